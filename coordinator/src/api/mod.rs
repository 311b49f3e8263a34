//! The OpenAI-compatible HTTP API (axum): chat and text completions, streamed over server-sent
//! events or not, the model list, health and Prometheus metrics.
//!
//! A request is parsed and rendered here (the model's own chat template), then handed to the
//! [`Scheduler`], whose batching thread sends back token ids; [`text::TextOut`] turns them
//! into text, R1's thinking and stop strings included. Dropping the event receiver (a client
//! that disconnects, a stop string) ends the sequence in the scheduler at its next step.

pub mod openai;
pub mod text;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::chat::ChatTemplate;
use engine::tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

use crate::metrics::{self, Metrics, WorkerRtt};
use crate::remote::WorkerStats;
use crate::scheduler::{Event, Finish, Job, Scheduler, SubmitError};
use openai::{ApiError, GenParams, Prompt};
use text::{Delta, TextOut};

/// What the API needs to know about the cluster behind it.
pub trait ClusterView: Send + Sync {
    /// Every expert is loaded somewhere.
    fn is_serving(&self) -> bool;
    fn tokens_per_second(&self) -> f64;
    /// Data-plane statistics of each worker, by name.
    fn worker_stats(&self) -> Vec<(String, Arc<WorkerStats>)>;
}

/// Everything the handlers share.
pub struct Api {
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    /// The name `/v1/models` lists and responses carry.
    pub model_id: String,
    /// Required as `Authorization: Bearer <key>` on `/v1/*` and `/metrics` when set.
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub cluster: Option<Arc<dyn ClusterView>>,
    pub think: Option<(u32, u32)>,
    /// When the server started (seconds since the epoch).
    pub created: u64,
    next_id: AtomicU64,
}

impl Api {
    pub fn new(
        scheduler: Scheduler,
        tokenizer: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        model_id: String,
        api_key: Option<String>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<dyn ClusterView>>,
    ) -> Self {
        let think = text::think_ids(&tokenizer);
        let created = now();
        Api {
            scheduler,
            tokenizer,
            template,
            model_id,
            api_key,
            metrics,
            cluster,
            think,
            created,
            // Ids differ across restarts too.
            next_id: AtomicU64::new(created.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn serving(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.is_serving())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The routes, ready for `axum::serve`.
pub fn router(api: Arc<Api>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(prometheus))
        .route_layer(middleware::from_fn_with_state(api.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn auth(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    if let Some(key) = &api.api_key {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = presented.is_some_and(|p| {
            use subtle::ConstantTimeEq;
            bool::from(p.as_bytes().ct_eq(key.as_bytes()))
        });
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    if api.serving() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading", "message": "not every expert is loaded yet"})),
        )
            .into_response()
    }
}

async fn models(State(api): State<Arc<Api>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": api.model_id,
            "object": "model",
            "created": api.created,
            "owned_by": "dsv3-cluster",
        }],
    }))
    .into_response()
}

async fn prometheus(State(api): State<Arc<Api>>) -> Response {
    let (tps, workers) = match &api.cluster {
        Some(c) => (c.tokens_per_second(), c.worker_stats()),
        None => (0.0, Vec::new()),
    };
    let rtts: Vec<WorkerRtt<'_>> = workers
        .iter()
        .map(|(name, s)| WorkerRtt {
            name,
            hist: &s.rtt_histogram,
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&api.metrics, tps, &rtts),
    )
        .into_response()
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::invalid(None, e.body_text())
    })
}

async fn chat(State(api): State<Arc<Api>>, b: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<(Vec<u32>, GenParams, bool), ApiError> {
        let req = openai::parse_chat(&body(b)?)?;
        let template = api.template.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "messages".to_string(),
                "this model carries no chat template: use /v1/completions",
            )
        })?;
        let rendered = template
            .render(&req.messages, true)
            .map_err(|e| ApiError::invalid("messages".to_string(), e.to_string()))?;
        let prompt = api
            .tokenizer
            .encode(&rendered, false)
            .map_err(|e| ApiError::invalid("messages".to_string(), e.to_string()))?;
        // R1's template ends the prompt inside the thinking part.
        let reasoning = rendered.trim_end().ends_with("<think>");
        Ok((prompt, req.params, reasoning))
    };
    match run() {
        Ok((prompt, params, reasoning)) => {
            generate(api, Kind::Chat, prompt, params, reasoning).await
        }
        Err(e) => e.into_response(),
    }
}

async fn completions(State(api): State<Arc<Api>>, b: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<(Vec<u32>, GenParams), ApiError> {
        let req = openai::parse_completion(&body(b)?)?;
        let prompt = match req.prompt {
            Prompt::Ids(ids) => ids,
            Prompt::Text(t) => api
                .tokenizer
                .encode(&t, true)
                .map_err(|e| ApiError::invalid("prompt".to_string(), e.to_string()))?,
        };
        Ok((prompt, req.params))
    };
    match run() {
        Ok((prompt, params)) => generate(api, Kind::Text, prompt, params, false).await,
        Err(e) => e.into_response(),
    }
}

/// Queues the request and answers it, streamed or whole.
async fn generate(
    api: Arc<Api>,
    kind: Kind,
    prompt: Vec<u32>,
    params: GenParams,
    reasoning: bool,
) -> Response {
    if !api.serving() {
        return ApiError::unavailable("the cluster is still loading experts", 5).into_response();
    }
    let mut sampling = params.sampling;
    let id = api.id();
    if !params.seeded {
        sampling.seed = id;
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        max_new_tokens: params.max_tokens.unwrap_or(usize::MAX),
        sampling,
        ignore_eos: params.ignore_eos,
        events: tx,
    };
    if let Err(e) = api.scheduler.submit(job) {
        return submit_error(e, kind).into_response();
    }
    let think = if kind == Kind::Chat { api.think } else { None };
    let out = TextOut::new(api.tokenizer.clone(), think, reasoning, params.stop.clone());
    let run = Run {
        api,
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{id:016x}"),
            Kind::Text => format!("cmpl-{id:016x}"),
        },
        created: now(),
        rx,
        out,
        prompt_tokens,
        tokens: 0,
        reasoning,
        pending: VecDeque::new(),
        ended: false,
    };
    if params.stream {
        stream(run, params.include_usage)
    } else {
        whole(run).await
    }
}

fn submit_error(e: SubmitError, kind: Kind) -> ApiError {
    let param = match kind {
        Kind::Chat => "messages",
        Kind::Text => "prompt",
    };
    match e {
        SubmitError::QueueFull(_) => {
            ApiError::unavailable(format!("the server is busy: {e}; retry shortly"), 1)
                .with_code("queue_full")
        }
        SubmitError::Stopped => ApiError::unavailable(e.to_string(), 5),
        SubmitError::PromptTooLong { .. } => {
            ApiError::invalid(param.to_string(), e.to_string()).with_code("context_length_exceeded")
        }
        SubmitError::EmptyPrompt | SubmitError::UnknownToken { .. } => {
            ApiError::invalid(param.to_string(), e.to_string())
        }
    }
}

/// One request's generation in progress.
struct Run {
    api: Arc<Api>,
    kind: Kind,
    id: String,
    created: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    out: TextOut,
    prompt_tokens: usize,
    /// Tokens received.
    tokens: usize,
    /// The answer starts in R1's thinking part.
    reasoning: bool,
    pending: VecDeque<Step>,
    ended: bool,
}

/// A step of a generation as the response sees it.
enum Step {
    Text(Delta),
    End {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

impl Run {
    /// The next step; `None` after the end (which is always `End` or `Failed`).
    async fn next(&mut self) -> Option<Step> {
        loop {
            if let Some(s) = self.pending.pop_front() {
                return Some(s);
            }
            if self.ended {
                return None;
            }
            let ev = self.rx.recv().await.unwrap_or_else(|| {
                Event::Failed("the scheduler stopped before the request ended".into())
            });
            match ev {
                Event::Token(t) => {
                    self.tokens += 1;
                    match self.out.push(t) {
                        Ok(d) => {
                            if !d.is_empty() {
                                self.pending.push_back(Step::Text(d));
                            }
                            if self.out.stopped() {
                                // A stop string: the scheduler drops the sequence at its next
                                // step, seeing the channel closed.
                                self.rx.close();
                                self.end(Step::End {
                                    finish: Finish::Stop,
                                    prompt_tokens: self.prompt_tokens,
                                    completion_tokens: self.tokens,
                                });
                            }
                        }
                        Err(e) => self.end(Step::Failed(server_error(e.to_string()))),
                    }
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let rest = self.out.finish();
                    if !rest.is_empty() {
                        self.pending.push_back(Step::Text(rest));
                    }
                    self.end(Step::End {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                Event::Failed(msg) => self.end(Step::Failed(server_error(msg))),
            }
        }
    }

    fn end(&mut self, s: Step) {
        self.pending.push_back(s);
        self.ended = true;
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// A response or chunk around `choice` (and `usage` when given).
    fn wrap(&self, chunk: bool, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.api.model_id,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }

    /// A streamed chunk with one choice: `delta` text (or a chat delta object) and a finish
    /// reason.
    fn chunk(&self, d: &Delta, role: bool, finish: Option<Finish>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                    delta["content"] = json!("");
                }
                if !d.reasoning.is_empty() {
                    delta["reasoning_content"] = json!(d.reasoning);
                }
                if !d.content.is_empty() {
                    delta["content"] = json!(d.content);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(reason)})
            }
            Kind::Text => {
                json!({"index": 0, "text": d.content, "logprobs": null, "finish_reason": finish.map(reason)})
            }
        };
        self.wrap(true, json!([choice]), None)
    }
}

fn reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::BAD_GATEWAY,
        message,
        kind: "server_error",
        param: None,
        code: Some("generation_failed"),
        retry_after: None,
    }
}

/// Server-sent events: OpenAI's chunks, then `[DONE]`.
fn stream(mut run: Run, include_usage: bool) -> Response {
    let (tx, rx) = mpsc::channel::<SseEvent>(32);
    tokio::spawn(async move {
        let data = |v: Value| SseEvent::default().data(v.to_string());
        let mut queue = Vec::new();
        if run.kind == Kind::Chat {
            queue.push(data(run.chunk(&Delta::default(), true, None)));
        }
        loop {
            for ev in queue.drain(..) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            // A client that goes away ends the generation now, not at its next token.
            let step = tokio::select! {
                s = run.next() => s,
                _ = tx.closed() => return,
            };
            match step {
                None => return,
                Some(Step::Text(d)) => queue.push(data(run.chunk(&d, false, None))),
                Some(Step::End {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    queue.push(data(run.chunk(&Delta::default(), false, Some(finish))));
                    if include_usage {
                        let usage = openai::usage(prompt_tokens, completion_tokens);
                        queue.push(data(run.wrap(true, json!([]), Some(usage))));
                    }
                    queue.push(SseEvent::default().data("[DONE]"));
                }
                Some(Step::Failed(e)) => queue.push(data(e.body())),
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The whole answer in one response.
async fn whole(mut run: Run) -> Response {
    let mut text = Delta::default();
    while let Some(step) = run.next().await {
        match step {
            Step::Text(d) => {
                text.reasoning += &d.reasoning;
                text.content += &d.content;
            }
            Step::Failed(e) => return e.into_response(),
            Step::End {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let choice = match run.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": text.content});
                        if run.reasoning || !text.reasoning.is_empty() {
                            message["reasoning_content"] = json!(text.reasoning);
                        }
                        json!({"index": 0, "message": message, "logprobs": null, "finish_reason": reason(finish)})
                    }
                    Kind::Text => {
                        json!({"index": 0, "text": text.content, "logprobs": null, "finish_reason": reason(finish)})
                    }
                };
                let usage = openai::usage(prompt_tokens, completion_tokens);
                return Json(run.wrap(false, json!([choice]), Some(usage))).into_response();
            }
        }
    }
    server_error("the generation ended without a result".into()).into_response()
}
