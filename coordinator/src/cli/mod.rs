//! The `cluster` command: watch and steer a running cluster from a terminal.
//!
//! - `cluster status`: the control plane's `Status` as a table (or JSON), once or redrawn every
//!   second ([`status`]).
//! - `cluster drain NAME`: the `Drain` RPC for the worker of that name.
//! - `cluster chat`: a conversation with the coordinator's OpenAI-compatible HTTP API
//!   ([`chat`]).
//! - `cluster demo`: a coordinator and two workers on loopback with a tiny built-in model, one
//!   question through the API, then the status ([`demo`]).
//!
//! The control plane is reached with mutual TLS like everything else: as the operator with the
//! coordinator's state directory (its CA signs a fresh coordinator-role certificate for each
//! call; creating nothing), or, for `status` from another machine, by joining once with a join
//! token as `cli-<host>` (the identity is kept in a per-user directory, one per cluster CA).

pub mod chat;
pub mod demo;
pub mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use proto::control::{self, Client};
use proto::trust::{self, ClusterCa, Identity, JoinToken, Trust};

/// Longest a connection plus one call to the control plane may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "cluster",
    version,
    about = "Watch and steer a DeepSeek-V3/R1 cluster"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the model, the workers, their experts, state, round trips and the throughput.
    Status(status::StatusArgs),
    /// Ask a worker to finish its in-flight work and leave.
    Drain(DrainArgs),
    /// Chat with the model through the coordinator's OpenAI-compatible API.
    Chat(chat::ChatArgs),
    /// Start a coordinator and two workers on this machine with a tiny built-in model, ask
    /// it one question through the API, and show the cluster's status.
    Demo(demo::DemoArgs),
}

/// Where the control plane is and how to prove the caller is the operator.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// The coordinator's control plane, `host:port` (its `serve --listen`).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub coordinator: String,
    /// The coordinator's state directory (`serve --state-dir`): its cluster CA makes this
    /// command the operator.
    #[arg(long, default_value = "coordinator-state")]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The worker's name (as `cluster status` shows it).
    pub name: String,
    #[command(flatten)]
    pub control: ControlArgs,
}

/// Parses the command line, runs it, and turns an error into one line on stderr and exit
/// code 1.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cluster: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Status(a) => status::run(a),
        Command::Drain(a) => runtime()?.block_on(drain(a)),
        Command::Chat(a) => chat::run(a),
        Command::Demo(a) => demo::run(a),
    }
}

/// A runtime for one command (the CLI does little at a time).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Writes `text` to stdout; `false` when the reader has gone (a closed pipe, as with
/// `| head`: not an error).
pub(crate) fn emit(text: &str) -> std::io::Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace(['\n', '\r'], " ")
}

/// How the CLI authenticates to the control plane.
#[derive(Debug, Clone)]
pub enum Access {
    /// The operator: the coordinator's state directory with the cluster CA.
    Operator(PathBuf),
    /// A joined client (`cli-<host>`): enough for `Status`, not for `Drain`.
    Token(JoinToken),
}

/// The identity the CLI presents to `coordinator`.
pub async fn identity(coordinator: &str, access: &Access) -> Result<Identity> {
    match access {
        Access::Operator(dir) => {
            let ca = ClusterCa::load(dir)?;
            Ok(ca.coordinator_identity(&[])?)
        }
        Access::Token(token) => {
            let dir = identity_dir(token)?;
            if Identity::exists(&dir) {
                let id = Identity::load(&dir)
                    .with_context(|| format!("reading the identity in {}", dir.display()))?;
                if id.ca_fingerprint()? == token.ca_fingerprint {
                    return Ok(id);
                }
            }
            worker::daemon::join(
                coordinator,
                token,
                &client_name(),
                &dir,
                worker::daemon::JoinRetry::Fail,
            )
            .await
        }
    }
}

/// Where a joined CLI keeps its identity for the cluster whose CA `token` names:
/// `$XDG_STATE_HOME/dsv3-cluster/<CA fingerprint, 16 hex digits>`, else under
/// `~/.local/state`.
pub fn identity_dir(token: &JoinToken) -> Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".local").join("state"))
        })
        .or_else(|| std::env::var_os("LOCALAPPDATA").map(PathBuf::from))
        .ok_or_else(|| anyhow!("no home directory (set XDG_STATE_HOME) to keep the identity in"))?;
    Ok(base
        .join("dsv3-cluster")
        .join(&trust::hex(&token.ca_fingerprint)[..16]))
}

/// `cli-<host>`, the host name reduced to the characters a worker name may hold.
pub fn client_name() -> String {
    let host = ["HOSTNAME", "COMPUTERNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok()),
        )
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    client_name_for(&host)
}

fn client_name_for(host: &str) -> String {
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(control::MAX_NAME_LEN - 4)
        .collect();
    format!("cli-{clean}")
}

/// A control-plane client for `coordinator`, presenting `identity` and trusting its CA.
pub async fn connect(coordinator: &str, identity: &Identity) -> Result<Client> {
    let tls = trust::client_config(Some(identity), Trust::Ca(identity.ca_pem.clone()))?;
    let channel = trust::connect(coordinator, Arc::new(tls))
        .await
        .map_err(|e| {
            if e.is_bad_server_certificate() {
                anyhow!("{e}: this is not the coordinator of the cluster whose CA is used here")
            } else {
                anyhow!(e)
            }
        })?;
    Ok(Client::new(channel))
}

/// An RPC's error; one that failed in the transport (the server answered nothing) says so.
/// With TLS 1.3 a client certificate the coordinator refuses shows up here, as a connection
/// closed on the first call.
fn rpc_error(e: control::RpcError) -> anyhow::Error {
    if let control::RpcError::Status(s) = &e {
        if let Some(mut cause) = std::error::Error::source(s) {
            while let Some(next) = cause.source() {
                cause = next;
            }
            return anyhow!(
                "the connection failed ({cause}); the coordinator may have refused this \
                 client's certificate (its log says why)"
            );
        }
    }
    anyhow!(e)
}

/// Connects with `access` and fetches the status, all within [`CALL_TIMEOUT`].
pub async fn fetch_status(coordinator: &str, access: &Access) -> Result<control::ClusterStatus> {
    within(coordinator, async {
        let id = identity(coordinator, access).await?;
        let mut client = connect(coordinator, &id)
            .await
            .with_context(|| format!("coordinator {coordinator}"))?;
        client
            .status()
            .await
            .map_err(rpc_error)
            .with_context(|| format!("coordinator {coordinator}"))
    })
    .await
}

/// Runs `f` within [`CALL_TIMEOUT`].
pub async fn within<T>(
    coordinator: &str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| bail!("coordinator {coordinator}: no answer within {CALL_TIMEOUT:?}"))
}

async fn drain(a: DrainArgs) -> Result<ExitCode> {
    let coordinator = a.control.coordinator.as_str();
    let access = Access::Operator(a.control.state_dir.clone());
    let (id, accepted) = within(coordinator, async {
        let identity = identity(coordinator, &access).await?;
        let mut client = connect(coordinator, &identity)
            .await
            .with_context(|| format!("coordinator {coordinator}"))?;
        let status = client
            .status()
            .await
            .map_err(rpc_error)
            .with_context(|| format!("coordinator {coordinator}"))?;
        let Some(w) = status.workers.iter().find(|w| w.name == a.name) else {
            let names: Vec<&str> = status.workers.iter().map(|w| w.name.as_str()).collect();
            bail!(
                "no worker named {:?} (workers: {})",
                a.name,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
        };
        Ok((
            w.id,
            client
                .drain(w.id)
                .await
                .map_err(rpc_error)
                .with_context(|| format!("coordinator {coordinator}"))?,
        ))
    })
    .await?;
    if accepted {
        emit(&format!("drain of {} (worker {id}) accepted\n", a.name))?;
        Ok(ExitCode::SUCCESS)
    } else {
        emit(&format!(
            "drain of {} (worker {id}) not accepted: the coordinator no longer knows it\n",
            a.name
        ))?;
        Ok(ExitCode::FAILURE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_names_are_valid_worker_names() {
        for host in ["box-1", "My Laptop.local", "ü", &"h".repeat(200), "a:b/c"] {
            let name = client_name_for(host);
            assert!(name.starts_with("cli-"), "{name}");
            control::check_worker_name(&name).unwrap_or_else(|e| panic!("{host:?}: {e}"));
        }
        assert_eq!(client_name_for("My Laptop.local"), "cli-My-Laptop.local");
        control::check_worker_name(&client_name()).unwrap();
    }

    #[test]
    fn operator_access_needs_the_coordinators_state() {
        let dir = std::env::temp_dir().join(format!("dsv3-cli-nostate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rt = runtime().unwrap();
        let err = rt
            .block_on(identity("127.0.0.1:1", &Access::Operator(dir.clone())))
            .unwrap_err();
        assert!(
            one_line(&err).contains(&format!("no cluster state in {}", dir.display())),
            "{err:#}"
        );
        assert!(!dir.exists(), "a CA must not be created by the CLI");

        // With the state, the identity is the operator's, from that CA.
        let ca = ClusterCa::load_or_create(&dir).unwrap();
        let id = rt
            .block_on(identity("127.0.0.1:1", &Access::Operator(dir.clone())))
            .unwrap();
        assert_eq!(id.ca_fingerprint().unwrap(), ca.fingerprint());
        assert_eq!(id.peer_identity().unwrap().role, trust::Role::Coordinator);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
