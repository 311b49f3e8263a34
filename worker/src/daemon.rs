//! The worker daemon: join once, then keep a session with the coordinator alive for ever.
//!
//! A session: connect the control plane (mutual TLS), say hello, dial the coordinator's QUIC
//! port, then at the same time (1) follow the assignment stream, loading each new assignment's
//! experts, (2) send heartbeats with the load progress, (3) serve data-plane requests with the
//! experts loaded so far. When any of the three ends (the coordinator restarted, the network
//! went away), the session ends and a new one starts after a backoff (0.5 s doubling to 10 s).
//! Loaded experts survive sessions: an assignment equal to what is loaded is ready at once.

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use engine::model::moe::LocalExperts;
use engine::model::weights::ExpertFilter;
use engine::model::ModelFile;
use proto::control::{self, Assignment, Heartbeat, Hello, JoinRequest, WorkerState};
use proto::runtime::DataPlaneRuntime;
use proto::trust::{self, Identity, JoinToken, Trust, WorkerKey};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use crate::cache::{self, Cache};
use crate::compute::{Compute, Executor};
use crate::dataplane::{self, Stats};

/// Everything the daemon is started with.
pub struct Options {
    /// `host:port` of the coordinator's control plane (its QUIC port is learnt at hello).
    pub coordinator: String,
    pub token: Option<JoinToken>,
    pub name: String,
    pub model: Option<Arc<ModelFile>>,
    /// Bytes usable for experts.
    pub memory: u64,
    /// Measured expert throughput (GB/s of weights).
    pub speed: f64,
    pub state_dir: PathBuf,
    /// Where weights streamed from the coordinator are kept (when there is no `model`).
    pub cache_dir: PathBuf,
    pub devices: Vec<control::DeviceInfo>,
    /// The GPU the experts are computed on (`None`: the CPU backend).
    pub gpu: Option<Arc<engine::gpu::GpuContext>>,
    /// How long the data plane's thread polls for the next request after each answer
    /// instead of sleeping (zero: it sleeps; see `proto::runtime::BusyPoll`).
    pub busy_poll: Duration,
}

/// Tokens per pass of the GPU expert kernels (larger batches take several passes).
const GPU_MAX_TOKENS: usize = 64;

/// Progress and counters, read by heartbeats.
#[derive(Default)]
struct Progress {
    state: Mutex<Option<WorkerState>>,
    generation: AtomicU64,
    done: AtomicU64,
    total: AtomicU64,
    experts: AtomicU64,
    /// The coordinator is draining this worker (from the heartbeat replies).
    draining: std::sync::atomic::AtomicBool,
}

/// Loads the identity from `state_dir`, joining with the token first if there is none.
pub async fn ensure_identity(opts: &Options) -> Result<Identity> {
    if Identity::exists(&opts.state_dir) {
        return Identity::load(&opts.state_dir)
            .with_context(|| format!("reading the identity in {}", opts.state_dir.display()));
    }
    let token = opts.token.as_ref().ok_or_else(|| {
        anyhow!(
            "no identity in {} and no --join-token: this worker has not joined a cluster yet",
            opts.state_dir.display()
        )
    })?;
    join(
        &opts.coordinator,
        token,
        &opts.name,
        &opts.state_dir,
        JoinRetry::Wait,
    )
    .await
}

/// What [`join`] does while the coordinator cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinRetry {
    /// Retry with backoff (0.5 s doubling to 10 s): a daemon started before its coordinator.
    Wait,
    /// Fail at once (a command a person is waiting for).
    Fail,
}

/// Joins the cluster at `coordinator` (`host:port`) as `name`: a fresh key and CSR, trusting
/// only the CA that `token` names; saves the identity in `state_dir`. A coordinator with
/// another CA or a refused join is an error at once.
pub async fn join(
    coordinator: &str,
    token: &JoinToken,
    name: &str,
    state_dir: &Path,
    retry: JoinRetry,
) -> Result<Identity> {
    let key = WorkerKey::generate(name)?;
    let tls = Arc::new(trust::client_config(
        None,
        Trust::Fingerprint(token.ca_fingerprint),
    )?);
    let mut backoff = Duration::from_millis(500);
    let channel = loop {
        match trust::connect(coordinator, tls.clone()).await {
            Ok(c) => break c,
            Err(
                e @ (trust::ConnectError::UntrustedCa(_)
                | trust::ConnectError::Tls(_)
                | trust::ConnectError::Address(_)),
            ) => {
                return Err(anyhow!(e).context(format!("joining {coordinator}")));
            }
            Err(e) if retry == JoinRetry::Fail => {
                return Err(anyhow!(e).context(format!("joining {coordinator}")));
            }
            Err(e) => {
                tracing::warn!("cannot reach {coordinator} yet ({e}); retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    let mut client = control::Client::new(channel);
    let reply = client
        .join(JoinRequest {
            token_secret: token.secret,
            name: name.to_string(),
            csr_der: key.csr_der().to_vec(),
        })
        .await
        .map_err(|e| anyhow!("the coordinator refused the join: {e}"))?;
    let identity = key.into_identity(&reply, token)?;
    identity.save(state_dir)?;
    tracing::info!(
        "joined the cluster at {coordinator}; identity saved in {}",
        state_dir.display()
    );
    Ok(identity)
}

/// Runs sessions for ever (until the process is stopped).
pub async fn run(opts: Options, identity: Identity) -> Result<()> {
    let opts = Arc::new(opts);
    let loaded: Arc<watch::Sender<Option<Executor>>> = Arc::new(watch::channel(None).0);
    let stats = Arc::new(Stats::default());
    let dp = DataPlaneRuntime::new().context("starting the data plane's thread")?;
    dp.set_busy_poll(opts.busy_poll);
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = std::time::Instant::now();
        match session(&opts, &identity, &dp, &loaded, &stats).await {
            Ok(()) => tracing::warn!("the coordinator closed the session"),
            Err(e) => tracing::warn!("session with {} ended: {e:#}", opts.coordinator),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        tracing::info!("reconnecting in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn session(
    opts: &Arc<Options>,
    identity: &Identity,
    dp: &DataPlaneRuntime,
    loaded: &Arc<watch::Sender<Option<Executor>>>,
    stats: &Arc<Stats>,
) -> Result<()> {
    let tls = trust::client_config(Some(identity), Trust::Ca(identity.ca_pem.clone()))?;
    let channel = trust::connect(&opts.coordinator, Arc::new(tls)).await?;
    let mut client = control::Client::new(channel);
    let hello = client
        .hello(Hello {
            name: opts.name.clone(),
            devices: opts.devices.clone(),
            memory_bytes: opts.memory,
            speed: opts.speed,
            model_fingerprint: opts.model.as_ref().map(|m| m.fingerprint()),
            quic_ready: true,
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .await
        .map_err(|e| anyhow!("hello refused: {e}"))?;
    let worker_id = hello.worker_id;
    // The coordinator sets the cluster's numerics; a restarted coordinator may change them.
    engine::tensor::set_activations(crate::numerics::from_wire(hello.activations));
    tracing::info!(
        "connected to {} as worker {worker_id} ({} activations)",
        opts.coordinator,
        hello.activations.as_str()
    );

    // The data plane: dial the coordinator's QUIC port on the same host.
    let host = opts
        .coordinator
        .to_socket_addrs()
        .context("resolving the coordinator")?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", opts.coordinator))?;
    let data_addr = SocketAddr::new(host.ip(), hello.data_port);
    let bind: SocketAddr = if host.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    // The endpoint is made on the data plane's runtime, so its connection runs there too.
    let quic_client = trust::quic_client_config(identity, &identity.ca_pem)?;
    let (_endpoint, conn) = dp
        .spawn(async move {
            let mut endpoint = trust::quic_endpoint(bind, None)?;
            endpoint.set_default_client_config(quic_client);
            let conn = endpoint
                .connect(data_addr, trust::COORDINATOR_NAME)?
                .await
                .with_context(|| format!("dialling the data plane at {data_addr}"))?;
            anyhow::Ok((endpoint, conn))
        })
        .await
        .map_err(|e| anyhow!("the data plane's task: {e}"))??;

    let progress = Arc::new(Progress::default());
    *progress.state.lock().expect("progress lock") = Some(match &*loaded.borrow() {
        Some(_) => WorkerState::Loading,
        None => WorkerState::Joining,
    });

    let serve = {
        let task = dp.spawn(dataplane::serve(
            conn,
            loaded.subscribe(),
            stats.clone(),
            Some(dp.busy_poll()),
        ));
        async move {
            Err::<(), _>(match task.await {
                Ok(e) => anyhow!("data plane closed: {e}"),
                Err(e) => anyhow!("the data plane's task: {e}"),
            })
        }
    };
    let beats = heartbeats(client.clone(), worker_id, progress.clone(), stats.clone());
    let follow = follow_assignments(client, worker_id, opts.clone(), loaded.clone(), progress);
    tokio::select! {
        r = serve => r,
        r = beats => r,
        r = follow => r,
    }
}

async fn heartbeats(
    mut client: control::Client,
    worker_id: u64,
    progress: Arc<Progress>,
    stats: Arc<Stats>,
) -> Result<()> {
    loop {
        let state = match progress
            .state
            .lock()
            .expect("progress lock")
            .unwrap_or(WorkerState::Joining)
        {
            // Draining: its assignment is loaded, and shrinks to nothing once the coordinator
            // has moved every expert elsewhere.
            WorkerState::Ready if progress.draining.load(Ordering::Relaxed) => {
                WorkerState::Draining
            }
            s => s,
        };
        let reply = client
            .heartbeat(Heartbeat {
                worker_id,
                state,
                load_done_bytes: progress.done.load(Ordering::Relaxed),
                load_total_bytes: progress.total.load(Ordering::Relaxed),
                experts_loaded: progress.experts.load(Ordering::Relaxed),
                served_requests: stats.served.load(Ordering::Relaxed),
                generation: progress.generation.load(Ordering::Relaxed),
            })
            .await
            .map_err(|e| anyhow!("heartbeat refused: {e}"))?;
        if reply.drain != progress.draining.swap(reply.drain, Ordering::Relaxed) && reply.drain {
            tracing::info!("the coordinator is draining this worker");
        }
        tokio::time::sleep(reply.interval).await;
    }
}

async fn follow_assignments(
    mut client: control::Client,
    worker_id: u64,
    opts: Arc<Options>,
    loaded: Arc<watch::Sender<Option<Executor>>>,
    progress: Arc<Progress>,
) -> Result<()> {
    let mut stream = client
        .assignments(worker_id)
        .await
        .map_err(|e| anyhow!("assignments refused: {e}"))?;
    while let Some(a) = stream.next().await {
        let a = a.map_err(|e| anyhow!("assignment stream: {e}"))?;
        let want: BTreeSet<(u32, u32)> = a
            .experts
            .iter()
            .flat_map(|l| l.experts.iter().map(move |&e| (l.layer, e)))
            .collect();
        progress.generation.store(0, Ordering::Relaxed);
        let same = loaded.borrow().as_ref().is_some_and(|x| *x.held() == want);
        if !same {
            *progress.state.lock().expect("progress lock") = Some(WorkerState::Loading);
            tracing::info!(
                "assignment {}: {} experts over {} layers",
                a.generation,
                want.len(),
                a.experts.len()
            );
            let local = match &opts.model {
                Some(model) => load(model.clone(), &a, &want, &progress).await?,
                None => load_streamed(&opts, client.clone(), &a, &progress).await?,
            };
            let compute = on_device(&opts, local).await?;
            loaded.send_replace(Some(Executor::start_with(compute)));
        }
        progress.experts.store(
            loaded.borrow().as_ref().map_or(0, |x| x.held().len()) as u64,
            Ordering::Relaxed,
        );
        progress.generation.store(a.generation, Ordering::Relaxed);
        *progress.state.lock().expect("progress lock") = Some(WorkerState::Ready);
        if want.is_empty() && progress.draining.load(Ordering::Relaxed) {
            tracing::info!("drained: this worker holds no experts and may be stopped");
        } else {
            tracing::info!("assignment {} loaded; serving", a.generation);
        }
    }
    bail!("the assignment stream ended")
}

/// Loads the assigned experts from the cache of weights streamed from the coordinator,
/// fetching what the cache lacks first (see [`crate::cache`]).
async fn load_streamed(
    opts: &Arc<Options>,
    client: control::Client,
    a: &Assignment,
    progress: &Arc<Progress>,
) -> Result<LocalExperts> {
    let wants = cache::plan(a)?;
    let cache = Cache::open(&opts.cache_dir, &a.model_fingerprint)?;
    tracing::info!("streaming experts into {}", cache.dir().display());
    let mut report = LoadReport::new(progress.clone());
    let local = cache
        .obtain(
            &wants,
            |req| {
                let mut c = client.clone();
                async move { c.fetch_weights(req).await }
            },
            &mut |done, total| report.update(done, total),
        )
        .await;
    report.finish();
    local
}

/// Load progress: into the heartbeat counters, and a bar on a terminal or a log line every 10%.
struct LoadReport {
    progress: Arc<Progress>,
    bar: Option<indicatif::ProgressBar>,
    decile: u64,
}

impl LoadReport {
    fn new(progress: Arc<Progress>) -> Self {
        LoadReport {
            progress,
            bar: None,
            decile: u64::MAX,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        self.progress.done.store(done, Ordering::Relaxed);
        self.progress.total.store(total, Ordering::Relaxed);
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = self.bar.get_or_insert_with(|| {
                let b = indicatif::ProgressBar::new(total);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "experts {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("a valid template"),
                );
                b
            });
            bar.set_length(total);
            bar.set_position(done);
        } else {
            let decile = (done * 10).checked_div(total).unwrap_or(10);
            if decile != self.decile {
                self.decile = decile;
                tracing::info!(
                    "experts: {:.1} of {:.1} MiB ({}%)",
                    done as f64 / (1u64 << 20) as f64,
                    total as f64 / (1u64 << 20) as f64,
                    decile * 10
                );
            }
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// Loads the assigned experts from this worker's own copy of the model and reads every byte of
/// them once (so "ready" means in memory, and progress is real).
async fn load(
    model: Arc<ModelFile>,
    a: &Assignment,
    want: &BTreeSet<(u32, u32)>,
    progress: &Arc<Progress>,
) -> Result<LocalExperts> {
    if model.fingerprint() != a.model_fingerprint {
        bail!(
            "the coordinator serves model {} but this worker's copy is {}",
            a.model_fingerprint,
            model.fingerprint()
        );
    }
    let filter = ExpertFilter::Only(
        want.iter()
            .map(|&(l, e)| (l as usize, e as usize))
            .collect(),
    );
    let progress = progress.clone();
    tokio::task::spawn_blocking(move || {
        let local = model.load_experts(&filter)?;
        let total: u64 = local
            .layers
            .iter()
            .flatten()
            .flat_map(|s| s.experts.iter().flatten())
            .map(|m| m.bytes() as u64)
            .sum();
        progress.total.store(total, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        let mut sink = 0u8;
        for mlp in local
            .layers
            .iter()
            .flatten()
            .flat_map(|s| s.experts.iter().flatten())
        {
            for data in mlp.data() {
                // One read per page brings the bytes in from disk.
                for chunk in data.chunks(1 << 20) {
                    for page in chunk.iter().step_by(4096) {
                        sink ^= *page;
                    }
                    progress
                        .done
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        }
        std::hint::black_box(sink);
        Ok::<_, anyhow::Error>(local)
    })
    .await?
}

/// Where the loaded experts are computed: uploaded to the GPU when the worker has one.
async fn on_device(opts: &Arc<Options>, local: LocalExperts) -> Result<Compute> {
    let Some(ctx) = opts.gpu.clone().filter(|_| local.held().next().is_some()) else {
        return Ok(Compute::Cpu(Arc::new(local)));
    };
    let held = local.held().map(|(l, e)| (l as u32, e as u32)).collect();
    let hidden = local.hidden;
    let gpu = tokio::task::spawn_blocking(move || {
        engine::gpu::GpuExperts::upload(ctx, &local, GPU_MAX_TOKENS)
    })
    .await?
    .context("uploading the experts to the GPU")?;
    Ok(Compute::Gpu {
        experts: Arc::new(gpu),
        held,
        hidden,
    })
}
