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
    /// are streamed from the coordinator into --cache-dir (GGUF models only).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Compute backend for the experts.
    #[arg(long, default_value = "cpu", value_parser = ["cpu"])]
    backend: String,
    /// Memory for experts, in GiB (default: 90% of the memory available now).
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
        println!("0  cpu  {threads} threads");
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
    tracing::info!("measuring expert throughput");
    let speed = engine::bench::quick_expert_gbps(threads);
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
        devices: vec![DeviceInfo {
            backend: cli.backend,
            name: format!("cpu ({threads} threads)"),
            memory_bytes: memory,
        }],
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
