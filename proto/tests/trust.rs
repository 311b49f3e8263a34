//! The trust layer over real sockets on 127.0.0.1: join, mutual TLS on gRPC and QUIC, and
//! everything that must be refused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proto::control::{self, Assignment, Chunk, Hello, LayerExperts, WorkerState};
use proto::grpc::{control_server, pb, Control};
use proto::trust::{
    self, client_config, connect, peer_identity, peer_worker_name, quic_client_config,
    quic_peer_identity, quic_server_config, server_config, ClientAuth, ClusterCa, ConnectError,
    Identity, JoinToken, Role, TlsIncoming, Trust, Validity, WorkerKey, COORDINATOR_NAME,
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsv3-trust-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A minimal coordinator: `Join` through `ClusterCa::handle_join`, every other RPC requires a
/// worker certificate (Status also accepts the coordinator's own identity).
struct TestControl {
    ca: Arc<ClusterCa>,
    hellos: Arc<Mutex<Vec<String>>>,
}

fn require_worker<T>(request: &Request<T>) -> Result<String, Status> {
    peer_worker_name(request)
        .ok_or_else(|| Status::unauthenticated("a worker certificate of this cluster is required"))
}

type BoxStream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Control for TestControl {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let request = control::JoinRequest::try_from(request.into_inner())?;
        let reply = self.ca.handle_join(&request)?;
        Ok(Response::new(reply.into()))
    }

    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let peer = require_worker(&request)?;
        let hello = Hello::try_from(request.into_inner())?;
        if hello.name != peer {
            return Err(Status::permission_denied(format!(
                "certificate names {peer}, hello names {}",
                hello.name
            )));
        }
        self.hellos.lock().unwrap().push(peer);
        Ok(Response::new(
            control::HelloReply {
                worker_id: 42,
                coordinator_version: "test".into(),
                data_port: 4433,
                activations: Default::default(),
            }
            .into(),
        ))
    }

    type AssignmentsStream = BoxStream<pb::Assignment>;
    async fn assignments(
        &self,
        request: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        require_worker(&request)?;
        let a = Assignment {
            generation: 1,
            model_fingerprint: "m".into(),
            experts: vec![LayerExperts {
                layer: 3,
                experts: vec![1, 2],
                n_experts: 4,
            }],
            pieces: vec![],
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(a.into())]))))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        require_worker(&request)?;
        let hb = control::Heartbeat::try_from(request.into_inner())?;
        Ok(Response::new(
            control::HeartbeatReply {
                interval: Duration::from_millis(500),
                drain: hb.state == WorkerState::Draining,
            }
            .into(),
        ))
    }

    type FetchWeightsStream = BoxStream<pb::Chunk>;
    async fn fetch_weights(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        require_worker(&request)?;
        let r = control::FetchRequest::try_from(request.into_inner())?;
        let chunks: Vec<Result<pb::Chunk, Status>> =
            (0..r.length.div_ceil(control::MAX_CHUNK as u64))
                .map(|i| {
                    let start = r.offset + i * control::MAX_CHUNK as u64;
                    let len = (r.offset + r.length - start).min(control::MAX_CHUNK as u64);
                    Ok(Chunk {
                        offset: start,
                        data: vec![(i % 251) as u8; len as usize],
                    }
                    .into())
                })
                .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let peer = peer_identity(&request)
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        Ok(Response::new(
            control::ClusterStatus {
                model: format!("seen by {:?}", peer.role),
                all_placed: true,
                all_loaded: true,
                workers: vec![],
                tokens_per_second: 0.0,
                coordinator_device: String::new(),
                activations: Default::default(),
                copies: 1,
                experts: 0,
                experts_with_spare: 0,
            }
            .into(),
        ))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        require_worker(&request)?;
        Ok(Response::new(pb::DrainReply { accepted: true }))
    }
}

struct Coordinator {
    ca: Arc<ClusterCa>,
    addr: SocketAddr,
    rejected: Arc<AtomicU64>,
    hellos: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_coordinator(tag: &str) -> Coordinator {
    let dir = temp_dir(tag);
    let ca = Arc::new(ClusterCa::load_or_create(&dir).unwrap());
    let identity = ca.coordinator_identity(&["127.0.0.1".to_string()]).unwrap();
    let config = Arc::new(server_config(&identity, ClientAuth::Optional).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let incoming = TlsIncoming::new(listener, config).unwrap();
    let addr = incoming.local_addr();
    let rejected = incoming.rejected();
    let hellos = Arc::new(Mutex::new(Vec::new()));
    let service = TestControl {
        ca: ca.clone(),
        hellos: hellos.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(control_server(service))
            .serve_with_incoming(incoming),
    );
    Coordinator {
        ca,
        addr,
        rejected,
        hellos,
        dir,
    }
}

fn hello(name: &str) -> Hello {
    Hello {
        name: name.into(),
        devices: vec![],
        memory_bytes: 1 << 30,
        speed: 10.0,
        model_fingerprint: None,
        quic_ready: false,
        version: "test".into(),
    }
}

/// The worker's side of the join, as the daemon does it: only the printed token is known.
async fn join(addr: SocketAddr, token: &str, name: &str) -> Result<Identity, Status> {
    let token: JoinToken = token.parse().unwrap();
    let config = client_config(None, Trust::Fingerprint(token.ca_fingerprint)).unwrap();
    let channel = connect(&addr.to_string(), Arc::new(config)).await.unwrap();
    let key = WorkerKey::generate(name).unwrap();
    let request = control::JoinRequest {
        token_secret: token.secret,
        name: name.into(),
        csr_der: key.csr_der().to_vec(),
    };
    let reply = control::Client::new(channel)
        .join(request)
        .await
        .map_err(|e| match e {
            control::RpcError::Status(s) => s,
            other => panic!("{other}"),
        })?;
    Ok(key.into_identity(&reply, &token).unwrap())
}

async fn worker_channel(
    addr: SocketAddr,
    identity: &Identity,
) -> Result<tonic::transport::Channel, ConnectError> {
    let config = client_config(Some(identity), Trust::Ca(identity.ca_pem.clone())).unwrap();
    connect(&addr.to_string(), Arc::new(config)).await
}

/// A worker identity whose certificate the CA signed with `validity` (bypassing the checks of
/// `WorkerKey::into_identity`, as an attacker or a stale state directory would).
fn raw_identity(ca: &ClusterCa, name: &str, validity: Validity) -> Identity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key).unwrap();
    Identity {
        cert_chain_pem: ca.issue_worker(csr.der(), name, validity).unwrap(),
        key_pem: key.serialize_pem(),
        ca_pem: ca.cert_pem().to_string(),
    }
}

/// An RPC over a connection the server must refuse: fails at connect or at the first call.
async fn hello_result(addr: SocketAddr, identity: &Identity) -> Result<(), String> {
    let channel = worker_channel(addr, identity)
        .await
        .map_err(|e| e.to_string())?;
    control::Client::new(channel)
        .hello(hello("w"))
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

async fn wait_rejected(counter: &AtomicU64, at_least: u64) {
    for _ in 0..200 {
        if counter.load(Ordering::Relaxed) >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server did not count the refused handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_then_mutual_tls() {
    let coord = start_coordinator("join").await;
    let token = coord.ca.join_token().to_string();
    let identity = join(coord.addr, &token, "box-1").await.unwrap();
    assert_eq!(identity.peer_identity().unwrap().name, "box-1");
    assert_eq!(identity.peer_identity().unwrap().role, Role::Worker);
    assert_eq!(identity.ca_fingerprint().unwrap(), coord.ca.fingerprint());

    // The worker keeps its identity and uses it after a restart.
    let dir = temp_dir("worker-state");
    identity.save(&dir).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(Identity::exists(&dir));
    let identity = Identity::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let mut client = control::Client::new(worker_channel(coord.addr, &identity).await.unwrap());
    let reply = client.hello(hello("box-1")).await.unwrap();
    assert_eq!(reply.worker_id, 42);
    assert_eq!(*coord.hellos.lock().unwrap(), ["box-1"]);
    // A worker may not claim another name than its certificate's.
    let err = client.hello(hello("box-9")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let beat = client
        .heartbeat(control::Heartbeat {
            worker_id: 42,
            state: WorkerState::Draining,
            load_done_bytes: 0,
            load_total_bytes: 0,
            experts_loaded: 0,
            served_requests: 0,
            generation: 1,
        })
        .await
        .unwrap();
    assert!(beat.drain);

    // Server streaming works over the same channel, through the domain conversions.
    let mut stream = client.assignments(42).await.unwrap();
    let a: Assignment = stream.next().await.unwrap().unwrap();
    assert_eq!(a.experts[0].experts, [1, 2]);
    let request = control::FetchRequest {
        model_fingerprint: "m".into(),
        tensor: "t".into(),
        offset: 10,
        length: (control::MAX_CHUNK + 5) as u64,
    };
    let mut chunks = client.fetch_weights(request).await.unwrap();
    let mut total = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk: Chunk = chunk.unwrap();
        assert_eq!(chunk.offset, 10 + total as u64);
        total += chunk.data.len();
    }
    assert_eq!(total, control::MAX_CHUNK + 5);

    // The coordinator's own identity works as a client too (the `cluster` CLI), as role
    // coordinator: not a worker.
    let cli = coord.ca.coordinator_identity(&[]).unwrap();
    let mut cli_client = control::Client::new(worker_channel(coord.addr, &cli).await.unwrap());
    let status = cli_client.status().await.unwrap();
    assert_eq!(status.model, "seen by Coordinator");
    let err = cli_client.drain(42).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(coord.rejected.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused() {
    let coord = start_coordinator("secret").await;
    let mut token = coord.ca.join_token();
    token.secret[0] ^= 1;
    let err = join(coord.addr, &token.to_string(), "box-2")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("secret is wrong"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_with_another_ca_is_not_trusted() {
    let coord = start_coordinator("fp").await;
    let other_dir = temp_dir("fp-other");
    let other = ClusterCa::load_or_create(&other_dir).unwrap();
    let config = client_config(None, Trust::Fingerprint(other.fingerprint())).unwrap();
    let err = connect(&coord.addr.to_string(), Arc::new(config))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::UntrustedCa(_)), "{err:?}");
    assert!(err.to_string().contains("join token"), "{err}");

    // Trusting the other CA's certificate itself fails too, as a certificate error.
    let config = client_config(None, Trust::Ca(other.cert_pem().to_string())).unwrap();
    let err = connect(&coord.addr.to_string(), Arc::new(config))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Tls(rustls::Error::InvalidCertificate(_))),
        "{err:?}"
    );
    std::fs::remove_dir_all(&other_dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_without_client_certificate_is_refused() {
    let coord = start_coordinator("nocert").await;
    let config = client_config(None, Trust::Ca(coord.ca.cert_pem().to_string())).unwrap();
    let channel = connect(&coord.addr.to_string(), Arc::new(config))
        .await
        .unwrap();
    let err = control::Client::new(channel)
        .hello(hello("box-3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() {
    let coord = start_coordinator("expired").await;
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let expired = raw_identity(
        &coord.ca,
        "old",
        Validity {
            not_before: now - 3 * day,
            not_after: now - day,
        },
    );
    let err = hello_result(coord.addr, &expired).await.unwrap_err();
    wait_rejected(&coord.rejected, 1).await;
    assert!(coord.hellos.lock().unwrap().is_empty(), "{err}");

    // The same CA with a valid certificate is accepted (the refusal was the date).
    let fresh = raw_identity(&coord.ca, "w", Validity::days(1));
    hello_result(coord.addr, &fresh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_of_another_ca_is_refused() {
    let coord = start_coordinator("foreign").await;
    let other_dir = temp_dir("foreign-other");
    let other = ClusterCa::load_or_create(&other_dir).unwrap();
    let mut foreign = raw_identity(&other, "w", Validity::days(1));
    // It trusts the right coordinator, but its own certificate is from elsewhere.
    foreign.ca_pem = coord.ca.cert_pem().to_string();
    let err = hello_result(coord.addr, &foreign).await.unwrap_err();
    wait_rejected(&coord.rejected, 1).await;
    assert!(coord.hellos.lock().unwrap().is_empty(), "{err}");
    std::fs::remove_dir_all(&other_dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// QUIC

struct QuicServer {
    addr: SocketAddr,
    /// Names of the peers whose connections completed, in order.
    accepted: Arc<Mutex<Vec<String>>>,
    _endpoint: quinn::Endpoint,
}

fn quic_server(ca: &ClusterCa) -> QuicServer {
    let identity = ca.coordinator_identity(&[]).unwrap();
    let endpoint = trust::quic_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        Some(quic_server_config(&identity).unwrap()),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let (ep, acc) = (endpoint.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let peer = quic_peer_identity(&conn).expect("a verified peer");
                acc.lock().unwrap().push(peer.name.clone());
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let msg = recv.read_to_end(1 << 16).await.unwrap();
                    let mut reply = format!("{}:", peer.name).into_bytes();
                    reply.extend_from_slice(&msg);
                    send.write_all(&reply).await.unwrap();
                    send.finish().unwrap();
                }
            });
        }
    });
    QuicServer {
        addr,
        accepted,
        _endpoint: endpoint,
    }
}

async fn quic_exchange(addr: SocketAddr, config: quinn::ClientConfig) -> Result<Vec<u8>, String> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let result = async {
        let conn = endpoint
            .connect_with(config, addr, COORDINATOR_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"ping").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    endpoint.close(0u32.into(), b"done");
    result
}

/// Both ends accept big datagrams, so on loopback (MTU 64 KiB) path MTU discovery climbs far
/// past Ethernet's 1452 and a big message crosses in a fraction of the datagrams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_discovers_big_datagrams_on_loopback() {
    let dir = temp_dir("quic-mtu");
    let ca = ClusterCa::load_or_create(&dir).unwrap();
    let server = quic_server(&ca);
    let worker = raw_identity(&ca, "box-m", Validity::days(1));
    let mut endpoint = trust::quic_endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap();
    endpoint.set_default_client_config(quic_client_config(&worker, ca.cert_pem()).unwrap());
    let conn = endpoint
        .connect(server.addr, COORDINATOR_NAME)
        .unwrap()
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    while conn.stats().path.current_mtu < 9000 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "MTU stuck at {}",
            conn.stats().path.current_mtu
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(conn.stats().path.current_mtu <= trust::QUIC_MAX_UDP_PAYLOAD);
    let before = conn.stats().udp_tx.datagrams;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // 56 KiB: at least 40 datagrams of 1452 bytes; with 9000 or more, 7 plus a few for
    // acknowledgements and discovery probes still in flight.
    send.write_all(&[7u8; 56 << 10]).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 17).await.unwrap();
    assert_eq!(reply.len(), "box-m:".len() + (56 << 10));
    let sent = conn.stats().udp_tx.datagrams - before;
    assert!(sent <= 16, "{sent} datagrams for 56 KiB");
    endpoint.close(0u32.into(), b"done");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_requires_a_certificate_of_the_cluster() {
    let dir = temp_dir("quic");
    let ca = ClusterCa::load_or_create(&dir).unwrap();
    let server = quic_server(&ca);

    let worker = raw_identity(&ca, "box-q", Validity::days(1));
    let reply = quic_exchange(
        server.addr,
        quic_client_config(&worker, ca.cert_pem()).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(reply, b"box-q:ping");

    // No client certificate: same trust, no identity.
    let mut tls = client_config(None, Trust::Ca(ca.cert_pem().to_string())).unwrap();
    tls.alpn_protocols = vec![trust::ALPN_DATA.to_vec()];
    let no_cert = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let err = quic_exchange(server.addr, no_cert).await.unwrap_err();
    assert!(!err.is_empty());

    // A certificate of another CA.
    let other_dir = temp_dir("quic-other");
    let other = ClusterCa::load_or_create(&other_dir).unwrap();
    let foreign = raw_identity(&other, "intruder", Validity::days(1));
    let err = quic_exchange(
        server.addr,
        quic_client_config(&foreign, ca.cert_pem()).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(!err.is_empty());

    // An expired certificate of the right CA.
    let now = SystemTime::now();
    let expired = raw_identity(
        &ca,
        "old",
        Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    quic_exchange(
        server.addr,
        quic_client_config(&expired, ca.cert_pem()).unwrap(),
    )
    .await
    .unwrap_err();

    assert_eq!(*server.accepted.lock().unwrap(), ["box-q"]);
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other_dir).unwrap();
}
