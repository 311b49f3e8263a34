//! `cluster demo`: the whole system on one machine, from nothing. It writes the synthetic tiny
//! DeepSeek-V3-shaped model (deterministic weights, the real tokenizer), starts a coordinator
//! and two workers as separate processes on loopback (mutual TLS, gRPC, QUIC), waits until every
//! expert is loaded, asks one question through the OpenAI-compatible API and streams the
//! answer, then prints `cluster status`. The tiny model's weights are random: its text is noise.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::synth::{write_model, ChatStyle, SynthSpec};

use super::chat::{Api, Message, Printer};
use super::{status, Access};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the model, state and logs here (default: a temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The question to ask.
    #[arg(long, default_value = "Why is the sky blue?")]
    pub prompt: String,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Keep the cluster running after the answer, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// Child processes, killed when dropped.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Children {
    /// Fails naming a process that has exited.
    fn check(&mut self, logs: &Path) -> Result<()> {
        for (name, c) in &mut self.0 {
            if let Some(st) = c.try_wait()? {
                bail!(
                    "{name} exited ({st}); its log is {}",
                    logs.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }
}

/// A binary next to this one (`cargo build` puts the workspace's binaries together).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe
        .with_file_name(name)
        .with_extension(std::env::consts::EXE_EXTENSION);
    if !path.exists() {
        bail!(
            "{} is missing: build every binary first (`cargo build --release`)",
            path.display()
        );
    }
    Ok(path)
}

/// Copies a child's stderr into its log file and sends each line to `tx`.
fn follow(child: &mut Child, log: PathBuf, tx: mpsc::Sender<String>) -> Result<()> {
    let err = child.stderr.take().context("child stderr")?;
    let mut file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            let _ = writeln!(file, "{line}");
            let _ = tx.send(line);
        }
    });
    Ok(())
}

/// Waits for a line `prefix...` from `rx` and returns what follows the prefix.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    prefix: &str,
    children: &mut Children,
    logs: &Path,
) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.trim().to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => children.check(logs)?,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its stderr closed: it is exiting.
                children.check(logs)?;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    bail!(
        "no `{prefix}` line within 120 s (logs in {})",
        logs.display()
    )
}

pub fn run(a: DemoArgs) -> Result<ExitCode> {
    let coordinator = sibling("coordinator")?;
    let worker = sibling("worker")?;
    let temp = a.dir.is_none();
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("dsv3-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = demo(&a, &dir, &coordinator, &worker);
    if temp && !a.keep_running {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn demo(a: &DemoArgs, dir: &Path, coordinator: &Path, worker: &Path) -> Result<ExitCode> {
    let model = dir.join("tiny.gguf");
    let spec = SynthSpec {
        chat: ChatStyle::V3,
        ..SynthSpec::tiny()
    };
    let summary = write_model(&model, &spec).context("writing the tiny model")?;
    eprintln!(
        "[demo] tiny DeepSeek-V3-shaped model: {} ({:.1} MB, random weights: its text is noise)",
        model.display(),
        summary.bytes as f64 / 1e6
    );
    let state = dir.join("coordinator-state");
    let mut children = Children(Vec::new());
    let mut coord = Command::new(coordinator)
        .args(["serve", "--model"])
        .arg(&model)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--min-workers",
            "2",
            "--state-dir",
        ])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", coordinator.display()))?;
    let (tx, rx) = mpsc::channel();
    follow(&mut coord, dir.join("coordinator.log"), tx)?;
    let out = coord.stdout.take().context("coordinator stdout")?;
    children.0.push(("coordinator".into(), coord));
    let mut out = BufReader::new(out);
    let mut token = String::new();
    out.read_line(&mut token)?;
    // Keep reading its stdout so that it never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let token = token
        .strip_prefix("join token: ")
        .map(|t| t.trim().to_string())
        .context("the coordinator printed no join token")?;
    let control = wait_line(&rx, "listening on ", &mut children, dir)?;
    let api_url = wait_line(&rx, "API: ", &mut children, dir)?;
    let api_url = api_url
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    eprintln!("[demo] coordinator: control plane {control}, API {api_url}");

    // Each worker has room for 60% of the experts, so both hold some.
    let layout = engine::model::ModelFile::open(&model)?.expert_layout()?;
    let total: u64 = layout.iter().map(|&(_, n, b)| n as u64 * b).sum();
    let memory = format!("{}", total as f64 * 0.6 / (1u64 << 30) as f64);
    for name in ["worker-1", "worker-2"] {
        let mut w = Command::new(worker)
            .args(["--coordinator", &control, "--join-token", &token, "--model"])
            .arg(&model)
            .args(["--name", name, "--memory", &memory, "--state-dir"])
            .arg(dir.join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", worker.display()))?;
        follow(&mut w, dir.join(format!("{name}.log")), mpsc::channel().0)?;
        children.0.push((name.into(), w));
    }
    eprintln!("[demo] two workers joining; waiting until every expert is loaded");

    let rt = super::runtime()?;
    let health = format!("{}/health", api_url.trim_end_matches("/v1"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = rt.block_on(async {
            reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
        });
        if ok {
            break;
        }
        children.check(dir)?;
        if Instant::now() > deadline {
            bail!(
                "the cluster was not ready within 120 s (logs in {})",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut api = Api::new(&api_url, None)?;
    api.max_tokens = Some(a.max_tokens);
    let stdout = std::io::stdout();
    let dim = stdout.is_terminal();
    println!("\n> {}", a.prompt);
    let mut printer = Printer::new(stdout, dim);
    let messages = [Message {
        role: "user",
        content: a.prompt.clone(),
    }];
    let answer = rt
        .block_on(api.complete(None, &messages, &mut printer))
        .context("asking the cluster")?;
    println!(
        "[{} · finish: {}]\n",
        api_url,
        answer.finish_reason.as_deref().unwrap_or("?")
    );

    let st = rt.block_on(super::fetch_status(&control, &Access::Operator(state)))?;
    print!("{}", status::render_table(&st));
    println!(
        "\nOn real boxes: `coordinator serve --model <first .gguf split> --listen 0.0.0.0:7070 --min-workers <n>` \
         on the box with the best GPU,\nthen `worker --coordinator <that box>:7070 --join-token <printed token> \
         --model <the same file>` on each box; chat tools use http://<that box>:8080/v1."
    );
    if a.keep_running {
        eprintln!(
            "[demo] running: API {api_url}, `cluster status --coordinator {control} --state-dir {}`; Ctrl-C stops",
            dir.join("coordinator-state").display()
        );
        loop {
            std::thread::sleep(Duration::from_secs(1));
            children.check(dir)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
