//! OpenAI's wire format: the request bodies the API accepts (checked field by field, so that a
//! wrong type names its parameter), the error shape, and the response and chunk bodies.
//!
//! Unknown fields are ignored, as OpenAI's own server and the clients people use expect.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use engine::chat::ChatMessage;
use engine::sampling::SamplingParams;
use serde_json::{json, Map, Value};

/// Most stop strings a request may carry.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_LEN: usize = 256;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
            retry_after: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "a valid API key is required: send `Authorization: Bearer <key>`".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u32) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable"),
            retry_after: Some(retry_after),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body (also what a stream sends when it fails midway).
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Generation settings common to both endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Whether the request named a seed (otherwise the server picks one).
    pub seeded: bool,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate past the model's end-of-sequence tokens, up to `max_tokens` (the extension
    /// llama.cpp's server and vLLM take, for benchmarks that need answers of a set length).
    pub ignore_eos: bool,
}

/// A `/v1/completions` prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A parsed `/v1/chat/completions` request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub params: GenParams,
}

/// A parsed `/v1/completions` request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub params: GenParams,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            None,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// A present, non-null field.
fn field<'a>(m: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    m.get(name).filter(|v| !v.is_null())
}

fn wrong(name: &str, what: &str, v: &Value) -> ApiError {
    ApiError::invalid(
        name.to_string(),
        format!("`{name}` must be {what}, not {}", kind_of(v)),
    )
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn number(m: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    let Some(v) = field(m, name) else {
        return Ok(None);
    };
    let what = format!("a number from {lo} to {hi}");
    let x = v.as_f64().ok_or_else(|| wrong(name, &what, v))?;
    if !(lo..=hi).contains(&x) {
        return Err(wrong(name, &what, v));
    }
    Ok(Some(x))
}

fn integer(m: &Map<String, Value>, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    let Some(v) = field(m, name) else {
        return Ok(None);
    };
    let what = format!("an integer from {lo} to {hi}");
    let x = v.as_i64().ok_or_else(|| wrong(name, &what, v))?;
    if !(lo..=hi).contains(&x) {
        return Err(wrong(name, &what, v));
    }
    Ok(Some(x))
}

fn boolean(m: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(m, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong(name, "a boolean", v)),
    }
}

fn params(m: &Map<String, Value>) -> Result<GenParams, ApiError> {
    let model = match field(m, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(wrong("model", "a string", v)),
    };
    if let Some(n) = integer(m, "n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid(
                "n".to_string(),
                "only n=1 is supported (one choice per request)",
            ));
        }
    }
    let max_tokens = integer(m, "max_tokens", 1, u32::MAX as i64)?;
    let max_completion = integer(m, "max_completion_tokens", 1, u32::MAX as i64)?;
    let mut sampling = SamplingParams::default();
    if let Some(t) = number(m, "temperature", 0.0, 2.0)? {
        sampling.temperature = t as f32;
    }
    if let Some(p) = number(m, "top_p", 0.0, 1.0)? {
        sampling.top_p = p as f32;
    }
    if let Some(k) = integer(m, "top_k", -1, u32::MAX as i64)? {
        // -1 and 0 both mean "off", as in the servers that take this extension.
        sampling.top_k = k.max(0) as usize;
    }
    if let Some(p) = number(m, "min_p", 0.0, 1.0)? {
        sampling.min_p = p as f32;
    }
    let seed = match field(m, "seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| wrong("seed", "an integer", v))?,
        ),
    };
    if let Some(s) = seed {
        sampling.seed = s;
    }
    let stop = match field(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(wrong("stop", "a string or an array of strings", v)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong("stop", "a string or an array of strings", v)),
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(ApiError::invalid(
            "stop".to_string(),
            format!("`stop` takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_LEN} bytes"),
        ));
    }
    let stream = boolean(m, "stream")?.unwrap_or(false);
    let ignore_eos = boolean(m, "ignore_eos")?.unwrap_or(false);
    let include_usage = match field(m, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|mut e| {
                e.param = Some("stream_options.include_usage".into());
                e
            })?
            .unwrap_or(false),
        Some(v) => return Err(wrong("stream_options", "an object", v)),
    };
    Ok(GenParams {
        model,
        max_tokens: max_completion.or(max_tokens).map(|n| n as usize),
        sampling,
        seeded: seed.is_some(),
        stop,
        stream,
        include_usage,
        ignore_eos,
    })
}

/// The text of a message's `content`: a string, or an array of `{"type": "text", "text"}`
/// parts (joined), or null/absent (empty).
fn content(v: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                let t = p
                    .as_object()
                    .filter(|o| o.get("type").and_then(Value::as_str) == Some("text"))
                    .and_then(|o| o.get("text"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            param.to_string(),
                            format!("`{param}` parts must be {{\"type\": \"text\", \"text\": ...}}; this model reads text only"),
                        )
                    })?;
                text.push_str(t);
            }
            Ok(text)
        }
        Some(v) => Err(wrong(param, "a string or an array of text parts", v)),
    }
}

pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let m = object(body)?;
    let list = match field(&m, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) | None => {
            return Err(ApiError::invalid(
                "messages".to_string(),
                "`messages` must be a non-empty array",
            ))
        }
        Some(v) => return Err(wrong("messages", "an array of messages", v)),
    };
    let mut messages = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let p = format!("messages[{i}]");
        let o = msg
            .as_object()
            .ok_or_else(|| wrong(&p, "an object with `role` and `content`", msg))?;
        let role = match o.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(v) => return Err(wrong(&format!("{p}.role"), "a string", v)),
            None => {
                return Err(ApiError::invalid(
                    format!("{p}.role"),
                    format!("`{p}.role` is required"),
                ))
            }
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    format!("{p}.role"),
                    format!("unknown role {other:?} (system, developer, user, assistant, tool)"),
                ))
            }
        };
        let text = content(o.get("content"), &format!("{p}.content"))?;
        messages.push(ChatMessage::new(role, text));
    }
    Ok(ChatRequest {
        messages,
        params: params(&m)?,
    })
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let m = object(body)?;
    let what = "a string, an array of one string, or an array of token ids";
    let prompt = match field(&m, "prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => Prompt::Ids(
            a.iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| wrong("prompt", what, v))
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(Value::Array(a)) if a.len() > 1 && a.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                "prompt".to_string(),
                "one prompt per request (batched prompts are not supported)",
            ))
        }
        Some(v) => return Err(wrong("prompt", what, v)),
        None => {
            return Err(ApiError::invalid(
                "prompt".to_string(),
                "`prompt` is required",
            ))
        }
    };
    Ok(CompletionRequest {
        prompt,
        params: params(&m)?,
    })
}

/// `usage` of a response.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<ChatRequest, ApiError> {
        parse_chat(body.to_string().as_bytes())
    }

    #[test]
    fn chat_request_with_every_parameter() {
        let r = chat(json!({
            "model": "m", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null},
                {"role": "developer", "content": "x"}
            ],
            "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
            "top_k": 40, "min_p": 0.05, "seed": 42, "stop": ["a", "b"], "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "ignore_eos": true,
            "frequency_penalty": 0, "some_future_field": {"x": 1}
        }))
        .unwrap();
        let roles: Vec<_> = r.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "system"]);
        assert_eq!(r.messages[1].content.as_deref(), Some("hi there"));
        assert_eq!(r.messages[2].content.as_deref(), Some(""));
        let p = r.params;
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(p.sampling.temperature, 0.5);
        assert_eq!(p.sampling.top_p, 0.9);
        assert_eq!(p.sampling.top_k, 40);
        assert_eq!(p.sampling.min_p, 0.05);
        assert_eq!(p.sampling.seed, 42);
        assert!(p.seeded && p.stream && p.include_usage && p.ignore_eos);
        assert_eq!(p.stop, ["a", "b"]);
    }

    #[test]
    fn defaults_and_nulls() {
        let r = chat(json!({"messages": [{"role": "user", "content": "x"}], "temperature": null, "stop": "END"})).unwrap();
        let p = r.params;
        assert_eq!(p.sampling, SamplingParams::default());
        assert!(!p.seeded && !p.stream && !p.include_usage && !p.ignore_eos);
        assert_eq!(p.max_tokens, None);
        assert_eq!(p.stop, ["END"]);
    }

    #[test]
    fn wrong_types_name_their_parameter() {
        let user = json!([{"role": "user", "content": "x"}]);
        let cases = [
            (
                json!({"messages": user, "temperature": "hot"}),
                "temperature",
            ),
            (json!({"messages": user, "temperature": 3}), "temperature"),
            (json!({"messages": user, "top_p": 1.5}), "top_p"),
            (json!({"messages": user, "max_tokens": 0}), "max_tokens"),
            (json!({"messages": user, "max_tokens": 2.5}), "max_tokens"),
            (json!({"messages": user, "n": 2}), "n"),
            (json!({"messages": user, "stream": "yes"}), "stream"),
            (json!({"messages": user, "ignore_eos": 1}), "ignore_eos"),
            (json!({"messages": user, "stop": [1]}), "stop"),
            (json!({"messages": user, "stop": ""}), "stop"),
            (json!({"messages": user, "seed": "x"}), "seed"),
            (json!({"messages": user, "model": 3}), "model"),
            (
                json!({"messages": user, "stream_options": {"include_usage": 1}}),
                "stream_options.include_usage",
            ),
            (json!({"messages": []}), "messages"),
            (json!({"messages": "hi"}), "messages"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content",
            ),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.kind, "invalid_request_error");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        for bad in ["", "[1]", "{", "null"] {
            let e = parse_chat(bad.as_bytes()).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, None),
                "{bad}"
            );
        }
    }

    #[test]
    fn completion_prompts() {
        let p = |v: Value| parse_completion(json!({ "prompt": v }).to_string().as_bytes());
        assert_eq!(p(json!("hi")).unwrap().prompt, Prompt::Text("hi".into()));
        assert_eq!(p(json!(["hi"])).unwrap().prompt, Prompt::Text("hi".into()));
        assert_eq!(
            p(json!([1, 2, 3])).unwrap().prompt,
            Prompt::Ids(vec![1, 2, 3])
        );
        for bad in [
            json!(["a", "b"]),
            json!([-1]),
            json!([1.5]),
            json!(3),
            json!([]),
        ] {
            assert_eq!(
                p(bad.clone()).unwrap_err().param.as_deref(),
                Some("prompt"),
                "{bad}"
            );
        }
        let e = parse_completion(b"{}").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn error_body_shape() {
        let e = ApiError::invalid("top_p".to_string(), "bad");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": null}})
        );
    }
}
