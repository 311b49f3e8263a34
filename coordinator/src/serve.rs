//! `coordinator serve`: hold the always-active part of the model, start the cluster's control
//! and data planes, print the join token, wait for workers to load every expert, then serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use coordinator::api::{Api, ClusterView};
use coordinator::metrics::{CountingExperts, ExpertHits, Metrics};
use coordinator::scheduler::{CpuBatch, GpuBatch, Scheduler, SchedulerConfig, TokenRules};
use coordinator::server::{Cluster, ClusterOptions, LocalWorker};
use engine::generate::CpuSequence;
use engine::gpu::GpuModel;
use engine::model::ModelFile;
use proto::wire::Dtype;

#[derive(Args)]
pub struct ServeArgs {
    /// A .gguf file (the first split of a split model) or a Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// Address of the control plane (TCP) and the data plane (UDP, same port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Workers to wait for before placing the experts.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Where the cluster CA, the join secret and the coordinator's state are kept.
    #[arg(long, default_value = "coordinator-state")]
    state_dir: PathBuf,
    /// Memory (GiB) for experts held by this process itself; 0: none.
    #[arg(long, default_value_t = 0.0)]
    local_experts: f64,
    /// Hidden vectors on the wire: bf16 (half the bytes) or f32 (exact).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
    wire: String,
    /// Extra DNS names or IP addresses workers may dial this coordinator by.
    #[arg(long = "name")]
    names: Vec<String>,
    /// Seconds without a heartbeat before a worker counts as lost.
    #[arg(long, default_value_t = 3.0)]
    heartbeat_timeout: f64,
    /// Copies of every routed expert across the workers. With 2, a spare copy of each expert
    /// sits on another worker where memory allows, and the loss of one box costs no request:
    /// its experts are answered by their spares at once. Spares take only the memory left
    /// after one copy of everything; `cluster status` shows how much of the model has one.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    replicas: u64,
    /// Seconds a layer waits for its workers' answers.
    #[arg(long, default_value_t = 10.0)]
    request_timeout: f64,
    /// After each layer's requests go out, poll for the answers (and the next layer) this
    /// many microseconds instead of sleeping (yielding the core to any thread with work):
    /// lower latency, most of all where waking an idle core is slow (VMs, deep idle states),
    /// for a core's power during generation. 0 turns it off.
    #[arg(long, default_value_t = proto::runtime::DEFAULT_BUSY_POLL_US)]
    busy_poll_us: u64,
    #[arg(long)]
    threads: Option<usize>,
    /// The activation format of quantized products (every worker follows this choice).
    #[command(flatten)]
    acts: crate::ActivationArgs,
    /// Where the always-active part runs. On either, up to `--max-batch` sequences are decoded
    /// together; on a GPU each has a slot of the device cache (fewer slots when they would not
    /// fit the device memory or one buffer binding).
    #[command(flatten)]
    gpu: crate::GpuArgs,
    /// Once serving, run this prompt (`--prompt` or `--token-ids`, with the same options as
    /// `generate`) through the cluster, print the text, write `--logits-out`, and exit.
    #[command(flatten)]
    p: crate::PromptArgs,
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Require `Authorization: Bearer <KEY>` on the API.
    #[arg(long, env = "DSV3_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model name the API lists (default: the model's own name).
    #[arg(long)]
    model_id: Option<String>,
    /// Sequences decoded together (continuous batching).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests that may wait for a batch slot; past it the API answers 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Positions per sequence (prompt and answer).
    #[arg(long, default_value_t = 4096)]
    ctx_size: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    crate::set_threads(a.threads)?;
    engine::tensor::set_activations(a.acts.activations);
    let mf = Arc::new(
        ModelFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?,
    );
    let tokenizer = mf.tokenizer().context("loading the tokenizer")?;
    // A bad prompt fails before any worker is waited for.
    let prompt = match a.p.given() {
        true => Some(a.p.prompt_ids(&mf, &tokenizer)?),
        false => None,
    };
    let model = Arc::new(mf.load_model().context("loading the model")?);
    let gpu = match &prompt {
        Some(p) => a.gpu.open_model(&model, a.p.capacity(p), 1, a.p.kv_cache)?,
        None => a.gpu.open_model(
            &model,
            a.ctx_size,
            a.max_batch,
            SchedulerConfig::default().cache,
        )?,
    };
    if let Some(g) = &gpu {
        let ctx = g.context();
        eprintln!(
            "[backend: wgpu on {} ({}), {:.1} MiB of device memory{}]",
            ctx.adapter().name,
            ctx.adapter().backend,
            ctx.memory_used() as f64 / (1u64 << 20) as f64,
            if prompt.is_none() {
                format!(
                    "; cache slots for {} sequences of {} positions",
                    g.sequences(),
                    g.capacity()
                )
            } else {
                String::new()
            }
        );
    }
    let layout = mf.expert_layout().context("reading the expert layout")?;
    let total: u64 = layout.iter().map(|&(_, n, b)| n as u64 * b).sum();
    eprintln!(
        "model {}: {} MoE layers, {:.2} GiB of routed experts to place",
        a.model.display(),
        layout.len(),
        total as f64 / (1u64 << 30) as f64
    );
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let local = (a.local_experts > 0.0).then(|| LocalWorker {
        memory: (a.local_experts * (1u64 << 30) as f64) as u64,
        speed: engine::bench::quick_expert_gbps(threads),
        model: mf.clone(),
    });
    let opts = ClusterOptions {
        listen: a.listen,
        state_dir: a.state_dir.clone(),
        min_workers: a.min_workers,
        model_name: model_name(&mf, &a.model),
        model_fingerprint: mf.fingerprint(),
        layout,
        n_groups: model.cfg.n_group,
        hidden: model.cfg.hidden,
        dtype: if a.wire == "f32" {
            Dtype::F32
        } else {
            Dtype::Bf16
        },
        heartbeat_timeout: Duration::from_secs_f64(a.heartbeat_timeout),
        copies: a.replicas as usize,
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        busy_poll: Duration::from_micros(a.busy_poll_us),
        names: a.names.clone(),
        local,
        model: Some(mf.clone()),
        activations: a.acts.activations,
        device: match &gpu {
            Some(g) => format!(
                "{} {}",
                g.context().adapter().backend.to_lowercase(),
                g.context().adapter().name
            ),
            None => format!("cpu ({threads} threads, {})", engine::quant::cpu_kernels()),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cluster = Arc::new(Cluster::start(opts).await?);
        println!("join token: {}", cluster.token);
        eprintln!("listening on {}", cluster.addr);
        eprintln!(
            "start workers with: worker --coordinator {} --join-token {} [--model <the same model file>]",
            cluster.addr, cluster.token
        );
        let Some(prompt) = prompt else {
            return serve_api(&a, cluster, &mf, model, gpu, tokenizer).await;
        };
        wait_serving(&cluster).await;
        eprintln!("serving: every expert is loaded");
        let experts = cluster.experts();
        let result = tokio::task::spawn_blocking(move || -> Result<()> {
            let capacity = a.p.capacity(&prompt);
            let req = a.p.request(&mf, &tokenizer, prompt);
            match gpu {
                Some(mut g) => a.p.run(&mut g, experts.as_ref(), &tokenizer, &req),
                None => {
                    let mut seq = CpuSequence::new(&model, a.p.kv_cache, capacity);
                    a.p.run(&mut seq, experts.as_ref(), &tokenizer, &req)
                }
            }
        })
        .await?;
        // Keep the cluster up until the generation is over, then stop it.
        drop(cluster);
        result
    })
}

/// Serves the OpenAI-compatible API until Ctrl-C (it answers 503 until every expert is
/// loaded).
async fn serve_api(
    a: &ServeArgs,
    cluster: Arc<Cluster>,
    mf: &ModelFile,
    model: Arc<engine::model::Model>,
    gpu: Option<GpuModel>,
    tokenizer: engine::tokenizer::Tokenizer,
) -> Result<()> {
    let api = api(a, &cluster, mf, model, gpu, tokenizer)?;
    let listener = tokio::net::TcpListener::bind(a.http)
        .await
        .with_context(|| format!("binding the API to {}", a.http))?;
    if a.api_key.is_none() && !a.http.ip().is_loopback() {
        eprintln!(
            "warning: the API listens on {} without --api-key: anyone who can reach it can use it",
            a.http
        );
    }
    eprintln!(
        "API: http://{}/v1 (OpenAI-compatible)",
        listener.local_addr()?
    );
    let server = tokio::spawn(coordinator::api::serve(listener, api, async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    wait_serving(&cluster).await;
    eprintln!("serving: every expert is loaded");
    server.await??;
    Ok(())
}

async fn wait_serving(cluster: &Cluster) {
    while !cluster.wait_serving(Duration::from_secs(10)).await {
        let st = cluster.status();
        eprintln!(
            "waiting: {} worker(s), placed: {}, loaded: {}",
            st.workers.len(),
            st.all_placed,
            st.all_loaded
        );
    }
}

/// The API in front of the cluster: the scheduler with its metrics, the tokenizer and the
/// model's chat template.
fn api(
    a: &ServeArgs,
    cluster: &Arc<Cluster>,
    mf: &ModelFile,
    model: Arc<engine::model::Model>,
    gpu: Option<GpuModel>,
    tokenizer: engine::tokenizer::Tokenizer,
) -> Result<Arc<Api>> {
    let hits = Arc::new(ExpertHits::new(&mf.expert_layout()?));
    let metrics = Arc::new(Metrics::new(hits.clone()));
    let experts = Arc::new(CountingExperts {
        inner: cluster.experts(),
        hits,
    });
    let rules = TokenRules {
        stop_ids: crate::stop_ids(mf, &tokenizer),
        banned_from: tokenizer.vocab_size().min(model.cfg.vocab_size) as u32,
        banned_ids: mf.unused_token_ids(),
    };
    let cfg = SchedulerConfig {
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_context: a.ctx_size,
        ..SchedulerConfig::default()
    };
    let meter = cluster.clone();
    let on_tokens = Box::new(move |n| meter.record_tokens(n));
    let scheduler = match gpu {
        Some(g) => Scheduler::start(
            GpuBatch::new(g),
            experts,
            cfg,
            rules,
            metrics.clone(),
            on_tokens,
        )?,
        None => Scheduler::start(
            CpuBatch::new(model),
            experts,
            cfg,
            rules,
            metrics.clone(),
            on_tokens,
        )?,
    };
    let template = mf
        .chat_template(&tokenizer)
        .context("compiling the chat template")?;
    if template.is_none() {
        eprintln!("warning: the model carries no chat template; only /v1/completions works");
    }
    let model_id = a
        .model_id
        .clone()
        .unwrap_or_else(|| model_name(mf, &a.model));
    Ok(Arc::new(Api::new(
        scheduler,
        Arc::new(tokenizer),
        template,
        model_id,
        a.api_key.clone(),
        metrics,
        Some(cluster.clone() as Arc<dyn ClusterView>),
    )))
}

fn model_name(mf: &ModelFile, path: &std::path::Path) -> String {
    mf.gguf
        .as_ref()
        .and_then(|g| g.meta("general.name"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
}
