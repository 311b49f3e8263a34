//! The OpenAI-compatible API over real HTTP: the scheduler and the axum server in this
//! process on loopback, the synthetic tiny model with every expert held locally, a real HTTP
//! client. Answers must equal the same model's generation in one process without the API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::api::{serve, Api};
use coordinator::metrics::{CountingExperts, ExpertHits, Metrics};
use coordinator::scheduler::{CpuBatch, GpuBatch, Scheduler, SchedulerConfig, TokenRules};
use engine::generate::{generate, GenerateRequest};
use engine::gpu::{test_context, GpuContext, GpuModel, GpuOptions};
use engine::model::kv_cache::CacheType;
use engine::model::moe::RoutedExperts;
use engine::model::weights::ExpertFilter;
use engine::model::{Model, ModelFile};
use engine::sampling::SamplingParams;
use engine::synth::{write_model, ChatStyle, SynthSpec};
use engine::tokenizer::Tokenizer;
use serde_json::{json, Value};

struct Server {
    addr: SocketAddr,
    api: Arc<Api>,
    mf: Arc<ModelFile>,
    model: Arc<Model>,
    experts: Arc<dyn RoutedExperts>,
    tokenizer: Arc<Tokenizer>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn tiny(dir: &Path, chat: ChatStyle) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    write_model(
        &path,
        &SynthSpec {
            chat,
            ..SynthSpec::tiny()
        },
    )
    .unwrap();
    path
}

fn start(chat: ChatStyle, cfg: SchedulerConfig, api_key: Option<&str>) -> Server {
    start_with(chat, cfg, api_key, None, None)
}

/// The server with the model's dense part on `gpu` when given (the experts stay on the host),
/// and ending answers at `stop_ids` when given instead of the model's end-of-sequence ids.
fn start_with(
    chat: ChatStyle,
    cfg: SchedulerConfig,
    api_key: Option<&str>,
    gpu: Option<Arc<GpuContext>>,
    stop_ids: Option<Vec<u32>>,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mf = Arc::new(ModelFile::open(&tiny(dir.path(), chat)).unwrap());
    let model = Arc::new(mf.load_model().unwrap());
    let tokenizer = Arc::new(mf.tokenizer().unwrap());
    let experts: Arc<dyn RoutedExperts> = Arc::new(mf.load_experts(&ExpertFilter::All).unwrap());
    let hits = Arc::new(ExpertHits::new(&mf.expert_layout().unwrap()));
    let metrics = Arc::new(Metrics::new(hits.clone()));
    let rules = TokenRules {
        stop_ids: stop_ids.unwrap_or_else(|| mf.config.eos_ids.clone()),
        banned_from: tokenizer.vocab_size().min(model.cfg.vocab_size) as u32,
        banned_ids: mf.unused_token_ids(),
    };
    let counting = Arc::new(CountingExperts {
        inner: experts.clone(),
        hits,
    });
    let scheduler = match gpu {
        Some(ctx) => {
            let g =
                GpuModel::with_sequences(ctx, &model, cfg.max_context, cfg.max_batch, cfg.cache)
                    .unwrap();
            Scheduler::start(
                GpuBatch::new(g),
                counting,
                cfg,
                rules,
                metrics.clone(),
                Box::new(|_| {}),
            )
        }
        None => Scheduler::start(
            CpuBatch::new(model.clone()),
            counting,
            cfg,
            rules,
            metrics.clone(),
            Box::new(|_| {}),
        ),
    }
    .unwrap();
    let api = Arc::new(Api::new(
        scheduler,
        tokenizer.clone(),
        mf.chat_template(&tokenizer).unwrap(),
        "tiny".into(),
        api_key.map(str::to_string),
        metrics,
        None,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, api.clone(), std::future::pending()));
        addr
    });
    Server {
        addr,
        api,
        mf,
        model,
        experts,
        tokenizer,
        rt,
        _dir: dir,
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Greedy generation in this process without the API: (text, tokens).
    fn reference(&self, user: &str, max_new: usize) -> (String, Vec<u32>) {
        self.reference_stopping(user, max_new, self.mf.config.eos_ids.clone())
    }

    /// As `reference`, ending at `stop_ids`.
    fn reference_stopping(
        &self,
        user: &str,
        max_new: usize,
        stop_ids: Vec<u32>,
    ) -> (String, Vec<u32>) {
        let tpl = self.mf.chat_template(&self.tokenizer).unwrap().unwrap();
        let rendered = tpl
            .render(&[engine::chat::ChatMessage::user(user)], true)
            .unwrap();
        let prompt = self.tokenizer.encode(&rendered, false).unwrap();
        let req = GenerateRequest {
            prompt,
            max_new_tokens: max_new,
            sampling: SamplingParams::greedy(),
            stop_ids,
            banned_ids: self.mf.unused_token_ids(),
            force: None,
            keep_logits: false,
            cache: CacheType::F16,
        };
        let mut text = String::new();
        let g = generate(
            &self.model,
            self.experts.as_ref(),
            &self.tokenizer,
            &req,
            |p| text.push_str(p),
        )
        .unwrap();
        (text, g.tokens)
    }

    /// Streams a chat completion for every prompt at once; each answer's text, in order.
    async fn stream_all(&self, prompts: &[String], max_tokens: usize) -> Vec<String> {
        let tasks: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (url, body) = (
                    self.url("/v1/chat/completions"),
                    chat_body(p, max_tokens, true),
                );
                tokio::spawn(async move {
                    let r = reqwest::Client::new()
                        .post(url)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    parse_chat_stream(&r.text().await.unwrap()).1
                })
            })
            .collect();
        let mut texts = Vec::new();
        for t in tasks {
            texts.push(t.await.unwrap());
        }
        texts
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

fn chat_body(user: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// The `data:` payloads of an SSE body, checking the framing on the way.
fn sse_data(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "events end with a blank line");
    let mut out = Vec::new();
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        for line in event.lines() {
            if line.starts_with(':') {
                continue; // keep-alive comment
            }
            let d = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {line:?}"));
            out.push(d.to_string());
        }
    }
    out
}

/// Streamed chat: (reasoning, content, finish_reason, usage).
fn parse_chat_stream(body: &str) -> (String, String, String, Value) {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let (mut reasoning, mut content, mut finish, mut usage) =
        (String::new(), String::new(), String::new(), Value::Null);
    for (i, d) in data[..data.len() - 1].iter().enumerate() {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        assert_eq!(v["object"], "chat.completion.chunk");
        if i == 0 {
            assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        }
        if let Some(u) = v.get("usage") {
            assert_eq!(v["choices"], json!([]));
            usage = u.clone();
            continue;
        }
        let c = &v["choices"][0];
        if let Some(s) = c["delta"]["reasoning_content"].as_str() {
            reasoning += s;
        }
        if let Some(s) = c["delta"]["content"].as_str() {
            content += s;
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (reasoning, content, finish, usage)
}

fn finish_of(tokens: &[u32], eos: &[u32]) -> &'static str {
    if tokens.last().is_some_and(|t| eos.contains(t)) {
        "stop"
    } else {
        "length"
    }
}

#[test]
fn chat_and_completions_equal_one_process_generation() {
    let s = start(ChatStyle::V3, SchedulerConfig::default(), None);
    let (text, tokens) = s.reference("Why is the sky blue?", 12);
    let eos = s.mf.config.eos_ids.clone();
    s.rt.block_on(async {
        // Whole.
        let r = s
            .post(
                "/v1/chat/completions",
                chat_body("Why is the sky blue?", 12, false),
            )
            .await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "tiny");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], text.as_str(), "{v}");
        assert!(v["choices"][0]["message"]
            .get("reasoning_content")
            .is_none());
        assert_eq!(v["choices"][0]["finish_reason"], finish_of(&tokens, &eos));
        assert_eq!(v["usage"]["completion_tokens"], tokens.len());
        let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 5);
        assert_eq!(
            v["usage"]["total_tokens"],
            prompt_tokens + tokens.len() as u64
        );

        // Streamed.
        let r = s
            .post(
                "/v1/chat/completions",
                chat_body("Why is the sky blue?", 12, true),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let (reasoning, content, finish, usage) = parse_chat_stream(&r.text().await.unwrap());
        assert_eq!(reasoning, "");
        assert_eq!(content, text);
        assert_eq!(finish, finish_of(&tokens, &eos));
        assert_eq!(usage["completion_tokens"], tokens.len());
        assert_eq!(usage["prompt_tokens"], prompt_tokens);

        // Text completion of the same prompt ids, whole and streamed.
        let tpl = s.mf.chat_template(&s.tokenizer).unwrap().unwrap();
        let rendered = tpl
            .render(
                &[engine::chat::ChatMessage::user("Why is the sky blue?")],
                true,
            )
            .unwrap();
        let ids = s.tokenizer.encode(&rendered, false).unwrap();
        let body = json!({"prompt": ids, "max_tokens": 12, "temperature": 0.0});
        let v: Value = s
            .post("/v1/completions", body.clone())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], text.as_str());
        let mut streamed = body;
        streamed["stream"] = json!(true);
        let raw = s
            .post("/v1/completions", streamed)
            .await
            .text()
            .await
            .unwrap();
        let data = sse_data(&raw);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let joined: String = data[..data.len() - 1]
            .iter()
            .map(|d| {
                serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(joined, text);

        // The model list, health and metrics.
        let v: Value = reqwest::get(s.url("/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["data"][0]["id"], "tiny");
        let h = reqwest::get(s.url("/health")).await.unwrap();
        assert_eq!(h.status(), 200);
        let m = reqwest::get(s.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| -> f64 {
            m.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing:\n{m}"))
                .parse()
                .unwrap()
        };
        assert_eq!(value("dsv3_requests_total"), 4.0);
        assert!(value("dsv3_generated_tokens_total") >= 4.0 * tokens.len() as f64);
        assert_eq!(value("dsv3_time_to_first_token_seconds_count"), 4.0);
        assert!(m.contains("dsv3_expert_hits_total{layer=\"1\""), "{m}");
    });
}

#[test]
fn concurrent_streams_give_the_same_tokens_as_one_by_one() {
    let cfg = SchedulerConfig {
        max_batch: 32,
        ..SchedulerConfig::default()
    };
    let s = start(ChatStyle::V3, cfg, None);
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Question {i}: {}?", "why ".repeat(i % 5 + 1)))
        .collect();
    s.rt.block_on(async {
        let mut alone = Vec::new();
        for p in &prompts {
            let v: Value = s
                .post("/v1/chat/completions", chat_body(p, 16, false))
                .await
                .json()
                .await
                .unwrap();
            alone.push(
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let steps_before = s.api.metrics.steps.load(Ordering::Relaxed);
        let together = s.stream_all(&prompts, 16).await;
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a, b, "request {i}");
        }
        // They did run together: one by one they took 32 x 16 steps (a prefill and 15 decode
        // steps each).
        let steps = s.api.metrics.steps.load(Ordering::Relaxed) - steps_before;
        assert!(
            steps < 32 * 16 / 2,
            "{steps} steps for 32 concurrent requests"
        );
    });
}

/// With the model's dense part on a GPU (lavapipe in CI), every sequence has a slot of the
/// device cache: concurrent requests are batched (fewer steps than tokens), slots are reused
/// when six requests share four, and every answer is the CPU's greedy answer in one process.
#[test]
fn a_gpu_batches_concurrent_requests_with_the_cpus_tokens() {
    let Some(ctx) = test_context(GpuOptions::default()) else {
        return;
    };
    let cfg = SchedulerConfig {
        max_batch: 4,
        max_context: 256,
        ..SchedulerConfig::default()
    };
    let s = start_with(ChatStyle::V3, cfg, None, Some(Arc::new(ctx)), None);
    assert_eq!(s.api.scheduler.config().max_batch, 4);
    let prompts: Vec<String> = (0..6)
        .map(|i| format!("Question {i}: {}?", "how ".repeat(i + 1)))
        .collect();
    let max_new = 10;
    s.rt.block_on(async {
        let steps_before = s.api.metrics.steps.load(Ordering::Relaxed);
        let texts = s.stream_all(&prompts, max_new).await;
        let mut generated = 0;
        for (i, text) in texts.into_iter().enumerate() {
            let (want, tokens) = s.reference(&prompts[i], max_new);
            assert_eq!(text, want, "request {i}");
            generated += tokens.len() as u64;
        }
        // Sequences shared steps: fewer steps than sampled tokens.
        let steps = s.api.metrics.steps.load(Ordering::Relaxed) - steps_before;
        assert!(steps < generated, "{steps} steps for {generated} tokens");
    });
}

#[test]
fn r1_thinking_is_reasoning_content() {
    let s = start(ChatStyle::R1, SchedulerConfig::default(), None);
    let (_, tokens) = s.reference("Why is the sky blue?", 24);
    let close = s.tokenizer.token_to_id("</think>").unwrap();
    let eos = s.mf.config.eos_ids.clone();
    let text_ids: Vec<u32> = tokens
        .iter()
        .copied()
        .filter(|t| !eos.contains(t))
        .collect();
    let (think, answer) = match text_ids.iter().position(|&t| t == close) {
        Some(i) => (&text_ids[..i], &text_ids[i + 1..]),
        None => (&text_ids[..], &[][..]),
    };
    let want_reasoning = s.tokenizer.decode(think, true).unwrap();
    let want_content = s.tokenizer.decode(answer, true).unwrap();
    assert!(!want_reasoning.is_empty());
    s.rt.block_on(async {
        let v: Value = s
            .post(
                "/v1/chat/completions",
                chat_body("Why is the sky blue?", 24, false),
            )
            .await
            .json()
            .await
            .unwrap();
        let m = &v["choices"][0]["message"];
        assert_eq!(m["reasoning_content"], want_reasoning.as_str(), "{v}");
        assert_eq!(m["content"], want_content.as_str(), "{v}");
        let r = s
            .post(
                "/v1/chat/completions",
                chat_body("Why is the sky blue?", 24, true),
            )
            .await;
        let (reasoning, content, _, _) = parse_chat_stream(&r.text().await.unwrap());
        assert_eq!(reasoning, want_reasoning);
        assert_eq!(content, want_content);
    });
}

#[test]
fn stop_strings_end_the_answer_before_them() {
    let s = start(ChatStyle::V3, SchedulerConfig::default(), None);
    let (text, _) = s.reference("Tell me a story.", 24);
    // A stop string from the middle of the greedy answer.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let at = text.find(&stop).unwrap();
    s.rt.block_on(async {
        for stream in [false, true] {
            let mut body = chat_body("Tell me a story.", 24, stream);
            body["stop"] = json!([stop, "never appears \u{1}"]);
            let r = s.post("/v1/chat/completions", body).await;
            let (content, finish) = if stream {
                let (_, c, f, _) = parse_chat_stream(&r.text().await.unwrap());
                (c, f)
            } else {
                let v: Value = r.json().await.unwrap();
                (
                    v["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    v["choices"][0]["finish_reason"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            };
            assert_eq!(content, text[..at], "stream: {stream}");
            assert_eq!(finish, "stop");
        }
    });
}

#[test]
fn bad_requests_get_openai_shaped_errors() {
    let cfg = SchedulerConfig {
        max_context: 64,
        ..SchedulerConfig::default()
    };
    let s = start(ChatStyle::V3, cfg, Some("sesame"));
    s.rt.block_on(async {
        let c = reqwest::Client::new();
        let post = |path: &str, body: String, key: Option<&str>| {
            let mut r = c
                .post(s.url(path))
                .header("content-type", "application/json")
                .body(body);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send()
        };
        let check = |v: &Value, kind: &str, param: Option<&str>| {
            let e = &v["error"];
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            assert_eq!(e["type"], kind, "{v}");
            assert_eq!(e["param"].as_str(), param, "{v}");
        };
        // No key, wrong key.
        for key in [None, Some("wrong")] {
            let r = post(
                "/v1/chat/completions",
                chat_body("hi", 4, false).to_string(),
                key,
            )
            .await
            .unwrap();
            assert_eq!(r.status(), 401);
            check(&r.json().await.unwrap(), "invalid_request_error", None);
        }
        let r = c.get(s.url("/v1/models")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        // Health needs no key.
        assert_eq!(c.get(s.url("/health")).send().await.unwrap().status(), 200);

        let key = Some("sesame");
        let cases = [
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"})
                    .to_string(),
                Some("temperature"),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": "hi"}).to_string(),
                Some("messages"),
            ),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}).to_string(),
                Some("n"),
            ),
            ("/v1/chat/completions", "{not json".to_string(), None),
            (
                "/v1/completions",
                json!({"prompt": [1, 2, 999999]}).to_string(),
                Some("prompt"),
            ),
            (
                "/v1/completions",
                json!({"prompt": "word ".repeat(200)}).to_string(),
                Some("prompt"),
            ),
        ];
        for (path, body, param) in cases {
            let r = post(path, body.clone(), key).await.unwrap();
            assert_eq!(r.status(), 400, "{body}");
            check(&r.json().await.unwrap(), "invalid_request_error", param);
        }
        let r = c
            .get(s.url("/v1/nothing"))
            .bearer_auth("sesame")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        check(&r.json().await.unwrap(), "invalid_request_error", None);

        // A good request with the key works.
        let r = post(
            "/v1/chat/completions",
            chat_body("hi", 4, false).to_string(),
            key,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
    });
}

#[test]
fn ignore_eos_answers_run_to_max_tokens() {
    // The greedy answer's third token ends answers on this server, so that where the answer
    // stops does not depend on when the model happens to give its own end-of-sequence token.
    let (text, tokens) = start(ChatStyle::V3, SchedulerConfig::default(), None).reference_stopping(
        "Why is the sky blue?",
        8,
        vec![],
    );
    assert_eq!(tokens.len(), 8);
    let stop = tokens[2];
    let stops_at = tokens.iter().position(|&t| t == stop).unwrap() + 1;
    let s = start_with(
        ChatStyle::V3,
        SchedulerConfig::default(),
        None,
        None,
        Some(vec![stop]),
    );
    s.rt.block_on(async {
        let chat = |body: Value| async {
            let r = s.post("/v1/chat/completions", body).await;
            (r.status(), r.json::<Value>().await.unwrap())
        };
        let mut body = chat_body("Why is the sky blue?", 8, false);
        let (_, v) = chat(body.clone()).await;
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], stops_at);

        body["ignore_eos"] = json!(true);
        let (_, v) = chat(body.clone()).await;
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 8);
        assert_eq!(v["choices"][0]["message"]["content"], text.as_str());

        body["ignore_eos"] = json!("yes");
        let (status, v) = chat(body).await;
        assert_eq!(status, 400);
        assert_eq!(v["error"]["param"], "ignore_eos");
    });
}

#[test]
fn a_full_queue_refuses_and_a_gone_client_frees_its_slot() {
    let cfg = SchedulerConfig {
        max_batch: 1,
        max_queue: 1,
        max_context: 4096,
        ..SchedulerConfig::default()
    };
    let s = start(ChatStyle::V3, cfg, None);
    s.rt.block_on(async {
        // One long request runs, one waits; the third is refused. The long one ignores the
        // end-of-sequence token, so that only its 4000 tokens could end it.
        let mut long = chat_body("Talk forever.", 4000, true);
        long["ignore_eos"] = json!(true);
        let running = s.post("/v1/chat/completions", long.clone()).await;
        assert_eq!(running.status(), 200);
        let mut running = running;
        let first = running.chunk().await.unwrap().unwrap();
        assert!(first.starts_with(b"data: "));
        // The first chunk (the role) leaves before the batching thread takes the request in:
        // wait until it runs, so that the queue's one place is free for the next.
        let t0 = Instant::now();
        while s.api.metrics.active.load(Ordering::Relaxed) < 1
            || s.api.metrics.queue_depth.load(Ordering::Relaxed) != 0
        {
            assert!(t0.elapsed() < Duration::from_secs(10), "never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let waiting = tokio::spawn({
            let url = s.url("/v1/chat/completions");
            let body = chat_body("Wait your turn.", 3, false);
            async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
            }
        });
        let t0 = Instant::now();
        while s.api.metrics.queue_depth.load(Ordering::Relaxed) < 1 {
            assert!(t0.elapsed() < Duration::from_secs(10), "never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = s
            .post("/v1/chat/completions", chat_body("No room.", 3, false))
            .await;
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "queue_full");

        // The streaming client goes away: its slot frees and the waiting request runs.
        drop(running);
        let r = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the waiting request never ran")
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 3);
        let t0 = Instant::now();
        while s.api.metrics.active.load(Ordering::Relaxed) != 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "slot never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(s.api.metrics.generated_tokens.load(Ordering::Relaxed) < 4000);
    });
}
