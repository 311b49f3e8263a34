//! The worker's side of the data plane: the coordinator opens one bidirectional QUIC stream per
//! MoE-layer batch on the connection this worker dialled; each carries one request frame and
//! gets one result (or error) frame back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::runtime::BusyPoll;
use proto::stream::{read_only_frame, write_bytes, StreamError};
use proto::wire::{code, ErrorFrame, Frame};

use tokio::sync::watch;

use crate::compute::Executor;

/// Counters of the data plane, for heartbeats and logs.
#[derive(Default, Debug)]
pub struct Stats {
    pub served: AtomicU64,
    pub failed: AtomicU64,
    /// Streams closed because of a malformed or oversized frame.
    pub bad_frames: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// Serves requests on `conn` until it closes, with whatever executor `exec` holds at the time
/// of each request (none yet: requests are refused as not held); returns why it closed.
///
/// With `poll`, the data plane's thread keeps polling for the busy-poll window after each
/// answer (the next layer's request follows within a token's time).
pub async fn serve(
    conn: quinn::Connection,
    exec: watch::Receiver<Option<Executor>>,
    stats: Arc<Stats>,
    poll: Option<BusyPoll>,
) -> quinn::ConnectionError {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let exec = exec.borrow().clone();
                let stats = stats.clone();
                let poll = poll.clone();
                tokio::spawn(async move {
                    handle(send, recv, exec, stats).await;
                    if let Some(p) = poll {
                        p.touch();
                    }
                });
            }
            Err(e) => return e,
        }
    }
}

async fn handle(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    exec: Option<Executor>,
    stats: Arc<Stats>,
) {
    let mut out = Vec::new();
    match read_only_frame(&mut recv).await {
        Ok(Frame::Request(req)) => {
            let bytes = req.xs.len() * req.dtype.size() + req.experts.len() * 6;
            stats.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
            let answer = match exec {
                Some(exec) => exec.eval(req).await,
                None => Err(ErrorFrame {
                    request_id: req.request_id,
                    code: code::NOT_HELD,
                    message: "no experts loaded yet".into(),
                }),
            };
            match answer {
                Ok(res) => match res.encode(&mut out) {
                    Ok(()) => {
                        stats.served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        out.clear();
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        ErrorFrame {
                            request_id: res.request_id,
                            code: code::INTERNAL,
                            message: e.to_string(),
                        }
                        .encode(&mut out);
                    }
                },
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(code = e.code, "request refused: {}", e.message);
                    e.encode(&mut out);
                }
            }
        }
        Ok(other) => {
            stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            ErrorFrame {
                request_id: other.request_id(),
                code: code::BAD_REQUEST,
                message: "expected a request frame".into(),
            }
            .encode(&mut out);
        }
        Err(StreamError::Closed) => return,
        Err(e) => {
            stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("closing a data-plane stream: {e}");
            ErrorFrame {
                request_id: 0,
                code: code::BAD_REQUEST,
                message: e.to_string(),
            }
            .encode(&mut out);
            let _ = write_bytes(&mut send, &out).await;
            let _ = send.finish();
            let _ = recv.stop(quinn::VarInt::from_u32(code::BAD_REQUEST));
            return;
        }
    }
    stats
        .bytes_out
        .fetch_add(out.len() as u64, Ordering::Relaxed);
    if write_bytes(&mut send, &out).await.is_ok() {
        let _ = send.finish();
    }
}
