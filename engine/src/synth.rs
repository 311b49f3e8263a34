//! Deterministic synthetic DeepSeek-V3-shaped models, written as GGUF.
//!
//! No weights can be downloaded to test or benchmark with, so the project makes its own: a
//! [`SynthSpec`] (a shape, a seed, a weight type) becomes a complete `deepseek2` GGUF that both
//! this engine and llama.cpp load: the newer MLA layout (`attn_k_b` / `attn_v_b` stored per
//! head, `*_mla` keys), expert groups (`expert_group_count` / `expert_group_used_count`),
//! sigmoid routing with a correction bias (`expert_gating_func` = 2), YaRN scaling like the
//! 671B, and a real byte-level BPE tokenizer with DeepSeek's special tokens and chat template.
//!
//! ```no_run
//! use engine::synth::{self, SynthSpec};
//! let summary = synth::write_model(std::path::Path::new("tiny.gguf"), &SynthSpec::tiny())?;
//! println!("{} parameters, {} bytes", summary.params, summary.bytes);
//! # Ok::<(), engine::synth::SynthError>(())
//! ```
//!
//! **Determinism.** Every value is a pure function of the seed, the tensor's name and the
//! element's index (a counter-based generator, SplitMix64), computed with additions and
//! multiplications only (no `ln`/`cos` from the platform's libm), so the same spec gives a
//! byte-identical file on every machine, whatever the thread count.
//!
//! **Values** (the scheme of the oracle's `make_tiny2.py`, so activations stay finite and the
//! routing is not degenerate): every matrix ~ N(0, 1/fan_in) (the output projections and the
//! FFN down projections times [`SynthSpec::branch_gain`]); embeddings ~ N(0, 1); the head
//! ~ N(0, `lm_head_gain`² / hidden), so logits have a standard deviation near `lm_head_gain`;
//! norm weights ~ U(0.6, 1.4); the router's correction bias ~ U(-0.15, 0.15). "Normal" here is
//! the Irwin-Hall sum of four uniforms, rescaled to unit variance (bounded at ±3.46 σ). All
//! values are rounded to bf16, so the BF16 and F32 files of one spec hold the same model.
//! Norms, the router and its bias are always F32 (as llama.cpp's converter writes them).
//!
//! **Tokenizer.** The vocabulary, merges, token types and chat template of the oracle's tiny
//! model (1024 tokens: 256 byte tokens, a small trained BPE, DeepSeek's special tokens) are
//! embedded in the crate. A larger `vocab_size` pads the vocabulary with `[PAD{id}]` tokens of
//! type unused, the way llama.cpp's converter pads DeepSeek's 128,815 tokens to 129,280 rows;
//! their rows of the head are zero, so greedy decoding still picks real tokens.

use std::path::Path;

use rayon::prelude::*;
use serde::Deserialize;

use crate::gguf::{GgufWriteError, GgufWriter, MetaValue};
use crate::quant::QuantType;
use crate::tokenizer::token_type;
use crate::Bytes;

/// The tokenizer metadata of the oracle's tiny model (`tokenizer.ggml.*` and the chat template).
const TINY_VOCAB_JSON: &str = include_str!("../tests/data/text/tiny_gguf_vocab.json");

/// The names [`SynthSpec::preset`] knows.
pub const PRESETS: &[&str] = &["tiny", "mid"];

/// Storage type of the generated weight matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthType {
    Bf16,
    F32,
}

impl SynthType {
    fn quant(self) -> QuantType {
        match self {
            SynthType::Bf16 => QuantType::BF16,
            SynthType::F32 => QuantType::F32,
        }
    }

    /// `general.file_type` (llama.cpp's `LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            SynthType::Bf16 => 32,
            SynthType::F32 => 0,
        }
    }
}

impl std::str::FromStr for SynthType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" => Ok(SynthType::Bf16),
            "f32" => Ok(SynthType::F32),
            other => Err(format!("unknown weight type `{other}` (bf16 or f32)")),
        }
    }
}

/// Which chat template the file carries: R1's (the embedded tokenizer's own; its generation
/// prompt opens the thinking part with `<think>`), or DeepSeek-V3's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChatStyle {
    V3,
    #[default]
    R1,
}

impl std::str::FromStr for ChatStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "v3" => Ok(ChatStyle::V3),
            "r1" => Ok(ChatStyle::R1),
            other => Err(format!("unknown chat template `{other}` (v3 or r1)")),
        }
    }
}

/// DeepSeek-V3's `tokenizer_config.json` (its chat template; the embedded tokenizer carries
/// R1's).
const V3_TOKENIZER_CONFIG: &str =
    include_str!("../tests/data/text/deepseek-v3_tokenizer_config.json");

/// The shape, seed and storage of a synthetic model. Field names follow [`ModelConfig`]
/// (`crate::config::ModelConfig`); the Hugging Face names are in the comments.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSpec {
    /// `general.name`.
    pub name: String,
    pub seed: u64,
    pub dtype: SynthType,
    /// Rows of the embedding and the head; at least the embedded tokenizer's 1024 tokens.
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    /// `first_k_dense_replace`.
    pub n_dense_layers: usize,
    /// `intermediate_size` (dense FFN width).
    pub dense_inter: usize,
    /// `moe_intermediate_size` (width of one routed or shared expert).
    pub moe_inter: usize,
    pub n_routed: usize,
    pub n_shared: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scale: f32,
    pub norm_topk: bool,
    pub n_heads: usize,
    /// `None`: queries are projected directly (`attn_q`), as in V2-Lite.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head: usize,
    pub rope_theta: f32,
    pub yarn_factor: f32,
    pub yarn_original_context: u32,
    pub yarn_beta_fast: f32,
    pub yarn_beta_slow: f32,
    /// DeepSeek's `mscale_all_dim` (= `mscale`); GGUF stores 0.1 times it.
    pub yarn_mscale_all_dim: f32,
    pub rms_eps: f32,
    /// Scale of the residual branches' last projections (`attn_output`, `ffn_down*`); below
    /// 1 gives calmer activations.
    pub branch_gain: f32,
    /// Standard deviation of the logits, roughly.
    pub lm_head_gain: f32,
    pub chat: ChatStyle,
}

impl SynthSpec {
    /// The oracle's tiny shape (vocab 1024, hidden 256, 5 layers with layer 0 dense, 16 experts
    /// top-4 in 4 groups keeping 2, q_lora 160, kv_lora 64, nope 32, rope 16, v 24, 4 heads):
    /// 8.3 M parameters, 17 MB in BF16.
    pub fn tiny() -> Self {
        SynthSpec {
            name: "synth-dsv3-tiny".into(),
            seed: 1234,
            dtype: SynthType::Bf16,
            vocab_size: 1024,
            hidden: 256,
            n_layers: 5,
            n_dense_layers: 1,
            dense_inter: 512,
            moe_inter: 128,
            n_routed: 16,
            n_shared: 1,
            top_k: 4,
            n_group: 4,
            topk_group: 2,
            routed_scale: 2.5,
            norm_topk: true,
            n_heads: 4,
            q_lora_rank: Some(160),
            kv_lora_rank: 64,
            qk_nope: 32,
            qk_rope: 16,
            v_head: 24,
            rope_theta: 10000.0,
            yarn_factor: 40.0,
            yarn_original_context: 4096,
            yarn_beta_fast: 32.0,
            yarn_beta_slow: 1.0,
            yarn_mscale_all_dim: 1.0,
            rms_eps: 1e-6,
            branch_gain: 1.0,
            lm_head_gain: 3.0,
            chat: ChatStyle::R1,
        }
    }

    /// The oracle's mid-size speed model (`make_tiny2.py --preset mid`): hidden 2048, 7 layers
    /// (layer 0 dense, width 5632), 64 experts of width 256, top-6, 8 groups keeping 4, 1 shared
    /// expert, 16 heads, q_lora 768, kv_lora 256, nope 64, rope 32, v 64, vocab 32000 (the tiny
    /// tokenizer padded), residual branches at 0.5: 0.82 B parameters, 1.64 GB in BF16.
    pub fn mid() -> Self {
        SynthSpec {
            name: "synth-dsv3-mid".into(),
            seed: 4242,
            vocab_size: 32000,
            hidden: 2048,
            n_layers: 7,
            n_dense_layers: 1,
            dense_inter: 5632,
            moe_inter: 256,
            n_routed: 64,
            n_shared: 1,
            top_k: 6,
            n_group: 8,
            topk_group: 4,
            n_heads: 16,
            q_lora_rank: Some(768),
            kv_lora_rank: 256,
            qk_nope: 64,
            qk_rope: 32,
            v_head: 64,
            branch_gain: 0.5,
            ..Self::tiny()
        }
    }

    /// A preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "mid" => Some(Self::mid()),
            _ => None,
        }
    }

    /// Number of weights in the file.
    pub fn params(&self) -> u64 {
        tensor_plan(self, 0).iter().map(|t| t.numel() as u64).sum()
    }

    /// Checks that the shape is one both loaders accept.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |what: String| Err(SynthError::Invalid(what));
        let vocab = embedded_vocab()?;
        if self.vocab_size < vocab.tokens.len() {
            return bad(format!(
                "vocab_size {} is below the tokenizer's {} tokens",
                self.vocab_size,
                vocab.tokens.len()
            ));
        }
        for (k, v) in [
            ("hidden", self.hidden),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope", self.qk_nope),
            ("qk_rope", self.qk_rope),
            ("v_head", self.v_head),
        ] {
            if v == 0 {
                return bad(format!("{k} must be > 0"));
            }
        }
        if self.qk_rope & 1 == 1 {
            return bad(format!("qk_rope {} must be even", self.qk_rope));
        }
        if self.q_lora_rank == Some(0) {
            return bad("q_lora_rank must be > 0 (or None)".into());
        }
        if self.n_dense_layers > self.n_layers {
            return bad("n_dense_layers > n_layers".into());
        }
        if self.n_dense_layers > 0 && self.dense_inter == 0 {
            return bad("dense_inter must be > 0".into());
        }
        if self.n_dense_layers < self.n_layers {
            let (e, g, tg, k) = (self.n_routed, self.n_group, self.topk_group, self.top_k);
            if e == 0 || self.moe_inter == 0 {
                return bad("MoE layers need n_routed and moe_inter > 0".into());
            }
            if g == 0 || e % g != 0 || e / g < 2 {
                return bad(format!(
                    "{e} experts in {g} groups (each group needs >= 2 experts)"
                ));
            }
            if tg == 0 || tg > g || k == 0 || k > tg * (e / g) {
                return bad(format!(
                    "top_k {k} from {tg} of {g} groups of {} experts",
                    e / g
                ));
            }
        }
        Ok(())
    }
}

/// What [`write_model`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    pub params: u64,
    pub tensors: usize,
    /// File size.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synthetic model spec: {0}")]
    Invalid(String),
    #[error("embedded tokenizer data: {0}")]
    Vocab(#[from] serde_json::Error),
    #[error(transparent)]
    Write(#[from] GgufWriteError),
}

/// Generates the model described by `spec` and writes it to `path` as one GGUF file.
pub fn write_model(path: &Path, spec: &SynthSpec) -> Result<SynthSummary, SynthError> {
    let w = build(spec)?;
    w.write(path)?;
    let bytes = std::fs::metadata(path)
        .map_err(|source| GgufWriteError::Io {
            path: path.to_owned(),
            source,
        })?
        .len();
    Ok(SynthSummary {
        params: spec.params(),
        tensors: w.tensor_count(),
        bytes,
    })
}

/// The whole GGUF image in memory (for embedded models: open it with
/// [`GgufFile::from_bytes`](crate::gguf::GgufFile::from_bytes)).
pub fn to_bytes(spec: &SynthSpec) -> Result<Vec<u8>, SynthError> {
    let mut out = Vec::new();
    build(spec)?
        .write_to(&mut out)
        .expect("writing to memory cannot fail");
    Ok(out)
}

/// Generates every tensor and all metadata into a [`GgufWriter`], ready to be written.
pub fn build(spec: &SynthSpec) -> Result<GgufWriter, SynthError> {
    spec.validate()?;
    let mut w = GgufWriter::new();
    add_metadata(&mut w, spec)?;
    let live = embedded_vocab()?.tokens.len();
    for t in tensor_plan(spec, live) {
        let ty = match t.storage {
            Storage::Weight => spec.dtype.quant(),
            Storage::F32 => QuantType::F32,
        };
        let data = generate(
            spec.seed,
            &t.name,
            t.numel().min(t.zero_from),
            t.numel(),
            t.init,
            ty,
        );
        w.add_tensor(t.name, ty, &t.shape, Bytes::from_vec(data))?;
    }
    Ok(w)
}

/// The embedded tokenizer metadata (the oracle tiny model's `tokenizer.*` keys).
#[derive(Deserialize)]
struct EmbeddedVocab {
    model: String,
    pre: String,
    tokens: Vec<String>,
    token_types: Vec<i32>,
    merges: Vec<String>,
    bos_id: u32,
    eos_id: u32,
    padding_id: u32,
    add_bos: bool,
    chat_template: String,
}

fn embedded_vocab() -> Result<EmbeddedVocab, SynthError> {
    let v: EmbeddedVocab = serde_json::from_str(TINY_VOCAB_JSON)?;
    if v.token_types.len() != v.tokens.len() {
        return Err(SynthError::Invalid(format!(
            "embedded tokenizer: {} tokens, {} types",
            v.tokens.len(),
            v.token_types.len()
        )));
    }
    Ok(v)
}

fn chat_template(style: ChatStyle, v: &EmbeddedVocab) -> Result<String, SynthError> {
    Ok(match style {
        ChatStyle::R1 => v.chat_template.clone(),
        ChatStyle::V3 => {
            let cfg: serde_json::Value = serde_json::from_str(V3_TOKENIZER_CONFIG)?;
            cfg["chat_template"]
                .as_str()
                .ok_or_else(|| {
                    SynthError::Invalid("V3 tokenizer config without a chat template".into())
                })?
                .to_string()
        }
    })
}

fn add_metadata(w: &mut GgufWriter, s: &SynthSpec) -> Result<(), SynthError> {
    let u32_of = |v: usize| MetaValue::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let qk_head = s.qk_nope + s.qk_rope;
    let ctx = (s.yarn_factor as f64 * s.yarn_original_context as f64).round() as usize;
    let mut kv: Vec<(&str, MetaValue)> = vec![
        ("general.architecture", "deepseek2".into()),
        ("general.type", "model".into()),
        ("general.name", s.name.as_str().into()),
        ("general.file_type", MetaValue::U32(s.dtype.file_type())),
        ("general.quantization_version", MetaValue::U32(2)),
        ("deepseek2.block_count", u32_of(s.n_layers)),
        ("deepseek2.context_length", u32_of(ctx)),
        ("deepseek2.embedding_length", u32_of(s.hidden)),
        ("deepseek2.feed_forward_length", u32_of(s.dense_inter)),
        ("deepseek2.attention.head_count", u32_of(s.n_heads)),
        // MLA: one latent "KV head"; key/value_length are the absorbed widths, the *_mla keys
        // the per-head ones.
        ("deepseek2.attention.head_count_kv", MetaValue::U32(1)),
        (
            "deepseek2.attention.key_length",
            u32_of(s.kv_lora_rank + s.qk_rope),
        ),
        ("deepseek2.attention.value_length", u32_of(s.kv_lora_rank)),
        ("deepseek2.attention.key_length_mla", u32_of(qk_head)),
        ("deepseek2.attention.value_length_mla", u32_of(s.v_head)),
        (
            "deepseek2.attention.q_lora_rank",
            u32_of(s.q_lora_rank.unwrap_or(0)),
        ),
        ("deepseek2.attention.kv_lora_rank", u32_of(s.kv_lora_rank)),
        (
            "deepseek2.attention.layer_norm_rms_epsilon",
            MetaValue::F32(s.rms_eps),
        ),
        ("deepseek2.rope.dimension_count", u32_of(s.qk_rope)),
        ("deepseek2.rope.freq_base", MetaValue::F32(s.rope_theta)),
        ("deepseek2.rope.scaling.type", "yarn".into()),
        (
            "deepseek2.rope.scaling.factor",
            MetaValue::F32(s.yarn_factor),
        ),
        (
            "deepseek2.rope.scaling.original_context_length",
            MetaValue::U32(s.yarn_original_context),
        ),
        (
            "deepseek2.rope.scaling.yarn_beta_fast",
            MetaValue::F32(s.yarn_beta_fast),
        ),
        (
            "deepseek2.rope.scaling.yarn_beta_slow",
            MetaValue::F32(s.yarn_beta_slow),
        ),
        (
            "deepseek2.rope.scaling.yarn_log_multiplier",
            MetaValue::F32(0.1 * s.yarn_mscale_all_dim),
        ),
        (
            "deepseek2.leading_dense_block_count",
            u32_of(s.n_dense_layers),
        ),
        ("deepseek2.vocab_size", u32_of(s.vocab_size)),
        ("deepseek2.expert_count", u32_of(s.n_routed)),
        ("deepseek2.expert_used_count", u32_of(s.top_k)),
        ("deepseek2.expert_shared_count", u32_of(s.n_shared)),
        ("deepseek2.expert_group_count", u32_of(s.n_group)),
        ("deepseek2.expert_group_used_count", u32_of(s.topk_group)),
        ("deepseek2.expert_feed_forward_length", u32_of(s.moe_inter)),
        (
            "deepseek2.expert_weights_scale",
            MetaValue::F32(s.routed_scale),
        ),
        (
            "deepseek2.expert_weights_norm",
            MetaValue::Bool(s.norm_topk),
        ),
        // 2 = sigmoid (DeepSeek-V3/R1).
        ("deepseek2.expert_gating_func", MetaValue::U32(2)),
    ];
    let v = embedded_vocab()?;
    let template = chat_template(s.chat, &v)?;
    let mut tokens = v.tokens.clone();
    let mut types = v.token_types.clone();
    for id in tokens.len()..s.vocab_size {
        tokens.push(format!("[PAD{id}]"));
        types.push(token_type::UNUSED);
    }
    let strings = |v: Vec<String>| MetaValue::Array(v.into_iter().map(MetaValue::String).collect());
    kv.extend([
        ("tokenizer.ggml.model", v.model.as_str().into()),
        ("tokenizer.ggml.pre", v.pre.as_str().into()),
        ("tokenizer.ggml.tokens", strings(tokens)),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(v.merges.clone())),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(v.bos_id)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(v.eos_id)),
        (
            "tokenizer.ggml.padding_token_id",
            MetaValue::U32(v.padding_id),
        ),
        ("tokenizer.ggml.add_bos_token", MetaValue::Bool(v.add_bos)),
        ("tokenizer.ggml.add_eos_token", MetaValue::Bool(false)),
        ("tokenizer.chat_template", template.as_str().into()),
    ]);
    for (k, val) in kv {
        w.add_meta(k, val)?;
    }
    Ok(())
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Approximately N(0, std²).
    Normal(f64),
    Uniform(f64, f64),
}

/// Where a tensor's type comes from.
#[derive(Clone, Copy, Debug)]
enum Storage {
    /// [`SynthSpec::dtype`].
    Weight,
    /// Always F32 (norms, router, bias).
    F32,
}

struct PlannedTensor {
    name: String,
    /// Outermost-first, like [`crate::source::RawTensor::shape`].
    shape: Vec<usize>,
    init: Init,
    storage: Storage,
    /// Elements from this index on are zero (the head's padding rows).
    zero_from: usize,
}

impl PlannedTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of the model, in file order, with the shapes the loaders expect.
fn tensor_plan(s: &SynthSpec, tokenizer_tokens: usize) -> Vec<PlannedTensor> {
    let mut plan = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init, storage: Storage| {
        let zero_from = shape.iter().product();
        plan.push(PlannedTensor {
            name,
            shape,
            init,
            storage,
            zero_from,
        })
    };
    // A matrix with `fan_in` inputs: N(0, gain² / fan_in).
    let lin = |fan_in: usize, gain: f32| Init::Normal(gain as f64 / (fan_in as f64).sqrt());
    let norm = Init::Uniform(0.6, 1.4);
    let (h, bg) = (s.hidden, s.branch_gain);
    let qk_head = s.qk_nope + s.qk_rope;

    add(
        "token_embd.weight".into(),
        vec![s.vocab_size, h],
        Init::Normal(1.0),
        Storage::Weight,
    );
    for l in 0..s.n_layers {
        let n = |t: &str| format!("blk.{l}.{t}");
        add(n("attn_norm.weight"), vec![h], norm, Storage::F32);
        match s.q_lora_rank {
            Some(r) => {
                add(
                    n("attn_q_a.weight"),
                    vec![r, h],
                    lin(h, 1.0),
                    Storage::Weight,
                );
                add(n("attn_q_a_norm.weight"), vec![r], norm, Storage::F32);
                add(
                    n("attn_q_b.weight"),
                    vec![s.n_heads * qk_head, r],
                    lin(r, 1.0),
                    Storage::Weight,
                );
            }
            None => add(
                n("attn_q.weight"),
                vec![s.n_heads * qk_head, h],
                lin(h, 1.0),
                Storage::Weight,
            ),
        }
        add(
            n("attn_kv_a_mqa.weight"),
            vec![s.kv_lora_rank + s.qk_rope, h],
            lin(h, 1.0),
            Storage::Weight,
        );
        add(
            n("attn_kv_a_norm.weight"),
            vec![s.kv_lora_rank],
            norm,
            Storage::F32,
        );
        // Both halves of Hugging Face's kv_b_proj, whose fan-in is kv_lora_rank.
        add(
            n("attn_k_b.weight"),
            vec![s.n_heads, s.kv_lora_rank, s.qk_nope],
            lin(s.kv_lora_rank, 1.0),
            Storage::Weight,
        );
        add(
            n("attn_v_b.weight"),
            vec![s.n_heads, s.v_head, s.kv_lora_rank],
            lin(s.kv_lora_rank, 1.0),
            Storage::Weight,
        );
        add(
            n("attn_output.weight"),
            vec![h, s.n_heads * s.v_head],
            lin(s.n_heads * s.v_head, bg),
            Storage::Weight,
        );
        add(n("ffn_norm.weight"), vec![h], norm, Storage::F32);
        if l < s.n_dense_layers {
            let i = s.dense_inter;
            add(
                n("ffn_gate.weight"),
                vec![i, h],
                lin(h, 1.0),
                Storage::Weight,
            );
            add(n("ffn_up.weight"), vec![i, h], lin(h, 1.0), Storage::Weight);
            add(
                n("ffn_down.weight"),
                vec![h, i],
                lin(i, bg),
                Storage::Weight,
            );
        } else {
            let (e, m) = (s.n_routed, s.moe_inter);
            add(
                n("ffn_gate_inp.weight"),
                vec![e, h],
                lin(h, 1.0),
                Storage::F32,
            );
            add(
                n("exp_probs_b.bias"),
                vec![e],
                Init::Uniform(-0.15, 0.15),
                Storage::F32,
            );
            add(
                n("ffn_gate_exps.weight"),
                vec![e, m, h],
                lin(h, 1.0),
                Storage::Weight,
            );
            add(
                n("ffn_up_exps.weight"),
                vec![e, m, h],
                lin(h, 1.0),
                Storage::Weight,
            );
            add(
                n("ffn_down_exps.weight"),
                vec![e, h, m],
                lin(m, bg),
                Storage::Weight,
            );
            if s.n_shared > 0 {
                let sm = s.n_shared * m;
                add(
                    n("ffn_gate_shexp.weight"),
                    vec![sm, h],
                    lin(h, 1.0),
                    Storage::Weight,
                );
                add(
                    n("ffn_up_shexp.weight"),
                    vec![sm, h],
                    lin(h, 1.0),
                    Storage::Weight,
                );
                add(
                    n("ffn_down_shexp.weight"),
                    vec![h, sm],
                    lin(sm, bg),
                    Storage::Weight,
                );
            }
        }
    }
    add("output_norm.weight".into(), vec![h], norm, Storage::F32);
    add(
        "output.weight".into(),
        vec![s.vocab_size, h],
        lin(h, s.lm_head_gain),
        Storage::Weight,
    );
    // Padding tokens get zero logits, so that greedy decoding picks real tokens (the head's
    // size, and so its cost, is unchanged).
    plan.last_mut().expect("just added").zero_from = tokenizer_tokens * h;
    plan
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stream key of one tensor: the seed and the tensor's name (FNV-1a), mixed.
fn tensor_key(seed: u64, name: &str) -> u64 {
    let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    mix(seed.wrapping_mul(GOLDEN) ^ fnv)
}

/// Value `i` of the tensor whose stream key is `key`, before rounding.
fn value(key: u64, i: u64, init: Init) -> f64 {
    let r = mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)));
    match init {
        Init::Normal(std) => {
            // Irwin-Hall: four 16-bit uniforms, mean 2, variance 1/3.
            let u = |k: u32| ((r >> (16 * k)) & 0xffff) as f64 + 0.5;
            let sum = (u(0) + u(1) + u(2) + u(3)) / 65536.0;
            (sum - 2.0) * 3f64.sqrt() * std
        }
        Init::Uniform(lo, hi) => {
            let u = ((r >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            lo + (hi - lo) * u
        }
    }
}

/// `total` values of the tensor `name`, the first `live` drawn and rounded to bf16, the rest
/// zero, stored as `ty` (BF16 or F32).
fn generate(
    seed: u64,
    name: &str,
    live: usize,
    total: usize,
    init: Init,
    ty: QuantType,
) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let key = tensor_key(seed, name);
    let size = if ty == QuantType::BF16 { 2 } else { 4 };
    let mut out = vec![0u8; total * size];
    out[..live * size]
        .par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = (c * CHUNK) as u64;
            for (j, dst) in chunk.chunks_exact_mut(size).enumerate() {
                let v = half::bf16::from_f64(value(key, base + j as u64, init));
                if size == 2 {
                    dst.copy_from_slice(&v.to_bits().to_le_bytes());
                } else {
                    dst.copy_from_slice(&v.to_f32().to_le_bytes());
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatMessage;
    use crate::gguf::GgufFile;
    use crate::model::kv_cache::CacheType;
    use crate::model::weights::ExpertFilter;
    use crate::model::{Logits, ModelFile, Workspace};
    use crate::source::TensorSource;

    fn tiny_file(dir: &Path, spec: &SynthSpec) -> std::path::PathBuf {
        let path = dir.join(format!("{}-{}.gguf", spec.name, spec.seed));
        write_model(&path, spec).expect("write");
        path
    }

    #[test]
    fn tiny_loads_with_the_expected_config() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec::tiny();
        let path = tiny_file(dir.path(), &spec);
        let mf = ModelFile::open(&path).expect("open");
        let c = &mf.config;
        assert_eq!(
            (c.vocab_size, c.hidden, c.n_layers, c.n_dense_layers),
            (1024, 256, 5, 1)
        );
        assert_eq!(
            (c.n_routed, c.top_k, c.n_group, c.topk_group, c.n_shared),
            (16, 4, 4, 2, 1)
        );
        assert_eq!(
            (
                c.q_lora_rank,
                c.kv_lora_rank,
                c.qk_nope,
                c.qk_rope,
                c.v_head
            ),
            (Some(160), 64, 32, 16, 24)
        );
        assert_eq!(c.scoring, crate::config::Scoring::Sigmoid);
        assert!(c.norm_topk);
        assert_eq!(c.routed_scale, 2.5);
        let y = c.rope.yarn.expect("yarn");
        assert_eq!((y.factor, y.original_max_position), (40.0, 4096.0));
        assert!((y.mscale_all_dim - 1.0).abs() < 1e-6);
        assert_eq!(c.max_positions, 163840);
        assert_eq!((c.bos_id, c.eos_ids.as_slice()), (Some(0), &[1u32][..]));
        // The MLA layout and the weight types.
        let g = mf.gguf.as_ref().unwrap();
        assert!(g.contains("blk.0.attn_k_b.weight") && !g.contains("blk.0.attn_kv_b.weight"));
        assert_eq!(
            g.tensor_info("blk.1.ffn_gate_exps.weight").unwrap().ty,
            QuantType::BF16
        );
        assert_eq!(
            g.tensor_info("blk.1.ffn_gate_inp.weight").unwrap().ty,
            QuantType::F32
        );
        let n: u64 = g.tensor_infos().iter().map(|t| t.numel() as u64).sum();
        assert_eq!(n, spec.params());
    }

    #[test]
    fn tiny_runs_with_finite_logits_and_live_routing() {
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_file(dir.path(), &SynthSpec::tiny());
        let mf = ModelFile::open(&path).unwrap();
        let model = mf.load_model().unwrap();
        let experts = mf.load_experts(&ExpertFilter::All).unwrap();
        let tok = mf.tokenizer().unwrap();
        let prompt = tok
            .encode("Hello, world! The quick brown fox.", false)
            .unwrap();
        assert!(prompt.len() > 4, "{prompt:?}");
        let mut cache = model.new_cache(CacheType::F32, 64);
        let mut ws = Workspace::default();
        ws.trace = Some(Vec::new());
        let v = model.cfg.vocab_size;
        let logits = model
            .forward(&prompt, &mut cache, &experts, &mut ws, Logits::All)
            .unwrap()
            .to_vec();
        assert_eq!(logits.len(), prompt.len() * v);
        assert!(logits.iter().all(|x| x.is_finite()));
        let std = (logits.iter().map(|x| x * x).sum::<f32>() / logits.len() as f32).sqrt();
        assert!((0.3..30.0).contains(&std), "logit rms {std}");
        // Distinct tokens pick distinct experts: routing is neither constant nor empty.
        for r in &ws.routing_trace {
            let mut used: Vec<u32> = r.experts.clone();
            used.sort_unstable();
            used.dedup();
            assert!(used.len() > r.top_k, "layer uses only {used:?}");
            assert!(r.weights.iter().all(|w| w.is_finite() && *w > 0.0));
        }
        // Decode steps stay finite too.
        let mut next = argmax(&logits[(prompt.len() - 1) * v..]);
        for _ in 0..8 {
            let l = model
                .forward(&[next], &mut cache, &experts, &mut ws, Logits::Last)
                .unwrap();
            assert!(l.iter().all(|x| x.is_finite()));
            next = argmax(l);
        }
    }

    fn argmax(v: &[f32]) -> u32 {
        v.iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > v[b] { i } else { b }) as u32
    }

    #[test]
    fn tokenizer_and_chat_template_come_with_the_file() {
        let bytes = to_bytes(&SynthSpec::tiny()).unwrap();
        let g = GgufFile::from_bytes("tiny.gguf", Bytes::from_vec(bytes)).unwrap();
        assert_eq!(
            g.meta("tokenizer.ggml.pre").and_then(|v| v.as_str()),
            Some("deepseek-v3")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_file(dir.path(), &SynthSpec::tiny());
        let mf = ModelFile::open(&path).unwrap();
        let tok = mf.tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), 1024);
        let text = "def f(x):\n    return x + 1  # ok";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        let tpl = mf.chat_template(&tok).unwrap().expect("template");
        let rendered = tpl.render(&[ChatMessage::user("Hi there")], true).unwrap();
        assert!(
            rendered.starts_with("<｜begin▁of▁sentence｜>")
                && rendered.contains("<｜User｜>Hi there")
                && rendered.contains("<｜Assistant｜>"),
            "{rendered}"
        );
        let ids = tok.encode(&rendered, false).unwrap();
        assert_eq!(ids[0], 0);
        assert!(ids.contains(&1012) && ids.contains(&1013), "{ids:?}");
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_weights() {
        let a = to_bytes(&SynthSpec::tiny()).unwrap();
        let b = to_bytes(&SynthSpec::tiny()).unwrap();
        assert!(a == b, "two builds of one spec differ");
        let c = to_bytes(&SynthSpec {
            seed: 7,
            ..SynthSpec::tiny()
        })
        .unwrap();
        assert_eq!(a.len(), c.len());
        assert!(a != c);
        // A file on disk is the same image.
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_file(dir.path(), &SynthSpec::tiny());
        assert!(std::fs::read(&path).unwrap() == a);
    }

    /// The tiny model is a fixture (tests, the demo): any change to its bytes must be deliberate.
    #[test]
    fn tiny_bytes_are_pinned() {
        let bytes = to_bytes(&SynthSpec::tiny()).unwrap();
        let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!((bytes.len(), fnv), (16_634_112, 0x74cb_6bf1_4d6b_ad40));
    }

    #[test]
    fn bf16_and_f32_files_hold_the_same_values() {
        let g = |dtype| {
            let bytes = to_bytes(&SynthSpec {
                dtype,
                ..SynthSpec::tiny()
            })
            .unwrap();
            GgufFile::from_bytes("t.gguf", Bytes::from_vec(bytes)).unwrap()
        };
        let (b, f) = (g(SynthType::Bf16), g(SynthType::F32));
        for name in ["blk.2.attn_k_b.weight", "output.weight"] {
            let (tb, tf) = (b.tensor(name).unwrap(), f.tensor(name).unwrap());
            assert_eq!((tb.ty, tf.ty), (QuantType::BF16, QuantType::F32));
            let mut xb = vec![0f32; tb.shape.iter().product()];
            let mut xf = xb.clone();
            crate::quant::dequantize_row(tb.ty, &tb.data, &mut xb).unwrap();
            crate::quant::dequantize_row(tf.ty, &tf.data, &mut xf).unwrap();
            assert!(xb == xf, "{name}");
        }
    }

    #[test]
    fn values_have_the_intended_scale() {
        let n = 1 << 16;
        let key = tensor_key(1, "x");
        let xs: Vec<f64> = (0..n).map(|i| value(key, i, Init::Normal(0.5))).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.01,
            "{mean} {var}"
        );
        let us: Vec<f64> = (0..n)
            .map(|i| value(key, i, Init::Uniform(0.6, 1.4)))
            .collect();
        assert!(us.iter().all(|u| (0.6..1.4).contains(u)));
    }

    #[test]
    fn presets_and_validation() {
        for p in PRESETS {
            SynthSpec::preset(p).unwrap().validate().unwrap();
        }
        let mid = SynthSpec::mid();
        assert!(
            (800_000_000..850_000_000).contains(&mid.params()),
            "{}",
            mid.params()
        );
        let bad = SynthSpec {
            n_group: 3,
            ..SynthSpec::tiny()
        };
        assert!(matches!(bad.validate(), Err(SynthError::Invalid(_))));
        let small = SynthSpec {
            vocab_size: 512,
            ..SynthSpec::tiny()
        };
        assert!(small.validate().is_err());
    }

    #[test]
    fn padded_vocabulary_keeps_the_tokenizer() {
        let spec = SynthSpec {
            vocab_size: 1100,
            n_layers: 2,
            ..SynthSpec::tiny()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = tiny_file(dir.path(), &spec);
        let mf = ModelFile::open(&path).unwrap();
        assert_eq!(mf.config.vocab_size, 1100);
        let head = mf.source.tensor("output.weight").unwrap();
        let row = 256 * 2;
        assert!(head.data[1024 * row..].iter().all(|&b| b == 0));
        assert!(head.data[1023 * row..1024 * row].iter().any(|&b| b != 0));
        let tok = mf.tokenizer().unwrap();
        assert_eq!(tok.vocab_size(), 1100);
        assert_eq!(tok.encode("hello", false).unwrap(), {
            let small = ModelFile::open(&tiny_file(dir.path(), &SynthSpec::tiny())).unwrap();
            small.tokenizer().unwrap().encode("hello", false).unwrap()
        });
    }
}
