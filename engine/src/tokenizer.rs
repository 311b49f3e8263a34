//! Byte-level BPE tokenizer from a tokenizer.json or from a GGUF's own vocabulary.
//!
//! Both sources end up as one `tokenizers::Tokenizer` (the Hugging Face implementation does the
//! BPE; nothing here re-implements it). From a GGUF we rebuild what the model's tokenizer.json
//! would have said: byte-level BPE over `tokenizer.ggml.tokens`/`merges`, the DeepSeek-V3
//! pre-tokenizer, a ByteLevel decoder, and the control/user-defined tokens as added tokens so
//! that chat markup such as `<｜User｜>` in text maps to its id.
//!
//! Only byte-level BPE is supported (`gpt2` in GGUF, `BPE` + `ByteLevel` decoder in JSON), and
//! from GGUF only the `deepseek-v3` pre-tokenizer: any other `tokenizer.ggml.pre` is refused
//! with [`TokenizerError::UnsupportedPreTokenizer`] rather than tokenized with rules that would
//! silently give different ids.
//!
//! Decoding goes through per-id byte strings computed once at load, so [`StreamDecoder`] costs
//! a table look-up per token and never re-decodes the whole sequence.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, PreTokenizerWrapper};

/// Errors of loading a tokenizer and of converting between text and ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("loading tokenizer.json: {0}")]
    Json(#[source] tokenizers::Error),
    #[error("tokenizer model {0:?} is not supported: only byte-level BPE (GGUF \"gpt2\")")]
    UnsupportedModel(String),
    #[error(
        "pre-tokenizer {0:?} is not supported: only \"deepseek-v3\" (its rules differ, \
         so ids would silently differ from the model's)"
    )]
    UnsupportedPreTokenizer(String),
    #[error("GGUF vocabulary is malformed: {0}")]
    BadVocab(String),
    #[error("building the tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    #[error("token {0:?} is not in the vocabulary")]
    UnknownToken(String),
    #[error("token id {id} is outside the vocabulary ({vocab_size} ids)")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error("encoding text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("decoding ids: {0}")]
    Decode(#[source] tokenizers::Error),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The tokenizer part of a GGUF's metadata, as plain values (no dependency on the GGUF reader).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`; only `"gpt2"` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`; only `"deepseek-v3"` is supported.
    pub pre: String,
    /// `tokenizer.ggml.tokens`, indexed by id, in the GPT-2 byte-to-unicode alphabet.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (see [`token_type`]); empty means all normal.
    #[serde(default)]
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`, `"left right"` in rank order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    #[serde(default)]
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    #[serde(default)]
    pub eos_id: Option<u32>,
}

/// The DeepSeek-V3 pre-tokenizer regexes, character for character as in the model's
/// tokenizer.json (`\r`/`\n` are literal characters there too): digit runs of up to three,
/// runs of CJK ideographs/Hiragana/Katakana, then a GPT-4-like word/punctuation/space splitter.
const DEEPSEEK_V3_SPLITS: [&str; 3] = [
    "\\p{N}{1,3}",
    "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// A loaded tokenizer: encode, decode, special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The bytes each id decodes to (what the ByteLevel decoder produces for it), by id;
    /// `None` for ids inside the range that name no token.
    pieces: Vec<Option<Box<[u8]>>>,
    /// Whether each id is a special added token (dropped by `skip_special` decoding).
    special: Vec<bool>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. BOS/EOS are unknown until
    /// [`Tokenizer::with_bos_eos`] (they live in tokenizer_config.json); see also
    /// [`Tokenizer::from_hf_dir`].
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_bytes(&bytes)
    }

    /// Parses the bytes of a Hugging Face `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(TokenizerError::Json)?;
        Self::from_inner(inner, None, None)
    }

    /// Loads `tokenizer.json` from a model directory, with BOS/EOS from its
    /// `tokenizer_config.json` when that file exists.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok = Self::from_json_file(dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        if !config_path.exists() {
            return Ok(tok);
        }
        let bytes = std::fs::read(&config_path).map_err(|source| TokenizerError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = crate::chat::HfTokenizerConfig::from_json_bytes(&bytes).map_err(|e| {
            TokenizerError::Config {
                path: config_path,
                message: e.to_string(),
            }
        })?;
        tok.with_bos_eos(config.bos_token.as_deref(), config.eos_token.as_deref())
    }

    /// Sets BOS/EOS by their token strings (e.g. from tokenizer_config.json).
    pub fn with_bos_eos(mut self, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let lookup = |t: &str| {
            self.token_to_id(t)
                .ok_or_else(|| TokenizerError::UnknownToken(t.to_owned()))
        };
        let bos_id = bos.map(lookup).transpose()?;
        let eos_id = eos.map(lookup).transpose()?;
        self.bos_id = bos_id;
        self.eos_id = eos_id;
        Ok(self)
    }

    /// Builds the tokenizer a GGUF describes (see the module docs for what is supported).
    ///
    /// Control tokens (type 3) become special added tokens and user-defined ones (type 4,
    /// e.g. R1's `<think>`) non-special added tokens; both are matched in text. Unused padding
    /// rows (type 5, `[PAD…]`) stay plain vocabulary entries, so ids keep their GGUF meaning
    /// and [`Tokenizer::vocab_size`] equals `tokens.len()`. Note that GGUF marks the chat role
    /// tokens as control, so unlike from tokenizer.json they count as special here.
    pub fn from_gguf_vocab(v: GgufVocab) -> Result<Self> {
        if v.model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(v.model));
        }
        if v.pre != "deepseek-v3" {
            return Err(TokenizerError::UnsupportedPreTokenizer(v.pre));
        }
        if !v.token_types.is_empty() && v.token_types.len() != v.tokens.len() {
            return Err(TokenizerError::BadVocab(format!(
                "{} tokens but {} token types",
                v.tokens.len(),
                v.token_types.len()
            )));
        }
        let n = v.tokens.len();
        let n_u32 = u32::try_from(n)
            .map_err(|_| TokenizerError::BadVocab(format!("{n} tokens do not fit u32 ids")))?;
        for (what, id) in [("bos", v.bos_id), ("eos", v.eos_id)] {
            if let Some(id) = id.filter(|&id| id >= n_u32) {
                return Err(TokenizerError::BadVocab(format!(
                    "{what} id {id} outside {n} tokens"
                )));
            }
        }

        let mut vocab = Vocab::with_capacity(n);
        for (id, token) in (0..n_u32).zip(&v.tokens) {
            if vocab.contains_key(token) {
                // Keep the first id; the later one decodes to nothing and is reported on use.
                tracing::warn!(
                    id,
                    token = token.as_str(),
                    "duplicate token in GGUF vocabulary"
                );
                continue;
            }
            vocab.insert(token.clone(), id);
        }
        let merges = v
            .merges
            .iter()
            .map(|m| split_merge(m))
            .collect::<Result<Merges>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(TokenizerError::Build)?;

        // The same components, with the same settings, as DeepSeek's tokenizer.json.
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(deepseek_v3_pre_tokenizer()?))
            .with_post_processor(Some(ByteLevelProcessor::new(true, false, true)))
            .with_decoder(Some(ByteLevelDecoder::new(true, true, true)));

        let added: Vec<AddedToken> = v
            .tokens
            .iter()
            .zip(&v.token_types)
            .filter_map(|(t, &ty)| match ty {
                token_type::CONTROL => Some(AddedToken::from(t.clone(), true)),
                token_type::USER_DEFINED => Some(AddedToken::from(t.clone(), false)),
                _ => None,
            })
            .map(|t| t.normalized(false))
            .collect();
        inner.add_tokens(&added);
        Self::from_inner(inner, v.bos_id, v.eos_id)
    }

    fn from_inner(
        mut inner: tokenizers::Tokenizer,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self> {
        // A tokenizer.json may ask for truncation or padding; a prompt must never be cut or
        // padded behind the caller's back.
        inner
            .with_truncation(None)
            .map_err(TokenizerError::Build)?
            .with_padding(None);
        if !matches!(inner.get_model(), ModelWrapper::BPE(_)) {
            return Err(TokenizerError::UnsupportedModel(
                "tokenizer.json model is not BPE".into(),
            ));
        }
        if !matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_))) {
            return Err(TokenizerError::UnsupportedModel(
                "tokenizer.json decoder is not ByteLevel".into(),
            ));
        }
        let vocab = inner.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut pieces: Vec<Option<Box<[u8]>>> = vec![None; size];
        for (token, &id) in &vocab {
            pieces[id as usize] = Some(byte_level_bytes(token).into_boxed_slice());
        }
        let mut special = vec![false; size];
        for (id, t) in inner.get_added_tokens_decoder() {
            if let Some(s) = special.get_mut(id as usize) {
                *s = t.special;
            }
        }
        Ok(Self {
            inner,
            pieces,
            special,
            bos_id,
            eos_id,
        })
    }

    /// Text to ids. Special and added tokens written in the text (`<｜User｜>`, …) map to
    /// their ids. `add_special` prepends BOS when one is known, except when the text already
    /// starts with it (chat renderings carry their own BOS; a second one hurts the model).
    /// DeepSeek adds no EOS.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(TokenizerError::Encode)?;
        let ids = enc.get_ids();
        match self.bos_id {
            Some(bos) if add_special && ids.first() != Some(&bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Ids to text, as Hugging Face decodes them (invalid UTF-8 becomes U+FFFD).
    /// `skip_special` drops special tokens (see [`Tokenizer::is_special`]).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        for &id in ids {
            self.piece(id)?;
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(TokenizerError::Decode)
    }

    /// The bytes `id` decodes to; the unit of [`StreamDecoder`].
    pub fn piece(&self, id: u32) -> Result<&[u8]> {
        self.pieces
            .get(id as usize)
            .and_then(|p| p.as_deref())
            .ok_or(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.pieces.len(),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of `id` (in the byte-level alphabet for ordinary tokens).
    pub fn id_to_token(&self, id: u32) -> Result<String> {
        self.inner
            .id_to_token(id)
            .ok_or(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.pieces.len(),
            })
    }

    /// One past the largest id that names a token (128,815 for DeepSeek's tokenizer.json;
    /// a GGUF's token count, padding included). The model's embedding may have more rows.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether `id` is a special added token. False for ids outside the vocabulary.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Splits a GGUF merge `"left right"` at its first space after the first character, as
/// llama.cpp does (byte-level tokens contain no spaces, `Ġ` stands for one).
fn split_merge(m: &str) -> Result<(String, String)> {
    let first = m.chars().next().map_or(0, char::len_utf8);
    match m[first..].find(' ') {
        Some(i) if first > 0 && first + i + 1 < m.len() => {
            let (a, b) = m.split_at(first + i);
            Ok((a.to_owned(), b[1..].to_owned()))
        }
        _ => Err(TokenizerError::BadVocab(format!(
            "merge {m:?} is not \"a b\""
        ))),
    }
}

fn deepseek_v3_pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let mut stages = Vec::with_capacity(DEEPSEEK_V3_SPLITS.len() + 1);
    for re in DEEPSEEK_V3_SPLITS {
        let split = Split::new(
            SplitPattern::Regex(re.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(TokenizerError::Build)?;
        stages.push(PreTokenizerWrapper::from(split));
    }
    stages.push(PreTokenizerWrapper::from(ByteLevel::new(
        false, true, false,
    )));
    Ok(PreTokenizerWrapper::from(Sequence::new(stages)))
}

/// GPT-2's byte-to-unicode alphabet inverted: `BYTE_OF_CHAR[c]` is `byte + 1` for the char
/// `c` that stands for `byte`, 0 for chars that stand for none. All such chars are < 324.
static BYTE_OF_CHAR: std::sync::LazyLock<[u16; 324]> = std::sync::LazyLock::new(|| {
    let mut table = [0u16; 324];
    let mut extra = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[c as usize] = b as u16 + 1;
    }
    table
});

/// The bytes a token decodes to under the ByteLevel decoder: every char mapped back to its
/// byte, or, when some char stands for no byte (added tokens like `<｜User｜>`), the token's
/// own UTF-8.
fn byte_level_bytes(token: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match BYTE_OF_CHAR.get(c as usize).copied().unwrap_or(0) {
            0 => return token.as_bytes().to_vec(),
            b => out.push((b - 1) as u8),
        }
    }
    out
}

/// Incremental detokenizer for streaming: feed one id at a time, get the text it completes.
///
/// Bytes of an incomplete UTF-8 sequence (a character split across tokens) are held back
/// until the character is complete; invalid bytes become U+FFFD exactly as in
/// [`Tokenizer::decode`], so the concatenated output equals the one-shot decode.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            pending: Vec::with_capacity(8),
            skip_special,
        }
    }

    /// Adds `id`; returns the newly completed text (often empty for a partial character).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        let piece = tokenizer.piece(id)?;
        let mut out = String::new();
        if self.skip_special && tokenizer.is_special(id) {
            return Ok(out);
        }
        self.pending.extend_from_slice(piece);
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The first `valid_up_to` bytes were just checked to be UTF-8.
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..start + valid])
                            .unwrap_or_default(),
                    );
                    start += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += bad;
                        }
                        None => break, // incomplete sequence at the end: wait for more
                    }
                }
            }
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// Ends the stream: the held-back bytes of an unfinished character, as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Loaders for the test data under `engine/tests/data/text` (shared with the chat tests).
#[cfg(test)]
pub(crate) mod test_data {
    use super::{token_type, GgufVocab, Tokenizer};
    use std::collections::HashMap;
    use std::io::Read;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex, OnceLock};

    pub fn path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/text")
            .join(name)
    }

    pub fn read(name: &str) -> Vec<u8> {
        let p = path(name);
        let raw = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if name.ends_with(".gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .expect("gunzip");
            out
        } else {
            raw
        }
    }

    pub fn json(name: &str) -> serde_json::Value {
        serde_json::from_slice(&read(name)).expect("test data is JSON")
    }

    /// `tiny`, `v3` or `r1` tokenizer.json.
    pub fn json_file(vocab: &str) -> &'static str {
        match vocab {
            "tiny" => "tiny_tokenizer.json",
            "v3" => "deepseek-v3_tokenizer.json.gz",
            "r1" => "deepseek-r1_tokenizer.json.gz",
            _ => panic!("unknown vocab {vocab}"),
        }
    }

    /// What a GGUF made from a tokenizer.json carries, built the way llama.cpp's converter
    /// does: tokens by id, added tokens as control (special, or `<｜…｜>`/`<|…|>`) or
    /// user-defined, padded with `[PAD<id>]` unused rows to `pad_to`.
    pub fn gguf_vocab_from_tokenizer_json(t: &serde_json::Value, pad_to: usize) -> GgufVocab {
        let model = &t["model"];
        let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
        let mut put = |id: usize, tok: &str, ty: i32| {
            if by_id.len() <= id {
                by_id.resize(id + 1, None);
            }
            by_id[id] = Some((tok.to_owned(), ty));
        };
        for (tok, id) in model["vocab"].as_object().expect("vocab") {
            put(id.as_u64().expect("id") as usize, tok, token_type::NORMAL);
        }
        for a in t["added_tokens"].as_array().expect("added_tokens") {
            let tok = a["content"].as_str().expect("content");
            let looks_special = (tok.starts_with("<｜") && tok.ends_with("｜>"))
                || (tok.starts_with("<|") && tok.ends_with("|>"));
            let ty = if a["special"].as_bool() == Some(true) || looks_special {
                token_type::CONTROL
            } else {
                token_type::USER_DEFINED
            };
            put(a["id"].as_u64().expect("id") as usize, tok, ty);
        }
        let mut tokens = Vec::new();
        let mut token_types = Vec::new();
        for (i, t) in by_id.into_iter().enumerate() {
            let (tok, ty) = t.unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED));
            tokens.push(tok);
            token_types.push(ty);
        }
        while tokens.len() < pad_to {
            tokens.push(format!("[PAD{}]", tokens.len()));
            token_types.push(token_type::UNUSED);
        }
        let merges = model["merges"]
            .as_array()
            .expect("merges")
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(p) => format!(
                    "{} {}",
                    p[0].as_str().expect("merge"),
                    p[1].as_str().expect("merge")
                ),
                _ => panic!("bad merge {m}"),
            })
            .collect();
        GgufVocab {
            model: "gpt2".into(),
            pre: "deepseek-v3".into(),
            tokens,
            token_types,
            merges,
            bos_id: Some(0),
            eos_id: Some(1),
        }
    }

    /// The tokenizer of `vocab` (`tiny`, `v3`, `r1`) loaded from its tokenizer.json
    /// (`via_gguf` false) or rebuilt through [`Tokenizer::from_gguf_vocab`]. The tiny GGUF
    /// vocabulary is the one extracted from the real q8_0.gguf. Loaded once per process.
    pub fn tokenizer(vocab: &str, via_gguf: bool) -> Arc<Tokenizer> {
        type Cache = Mutex<HashMap<(String, bool), Arc<Tokenizer>>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let mut cache = CACHE.get_or_init(Default::default).lock().expect("cache");
        cache
            .entry((vocab.to_owned(), via_gguf))
            .or_insert_with(|| {
                let tok = match (vocab, via_gguf) {
                    ("tiny", true) => {
                        let v: GgufVocab =
                            serde_json::from_slice(&read("tiny_gguf_vocab.json")).expect("vocab");
                        Tokenizer::from_gguf_vocab(v)
                    }
                    (_, true) => {
                        let t = json(json_file(vocab));
                        Tokenizer::from_gguf_vocab(gguf_vocab_from_tokenizer_json(&t, 129_280))
                    }
                    (_, false) => {
                        Tokenizer::from_json_bytes(&read(json_file(vocab))).and_then(|t| {
                            t.with_bos_eos(
                                Some("<｜begin▁of▁sentence｜>"),
                                Some("<｜end▁of▁sentence｜>"),
                            )
                        })
                    }
                };
                Arc::new(tok.expect("tokenizer loads"))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::test_data::{json, read, tokenizer};
    use super::*;

    fn ids_of(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    }

    fn stream_decode(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> String {
        let mut sd = StreamDecoder::new(skip_special);
        let mut out = String::new();
        for &id in ids {
            out.push_str(&sd.step(tok, id).expect("step"));
        }
        out.push_str(&sd.finish());
        out
    }

    /// Every case of an oracle case file: ids, decode, stream decode, chat renderings' ids.
    fn check_case_file(file: &str, tok: &Tokenizer) {
        let cases = json(file);
        for case in cases["cases"].as_array().expect("cases") {
            let text = case["text"].as_str().expect("text");
            let ids = tok.encode(text, false).expect("encode");
            assert_eq!(ids, ids_of(&case["ids"]), "{file}: {text:?}");
            assert_eq!(tok.decode(&ids, false).expect("decode"), text);
            assert_eq!(stream_decode(tok, &ids, false), text);
        }
        for chat in cases["chat"].as_array().expect("chat") {
            let rendered = chat["rendered"].as_str().expect("rendered");
            let ids = tok.encode(rendered, false).expect("encode");
            assert_eq!(ids, ids_of(&chat["ids"]), "{file}: {rendered:?}");
        }
    }

    #[test]
    fn tiny_vocab_matches_oracle_cases() {
        check_case_file("tokenizer_cases_small.json", &tokenizer("tiny", false));
        check_case_file("tokenizer_cases_small.json", &tokenizer("tiny", true));
    }

    #[test]
    fn real_vocab_matches_oracle_cases() {
        // The oracle's real-vocabulary model uses R1's tokenizer (`<think>` is 128798).
        check_case_file("tokenizer_cases_realvocab.json", &tokenizer("r1", false));
        check_case_file("tokenizer_cases_realvocab.json", &tokenizer("r1", true));
    }

    fn check_corpus(vocab: &str, via_gguf: bool) {
        let tok = tokenizer(vocab, via_gguf);
        let corpus = json("tokenizer_corpus.json");
        for case in corpus["cases"].as_array().expect("cases") {
            let text = case["text"].as_str().expect("text");
            let ids = tok.encode(text, false).expect("encode");
            assert_eq!(
                ids,
                ids_of(&case["ids"][vocab]),
                "{vocab} gguf={via_gguf}: {text:?}"
            );
            assert_eq!(tok.decode(&ids, false).expect("decode"), text);
            assert_eq!(stream_decode(&tok, &ids, false), text);
            let skipped = tok.decode(&ids, true).expect("decode");
            assert_eq!(stream_decode(&tok, &ids, true), skipped);
            if !via_gguf {
                // GGUF marks the chat role tokens as control, so they count as special there.
                assert_eq!(
                    skipped,
                    case["decoded_skip_special"][vocab].as_str().expect("s")
                );
            }
        }
    }

    #[test]
    fn corpus_tiny_from_json() {
        check_corpus("tiny", false);
    }

    #[test]
    fn corpus_tiny_from_gguf() {
        check_corpus("tiny", true);
    }

    #[test]
    fn corpus_v3_from_json() {
        check_corpus("v3", false);
    }

    #[test]
    fn corpus_v3_from_gguf() {
        check_corpus("v3", true);
    }

    #[test]
    fn corpus_r1_from_json() {
        check_corpus("r1", false);
    }

    #[test]
    fn corpus_r1_from_gguf() {
        check_corpus("r1", true);
    }

    #[test]
    fn gguf_pipeline_serializes_like_deepseek_tokenizer_json() {
        let real = json("deepseek-v3_tokenizer.json.gz");
        let built = serde_json::to_value(tokenizer("tiny", true).inner()).expect("serialize");
        for part in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
            let want = if part == "normalizer" {
                // DeepSeek's is an empty Sequence: the same as none.
                serde_json::Value::Null
            } else {
                real[part].clone()
            };
            assert_eq!(built[part], want, "{part}");
        }
    }

    #[test]
    fn real_vocab_ids_and_specials() {
        for via_gguf in [false, true] {
            let tok = tokenizer("r1", via_gguf);
            assert_eq!(tok.bos_id(), Some(0));
            assert_eq!(tok.eos_id(), Some(1));
            assert_eq!(tok.token_to_id("<｜User｜>"), Some(128803));
            assert_eq!(tok.token_to_id("<｜Assistant｜>"), Some(128804));
            assert_eq!(tok.token_to_id("<think>"), Some(128798));
            assert_eq!(tok.token_to_id("</think>"), Some(128799));
            assert_eq!(tok.id_to_token(128805).expect("id"), "<|EOT|>");
            assert!(tok.is_special(0) && tok.is_special(1));
            assert!(!tok.is_special(128798), "<think> is not special in R1");
            assert!(!tok.is_special(3085));
            let expected_size = if via_gguf { 129_280 } else { 128_815 };
            assert_eq!(tok.vocab_size(), expected_size);
        }
        let v3 = tokenizer("v3", false);
        assert_eq!(v3.token_to_id("<think>"), None);
        assert_eq!(
            v3.id_to_token(128798).expect("id"),
            "<｜place▁holder▁no▁798｜>"
        );
    }

    #[test]
    fn add_special_prepends_one_bos() {
        let tok = tokenizer("tiny", false);
        let plain = tok.encode("Hello world!", false).expect("encode");
        let with = tok.encode("Hello world!", true).expect("encode");
        assert_eq!(with[0], 0);
        assert_eq!(&with[1..], &plain[..]);
        let rendered = "<｜begin▁of▁sentence｜><｜User｜>hi";
        let ids = tok.encode(rendered, true).expect("encode");
        assert_eq!(ids, tok.encode(rendered, false).expect("encode"));
        assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1);
    }

    #[test]
    fn out_of_vocabulary_ids_are_errors() {
        let tok = tokenizer("tiny", false);
        let n = tok.vocab_size() as u32;
        assert_eq!(n, 1024);
        for bad in [n, n + 1, u32::MAX] {
            assert!(matches!(
                tok.decode(&[5, bad], false),
                Err(TokenizerError::IdOutOfRange { id, vocab_size: 1024 }) if id == bad
            ));
            assert!(tok.id_to_token(bad).is_err());
            assert!(tok.piece(bad).is_err());
            assert!(!tok.is_special(bad));
            assert!(StreamDecoder::new(false).step(&tok, bad).is_err());
        }
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        // In the tiny vocabulary "🚀" is four single-byte tokens.
        let tok = tokenizer("tiny", false);
        let ids = tok.encode("a🚀b", false).expect("encode");
        assert_eq!(ids.len(), 6, "{ids:?}");
        let mut sd = StreamDecoder::new(false);
        let outs: Vec<String> = ids
            .iter()
            .map(|&id| sd.step(&tok, id).expect("step"))
            .collect();
        assert_eq!(outs, ["a", "", "", "", "🚀", "b"]);
        assert!(!sd.has_pending());

        // An unfinished character at the end comes out as one U+FFFD, as decode gives it.
        let cut = &ids[..3];
        assert_eq!(stream_decode(&tok, cut, false), "a\u{FFFD}");
        assert_eq!(tok.decode(cut, false).expect("decode"), "a\u{FFFD}");
        // A broken sequence followed by more text: same as decode too.
        let broken = [ids[1], ids[2], ids[5]];
        assert_eq!(
            stream_decode(&tok, &broken, false),
            tok.decode(&broken, false).expect("decode")
        );
    }

    #[test]
    fn stream_decoder_skips_specials() {
        let tok = tokenizer("tiny", false);
        let ids = tok
            .encode("<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>", false)
            .expect("encode");
        assert_eq!(stream_decode(&tok, &ids, true), "Hi");
        assert_eq!(
            stream_decode(&tok, &ids, false),
            "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>"
        );
    }

    fn tiny_gguf() -> GgufVocab {
        serde_json::from_slice(&read("tiny_gguf_vocab.json")).expect("vocab")
    }

    #[test]
    fn gguf_vocab_errors_are_typed() {
        let v = GgufVocab {
            pre: "llama-bpe".into(),
            ..tiny_gguf()
        };
        assert!(matches!(
            Tokenizer::from_gguf_vocab(v),
            Err(TokenizerError::UnsupportedPreTokenizer(p)) if p == "llama-bpe"
        ));
        let v = GgufVocab {
            model: "llama".into(),
            ..tiny_gguf()
        };
        assert!(matches!(
            Tokenizer::from_gguf_vocab(v),
            Err(TokenizerError::UnsupportedModel(m)) if m == "llama"
        ));
        let mut v = tiny_gguf();
        v.token_types.pop();
        assert!(matches!(
            Tokenizer::from_gguf_vocab(v),
            Err(TokenizerError::BadVocab(_))
        ));
        let mut v = tiny_gguf();
        v.merges.push("nospace".into());
        assert!(matches!(
            Tokenizer::from_gguf_vocab(v),
            Err(TokenizerError::BadVocab(_))
        ));
        let mut v = tiny_gguf();
        v.merges.push("Ġ zzzzzz".into());
        assert!(matches!(
            Tokenizer::from_gguf_vocab(v),
            Err(TokenizerError::Build(_))
        ));
        let v = GgufVocab {
            bos_id: Some(5000),
            ..tiny_gguf()
        };
        assert!(matches!(
            Tokenizer::from_gguf_vocab(v),
            Err(TokenizerError::BadVocab(_))
        ));
        assert!(matches!(
            Tokenizer::from_json_bytes(b"{not json"),
            Err(TokenizerError::Json(_))
        ));
    }

    #[test]
    fn merges_split_at_first_space() {
        assert_eq!(
            split_merge("Ġ t").expect("merge"),
            ("Ġ".to_owned(), "t".to_owned())
        );
        assert_eq!(
            split_merge("ĠĠ ĠĠĠ").expect("merge"),
            ("ĠĠ".to_owned(), "ĠĠĠ".to_owned())
        );
        for bad in ["", " a", "a ", "ab"] {
            assert!(split_merge(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn from_hf_dir_reads_bos_eos_from_config() {
        let dir = std::env::temp_dir().join(format!("engine-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("tokenizer.json"), read("tiny_tokenizer.json")).expect("write");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            read("tiny_tokenizer_config.json"),
        )
        .expect("write");
        let tok = Tokenizer::from_hf_dir(&dir).expect("load");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(0), Some(1)));
        let bare = Tokenizer::from_json_bytes(&read("tiny_tokenizer.json")).expect("load");
        assert_eq!((bare.bos_id(), bare.eos_id()), (None, None));
        assert!(matches!(
            bare.with_bos_eos(Some("<nope>"), None),
            Err(TokenizerError::UnknownToken(_))
        ));
    }

    #[test]
    fn truncation_and_padding_in_json_are_ignored() {
        let mut t = json("tiny_tokenizer.json");
        t["truncation"] = serde_json::json!(
            {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
        t["padding"] = serde_json::json!({"strategy": {"Fixed": 64}, "direction": "Right",
            "pad_to_multiple_of": null, "pad_id": 1, "pad_type_id": 0,
            "pad_token": "<｜end▁of▁sentence｜>"});
        let tok = Tokenizer::from_json_bytes(&serde_json::to_vec(&t).expect("json")).expect("load");
        let text = "The quick brown fox jumps over the lazy dog.";
        let ids = tok.encode(text, false).expect("encode");
        assert_eq!(
            ids,
            tokenizer("tiny", false)
                .encode(text, false)
                .expect("encode")
        );
        assert_eq!(ids.len(), 27);
    }

    #[test]
    fn byte_alphabet_round_trips() {
        for b in 0..=255u8 {
            let c = if (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae {
                char::from(b)
            } else {
                continue;
            };
            assert_eq!(byte_level_bytes(&c.to_string()), [b]);
        }
        assert_eq!(byte_level_bytes("Ġ"), b" ");
        assert_eq!(byte_level_bytes("Ċ"), b"\n");
        assert_eq!(byte_level_bytes("<｜User｜>"), "<｜User｜>".as_bytes());
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder>();
    }
}
