//! Chat templates rendered from the template the model carries (minijinja).
//!
//! The template source comes from `tokenizer_config.json` (`chat_template`) or from the GGUF
//! key `tokenizer.chat_template`; it is rendered the way Hugging Face `apply_chat_template`
//! renders it (jinja2 with `trim_blocks` and `lstrip_blocks`, Python string methods such as
//! `.split()`, a `raise_exception` function, `bos_token`/`eos_token` variables). The
//! DeepSeek-specific behaviour (system text after BOS, R1 dropping the reasoning of past
//! assistant turns, the `<think>\n` generation prompt) lives in the template itself, not here.
//!
//! The rendered string already starts with BOS: tokenize it without adding another.

use serde::{Deserialize, Serialize};

/// Errors of loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not compile: {0}")]
    Compile(#[source] minijinja::Error),
    #[error("rendering the chat template: {0}")]
    Render(#[source] minijinja::Error),
    #[error("tokenizer_config.json is not valid JSON: {0}")]
    ConfigJson(#[source] serde_json::Error),
    #[error("tokenizer_config.json: {0}")]
    Config(String),
    #[error("no chat template (tokenizer_config.json has no `chat_template`)")]
    NoTemplate,
}

pub type Result<T> = std::result::Result<T, ChatError>;

/// One message of a conversation, shaped as the templates expect (OpenAI style).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// `None` renders as Jinja `none` (an assistant turn that only calls tools).
    pub content: Option<String>,
    /// Left out of the template's view when `None`: templates test `'tool_calls' in message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            tool_calls: None,
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// The result of a tool call.
    pub fn tool(content: impl Into<String>) -> Self {
        Self::new("tool", content)
    }

    /// An assistant turn that calls tools (content `None`).
    pub fn assistant_tool_calls(calls: Vec<ToolCall>) -> Self {
        Self {
            role: "assistant".into(),
            content: None,
            tool_calls: Some(calls),
        }
    }
}

/// A tool call of an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Always `"function"` in practice.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

impl ToolCall {
    pub fn function(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self {
            kind: "function".into(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }
}

/// The function named by a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON text (the templates concatenate it as a string).
    pub arguments: String,
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the BOS/EOS strings it is rendered with.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // What transformers' jinja2 environment does.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(ChatError::Compile)?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template and BOS/EOS strings of a `tokenizer_config.json`.
    pub fn from_tokenizer_config(config: &HfTokenizerConfig) -> Result<Self> {
        let source = config.chat_template.clone().ok_or(ChatError::NoTemplate)?;
        Self::new(
            source,
            config.bos_token.clone().unwrap_or_default(),
            config.eos_token.clone().unwrap_or_default(),
        )
    }

    /// Renders a conversation. With `add_generation_prompt` the text ends where the
    /// assistant's reply begins (`<｜Assistant｜>`, and `<think>\n` for R1).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(ChatError::Render)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(ChatError::Render)
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// `raise_exception(msg)` as templates call it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        message,
    ))
}

/// What this engine needs from a Hugging Face `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HfTokenizerConfig {
    /// The default chat template (the one named `default` when the file holds a list).
    pub chat_template: Option<String>,
    /// BOS token string (`bos_token` may be a string or an AddedToken object).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
}

impl HfTokenizerConfig {
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(ChatError::ConfigJson)?;
        let obj = v
            .as_object()
            .ok_or_else(|| ChatError::Config("not a JSON object".into()))?;
        Ok(Self {
            chat_template: obj.get("chat_template").map(template_of).transpose()?,
            bos_token: obj.get("bos_token").and_then(token_string),
            eos_token: obj.get("eos_token").and_then(token_string),
            add_bos_token: obj.get("add_bos_token").and_then(|v| v.as_bool()),
            add_eos_token: obj.get("add_eos_token").and_then(|v| v.as_bool()),
        })
    }
}

/// `"..."` or `[{"name": "default", "template": "..."}, ...]`.
fn template_of(v: &serde_json::Value) -> Result<String> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_owned());
    }
    let list = v
        .as_array()
        .ok_or_else(|| ChatError::Config("chat_template is neither a string nor a list".into()))?;
    list.iter()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
        .and_then(|t| t.get("template"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| ChatError::Config("chat_template list has no \"default\" entry".into()))
}

/// A token given as `"..."` or as `{"content": "...", ...}`; `null` means none.
fn token_string(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .or_else(|| v.get("content").and_then(|c| c.as_str()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_data::{json, read, tokenizer};

    fn config(name: &str) -> HfTokenizerConfig {
        let file = match name {
            "v3" => "deepseek-v3_tokenizer_config.json",
            "r1" => "deepseek-r1_tokenizer_config.json",
            "tiny" => "tiny_tokenizer_config.json",
            _ => panic!("unknown template {name}"),
        };
        HfTokenizerConfig::from_json_bytes(&read(file)).expect("config")
    }

    fn template(name: &str) -> ChatTemplate {
        ChatTemplate::from_tokenizer_config(&config(name)).expect("template")
    }

    fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
        serde_json::from_value(v.clone()).expect("messages")
    }

    #[test]
    fn renders_like_jinja2() {
        let data = json("chat_renderings.json");
        let cases = data["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 48);
        for case in cases {
            let name = case["template"].as_str().expect("template");
            let agp = case["add_generation_prompt"].as_bool().expect("agp");
            let got = template(name)
                .render(&messages(&case["messages"]), agp)
                .expect("render");
            let want = case["rendered"].as_str().expect("rendered");
            assert_eq!(got, want, "{name} {} agp={agp}", case["name"]);
        }
    }

    #[test]
    fn renders_oracle_chats_and_their_ids() {
        for (file, vocab) in [
            ("tokenizer_cases_small.json", "tiny"),
            ("tokenizer_cases_realvocab.json", "r1"),
        ] {
            let tok = tokenizer(vocab, false);
            let t = template(vocab);
            for chat in json(file)["chat"].as_array().expect("chat") {
                let rendered = t
                    .render(&messages(&chat["messages"]), true)
                    .expect("render");
                assert_eq!(rendered, chat["rendered"].as_str().expect("rendered"));
                let ids: Vec<u32> = serde_json::from_value(chat["ids"].clone()).expect("ids");
                assert_eq!(tok.encode(&rendered, false).expect("encode"), ids);
            }
        }
    }

    #[test]
    fn generation_prompts() {
        let msgs = [ChatMessage::user("hi")];
        let v3 = template("v3").render(&msgs, true).expect("render");
        assert!(v3.ends_with("<｜User｜>hi<｜Assistant｜>"), "{v3}");
        let r1 = template("r1").render(&msgs, true).expect("render");
        assert!(r1.ends_with("<｜Assistant｜><think>\n"), "{r1}");
        let none = template("r1").render(&msgs, false).expect("render");
        assert_eq!(none, "<｜begin▁of▁sentence｜><｜User｜>hi");
    }

    #[test]
    fn r1_drops_past_reasoning() {
        let msgs = [
            ChatMessage::user("q"),
            ChatMessage::assistant("<think>\nsecret\n</think>\n\nanswer"),
            ChatMessage::user("q2"),
        ];
        let r1 = template("r1").render(&msgs, true).expect("render");
        assert!(!r1.contains("secret"));
        assert!(r1.contains("<｜Assistant｜>\n\nanswer<｜end▁of▁sentence｜>"));
        let v3 = template("v3").render(&msgs, true).expect("render");
        assert!(v3.contains("secret"));
    }

    #[test]
    fn tool_call_messages_serialize_for_the_template() {
        let m = ChatMessage::assistant_tool_calls(vec![ToolCall::function("f", "{}")]);
        let v = serde_json::to_value(&m).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"role": "assistant", "content": null,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        let plain = serde_json::to_value(ChatMessage::user("x")).expect("json");
        assert!(plain.get("tool_calls").is_none(), "absent, not null");
    }

    #[test]
    fn gguf_template_renders_like_the_config_one() {
        let gguf = json("tiny_gguf_vocab.json");
        let source = gguf["chat_template"].as_str().expect("template");
        let t = ChatTemplate::new(source, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
            .expect("template");
        let msgs = [
            ChatMessage::system("s"),
            ChatMessage::user("u"),
            ChatMessage::assistant("<think>x</think>a"),
            ChatMessage::user("u2"),
        ];
        assert_eq!(
            t.render(&msgs, true).expect("render"),
            template("tiny").render(&msgs, true).expect("render")
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user', 'system'] %}\
             {{ raise_exception('bad role ' + m.role) }}{% endif %}\
             {{ m.content.strip().upper() }}|{{ m.content.split(',')[-1] }}\n{% endfor %}",
            "",
            "",
        )
        .expect("template");
        let out = t
            .render(&[ChatMessage::user("  a,b  ")], false)
            .expect("render");
        assert_eq!(out, "A,B|b  \n");
        let err = t
            .render(&[ChatMessage::new("robot", "x")], false)
            .expect_err("raises");
        assert!(err.to_string().contains("bad role robot"), "{err}");
    }

    #[test]
    fn template_errors_are_typed() {
        assert!(matches!(
            ChatTemplate::new("{% if %}", "", ""),
            Err(ChatError::Compile(_))
        ));
        assert!(matches!(
            HfTokenizerConfig::from_json_bytes(b"[1]"),
            Err(ChatError::Config(_))
        ));
        assert!(matches!(
            HfTokenizerConfig::from_json_bytes(b"{"),
            Err(ChatError::ConfigJson(_))
        ));
        let no_template = HfTokenizerConfig::from_json_bytes(b"{}").expect("config");
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&no_template),
            Err(ChatError::NoTemplate)
        ));
    }

    #[test]
    fn config_fields() {
        let c = config("v3");
        assert_eq!(c.bos_token.as_deref(), Some("<｜begin▁of▁sentence｜>"));
        assert_eq!(c.eos_token.as_deref(), Some("<｜end▁of▁sentence｜>"));
        assert_eq!(
            (c.add_bos_token, c.add_eos_token),
            (Some(true), Some(false))
        );
        let listed = HfTokenizerConfig::from_json_bytes(
            br#"{"bos_token": "<s>", "chat_template": [{"name": "tool_use", "template": "T"},
                {"name": "default", "template": "D"}]}"#,
        )
        .expect("config");
        assert_eq!(listed.chat_template.as_deref(), Some("D"));
        assert_eq!(listed.bos_token.as_deref(), Some("<s>"));
        assert_eq!(listed.eos_token, None);
    }
}
