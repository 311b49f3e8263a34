//! TLS under tonic: a server-side stream of verified connections for `serve_with_incoming`, the
//! peer's identity in each request, and a client-side connector.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::Stream;

use super::tls::{peer_identity_of_cert, ConnectError, PeerIdentity, Role};
use super::COORDINATOR_NAME;

/// Longest TLS handshake a server waits for before dropping the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once; further connections wait in the accept queue.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshaken connections waiting for tonic to take them.
const ACCEPTED_QUEUE: usize = 32;

/// What a request knows about its connection: available as a request extension
/// (`request.extensions().get::<PeerInfo>()`), see [`peer_identity`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// The verified client certificate's identity; `None` when the client sent none.
    pub identity: Option<PeerIdentity>,
}

/// A TLS connection accepted by [`TlsIncoming`]; tonic's `Connected` gives each request its
/// [`PeerInfo`].
pub struct TlsServerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsServerStream {
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl tonic::transport::server::Connected for TlsServerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsServerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsServerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The TLS connections of a TCP listener, for
/// `tonic::transport::Server::builder().add_service(..).serve_with_incoming(incoming)`.
///
/// A background task accepts TCP connections and runs each handshake in its own task (at most
/// [`MAX_PENDING_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]). A failed handshake
/// (no or invalid client certificate where one is required, another CA, expired, not TLS) is
/// logged with the peer's address and the reason, counted ([`TlsIncoming::rejected`]), and never
/// reaches tonic. Dropping the stream stops the task.
pub struct TlsIncoming {
    rx: mpsc::Receiver<Result<TlsServerStream, io::Error>>,
    local_addr: SocketAddr,
    rejected: Arc<AtomicU64>,
}

impl TlsIncoming {
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<TlsIncoming> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        let rejected = Arc::new(AtomicU64::new(0));
        tokio::spawn(accept_loop(listener, config, tx, rejected.clone()));
        Ok(TlsIncoming {
            rx,
            local_addr,
            rejected,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A counter of refused handshakes, still readable after the stream moved into tonic.
    pub fn rejected(&self) -> Arc<AtomicU64> {
        self.rejected.clone()
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsServerStream, io::Error>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

async fn accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    tx: mpsc::Sender<Result<TlsServerStream, io::Error>>,
    rejected: Arc<AtomicU64>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote_addr) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("control plane: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let rejected = rejected.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            let stream = match result {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "control plane: refused {remote_addr}: TLS handshake failed: {e}"
                    );
                    return;
                }
                Err(_) => {
                    rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "control plane: refused {remote_addr}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                    );
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(peer_identity_of_cert);
            let info = PeerInfo {
                remote_addr,
                identity,
            };
            let _ = tx
                .send(Ok(TlsServerStream {
                    inner: stream,
                    info,
                }))
                .await;
        });
    }
}

/// The verified client identity of the connection a request came on; `None` without a client
/// certificate (or when the server does not use [`TlsIncoming`]).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.clone())
}

/// The address the request's connection came from (tonic's own `remote_addr` does not know
/// [`TlsIncoming`]'s connections).
pub fn peer_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.remote_addr)
}

/// The name of the worker on the other side, when it presented a valid worker certificate.
/// Every RPC but `Join` starts with this (or [`peer_identity`] for the CLI's coordinator role):
///
/// ```ignore
/// let name = peer_worker_name(&request)
///     .ok_or_else(|| Status::unauthenticated("a worker certificate is required"))?;
/// ```
pub fn peer_worker_name<T>(request: &tonic::Request<T>) -> Option<String> {
    peer_identity(request)
        .filter(|p| p.role == Role::Worker)
        .map(|p| p.name)
}

/// Connects to the coordinator's control plane at `addr` (`host:port`) over TLS with `config`
/// (from [`super::client_config`]), checking the server name [`COORDINATOR_NAME`], and returns
/// a tonic channel (HTTP/2, ALPN `h2`). The channel reconnects through the same TLS connector
/// when the connection drops. Handshake failures come back typed: a coordinator with another CA
/// as [`ConnectError::UntrustedCa`], other certificate problems as [`ConnectError::Tls`].
///
/// With TLS 1.3 the server checks the client's certificate after the client considers the
/// handshake done, so a client certificate the server refuses may surface as a failed first
/// RPC rather than here.
pub async fn connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, ConnectError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::Address(addr.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let connector = tokio_rustls::TlsConnector::from(config);
    let server_name = ServerName::try_from(COORDINATOR_NAME).expect("a valid DNS name");
    let target = addr.to_string();
    let service = tower::service_fn(move |_uri: http_uri::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(service)
        .await
        .map_err(ConnectError::classify)
}

mod http_uri {
    pub use tonic::codegen::http::Uri;
}
