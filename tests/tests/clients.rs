//! The OpenAI-compatible API as its users reach it: `coordinator serve --http` and two `worker`s
//! as processes on loopback (the tiny synthetic model, R1's chat template), driven by real
//! clients. The official `openai` Python package runs `tests/clients/openai_check.py`; `curl`
//! shows the raw server-sent-event framing and the error bodies; then a worker is killed while
//! an answer streams: the stream ends within seconds with an error event naming the worker and
//! its experts, the coordinator stays up, and the restarted worker restores the same answers.
//!
//! Without Python's `openai` package or `curl` those parts are skipped with a line on stderr;
//! with `REQUIRE_CLIENT_TESTS=1` (CI) they fail instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{output_within, spawn, worker_log, Serve, Worker, HALF};
use engine::synth::{write_model, SynthSpec};
use serde_json::{json, Value};

const KEY: &str = "sk-test-6b1d0c";

/// The processes of the cluster and where its API answers.
struct Api {
    serve: Serve,
    /// `http://127.0.0.1:PORT`.
    base: String,
    model: PathBuf,
    dir: PathBuf,
    workers: Vec<(String, Option<Worker>)>,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn state(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The logs of every process, for failure messages.
    fn logs(&self) -> String {
        let mut s = format!("coordinator serve:\n{}\n", self.serve.log());
        for (name, _) in &self.workers {
            let log = std::fs::read_to_string(worker_log(&self.state(name))).unwrap_or_default();
            s += &format!("worker {name}:\n{log}\n");
        }
        s
    }

    fn start_worker(&mut self, i: usize, token: Option<&str>) {
        let name = self.workers[i].0.clone();
        let w = spawn(
            &self.serve.addr,
            token,
            Some(&self.model),
            None,
            &self.state(&name),
            &name,
            HALF,
            &[],
        );
        self.workers[i].1 = Some(w);
    }

    fn health(&self) -> u16 {
        let url = format!("{}/health", self.base);
        self.rt
            .block_on(reqwest::get(&url))
            .map_or(0, |r| r.status().as_u16())
    }

    /// Waits until `/health` answers `status`; panics with every process's log after
    /// `timeout`.
    fn wait_health(&self, status: u16, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let got = self.health();
            if got == status {
                return;
            }
            assert!(
                t0.elapsed() < timeout,
                "/health answered {got}, not {status}, for {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A non-streamed chat request: status and JSON body.
    fn chat(&self, body: &Value) -> (u16, Value) {
        self.rt.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", self.base))
                .bearer_auth(KEY)
                .json(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json().await.unwrap())
        })
    }
}

fn require_clients() -> bool {
    std::env::var("REQUIRE_CLIENT_TESTS").as_deref() == Ok("1")
}

/// Whether `probe` runs and succeeds; if not, skips (or with `REQUIRE_CLIENT_TESTS=1`, fails)
/// saying `what` is missing.
fn client_available(probe: &mut Command, what: &str) -> bool {
    let ok = probe.output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(!require_clients(), "REQUIRE_CLIENT_TESTS=1 but {what}");
        eprintln!("skipped: {what}");
    }
    ok
}

fn chat_body(user: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "synth-dsv3-tiny",
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        // Answers of exactly `max_tokens`, wherever this machine's greedy path meets an end.
        "ignore_eos": true,
    })
}

#[test]
fn openai_python_curl_and_a_lost_worker_against_a_cluster_of_processes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_model(&model, &SynthSpec::tiny()).unwrap();
    // f32 on the wire, so that answers do not depend on how the partial sums are rounded; a
    // lost worker is noticed within 2 s, a layer waits at most 3 s for an answer.
    let args: Vec<String> = [
        "--min-workers",
        "2",
        "--wire",
        "f32",
        "--http",
        "127.0.0.1:0",
        "--api-key",
        KEY,
        "--heartbeat-timeout",
        "2",
        "--request-timeout",
        "3",
        "--ctx-size",
        "8192",
    ]
    .map(String::from)
    .to_vec();
    let mut serve = Serve::start(&model, &dir.path().join("coordinator"), &args);
    let line = serve.wait_line("API: http://", Duration::from_secs(30));
    let addr = line.split("/v1").next().unwrap();
    let base = format!("http://{addr}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut api = Api {
        serve,
        base,
        model,
        dir: dir.path().to_path_buf(),
        workers: vec![("w1".into(), None), ("w2".into(), None)],
        rt,
    };
    assert_eq!(api.health(), 503, "healthy before any worker");
    let token = api.serve.token.clone();
    api.start_worker(0, Some(&token));
    api.start_worker(1, Some(&token));
    let t0 = Instant::now();
    api.wait_health(200, Duration::from_secs(60));
    eprintln!(
        "every expert loaded {:?} after the workers started",
        t0.elapsed()
    );

    openai_python(&api);
    curl_sse_and_errors(&api);
    lost_worker(&mut api);
}

/// `tests/clients/openai_check.py` with the Python in `PYTHON` (or `python3`).
fn openai_python(api: &Api) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if !client_available(
        Command::new(&python).args(["-c", "import openai"]),
        &format!("{python} cannot import the openai package"),
    ) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/openai_check.py");
    let t0 = Instant::now();
    let out = output_within(
        Command::new(&python)
            .arg(&script)
            .args([&format!("{}/v1", api.base), KEY, "--r1"]),
        "",
        Duration::from_secs(180),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai_check.py failed ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        api.logs()
    );
    eprintln!("openai_check.py passed in {:?}", t0.elapsed());
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("openai_check.py printed no JSON line ({e}): {stdout}"));
    let chat = &seen["chat"];
    // R1's template ends the prompt inside the thinking part: 12 tokens of thinking.
    let reasoning = chat["reasoning_content"].as_str().unwrap_or_default();
    assert!(!reasoning.is_empty(), "no reasoning_content: {seen}");
    assert!(chat["content"].is_string(), "{seen}");
    assert_eq!(chat["finish"], "length", "{seen}");
    assert!(
        !seen["completion"].as_str().unwrap_or_default().is_empty(),
        "{seen}"
    );
}

/// curl's `-i` output: status, headers (lower-case names), body.
fn curl(api: &Api, path: &str, auth: bool, body: Option<&Value>) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-N", "-i", "--max-time", "60"]);
    if auth {
        cmd.args(["-H", &format!("Authorization: Bearer {KEY}")]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    cmd.arg(format!("{}{path}", api.base));
    let out = output_within(&mut cmd, "", Duration::from_secs(90));
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("curl output is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers: {text:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let headers = lines
        .map(|l| match l.split_once(':') {
            Some((k, v)) => format!("{}:{}", k.to_ascii_lowercase(), v),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (status, headers, body.to_string())
}

/// OpenAI's error shape with `param`.
fn assert_error(body: &str, kind: &str, param: Option<&str>) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["param"].as_str(), param, "{v}");
    v
}

/// The raw SSE framing of a streamed chat answer, a bad request and a missing key, as curl sees
/// them.
fn curl_sse_and_errors(api: &Api) {
    if !client_available(
        Command::new("curl").arg("--version"),
        "curl is not installed",
    ) {
        return;
    }
    let mut body = chat_body("Why is the sky blue?", 10, true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, headers, sse) = curl(api, "/v1/chat/completions", true, Some(&body));
    assert_eq!(status, 200, "{headers}\n{sse}");
    assert!(
        headers
            .lines()
            .any(|l| l.starts_with("content-type: text/event-stream")),
        "{headers}"
    );
    // Every event is exactly one `data: ` line and a blank line.
    assert!(sse.ends_with("\n\n"), "{sse:?}");
    let events: Vec<&str> = sse[..sse.len() - 2]
        .split("\n\n")
        .map(|e| {
            assert!(!e.contains('\n'), "an event of more than one line: {e:?}");
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {e:?}"))
        })
        .collect();
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(*last, "[DONE]");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|c| serde_json::from_str(c).unwrap_or_else(|e| panic!("{e}: {c}")))
        .collect();
    assert!(chunks.len() >= 3, "{sse}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], id, "{c}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|ch| &ch["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")], "{sse}");
    // include_usage: a last chunk without choices counts the tokens.
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 10, "{usage}");
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert!(!reasoning.is_empty(), "R1 thinks first: {sse}");

    // A wrong type is a 400 naming the parameter.
    let mut bad = chat_body("hi", 4, true);
    bad["temperature"] = json!("hot");
    let (status, headers, body) = curl(api, "/v1/chat/completions", true, Some(&bad));
    assert_eq!(status, 400, "{body}");
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    assert_error(&body, "invalid_request_error", Some("temperature"));

    // No key: 401, for the model list as for completions.
    let (status, _, body) = curl(api, "/v1/models", false, None);
    assert_eq!(status, 401, "{body}");
    let v = assert_error(&body, "invalid_request_error", None);
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    let (status, _, body) = curl(api, "/v1/chat/completions", false, Some(&bad));
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = curl(api, "/v1/models", true, None);
    assert_eq!(status, 200, "{body}");
}

/// A worker killed while an answer streams; then restarted.
fn lost_worker(api: &mut Api) {
    let probe = chat_body("Tell me a long story.", 8, false);
    let (status, before) = api.chat(&probe);
    assert_eq!(status, 200, "{before}");

    // A long answer (8000 tokens, the end-of-sequence token ignored); w2 dies once it streams.
    let url = format!("{}/v1/chat/completions", api.base);
    let long = chat_body("Tell me a long story.", 8000, true);
    let w2 = &mut api.workers[1].1;
    let (events, took) = api.rt.block_on(async {
        let mut r = reqwest::Client::new()
            .post(&url)
            .bearer_auth(KEY)
            .json(&long)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut sse = String::new();
        let mut killed: Option<Instant> = None;
        let t0 = Instant::now();
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(30), r.chunk())
                .await
                .expect("the stream stalled for 30 s")
                .expect("reading the stream");
            let Some(chunk) = chunk else { break };
            sse += std::str::from_utf8(&chunk).expect("UTF-8 events");
            if killed.is_none() && sse.matches("\n\n").count() >= 8 {
                drop(w2.take());
                killed = Some(Instant::now());
            }
            if let Some(k) = killed {
                assert!(
                    k.elapsed() < Duration::from_secs(20),
                    "the stream went on for 20 s after the kill"
                );
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no end in sight");
        }
        let killed = killed.expect("the answer ended before 8 events");
        (sse, killed.elapsed())
    });
    eprintln!("the stream ended {took:?} after w2 was killed");
    assert!(events.ends_with("\n\n"), "{events:?}");
    let last = events[..events.len() - 2].rsplit("\n\n").next().unwrap();
    assert!(!events.contains("[DONE]"), "the stream completed: {last}");
    let err: Value = serde_json::from_str(
        last.strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data line: {last:?}")),
    )
    .unwrap();
    let msg = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("\"w2\"") && msg.contains("experts ["),
        "the error names neither the worker nor its experts: {err}"
    );
    assert_eq!(err["error"]["type"], "server_error", "{err}");

    // The coordinator is up: /health says it is waiting, new requests are refused with 503.
    api.wait_health(503, Duration::from_secs(10));
    assert!(api.serve.child.try_wait().unwrap().is_none());
    let (status, refused) = api.chat(&probe);
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["type"], "server_error", "{refused}");

    // w2 comes back from its state directory (no token) and the same request gets the same
    // answer.
    let t0 = Instant::now();
    api.start_worker(1, None);
    api.wait_health(200, Duration::from_secs(60));
    eprintln!("serving again {:?} after w2 restarted", t0.elapsed());
    let (status, after) = api.chat(&probe);
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["choices"], before["choices"]);
    assert!(!before["choices"][0]["message"]["reasoning_content"]
        .as_str()
        .unwrap_or_default()
        .is_empty());
}
