//! `cluster chat`: a conversation in the terminal with the coordinator's OpenAI-compatible API.
//!
//! Each line read is a user message; the whole conversation goes to
//! `POST /v1/chat/completions` with `stream: true`, and the answer is printed as its
//! server-sent events arrive ([`SseParser`], [`parse_event`]). DeepSeek-R1's thinking
//! (`reasoning_content`) is shown dimmed on a terminal and is not sent back in the history.
//! `/reset` clears the conversation, `/exit` or end of input quits.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Base URL of the coordinator's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model to ask for (default: the first of `GET /v1/models`).
    #[arg(long)]
    pub model: Option<String>,
    /// A system message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Longest answer, in tokens (default: the server's limit).
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

/// Longest SSE line or event accepted.
pub const MAX_EVENT: usize = 1 << 20;
/// Longest answer kept in the history.
pub const MAX_ANSWER: usize = 16 << 20;
/// Most bytes of an error reply read.
const MAX_ERROR_BODY: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Server-sent events

/// A stream that breaks the event-stream format's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event-stream line or event exceeds {MAX_EVENT} bytes")]
    TooLong,
    #[error("the event stream is not UTF-8")]
    Utf8,
}

/// An incremental parser of `text/event-stream` (the WHATWG format): feed it bytes as they
/// arrive, in pieces cut anywhere, and it returns the `data` of each complete event.
///
/// Lines end with `\n`, `\r\n` or `\r` (also when the `\r` and `\n` arrive in different
/// pieces); lines starting with `:` are comments; an event's `data:` lines are joined with `\n`
/// (one space after the colon is dropped); a blank line ends the event. Other fields (`event`,
/// `id`, `retry`) are ignored. An event still open when the stream ends is dropped, as the
/// format says.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    after_cr: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The events completed by `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue; // the second half of "\r\n"
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    self.end_line(&mut events)?;
                }
                _ => {
                    if self.line.len() >= MAX_EVENT {
                        return Err(SseError::TooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(events)
    }

    fn end_line(&mut self, events: &mut Vec<String>) -> Result<(), SseError> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if !self.data.is_empty() {
                let mut data = std::mem::take(&mut self.data);
                data.pop(); // the '\n' after the last data line
                events.push(data);
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = String::from_utf8(line).map_err(|_| SseError::Utf8)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        if field == "data" {
            if self.data.len() + value.len() + 1 > MAX_EVENT {
                return Err(SseError::TooLong);
            }
            self.data.push_str(value);
            self.data.push('\n');
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Chunks of a streamed completion

/// One event of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A piece of the first choice: thinking, answer text, and why it stopped (`"stop"`,
    /// `"length"`, ...) on the last one.
    Delta {
        reasoning: Option<String>,
        content: Option<String>,
        finish_reason: Option<String>,
    },
    /// `data: [DONE]`.
    Done,
}

/// An error as the API reports it: `{"error": {"message", "type", "param"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    pub message: String,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match (&self.kind, &self.param) {
            (Some(k), Some(p)) => write!(f, " ({k}, parameter {p})"),
            (Some(k), None) => write!(f, " ({k})"),
            (None, Some(p)) => write!(f, " (parameter {p})"),
            (None, None) => Ok(()),
        }
    }
}

/// Why a turn failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Sse(#[from] SseError),
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("the server reported an error: {0}")]
    Api(ApiError),
    #[error("not a completion chunk: {0}")]
    BadChunk(String),
    #[error("the answer exceeds {MAX_ANSWER} bytes")]
    TooLong,
    #[error("the stream ended before the answer did")]
    Cut,
    #[error(transparent)]
    Request(#[from] reqwest::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Deserialize)]
struct ChunkJson {
    #[serde(default)]
    choices: Vec<ChoiceJson>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ChoiceJson {
    #[serde(default)]
    delta: DeltaJson,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct DeltaJson {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ApiError,
}

/// The meaning of one event's data: a chunk of the first choice, the end, or an error the
/// server sent in the stream.
pub fn parse_event(data: &str) -> Result<Event, ChatError> {
    if data.trim() == "[DONE]" {
        return Ok(Event::Done);
    }
    let chunk: ChunkJson = serde_json::from_str(data).map_err(|e| {
        let shown: String = data.chars().take(200).collect();
        ChatError::BadChunk(format!("{e}: {shown}"))
    })?;
    if let Some(e) = chunk.error {
        return Err(ChatError::Api(e));
    }
    let choice = chunk.choices.into_iter().next();
    Ok(match choice {
        Some(c) => Event::Delta {
            reasoning: c.delta.reasoning_content.filter(|s| !s.is_empty()),
            content: c.delta.content.filter(|s| !s.is_empty()),
            finish_reason: c.finish_reason,
        },
        None => Event::Delta {
            reasoning: None,
            content: None,
            finish_reason: None,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Printing

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Start,
    Reasoning,
    Content,
}

/// Writes an answer as it streams: thinking first (dimmed with `\x1b[2m` when `dim`), a blank
/// line, then the answer.
pub struct Printer<W: Write> {
    out: W,
    dim: bool,
    phase: Phase,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, dim: bool) -> Self {
        Printer {
            out,
            dim,
            phase: Phase::Start,
        }
    }

    pub fn reasoning(&mut self, text: &str) -> std::io::Result<()> {
        if self.phase != Phase::Reasoning {
            if self.phase == Phase::Content {
                self.out.write_all(b"\n")?;
            }
            if self.dim {
                self.out.write_all(b"\x1b[2m")?;
            }
            self.phase = Phase::Reasoning;
        }
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    pub fn content(&mut self, text: &str) -> std::io::Result<()> {
        if self.phase == Phase::Reasoning {
            if self.dim {
                self.out.write_all(b"\x1b[0m")?;
            }
            self.out.write_all(b"\n\n")?;
        }
        self.phase = Phase::Content;
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    /// Ends the answer: attributes reset, a final line break.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if self.phase == Phase::Reasoning && self.dim {
            self.out.write_all(b"\x1b[0m")?;
        }
        if self.phase != Phase::Start {
            self.out.write_all(b"\n")?;
        }
        self.phase = Phase::Start;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

// ---------------------------------------------------------------------------------------------
// The conversation

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

#[derive(Serialize)]
struct Request<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    messages: &'a [Message],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<usize>,
}

/// A finished answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub content: String,
    pub finish_reason: Option<String>,
}

/// The API client: base URL, key, model.
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    /// `max_tokens` of each request, when set.
    pub max_tokens: Option<usize>,
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> Result<Api> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let mut base = base.trim_end_matches('/').to_string();
        if let Some(b) = base.strip_suffix("/v1") {
            base = b.to_string();
        }
        Ok(Api {
            http,
            base,
            key,
            max_tokens: None,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// The first model of `GET /v1/models`; `None` when the server lists none or does not
    /// have that route (the request then names no model).
    pub async fn first_model(&self) -> Result<Option<String>, ChatError> {
        #[derive(Deserialize)]
        struct Models {
            data: Vec<ModelJson>,
        }
        #[derive(Deserialize)]
        struct ModelJson {
            id: String,
        }
        let reply = self
            .request(reqwest::Method::GET, "/v1/models")
            .send()
            .await?;
        if reply.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let reply = check(reply).await?;
        let body = read_limited(reply, MAX_ERROR_BODY).await?;
        let models: Models = serde_json::from_slice(&body)
            .map_err(|e| ChatError::BadChunk(format!("GET /v1/models: {e}")))?;
        Ok(models.data.into_iter().next().map(|m| m.id))
    }

    /// Sends the conversation and prints the streamed answer.
    pub async fn complete<W: Write>(
        &self,
        model: Option<&str>,
        messages: &[Message],
        out: &mut Printer<W>,
    ) -> Result<Answer, ChatError> {
        let reply = self
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&Request {
                model,
                messages,
                stream: true,
                max_tokens: self.max_tokens,
            })
            .send()
            .await?;
        let mut reply = check(reply).await?;
        let mut parser = SseParser::new();
        let mut answer = Answer {
            content: String::new(),
            finish_reason: None,
        };
        let result = async {
            while let Some(bytes) = reply.chunk().await? {
                for data in parser.push(&bytes)? {
                    match parse_event(&data)? {
                        Event::Done => return Ok(()),
                        Event::Delta {
                            reasoning,
                            content,
                            finish_reason,
                        } => {
                            if let Some(r) = reasoning {
                                out.reasoning(&r)?;
                            }
                            if let Some(c) = content {
                                if answer.content.len() + c.len() > MAX_ANSWER {
                                    return Err(ChatError::TooLong);
                                }
                                out.content(&c)?;
                                answer.content.push_str(&c);
                            }
                            if finish_reason.is_some() {
                                answer.finish_reason = finish_reason;
                            }
                        }
                    }
                }
            }
            // Closed without [DONE]: complete if the last chunk said why it stopped.
            if answer.finish_reason.is_some() {
                Ok(())
            } else {
                Err(ChatError::Cut)
            }
        }
        .await;
        out.finish()?;
        result.map(|()| answer)
    }
}

/// The reply if its status is a success; otherwise its error, from the API's JSON error body
/// when it has one.
async fn check(reply: reqwest::Response) -> Result<reqwest::Response, ChatError> {
    let status = reply.status();
    if status.is_success() {
        return Ok(reply);
    }
    let body = read_limited(reply, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let message = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) => e.error.to_string(),
        Err(_) => {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text.chars()
                    .take(300)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect()
            }
        }
    };
    Err(ChatError::Http {
        status: status.as_u16(),
        message,
    })
}

/// At most `limit` bytes of the body (the rest is dropped).
async fn read_limited(mut reply: reqwest::Response, limit: usize) -> Result<Vec<u8>, ChatError> {
    let mut body = Vec::new();
    while let Some(bytes) = reply.chunk().await? {
        let room = limit - body.len();
        body.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if body.len() == limit {
            break;
        }
    }
    Ok(body)
}

/// What a line of input asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input<'a> {
    Say(&'a str),
    Reset,
    Exit,
    Help,
    Nothing,
}

fn input(line: &str) -> Input<'_> {
    let line = line.trim_end_matches(['\n', '\r']);
    match line.trim() {
        "" => Input::Nothing,
        "/exit" | "/quit" => Input::Exit,
        "/reset" => Input::Reset,
        "/help" => Input::Help,
        _ => Input::Say(line),
    }
}

fn start(system: &Option<String>) -> Vec<Message> {
    system
        .iter()
        .map(|s| Message {
            role: "system",
            content: s.clone(),
        })
        .collect()
}

/// The chat loop over stdin. Exit code 1 when a turn failed.
pub fn run(a: ChatArgs) -> Result<ExitCode> {
    let rt = super::runtime()?;
    let mut api = Api::new(&a.api, a.api_key.clone())?;
    api.max_tokens = a.max_tokens;
    let model = match &a.model {
        Some(m) => Some(m.clone()),
        None => rt
            .block_on(api.first_model())
            .with_context(|| format!("asking {} for its models", a.api))?,
    };
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut printer = Printer::new(std::io::stdout(), std::io::stdout().is_terminal());
    if interactive {
        eprintln!(
            "chatting with {} at {} (/reset starts over, /exit or Ctrl-D quits)",
            model.as_deref().unwrap_or("the default model"),
            a.api
        );
    }
    let mut history = start(&a.system);
    let mut failed = false;
    let mut line = String::new();
    loop {
        if interactive {
            eprint!("> ");
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match input(&line) {
            Input::Nothing => continue,
            Input::Exit => break,
            Input::Help => {
                eprintln!("/reset starts a new conversation, /exit quits");
                continue;
            }
            Input::Reset => {
                history = start(&a.system);
                eprintln!("(new conversation)");
                continue;
            }
            Input::Say(text) => history.push(Message {
                role: "user",
                content: text.to_string(),
            }),
        }
        match rt.block_on(api.complete(model.as_deref(), &history, &mut printer)) {
            Ok(answer) => {
                if answer.finish_reason.as_deref() == Some("length") {
                    eprintln!("(the answer was cut at the token limit)");
                }
                history.push(Message {
                    role: "assistant",
                    content: answer.content,
                });
            }
            Err(e) => {
                history.pop(); // the question goes unanswered: ask again if you like
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": keep-alive\r\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Hmm\"},\"finish_reason\":null}]}\r\n\r\n\
        event: message\n\
        data: {\"choices\":[{\"index\":0,\n\
        data: \"delta\":{\"content\":\"Hé \"},\"finish_reason\":null}]}\n\n\
        data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"there\"},\"finish_reason\":\"stop\"}]}\r\r\
        data: [DONE]\n\n";

    fn events_of(pieces: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::new();
        pieces.iter().flat_map(|b| p.push(b).unwrap()).collect()
    }

    #[test]
    fn sse_events_whatever_the_chunk_boundaries() {
        let want = events_of(&[STREAM.as_bytes()]);
        assert_eq!(want.len(), 4, "{want:?}");
        assert_eq!(
            want[1],
            "{\"choices\":[{\"index\":0,\n\"delta\":{\"content\":\"Hé \"},\"finish_reason\":null}]}"
        );
        assert_eq!(want[3], "[DONE]");
        let bytes = STREAM.as_bytes();
        // Every single cut (inside "\r\n", inside the two-byte 'é'), then every pair of cuts.
        for i in 0..=bytes.len() {
            assert_eq!(events_of(&[&bytes[..i], &bytes[i..]]), want, "cut at {i}");
        }
        for i in (0..bytes.len()).step_by(3) {
            for j in i..bytes.len() {
                assert_eq!(
                    events_of(&[&bytes[..i], &bytes[i..j], &bytes[j..]]),
                    want,
                    "cuts at {i}, {j}"
                );
            }
        }
        // Byte by byte.
        let single: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(events_of(&single), want);
    }

    #[test]
    fn sse_edge_cases() {
        // An empty data line (with or without its colon) is an event with empty data; other
        // fields and comments are no events; an unterminated event is not delivered.
        assert_eq!(
            events_of(&[b"data:\n\nid: 3\nretry: 10\n\n:c\n\ndata\n\ndata: x"]),
            vec!["".to_string(), "".to_string()]
        );
        // Only one space after the colon is dropped.
        assert_eq!(events_of(&[b"data:  two\n\n"]), vec![" two".to_string()]);
        let mut p = SseParser::new();
        assert_eq!(p.push(b"data: \xff\xfe\n"), Err(SseError::Utf8));
        let mut p = SseParser::new();
        let long = vec![b'a'; MAX_EVENT + 1];
        assert_eq!(p.push(&long), Err(SseError::TooLong));
        // Many data lines add up to the same limit.
        let mut p = SseParser::new();
        let line = format!("data: {}\n", "b".repeat(1000));
        let mut err = None;
        for _ in 0..2000 {
            if let Err(e) = p.push(line.as_bytes()) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(SseError::TooLong));
    }

    #[test]
    fn events_and_errors() {
        let evs: Vec<Event> = events_of(&[STREAM.as_bytes()])
            .iter()
            .map(|d| parse_event(d).unwrap())
            .collect();
        assert_eq!(
            evs,
            vec![
                Event::Delta {
                    reasoning: Some("Hmm".into()),
                    content: None,
                    finish_reason: None
                },
                Event::Delta {
                    reasoning: None,
                    content: Some("Hé ".into()),
                    finish_reason: None
                },
                Event::Delta {
                    reasoning: None,
                    content: Some("there".into()),
                    finish_reason: Some("stop".into())
                },
                Event::Done,
            ]
        );
        // A usage-only chunk has no choices.
        assert_eq!(
            parse_event(r#"{"choices":[],"usage":{"total_tokens":3}}"#).unwrap(),
            Event::Delta {
                reasoning: None,
                content: None,
                finish_reason: None
            }
        );
        match parse_event(
            r#"{"error":{"message":"overloaded","type":"server_error","param":null}}"#,
        ) {
            Err(ChatError::Api(e)) => assert_eq!(e.to_string(), "overloaded (server_error)"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_event("{not json"),
            Err(ChatError::BadChunk(_))
        ));
    }

    #[test]
    fn printer_dims_thinking_on_a_terminal_only() {
        let run = |dim: bool| {
            let mut p = Printer::new(Vec::new(), dim);
            p.reasoning("think").unwrap();
            p.reasoning("ing").unwrap();
            p.content("Hi").unwrap();
            p.content("!").unwrap();
            p.finish().unwrap();
            p.content("Second").unwrap();
            p.finish().unwrap();
            p.finish().unwrap(); // nothing more
            String::from_utf8(p.into_inner()).unwrap()
        };
        assert_eq!(run(true), "\x1b[2mthinking\x1b[0m\n\nHi!\nSecond\n");
        assert_eq!(run(false), "thinking\n\nHi!\nSecond\n");
        // Thinking that ends the answer is reset too.
        let mut p = Printer::new(Vec::new(), true);
        p.reasoning("x").unwrap();
        p.finish().unwrap();
        assert_eq!(p.into_inner(), b"\x1b[2mx\x1b[0m\n");
    }

    #[test]
    fn input_lines() {
        assert_eq!(input("hello there\r\n"), Input::Say("hello there"));
        assert_eq!(input("  /reset \n"), Input::Reset);
        assert_eq!(input("/exit\n"), Input::Exit);
        assert_eq!(input("/quit"), Input::Exit);
        assert_eq!(input("/help\n"), Input::Help);
        assert_eq!(input("   \n"), Input::Nothing);
        assert_eq!(input("/etc/hosts?\n"), Input::Say("/etc/hosts?"));
        assert_eq!(
            start(&Some("be brief".into())),
            vec![Message {
                role: "system",
                content: "be brief".into()
            }]
        );
    }
}
