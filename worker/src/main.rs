//! `worker`: joins a cluster with a join token, loads the routed experts the coordinator
//! assigns it, and serves them over QUIC; reconnects by itself when the coordinator restarts.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use engine::model::ModelFile;
use proto::control::DeviceInfo;
use proto::trust::JoinToken;

#[derive(Parser)]
#[command(name = "worker", version, about = "DeepSeek-V3/R1 cluster worker")]
struct Cli {
    /// The coordinator's control-plane address, `host:port`.
    #[arg(long, required_unless_present = "list_gpus")]
    coordinator: Option<String>,
    /// The join token the coordinator printed (needed only for the first start; the identity
    /// it earns is kept in --state-dir).
    #[arg(long, env = "DSV3_JOIN_TOKEN")]
    join_token: Option<String>,
    /// This worker's own copy of the model (a .gguf, first split, or a Hugging Face
    /// directory): only the assigned experts' byte ranges are read. Without it, the experts
    /// are streamed from the coordinator into --cache-dir.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute backend for the experts: `auto` takes a hardware GPU if there is one (never a
    /// software adapter), else the CPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "wgpu"])]
    backend: String,
    /// GPU adapter for `--backend wgpu`: index or name substring (see --list-gpus).
    #[arg(long, default_value = "auto")]
    gpu: engine::gpu::GpuSelector,
    /// Memory for experts, in GiB (default: 90% of the memory available now; with a GPU, give
    /// the device memory to use: wgpu cannot tell how much a device has).
    #[arg(long)]
    memory: Option<f64>,
    /// Where the worker keeps its identity (key, certificate, cluster CA).
    #[arg(long, default_value = "worker-state")]
    state_dir: PathBuf,
    /// Where weights streamed from the coordinator are cached (used without --model).
    #[arg(long, default_value = "worker-cache")]
    cache_dir: PathBuf,
    /// This worker's name in the cluster (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// After each answer, poll for the next request this many microseconds instead of
    /// sleeping (yielding the core to any thread with work): lower latency, most of all where
    /// waking an idle core is slow (VMs, deep idle states), for a core's power during
    /// generation. 0 turns it off.
    #[arg(long, default_value_t = proto::runtime::DEFAULT_BUSY_POLL_US)]
    busy_poll_us: u64,
    /// With the wgpu backend: products in f16 pairs where the adapter has `shader-f16`
    /// (less exact; off by default).
    #[arg(long)]
    gpu_f16: bool,
    /// Print the compute devices this worker can use and exit.
    #[arg(long)]
    list_gpus: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("worker: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if cli.list_gpus {
        let list = engine::gpu::list_adapters();
        if list.is_empty() {
            println!("no GPU adapters found (Vulkan, Metal or DX12)");
        }
        for a in &list {
            println!("{a}");
        }
        match engine::gpu::select_adapter(&list, &engine::gpu::GpuSelector::Auto) {
            Ok(i) => println!("--backend auto computes on [{i}]"),
            Err(_) => println!("--backend auto computes on the CPU ({threads} threads)"),
        }
        return Ok(());
    }
    engine::threads::set_threads(threads).context("starting compute threads")?;
    let token = cli
        .join_token
        .as_deref()
        .map(|t| t.parse::<JoinToken>())
        .transpose()
        .context("--join-token")?;
    let name = match cli.name {
        Some(n) => n,
        None => hostname(),
    };
    let model = cli
        .model
        .as_deref()
        .map(|p| {
            ModelFile::open(p)
                .map(Arc::new)
                .with_context(|| format!("opening {}", p.display()))
        })
        .transpose()?;
    let memory = match cli.memory {
        Some(gib) => (gib * (1u64 << 30) as f64) as u64,
        None => available_memory() / 10 * 9,
    };
    let gpu = open_gpu(&cli.backend, &cli.gpu, memory, cli.gpu_f16)?;
    tracing::info!("measuring expert throughput");
    let (speed, device) = match &gpu {
        Some(ctx) => {
            let r = engine::bench::gpu_matvec_gbps(
                ctx,
                engine::quant::QuantType::Q4_K,
                2048,
                7168,
                std::time::Duration::from_millis(50),
                3,
            )
            .context("measuring the GPU")?;
            let a = ctx.adapter();
            (
                r.gbps,
                DeviceInfo {
                    backend: a.backend.to_lowercase(),
                    name: a.name.clone(),
                    memory_bytes: memory,
                },
            )
        }
        None => (
            engine::bench::quick_expert_gbps(threads),
            DeviceInfo {
                backend: "cpu".into(),
                name: format!("cpu ({threads} threads, {})", engine::quant::cpu_kernels()),
                memory_bytes: memory,
            },
        ),
    };
    tracing::info!(
        "{name}: {:.1} GiB for experts, {speed:.1} GB/s",
        memory as f64 / (1u64 << 30) as f64
    );
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("creating {}", cli.state_dir.display()))?;
    let opts = worker::daemon::Options {
        coordinator: cli.coordinator.expect("required by clap"),
        token,
        name,
        model,
        memory,
        speed,
        state_dir: cli.state_dir,
        cache_dir: cli.cache_dir,
        devices: vec![device],
        gpu,
        busy_poll: std::time::Duration::from_micros(cli.busy_poll_us),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let identity = worker::daemon::ensure_identity(&opts).await?;
        tokio::select! {
            r = worker::daemon::run(opts, identity) => r,
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("stopping");
                Ok(())
            }
        }
    })
}

/// The GPU for `--backend wgpu` (or `auto` when a hardware adapter exists), with `memory` as
/// its budget.
fn open_gpu(
    backend: &str,
    selector: &engine::gpu::GpuSelector,
    memory: u64,
    f16_products: bool,
) -> Result<Option<Arc<engine::gpu::GpuContext>>> {
    let auto = match backend {
        "cpu" => return Ok(None),
        "wgpu" => false,
        _ => true,
    };
    let opts = engine::gpu::GpuOptions {
        selector: selector.clone(),
        memory_budget: Some(memory),
        f16_products,
        ..Default::default()
    };
    match engine::gpu::GpuContext::new(opts) {
        Ok(c) => {
            tracing::info!("computing experts on {}", c.adapter().name);
            Ok(Some(Arc::new(c)))
        }
        Err(e @ engine::gpu::GpuError::NoAdapter(_)) if auto => {
            tracing::info!("computing experts on the CPU ({e})");
            Ok(None)
        }
        Err(e) => Err(e).context("opening the GPU"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// `MemAvailable` from /proc/meminfo (Linux), else 8 GiB.
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}
