//! The coordinator's cluster side: the gRPC control service, the QUIC endpoint workers dial,
//! and the driver that runs the membership state machine and carries out its actions.
//!
//! [`Cluster::start`] binds one port number twice (TCP for gRPC, UDP for QUIC), creates or
//! loads the cluster CA and join token from the state directory, and returns a handle whose
//! [`Cluster::experts`] is the `RoutedExperts` the generation loop uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proto::control::{self, ConvertError};
use proto::grpc::{self, pb};
use proto::runtime::DataPlaneRuntime;
use proto::trust::{self, ClientAuth, ClusterCa, JoinToken, TlsIncoming};
use proto::wire::Dtype;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::membership::{self, Action, DrainError, Membership, Report, WorkerId};
use crate::meter::TokenMeter;
use crate::placement::LayerExperts;
use crate::remote::{RemoteConfig, RemoteExperts, Routes};
use crate::streaming::{Refusal, Streamable};

/// Heartbeat period asked of workers.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// How long a drained worker keeps its experts after the routes left it (requests already on
/// their way are still answered).
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// What the cluster side needs to start.
pub struct ClusterOptions {
    /// Address for both the gRPC (TCP) and QUIC (UDP) listeners; port 0 picks one.
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub min_workers: usize,
    /// The model's identity (workers' copies must match).
    pub model_name: String,
    pub model_fingerprint: String,
    /// `(layer, experts, bytes per expert)` of every MoE layer.
    pub layout: Vec<(usize, usize, u64)>,
    pub n_groups: usize,
    pub hidden: usize,
    pub dtype: Dtype,
    /// Silence after which a worker is declared lost.
    pub heartbeat_timeout: Duration,
    /// Copies of every routed expert to place (1: none spare; see `membership`).
    pub copies: usize,
    /// Longest wait for one layer's answers.
    pub request_timeout: Duration,
    /// Extra names (DNS or IP) for the coordinator's certificate.
    pub names: Vec<String>,
    /// Experts held by this process too (an in-process worker: no network hop).
    pub local: Option<LocalWorker>,
    /// The model, to stream routed experts to workers that have no copy of it;
    /// `None`: every worker needs its own copy (`--model`).
    pub model: Option<Arc<engine::model::ModelFile>>,
    /// The cluster's numerics, told to every worker in its hello: the activation format of
    /// quantized products.
    pub activations: engine::tensor::Activations,
    /// Where this process runs the always-active part, for the status ("cpu (8 threads, AVX2)").
    pub device: String,
    /// How long the data plane's thread polls for answers after each layer's requests go
    /// out, instead of sleeping (zero: it sleeps; see `proto::runtime::BusyPoll`).
    pub busy_poll: Duration,
}

pub use proto::control::MAX_FETCH;

/// Chunks a `FetchWeights` stream may have queued ahead of the network.
const FETCH_QUEUE: usize = 4;

/// The coordinator's own share of the experts.
pub struct LocalWorker {
    /// Bytes of memory for experts.
    pub memory: u64,
    /// Measured expert throughput, GB/s.
    pub speed: f64,
    pub model: Arc<engine::model::ModelFile>,
}

/// The in-process worker's name in membership and status.
pub const LOCAL_NAME: &str = "coordinator";

/// Extra facts about workers that membership does not need.
#[derive(Clone, Default)]
struct WorkerInfo {
    address: String,
    devices: Vec<control::DeviceInfo>,
    served: u64,
    /// Which hello this is (numbered over all workers): an assignment stream belongs to the
    /// session of the hello before it.
    session: u64,
}

struct Shared {
    ca: ClusterCa,
    opts: ClusterOptions,
    membership: Mutex<Membership>,
    info: Mutex<HashMap<WorkerId, WorkerInfo>>,
    /// Hellos so far (numbers the sessions).
    hellos: AtomicU64,
    assignments: Mutex<HashMap<WorkerId, watch::Sender<Option<control::Assignment>>>>,
    routes: Arc<Routes>,
    serving: watch::Sender<bool>,
    data_port: u16,
    experts: Arc<RemoteExperts>,
    /// The in-process worker: its id and `(generation, loaded)` of its assignment.
    local: Option<(WorkerId, Mutex<(u64, bool)>)>,
    /// The routed experts' pieces that may be streamed (none when none may).
    streams: Streamable,
    /// Why experts cannot be streamed, when they cannot.
    no_streams: Option<String>,
    /// Bytes of weights sent to workers by `FetchWeights`.
    fetched: AtomicU64,
    /// Tokens generated, for the status's tokens per second.
    tokens: Mutex<TokenMeter>,
}

/// A running cluster front: control plane, data plane, membership.
pub struct Cluster {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    pub token: JoinToken,
    experts: Arc<RemoteExperts>,
    dp: Arc<DataPlaneRuntime>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Cluster {
    /// Starts listening. Call from within a tokio runtime.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("creating {}", opts.state_dir.display()))?;
        let ca = ClusterCa::load_or_create(&opts.state_dir)?;
        let token = ca.join_token();
        let mut names = opts.names.clone();
        names.push(opts.listen.ip().to_string());
        let identity = ca.coordinator_identity(&names)?;

        let tcp = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("listening on {}", opts.listen))?;
        let addr = tcp.local_addr()?;
        // The QUIC endpoint (and so every worker's connection) runs on the data plane's own
        // thread, apart from the control plane and the API.
        let dp = Arc::new(DataPlaneRuntime::new().context("starting the data plane's thread")?);
        dp.set_busy_poll(opts.busy_poll);
        let quic = {
            let _in_dp = dp.handle().enter();
            trust::quic_endpoint(addr, Some(trust::quic_server_config(&identity)?))
                .with_context(|| format!("listening for QUIC on udp {addr}"))?
        };
        let tls = trust::server_config(&identity, ClientAuth::Optional)?;
        let incoming = TlsIncoming::new(tcp, Arc::new(tls))?;

        let layers = opts
            .layout
            .iter()
            .map(|&(layer, n, bytes)| LayerExperts {
                layer: layer as u32,
                n_experts: n as u32,
                expert_bytes: bytes,
                n_groups: if opts.n_groups > 0 && n % opts.n_groups == 0 {
                    opts.n_groups as u32
                } else {
                    1
                },
            })
            .collect();
        let mut membership = Membership::new(membership::Config {
            min_workers: opts.min_workers,
            heartbeat_timeout: opts.heartbeat_timeout,
            layers,
            drain_grace: DRAIN_GRACE,
            copies: opts.copies.max(1),
        });
        let local = opts.local.as_ref().map(|l| {
            let id = membership.handle_hello(
                Instant::now(),
                membership::Hello {
                    name: LOCAL_NAME.into(),
                    memory: l.memory,
                    speed: l.speed.max(1e-3),
                },
            );
            (id, Mutex::new((0, false)))
        });
        let first: Vec<Action> = std::iter::from_fn(|| membership.poll_action()).collect();
        let (streams, no_streams) = match &opts.model {
            None => (
                Streamable::default(),
                Some("the coordinator does not stream weights (started without its model)".into()),
            ),
            Some(m) => match m
                .expert_pieces()
                .map_err(|e| e.to_string())
                .and_then(|p| Streamable::new(&p))
            {
                Ok(s) => (s, None),
                Err(e) => {
                    tracing::warn!("workers without a copy of the model cannot join: {e}");
                    (Streamable::default(), Some(e))
                }
            },
        };
        let routes = Arc::new(Routes::default());
        let experts = Arc::new(RemoteExperts::new(
            dp.clone(),
            routes.clone(),
            RemoteConfig {
                hidden: opts.hidden,
                dtype: opts.dtype,
                timeout: opts.request_timeout,
            },
            None,
        ));
        let shared = Arc::new(Shared {
            ca,
            opts,
            membership: Mutex::new(membership),
            info: Mutex::new(HashMap::new()),
            hellos: AtomicU64::new(0),
            assignments: Mutex::new(HashMap::new()),
            routes,
            serving: watch::channel(false).0,
            data_port: addr.port(),
            experts: experts.clone(),
            local,
            streams,
            no_streams,
            fetched: AtomicU64::new(0),
            tokens: Mutex::new(TokenMeter::new(Instant::now())),
        });
        apply(&shared, first);

        let mut tasks = Vec::new();
        let svc = grpc::control_server(Service(shared.clone()));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!("control plane stopped: {e}");
            }
        }));
        // Accepted on the data plane's runtime: a connection's driver runs where it was
        // accepted.
        tasks.push(dp.handle().spawn(accept_quic(quic, shared.clone())));
        tasks.push(tokio::spawn(drive(shared.clone())));
        tracing::info!("cluster listening on {addr} (gRPC over TLS on tcp, QUIC on udp)");
        Ok(Cluster {
            shared,
            addr,
            token,
            experts,
            dp,
            tasks,
        })
    }

    /// The routed experts as the generation loop sees them.
    pub fn experts(&self) -> Arc<RemoteExperts> {
        self.experts.clone()
    }

    /// Another view of the same workers with vectors sent as `dtype` (the cluster's own view
    /// uses the `dtype` it was started with).
    pub fn experts_with(&self, dtype: Dtype) -> Arc<RemoteExperts> {
        Arc::new(RemoteExperts::new(
            self.dp.clone(),
            self.shared.routes.clone(),
            RemoteConfig {
                hidden: self.shared.opts.hidden,
                dtype,
                timeout: self.shared.opts.request_timeout,
            },
            None,
        ))
    }

    /// Waits until every expert is loaded somewhere (or `timeout` passes).
    pub async fn wait_serving(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.serving.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&s| s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn is_serving(&self) -> bool {
        *self.shared.serving.borrow()
    }

    /// Bytes of weights streamed to workers so far (`FetchWeights`).
    pub fn weight_bytes_served(&self) -> u64 {
        self.shared.fetched.load(Ordering::Relaxed)
    }

    /// Counts `n` generated tokens for the status's tokens per second (a short lock; callable
    /// from the generation thread once per decode step).
    pub fn record_tokens(&self, n: u64) {
        self.shared
            .tokens
            .lock()
            .expect("token meter lock")
            .record(Instant::now(), n);
    }

    /// The cluster as `cluster status` shows it.
    pub fn status(&self) -> control::ClusterStatus {
        status(&self.shared)
    }

    /// Data-plane statistics of every worker that has any, by name.
    pub fn worker_stats(&self) -> Vec<(String, Arc<crate::remote::WorkerStats>)> {
        let m = self.shared.membership.lock().expect("membership lock");
        m.workers()
            .filter_map(|w| Some((w.name.clone(), self.shared.routes.stats(w.id)?)))
            .collect()
    }
}

impl crate::api::ClusterView for Cluster {
    fn is_serving(&self) -> bool {
        Cluster::is_serving(self)
    }

    fn tokens_per_second(&self) -> f64 {
        tokens_per_second(&self.shared)
    }

    fn worker_stats(&self) -> Vec<(String, Arc<crate::remote::WorkerStats>)> {
        Cluster::worker_stats(self)
    }
}

/// Turns membership actions into messages, and keeps the data plane's routes current.
async fn drive(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let actions = {
            let mut m = shared.membership.lock().expect("membership lock");
            if let Some((id, st)) = &shared.local {
                let (generation, loaded) = *st.lock().expect("local lock");
                m.handle_report(
                    Instant::now(),
                    *id,
                    Report {
                        generation,
                        loaded,
                        done_bytes: 0,
                        total_bytes: 0,
                    },
                );
            }
            m.handle_tick(Instant::now());
            let acts: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
            acts
        };
        apply(&shared, actions);
    }
}

fn apply(shared: &Arc<Shared>, actions: Vec<Action>) {
    for a in actions {
        match a {
            Action::Assign {
                worker,
                generation,
                experts,
            } => {
                if let Some((id, st)) = &shared.local {
                    if *id == worker {
                        *st.lock().expect("local lock") = (generation, false);
                        load_local(shared, worker, generation, experts);
                        continue;
                    }
                }
                let pieces = experts
                    .iter()
                    .flat_map(|(layer, es)| shared.streams.pieces(*layer, es))
                    .collect();
                let n_experts = |layer: u32| {
                    shared
                        .opts
                        .layout
                        .iter()
                        .find(|&&(l, _, _)| l as u32 == layer)
                        .map_or(0, |&(_, n, _)| n as u32)
                };
                let assignment = control::Assignment {
                    generation,
                    model_fingerprint: shared.opts.model_fingerprint.clone(),
                    experts: experts
                        .into_iter()
                        .map(|(layer, experts)| control::LayerExperts {
                            layer,
                            experts,
                            n_experts: n_experts(layer),
                        })
                        .collect(),
                    pieces,
                };
                let mut g = shared.assignments.lock().expect("assignments lock");
                g.entry(worker)
                    .or_insert_with(|| watch::channel(None).0)
                    .send_replace(Some(assignment));
            }
            Action::Lost { worker, name } => {
                tracing::warn!(
                    "worker {worker} ({name}) lost: its experts go to their spare copies, or \
                     are unavailable where they have none"
                );
                // Requests on their way to it fail now and go to the spares, instead of
                // waiting for their deadline; it reconnects if it is still alive.
                shared.routes.close(worker, "declared lost");
            }
            Action::Left { worker, name } => {
                tracing::info!("worker {worker} ({name}) was drained and has left");
                let _ = shared.routes.disconnect(worker, None);
                shared.info.lock().expect("info lock").remove(&worker);
                // Ends its assignment stream.
                shared
                    .assignments
                    .lock()
                    .expect("assignments lock")
                    .remove(&worker);
            }
            Action::Routes => {
                let m = shared.membership.lock().expect("membership lock");
                for &(layer, _, _) in &shared.opts.layout {
                    if let Some(o) = m.layer_owners(layer as u32) {
                        shared.routes.set_owners(layer as u32, o.to_vec());
                    }
                    if let Some(h) = m.layer_holders(layer as u32) {
                        shared.routes.set_holders(layer as u32, h.to_vec());
                    }
                }
            }
            Action::PlanFailed(e) => tracing::error!("cannot place the experts: {e}"),
            Action::Planned {
                spares,
                without_spare,
            } => {
                if spares + without_spare > 0 {
                    tracing::info!(
                        "placed {spares} spare copies of experts; {without_spare} more found no \
                         memory (those experts stop with their worker)"
                    );
                }
            }
            Action::Serving(s) => {
                if s {
                    tracing::info!("every expert is loaded: serving");
                } else {
                    tracing::warn!("some experts are unavailable: requests will fail");
                }
                shared.serving.send_replace(s);
            }
        }
    }
}

/// Loads the in-process worker's assignment on a blocking thread, then reports it loaded.
fn load_local(shared: &Arc<Shared>, id: WorkerId, generation: u64, experts: Vec<(u32, Vec<u32>)>) {
    let Some(model) = shared.opts.local.as_ref().map(|l| l.model.clone()) else {
        return;
    };
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let filter = engine::model::weights::ExpertFilter::Only(
            experts
                .iter()
                .flat_map(|(l, es)| es.iter().map(move |&e| (*l as usize, e as usize)))
                .collect(),
        );
        match model.load_experts(&filter) {
            Ok(local) => {
                shared.experts.set_local(Some((id, Arc::new(local))));
                if let Some((_, st)) = &shared.local {
                    let mut g = st.lock().expect("local lock");
                    if g.0 == generation {
                        g.1 = true;
                    }
                }
                tracing::info!(
                    "this process holds {} experts itself",
                    experts.iter().map(|e| e.1.len()).sum::<usize>()
                );
            }
            Err(e) => tracing::error!("loading this process's own experts failed: {e}"),
        }
    });
}

/// Accepts workers' data-plane connections; the certificate names the worker.
async fn accept_quic(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("refused a data-plane connection: {e}");
                    return;
                }
            };
            let Some(peer) = trust::quic_peer_identity(&conn) else {
                conn.close(1u32.into(), b"no worker certificate");
                return;
            };
            let id = {
                let m = shared.membership.lock().expect("membership lock");
                let id = m.workers().find(|w| w.name == peer.name).map(|w| w.id);
                id
            };
            let Some(id) = id else {
                tracing::warn!("data-plane connection from {} before its hello", peer.name);
                conn.close(2u32.into(), b"say hello first");
                return;
            };
            shared.routes.connect(id, peer.name.clone(), conn.clone());
            let why = conn.closed().await;
            tracing::warn!("data plane of {} closed: {why}", peer.name);
            if !shared.routes.disconnect(id, Some(&conn)) {
                // An older connection of a worker that has reconnected since.
                return;
            }
            lose(&shared, id);
        });
    }
}

fn status(shared: &Shared) -> control::ClusterStatus {
    let m = shared.membership.lock().expect("membership lock");
    let info = shared.info.lock().expect("info lock");
    let layout: HashMap<u32, u64> = shared
        .opts
        .layout
        .iter()
        .map(|&(l, _, b)| (l as u32, b))
        .collect();
    let (experts_with_spare, experts) = m.redundancy();
    let workers = m
        .workers()
        .map(|w| {
            let i = info.get(&w.id).cloned().unwrap_or_default();
            let stats = shared.routes.stats(w.id);
            let (p50, p99) = stats
                .as_ref()
                .and_then(|s| s.rtt_percentiles())
                .unwrap_or((0, 0));
            let held: u64 = w.experts.iter().map(|(_, e)| e.len() as u64).sum();
            let used: u64 = w
                .experts
                .iter()
                .map(|(l, e)| e.len() as u64 * layout.get(l).copied().unwrap_or(0))
                .sum();
            let (state, load_percent) = match w.state {
                membership::WorkerState::Joining => (control::WorkerState::Joining, 0.0),
                membership::WorkerState::Loading { done, total } => (
                    control::WorkerState::Loading,
                    if total > 0 {
                        (done as f32 * 100.0 / total as f32).min(100.0)
                    } else {
                        0.0
                    },
                ),
                membership::WorkerState::Ready => (control::WorkerState::Ready, 100.0),
                membership::WorkerState::Draining => (control::WorkerState::Draining, 100.0),
                membership::WorkerState::Lost => (control::WorkerState::Offline, 0.0),
            };
            let dev = i.devices.first();
            control::WorkerStatus {
                id: w.id,
                name: w.name.clone(),
                address: i.address.clone(),
                backend: dev.map(|d| d.backend.clone()).unwrap_or_default(),
                gpu: dev.map(|d| d.name.clone()).unwrap_or_default(),
                memory_used_bytes: used,
                memory_total_bytes: w.memory,
                experts_held: held,
                spares_held: m.spares_held(w.id),
                layers: w.experts.iter().map(|(l, _)| *l).collect(),
                state,
                load_percent,
                rtt_p50_us: p50 as u64,
                rtt_p99_us: p99 as u64,
                requests_served: stats
                    .map(|s| s.requests.load(std::sync::atomic::Ordering::Relaxed))
                    .unwrap_or(i.served),
            }
        })
        .collect();
    control::ClusterStatus {
        model: shared.opts.model_name.clone(),
        all_placed: m.is_planned(),
        all_loaded: m.is_serving(),
        workers,
        tokens_per_second: tokens_per_second(shared),
        coordinator_device: shared.opts.device.clone(),
        activations: worker::numerics::to_wire(shared.opts.activations),
        copies: shared.opts.copies.max(1) as u32,
        experts,
        experts_with_spare,
    }
}

fn tokens_per_second(shared: &Shared) -> f64 {
    shared
        .tokens
        .lock()
        .expect("token meter lock")
        .rate(Instant::now())
}

struct Service(Arc<Shared>);

fn bad(e: ConvertError) -> Status {
    e.into_status()
}

impl Service {
    /// The calling worker's id: its certificate's name must be a known worker.
    fn caller<T>(&self, req: &Request<T>, claimed: Option<u64>) -> Result<WorkerId, Status> {
        let name = trust::peer_worker_name(req)
            .ok_or_else(|| Status::unauthenticated("a worker certificate is required"))?;
        let m = self.0.membership.lock().expect("membership lock");
        let w = m
            .workers()
            .find(|w| w.name == name)
            .ok_or_else(|| Status::failed_precondition("say hello first"))?;
        if claimed.is_some_and(|c| c != w.id) {
            return Err(Status::permission_denied(format!(
                "worker {name:?} is not worker {}",
                claimed.unwrap_or(0)
            )));
        }
        Ok(w.id)
    }
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// A worker's assignment stream, which lives as long as its session: when the stream is
/// dropped (its connection closed, as when the process dies) and the worker has not said hello
/// again since, it is lost at once, not after the heartbeat timeout, so its requests go to
/// spare copies without waiting.
struct Session {
    stream: BoxStream<pb::Assignment>,
    shared: Arc<Shared>,
    id: WorkerId,
    /// The worker's session when the stream was opened (see [`WorkerInfo::session`]).
    session: Option<u64>,
}

impl Shared {
    /// `id`'s current session, if it said hello.
    fn session(&self, id: WorkerId) -> Option<u64> {
        self.info
            .lock()
            .expect("info lock")
            .get(&id)
            .map(|i| i.session)
    }
}

impl tokio_stream::Stream for Session {
    type Item = Result<pb::Assignment, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A newer session has begun (or none was known), or there is no runtime left
        // (shutting down): nothing to do.
        if self.session.is_none()
            || self.shared.session(self.id) != self.session
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        tracing::warn!("worker {}'s control connection closed", self.id);
        lose(&self.shared, self.id);
    }
}

/// `id`'s connection is gone: membership marks it lost (a no-op if it is already) and the
/// driver carries out what follows.
fn lose(shared: &Arc<Shared>, id: WorkerId) {
    let actions = {
        let mut m = shared.membership.lock().expect("membership lock");
        m.handle_disconnect(Instant::now(), id);
        std::iter::from_fn(|| m.poll_action()).collect()
    };
    apply(shared, actions);
}

#[tonic::async_trait]
impl grpc::Control for Service {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let from = trust::peer_addr(&req)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let r = control::JoinRequest::try_from(req.into_inner()).map_err(bad)?;
        match self.0.ca.handle_join(&r) {
            Ok(reply) => {
                tracing::info!("worker {:?} joined from {from}", r.name);
                Ok(Response::new(reply.into()))
            }
            Err(e) => {
                tracing::warn!("refused a join of {:?} from {from}: {e}", r.name);
                Err(Status::permission_denied(e.to_string()))
            }
        }
    }

    async fn hello(
        &self,
        req: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloReply>, Status> {
        let name = trust::peer_worker_name(&req)
            .ok_or_else(|| Status::unauthenticated("a worker certificate is required"))?;
        let address = trust::peer_addr(&req)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let h = control::Hello::try_from(req.into_inner()).map_err(bad)?;
        if h.name != name {
            return Err(Status::permission_denied(format!(
                "certificate is for {name:?}, hello says {:?}",
                h.name
            )));
        }
        match &h.model_fingerprint {
            Some(fp) if *fp != self.0.opts.model_fingerprint => {
                tracing::warn!(
                    "worker {name:?} has model {fp}, the cluster serves {}",
                    self.0.opts.model_fingerprint
                );
                return Err(Status::failed_precondition(format!(
                    "this worker's model ({fp}) is not the cluster's ({})",
                    self.0.opts.model_fingerprint
                )));
            }
            None => {
                if let Some(why) = &self.0.no_streams {
                    tracing::warn!("worker {name:?} has no copy of the model: {why}");
                    return Err(Status::failed_precondition(format!(
                        "this worker has no copy of the model and {why}; start it with --model"
                    )));
                }
                tracing::info!(
                    "worker {name:?} has no copy of the model: its experts are streamed"
                );
            }
            _ => {}
        }
        let (id, actions) = {
            let mut m = self.0.membership.lock().expect("membership lock");
            let id = m.handle_hello(
                Instant::now(),
                membership::Hello {
                    name: h.name.clone(),
                    memory: h.memory_bytes,
                    speed: h.speed.max(1e-3),
                },
            );
            let acts: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
            (id, acts)
        };
        self.0.info.lock().expect("info lock").insert(
            id,
            WorkerInfo {
                address,
                devices: h.devices.clone(),
                served: 0,
                session: self.0.hellos.fetch_add(1, Ordering::Relaxed) + 1,
            },
        );
        apply(&self.0, actions);
        tracing::info!(
            "worker {id} ({name}) says hello: {:.1} GiB, {:.1} GB/s",
            h.memory_bytes as f64 / (1u64 << 30) as f64,
            h.speed
        );
        Ok(Response::new(
            control::HelloReply {
                worker_id: id,
                coordinator_version: env!("CARGO_PKG_VERSION").into(),
                data_port: self.0.data_port,
                activations: worker::numerics::to_wire(self.0.opts.activations),
            }
            .into(),
        ))
    }

    type AssignmentsStream = BoxStream<pb::Assignment>;

    async fn assignments(
        &self,
        req: Request<pb::AssignmentsRequest>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let claimed = req.get_ref().worker_id;
        let id = self.caller(&req, Some(claimed))?;
        let rx = {
            let mut g = self.0.assignments.lock().expect("assignments lock");
            g.entry(id)
                .or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        let stream = tokio_stream::wrappers::WatchStream::new(rx);
        let stream =
            tokio_stream::StreamExt::filter_map(stream, |a| a.map(|a| Ok(pb::Assignment::from(a))));
        let session = self.0.session(id);
        Ok(Response::new(Box::pin(Session {
            stream: Box::pin(stream),
            shared: self.0.clone(),
            id,
            session,
        })))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let claimed = req.get_ref().worker_id;
        let id = self.caller(&req, Some(claimed))?;
        let hb = control::Heartbeat::try_from(req.into_inner()).map_err(bad)?;
        let (actions, drain) = {
            let mut m = self.0.membership.lock().expect("membership lock");
            if m.worker(id)
                .is_some_and(|w| w.state == membership::WorkerState::Lost)
            {
                // Declared lost (silent too long): its experts may have moved. A new session
                // (hello, assignment) brings it back in.
                return Err(Status::failed_precondition(
                    "this worker was declared lost; reconnect and say hello again",
                ));
            }
            m.handle_report(
                Instant::now(),
                id,
                Report {
                    generation: hb.generation,
                    // A draining worker reports `Draining` once its assignment is loaded.
                    loaded: matches!(
                        hb.state,
                        control::WorkerState::Ready | control::WorkerState::Draining
                    ),
                    done_bytes: hb.load_done_bytes,
                    total_bytes: hb.load_total_bytes,
                },
            );
            let acts: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
            (acts, m.is_draining(id))
        };
        if let Some(i) = self.0.info.lock().expect("info lock").get_mut(&id) {
            i.served = hb.served_requests;
        }
        apply(&self.0, actions);
        Ok(Response::new(
            control::HeartbeatReply {
                interval: HEARTBEAT,
                drain,
            }
            .into(),
        ))
    }

    type FetchWeightsStream = BoxStream<pb::Chunk>;

    async fn fetch_weights(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let id = self.caller(&req, None)?;
        let r = control::FetchRequest::try_from(req.into_inner()).map_err(bad)?;
        if r.model_fingerprint != self.0.opts.model_fingerprint {
            return Err(Status::failed_precondition(format!(
                "model {} is not the cluster's ({})",
                r.model_fingerprint, self.0.opts.model_fingerprint
            )));
        }
        let (Some(model), None) = (&self.0.opts.model, &self.0.no_streams) else {
            return Err(Status::failed_precondition(
                self.0.no_streams.clone().unwrap_or_default(),
            ));
        };
        let served = |why: Refusal| {
            tracing::warn!("worker {id}: {why}");
            Status::permission_denied(why.to_string())
        };
        if !self.0.streams.serves(&r.tensor) {
            return Err(served(Refusal::NotServed(r.tensor)));
        }
        if r.length > MAX_FETCH {
            return Err(Status::invalid_argument(format!(
                "{} bytes asked, at most {MAX_FETCH} per call",
                r.length
            )));
        }
        let tensor = model
            .source
            .tensor(&r.tensor)
            .map_err(|e| Status::internal(e.to_string()))?
            .data;
        let end = r.offset + r.length; // checked by the conversion
        if end > tensor.len() as u64 {
            return Err(Status::out_of_range(format!(
                "bytes {}..{end} of {}: the tensor has {} bytes",
                r.offset,
                r.tensor,
                tensor.len()
            )));
        }
        // Only the caller's own experts: every byte must belong to an expert assigned to it.
        {
            let m = self.0.membership.lock().expect("membership lock");
            let held = |layer: u32, expert: u32| {
                m.worker(id).is_some_and(|w| {
                    w.experts
                        .iter()
                        .any(|(l, es)| *l == layer && es.contains(&expert))
                })
            };
            self.0
                .streams
                .check(&r.tensor, r.offset..end, held)
                .map_err(served)?;
        }
        let data = tensor
            .slice(r.offset as usize..end as usize)
            .ok_or_else(|| Status::internal("tensor data shorter than its table entry"))?;
        // Read, hash and send one chunk at a time from the mapping; the bounded channel keeps
        // at most a few chunks in memory whatever the range and the network speed.
        let (tx, rx) = tokio::sync::mpsc::channel(FETCH_QUEUE);
        let shared = self.0.clone();
        let base = r.offset;
        tokio::task::spawn_blocking(move || {
            let mut at = 0usize;
            while at < data.len() {
                let n = (data.len() - at).min(control::MAX_CHUNK);
                let chunk = control::Chunk {
                    offset: base + at as u64,
                    data: data[at..at + n].to_vec(),
                };
                if tx.blocking_send(Ok(pb::Chunk::from(chunk))).is_err() {
                    return; // the worker went away
                }
                shared.fetched.fetch_add(n as u64, Ordering::Relaxed);
                at += n;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        if trust::peer_identity(&req).is_none() {
            return Err(Status::unauthenticated("a cluster certificate is required"));
        }
        Ok(Response::new(status(&self.0).into()))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        let Some(peer) = trust::peer_identity(&req) else {
            return Err(Status::unauthenticated("a cluster certificate is required"));
        };
        if peer.role != trust::Role::Coordinator {
            return Err(Status::permission_denied(
                "only the operator may drain workers",
            ));
        }
        let id = req.into_inner().worker_id;
        let (result, actions) = {
            let mut m = self.0.membership.lock().expect("membership lock");
            let r = m.handle_drain(Instant::now(), id);
            let acts: Vec<Action> = std::iter::from_fn(|| m.poll_action()).collect();
            (r, acts)
        };
        apply(&self.0, actions);
        match result {
            Ok(()) => {
                tracing::info!("draining worker {id}");
                Ok(Response::new(pb::DrainReply { accepted: true }))
            }
            Err(e @ DrainError::Unknown(_)) => Err(Status::not_found(e.to_string())),
            Err(e) => {
                tracing::warn!("refused to drain worker {id}: {e}");
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }
}
