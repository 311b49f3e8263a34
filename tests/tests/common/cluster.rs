//! A loopback cluster for the tests: the coordinator's cluster side in the test process, and
//! this build's `worker` and `cluster` binaries as child processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use coordinator::server::{Cluster, ClusterOptions};
use engine::model::ModelFile;
use proto::wire::Dtype;

/// A binary of this build (next to the test executable's directory).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `cargo test --workspace` \
         builds them too)",
        bin.display()
    );
    bin
}

/// The `worker` binary of this build.
pub fn worker_bin() -> PathBuf {
    bin("worker")
}

/// The `coordinator` binary of this build.
pub fn coordinator_bin() -> PathBuf {
    bin("coordinator")
}

/// The `cluster` binary (the CLI) of this build.
pub fn cluster_bin() -> PathBuf {
    bin("cluster")
}

/// A child process killed when dropped.
pub struct Worker(pub Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker with its own copy of the model, or (`model: None`) one that streams its experts
/// from the coordinator into `cache`.
pub fn spawn(
    addr: &str,
    token: Option<&str>,
    model: Option<&Path>,
    cache: Option<&Path>,
    state: &Path,
    name: &str,
    memory_gib: &str,
) -> Worker {
    let mut cmd = Command::new(worker_bin());
    cmd.args(["--coordinator", addr, "--name", name, "--threads", "1"])
        .args(["--memory", memory_gib]);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    if let Some(c) = cache {
        cmd.arg("--cache-dir").arg(c);
    }
    cmd.arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(t) = token {
        cmd.args(["--join-token", t]);
    }
    Worker(cmd.spawn().expect("starting a worker"))
}

/// The coordinator's cluster side for the tiny model in this process (f32 on the wire), on its
/// own runtime; `stream` lets workers without the model fetch their experts.
pub fn start_cluster(
    dir: &Path,
    file: &Arc<ModelFile>,
    cfg: &engine::config::ModelConfig,
    min_workers: usize,
    heartbeat_timeout: Duration,
    request_timeout: Duration,
    stream: bool,
) -> (tokio::runtime::Runtime, Cluster) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cluster = rt
        .block_on(Cluster::start(ClusterOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.join("coordinator"),
            min_workers,
            model_name: "synth-dsv3-tiny".into(),
            model_fingerprint: file.fingerprint(),
            layout: file.expert_layout().unwrap(),
            n_groups: cfg.n_group,
            hidden: cfg.hidden,
            dtype: Dtype::F32,
            heartbeat_timeout,
            request_timeout,
            names: vec![],
            local: None,
            model: stream.then(|| file.clone()),
        }))
        .unwrap();
    (rt, cluster)
}
