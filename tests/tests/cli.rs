//! The `cluster` CLI as a person runs it: the real binary against a loopback cluster (the
//! coordinator's cluster side in this process, one real `worker` process) for `status` and
//! `drain`, and against a small streaming HTTP server for `chat`.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{cluster_bin, output_within, spawn, start_cluster};
use engine::model::ModelFile;
use engine::synth::{write_model, SynthSpec};
use serde_json::{json, Value};

/// Runs the CLI with `args` (and `stdin`), failing the test if it takes longer than `limit`.
fn cli(args: &[&str], env: &[(&str, &Path)], stdin: &str, limit: Duration) -> Output {
    let mut cmd = Command::new(cluster_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(&mut cmd, stdin, limit)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit code 1 and exactly one line on stderr containing `want`.
fn expect_error(out: &Output, want: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("cluster: "), "{err}");
    assert!(err.contains(want), "{want:?} not in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn status_and_drain_against_a_real_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, &SynthSpec::tiny()).unwrap();
    let file = Arc::new(ModelFile::open(&path).unwrap());
    let layout = file.expert_layout().unwrap();
    let total_experts: u64 = layout.iter().map(|&(_, n, _)| n as u64).sum();
    let total_bytes: u64 = layout.iter().map(|&(_, n, b)| n as u64 * b).sum();
    let layers: Vec<u64> = layout.iter().map(|&(l, _, _)| l as u64).collect();
    let (rt, cluster) = start_cluster(
        dir.path(),
        &file,
        &file.config,
        1,
        Duration::from_secs(3),
        Duration::from_secs(5),
        false,
    );
    let addr = cluster.addr.to_string();
    let token = cluster.token.to_string();
    let state = dir.path().join("coordinator");
    let state = state.to_str().unwrap();
    let _w = spawn(
        &addr,
        Some(&token),
        Some(&path),
        None,
        &dir.path().join("w1"),
        "w1",
        "1",
        &[],
    );
    assert!(
        rt.block_on(cluster.wait_serving(Duration::from_secs(60))),
        "the worker never became ready: {:?}",
        cluster.status()
    );
    cluster.record_tokens(40);
    let limit = Duration::from_secs(30);

    // As the operator (the coordinator's state directory).
    let out = cli(
        &[
            "status",
            "--json",
            "--coordinator",
            &addr,
            "--state-dir",
            state,
        ],
        &[],
        "",
        limit,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["format"], 1);
    assert_eq!(s["model"], "synth-dsv3-tiny");
    assert_eq!(s["all_placed"], true);
    assert_eq!(s["all_loaded"], true);
    let tps = s["tokens_per_second"].as_f64().unwrap();
    assert!(tps > 0.0 && tps <= 40.0, "{tps}");
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{s}");
    let w = &workers[0];
    assert_eq!(w["name"], "w1");
    assert_eq!(w["state"], "ready");
    assert_eq!(w["load_percent"], 100.0);
    assert_eq!(w["experts_held"].as_u64(), Some(total_experts));
    assert_eq!(w["memory_used_bytes"].as_u64(), Some(total_bytes));
    assert_eq!(w["memory_total_bytes"].as_u64(), Some(1 << 30));
    assert_eq!(w["backend"], "cpu");
    let got_layers: Vec<u64> = w["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap())
        .collect();
    assert_eq!(got_layers, layers);
    assert!(
        w["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{w}"
    );

    // The table: the header says it serves, the worker's row its experts and state.
    let out = cli(
        &["status", "--coordinator", &addr, "--state-dir", state],
        &[],
        "",
        limit,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("model:       synth-dsv3-tiny"), "{table}");
    assert!(
        table.contains("coordinator: cpu, exact f32 activations"),
        "{table}"
    );
    assert!(table.contains("every expert placed and loaded"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("w1 "))
        .unwrap_or_else(|| panic!("no row for w1:\n{table}"));
    let range = format!(
        "{total_experts} ({}-{})",
        layers[0],
        layers[layers.len() - 1]
    );
    assert!(row.contains(&range), "{range:?} not in {row:?}");
    assert!(row.contains("ready"), "{row}");

    // With a join token: joins once as cli-<host>, keeps the identity per user.
    let xdg = dir.path().join("xdg");
    let env = [("XDG_STATE_HOME", xdg.as_path())];
    let out = cli(
        &[
            "status",
            "--json",
            "--coordinator",
            &addr,
            "--join-token",
            &token,
        ],
        &env,
        "",
        limit,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["workers"].as_array().unwrap().len(), 1, "{s}");
    let ids: Vec<_> = std::fs::read_dir(xdg.join("dsv3-cluster"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let cert = std::fs::read_to_string(ids[0].join("cert.pem")).unwrap();
    let out = cli(
        &["status", "--coordinator", &addr, "--join-token", &token],
        &env,
        "",
        limit,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(ids[0].join("cert.pem")).unwrap(),
        cert,
        "the CLI joined again instead of reusing its identity"
    );
    // A joined client may look but not drain: drain needs the operator's state.

    // Failures: one clear line, exit code 1, quickly.
    let nothing = dir.path().join("nothing");
    let out = cli(
        &[
            "status",
            "--coordinator",
            &addr,
            "--state-dir",
            nothing.to_str().unwrap(),
        ],
        &[],
        "",
        limit,
    );
    expect_error(&out, "no cluster state in");
    assert!(!nothing.exists(), "the CLI created a cluster CA");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let t = Instant::now();
    let out = cli(
        &[
            "status",
            "--coordinator",
            &closed_addr,
            "--state-dir",
            state,
        ],
        &[],
        "",
        limit,
    );
    expect_error(&out, &closed_addr);
    assert!(t.elapsed() < Duration::from_secs(15));

    // Another cluster's CA: the coordinator's certificate is not trusted.
    let other = dir.path().join("other");
    proto::trust::ClusterCa::load_or_create(&other).unwrap();
    let out = cli(
        &[
            "status",
            "--coordinator",
            &addr,
            "--state-dir",
            other.to_str().unwrap(),
        ],
        &[],
        "",
        limit,
    );
    expect_error(
        &out,
        "not the coordinator of the cluster whose CA is used here",
    );
    // A join token naming another CA.
    let mut wrong: proto::trust::JoinToken = token.parse().unwrap();
    wrong.ca_fingerprint[0] ^= 1;
    let out = cli(
        &[
            "status",
            "--coordinator",
            &addr,
            "--join-token",
            &wrong.to_string(),
        ],
        &env,
        "",
        limit,
    );
    expect_error(&out, "does not contain the CA named by the join token");

    // Drain: an unknown name is refused, and so is the only worker (no room elsewhere).
    let out = cli(
        &[
            "drain",
            "nobody",
            "--coordinator",
            &addr,
            "--state-dir",
            state,
        ],
        &[],
        "",
        limit,
    );
    expect_error(&out, "no worker named \"nobody\" (workers: w1)");
    // The only worker cannot be drained: nobody else has room for its experts.
    let out = cli(
        &["drain", "w1", "--coordinator", &addr, "--state-dir", state],
        &[],
        "",
        limit,
    );
    expect_error(
        &out,
        "cannot drain worker \"w1\": the other workers lack 12.0 MiB of memory",
    );
}

// ---------------------------------------------------------------------------------------------
// chat

/// A canned OpenAI-style streaming server: it thinks about the last user message, then
/// answers with it and the number of messages it was sent, in 5-byte pieces. "fail" gets an
/// HTTP 400 error, "cut" an answer that stops mid-stream.
async fn chat_server(seen: Arc<Mutex<Vec<Value>>>) -> std::net::SocketAddr {
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::Json;

    let completions = move |headers: HeaderMap, Json(body): Json<Value>| {
        let seen = seen.clone();
        async move {
            if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer k3y") {
                return (StatusCode::UNAUTHORIZED, "no key").into_response();
            }
            seen.lock().unwrap().push(body.clone());
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            let last = messages
                .last()
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_string();
            if last == "fail" {
                let e = json!({"error": {"message": "no such thing",
                    "type": "invalid_request_error", "param": "messages"}});
                return (StatusCode::BAD_REQUEST, Json(e)).into_response();
            }
            let chunk = |delta: Value, finish: Value| {
                let c = json!({"id": "c1", "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                format!("data: {c}\r\n\r\n")
            };
            let mut sse = String::from(": hello\n\n");
            sse += &chunk(json!({"role": "assistant"}), Value::Null);
            sse += &chunk(
                json!({"reasoning_content": format!("thinking about {last}")}),
                Value::Null,
            );
            sse += &chunk(
                json!({"content": format!("You said {last}; ")}),
                Value::Null,
            );
            if last != "cut" {
                sse += &chunk(
                    json!({"content": format!("{} messages so far.", messages.len())}),
                    json!("stop"),
                );
                sse += "data: [DONE]\n\n";
            }
            let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
                sse.as_bytes().chunks(5).map(|c| Ok(c.to_vec())).collect();
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(tokio_stream::iter(pieces)))
                .unwrap()
        }
    };
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "tiny-r1"}]})) }),
        )
        .route("/v1/chat/completions", post(completions));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[test]
fn chat_streams_answers_and_keeps_the_history() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = rt.block_on(chat_server(seen.clone()));
    let api = format!("http://{addr}");
    let out = cli(
        &[
            "chat",
            "--api",
            &api,
            "--api-key",
            "k3y",
            "--system",
            "be brief",
        ],
        &[],
        "hello\nfail\ncut\nagain\n/reset\nthird\n",
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // Not a terminal: the thinking is plain text, a blank line, then the answer.
    assert_eq!(
        stdout,
        "thinking about hello\n\nYou said hello; 2 messages so far.\n\
         thinking about cut\n\nYou said cut; \n\
         thinking about again\n\nYou said again; 4 messages so far.\n\
         thinking about third\n\nYou said third; 2 messages so far.\n",
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("HTTP 400: no such thing (invalid_request_error, parameter messages)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the stream ended before the answer did"),
        "{stderr}"
    );
    // A turn failed: exit code 1.
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 5, "{seen:?}");
    for r in seen.iter() {
        assert_eq!(r["model"], "tiny-r1", "the first listed model");
        assert_eq!(r["stream"], true);
    }
    // The answered turn is in the history without its thinking; failed turns are not.
    assert_eq!(
        seen[3]["messages"],
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "You said hello; 2 messages so far."},
            {"role": "user", "content": "again"},
        ])
    );
    assert_eq!(
        seen[4]["messages"],
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "third"},
        ])
    );

    // A wrong key: the server's refusal, not a hang.
    let out = cli(
        &["chat", "--api", &api, "--model", "x", "--api-key", "nope"],
        &[],
        "hi\n",
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("HTTP 401: no key"),
        "{}",
        text(&out.stderr)
    );
    // Nothing listening: one clear line.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let out = cli(
        &["chat", "--api", &format!("http://{closed_addr}")],
        &[],
        "hi\n",
        Duration::from_secs(30),
    );
    expect_error(&out, "asking http://");
}
