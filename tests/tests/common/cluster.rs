//! A loopback cluster for the tests: the coordinator's cluster side in the test process, or
//! `coordinator serve` as a child process, and this build's `worker` and `cluster` binaries as
//! child processes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Memory for exactly 32 of the tiny model's experts (196,608 bytes each in BF16), so that two
/// workers split the 64 experts evenly and neither can take over the other's share.
pub const HALF: &str = "0.00586";

/// Memory for all 64 of the tiny model's experts (and a little more).
pub const ALL: &str = "0.0118";

/// Runs `cmd` with `stdin` and its output collected, failing the test if it takes longer than
/// `limit`.
pub fn output_within(cmd: &mut Command, stdin: &str, limit: Duration) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    // A child may exit before it reads all its input (a refused connection ends `chat` at
    // once): a closed pipe is its answer, not the test's failure.
    match input.write_all(stdin.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            panic!("writing the stdin of {cmd:?}: {e}")
        }
        _ => {}
    }
    drop(input);
    let pid = child.id();
    let watchdog = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !watchdog.is_finished() {
        if started.elapsed() > limit {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    watchdog.join().unwrap()
}

/// Where [`spawn`] writes the stderr of the worker with state directory `state` (appended
/// across restarts).
pub fn worker_log(state: &Path) -> PathBuf {
    state.with_extension("log")
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
/// from the coordinator into `cache`; `extra`: more of its command-line arguments.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    addr: &str,
    token: Option<&str>,
    model: Option<&Path>,
    cache: Option<&Path>,
    state: &Path,
    name: &str,
    memory_gib: &str,
    extra: &[&str],
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
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(worker_log(state))
        .expect("creating the worker's log");
    cmd.arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(t) = token {
        cmd.args(["--join-token", t]);
    }
    cmd.args(extra);
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
    start_cluster_with_copies(
        dir,
        file,
        cfg,
        min_workers,
        heartbeat_timeout,
        request_timeout,
        stream,
        1,
    )
}

/// As [`start_cluster`], placing `copies` copies of every expert where memory allows.
#[allow(clippy::too_many_arguments)]
pub fn start_cluster_with_copies(
    dir: &Path,
    file: &Arc<ModelFile>,
    cfg: &engine::config::ModelConfig,
    min_workers: usize,
    heartbeat_timeout: Duration,
    request_timeout: Duration,
    stream: bool,
    copies: usize,
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
            copies,
            request_timeout,
            names: vec![],
            local: None,
            model: stream.then(|| file.clone()),
            activations: Default::default(),
            device: "cpu".into(),
            busy_poll: Duration::ZERO,
        }))
        .unwrap();
    (rt, cluster)
}

/// `coordinator serve` as a child process (killed when dropped); its stderr is collected on a
/// thread.
pub struct Serve {
    pub child: Child,
    /// The control plane's address.
    pub addr: String,
    pub token: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// Starts `coordinator serve` on an ephemeral port with `args` and waits for the line that
    /// gives its address and join token. The always-active part runs on the CPU unless `args`
    /// name a `--backend` (so a machine's GPU does not change what a test checks).
    pub fn start(model: &Path, state: &Path, args: &[String]) -> Serve {
        use std::io::BufRead;
        let backend: &[&str] = if args.iter().any(|a| a == "--backend") {
            &[]
        } else {
            &["--backend", "cpu"]
        };
        let mut child = Command::new(coordinator_bin())
            .arg("serve")
            .arg("--model")
            .arg(model)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", "127.0.0.1:0", "--threads", "1"])
            .args(backend)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting coordinator serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line);
            }
        });
        let mut serve = Serve {
            child,
            addr: String::new(),
            token: String::new(),
            log,
        };
        let line = serve.wait_line(
            "start workers with: worker --coordinator ",
            Duration::from_secs(60),
        );
        let mut words = line.split_whitespace();
        serve.addr = words.next().unwrap_or_default().to_string();
        serve.token = words.nth(1).unwrap_or_default().to_string();
        serve
    }

    /// The rest of the first line of stderr that starts with `prefix`, once it is there;
    /// panics with the log if the process ends first or `timeout` passes.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| l.strip_prefix(prefix).map(str::to_string));
            if let Some(rest) = found {
                return rest;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!("serve ended ({st}) before {prefix:?}: {}", self.log());
            }
            assert!(
                t0.elapsed() < timeout,
                "serve never said {prefix:?} within {timeout:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for the process to end (it does after `--prompt`); panics with its log if it
    /// fails or takes longer than `timeout`.
    pub fn wait(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Give the reader thread a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                assert!(st.success(), "serve failed: {}", self.log());
                return;
            }
            assert!(
                t0.elapsed() < timeout,
                "serve did not finish within {timeout:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
