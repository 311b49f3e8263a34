//! The worker's data plane over real QUIC with mutual TLS on loopback: a well-formed request
//! gets the experts' partial sum (the same bits as evaluating them in this process, with f32
//! on the wire), for a decode step's tokens and for a larger batch; a malformed stream (bytes
//! after its frame, a header announcing an oversized body, a bad magic) gets an error frame
//! with `BAD_REQUEST` and is counted, and the connection keeps serving.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::model::moe::{MoeScratch, Pair};
use engine::model::weights::ExpertFilter;
use engine::model::ModelFile;
use engine::synth::{write_model, SynthSpec};
use proto::control::JoinReply;
use proto::trust::{self, ClusterCa, Validity, WorkerKey};
use proto::wire::{code, Dtype, ExpertRequest, Frame, HEADER_LEN};
use tokio::sync::watch;
use worker::compute::{Executor, INLINE_TOKENS};
use worker::dataplane::{serve, Stats};

/// Sends `bytes` on a new stream, ends it, and decodes the one frame that comes back.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Frame {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(1 << 22))
        .await
        .expect("no answer within 30 s")
        .unwrap();
    Frame::decode_all(&answer).unwrap()
}

/// A request for `layer` (f32 on the wire) whose token `t` has hidden vector `xs[t]` and the
/// (expert, weight) pairs `choices[t]`, and the partial sums `experts` give it in this process.
fn request_and_want(
    experts: &engine::model::moe::LocalExperts,
    request_id: u64,
    layer: usize,
    hidden: usize,
    xs: &[f32],
    choices: &[Vec<(u16, f32)>],
) -> (ExpertRequest, Vec<f32>) {
    let req = ExpertRequest {
        request_id,
        layer: layer as u32,
        hidden,
        dtype: Dtype::F32,
        counts: choices.iter().map(|c| c.len() as u8).collect(),
        experts: choices.iter().flatten().map(|&(e, _)| e).collect(),
        weights: choices.iter().flatten().map(|&(_, w)| w).collect(),
        xs: xs.to_vec(),
    };
    let pairs: Vec<Pair> = choices
        .iter()
        .enumerate()
        .flat_map(|(t, c)| {
            c.iter().map(move |&(e, weight)| Pair {
                token: t as u32,
                expert: e as u32,
                weight,
            })
        })
        .collect();
    let mut want = vec![0f32; xs.len()];
    experts
        .eval_pairs(layer, xs, &pairs, &mut want, &mut MoeScratch::default())
        .unwrap();
    (req, want)
}

fn assert_refused(f: Frame, what: &str) {
    match f {
        Frame::Error(e) => assert_eq!(e.code, code::BAD_REQUEST, "{what}: {}", e.message),
        other => panic!("{what}: answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_and_malformed_streams_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let token = ca.join_token();
    let server = ca.coordinator_identity(&["127.0.0.1".into()]).unwrap();
    let key = WorkerKey::generate("w1").unwrap();
    let cert = ca
        .issue_worker(key.csr_der(), "w1", Validity::days(1))
        .unwrap();
    let id = key
        .into_identity(
            &JoinReply {
                worker_cert_pem: cert,
                ca_cert_pem: ca.cert_pem().to_string(),
            },
            &token,
        )
        .unwrap();

    let path = dir.path().join("tiny.gguf");
    write_model(&path, &SynthSpec::tiny()).unwrap();
    let mf = ModelFile::open(&path).unwrap();
    let layer = mf.expert_layout().unwrap()[0].0;
    let experts = Arc::new(mf.load_experts(&ExpertFilter::All).unwrap());
    let hidden = experts.hidden;
    let (_keep, loaded) = watch::channel(Some(Executor::start(experts.clone())));
    let stats = Arc::new(Stats::default());

    // The coordinator's end listens; the worker dials it and serves on that connection.
    let endpoint = trust::quic_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(trust::quic_server_config(&server).unwrap()),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let mut wend = trust::quic_endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    wend.set_default_client_config(trust::quic_client_config(&id, &id.ca_pem).unwrap());
    let (dialled, accepted) = tokio::join!(
        async {
            wend.connect(addr, trust::COORDINATOR_NAME)
                .unwrap()
                .await
                .unwrap()
        },
        async { endpoint.accept().await.unwrap().await.unwrap() }
    );
    tokio::spawn(serve(dialled, loaded, stats.clone(), None));
    let conn = accepted;

    let xs: Vec<f32> = (0..hidden)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05)
        .collect();
    // A request: the partial sum this process computes from the same experts.
    let (req, want) = request_and_want(
        &experts,
        7,
        layer,
        hidden,
        &xs,
        &[vec![(0, 0.75), (3, 0.25)]],
    );
    let mut good = Vec::new();
    req.encode(&mut good).unwrap();
    match exchange(&conn, &good).await {
        Frame::Result(r) => {
            assert_eq!(r.request_id, 7);
            assert_eq!(r.ys, want);
            assert!(want.iter().any(|&v| v != 0.0));
        }
        other => panic!("a good request answered {other:?}"),
    }

    // Bytes after the stream's one frame.
    let mut trailing = good.clone();
    trailing.push(0);
    assert_refused(exchange(&conn, &trailing).await, "a trailing byte");
    // A header announcing a body past the limit: refused before anything is allocated.
    let mut huge = good[..HEADER_LEN].to_vec();
    huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_refused(exchange(&conn, &huge).await, "an oversized body");
    // Not a frame at all.
    let mut magic = good.clone();
    magic[..4].copy_from_slice(b"HTTP");
    assert_refused(exchange(&conn, &magic).await, "a bad magic");

    // The connection still serves.
    assert!(matches!(exchange(&conn, &good).await, Frame::Result(_)));

    // A batch larger than a decode step's (computed off the data plane's thread): each token
    // its own pair of experts, the same bits as in this process.
    let n = INLINE_TOKENS + 5;
    let big_xs: Vec<f32> = (0..n * hidden)
        .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.03)
        .collect();
    let choices: Vec<Vec<(u16, f32)>> = (0..n)
        .map(|t| vec![((t % 4) as u16, 0.5), (4 + (t % 3) as u16, 0.01 * t as f32)])
        .collect();
    let (big, want) = request_and_want(&experts, 8, layer, hidden, &big_xs, &choices);
    let mut bytes = Vec::new();
    big.encode(&mut bytes).unwrap();
    match exchange(&conn, &bytes).await {
        Frame::Result(r) => {
            assert_eq!(r.request_id, 8);
            assert_eq!(r.ys, want);
            assert!(want.chunks(hidden).all(|row| row.iter().any(|&v| v != 0.0)));
        }
        other => panic!("a large request answered {other:?}"),
    }

    let t0 = Instant::now();
    while stats.served.load(Ordering::Relaxed) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.bad_frames.load(Ordering::Relaxed), 3, "{stats:?}");
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0, "{stats:?}");
}
