//! Model hyper-parameters from GGUF metadata (`deepseek2.*` keys) or a Hugging Face
//! `config.json`, validated once so that the graph code can trust them.

use serde_json::Value;

use crate::gguf::GgufFile;

/// How router logits become expert affinities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// DeepSeek-V3/R1: `sigmoid(logit)`.
    Sigmoid,
    /// DeepSeek-V2: `softmax(logits)`.
    Softmax,
}

/// YaRN context extension, as in the reference implementations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// `mscale` (0 when absent).
    pub mscale: f64,
    /// `mscale_all_dim` (0 when absent).
    pub mscale_all_dim: f64,
}

/// Rotary embedding parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub yarn: Option<Yarn>,
    /// Rotate adjacent channel pairs `(2i, 2i+1)` (the official layout, llama.cpp's NORM mode and
    /// Hugging Face's `rope_interleave = true`), or half-split pairs `(i, i + d/2)` otherwise.
    pub interleaved: bool,
}

/// Everything the graph needs to know about the model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    /// Layers `0..n_dense_layers` have a dense FFN; the rest are MoE.
    pub n_dense_layers: usize,
    pub dense_inter: usize,
    pub moe_inter: usize,
    pub n_heads: usize,
    pub n_routed: usize,
    pub n_shared: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scale: f32,
    pub norm_topk: bool,
    pub scoring: Scoring,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head: usize,
    pub rms_eps: f32,
    pub rope: Rope,
    pub max_positions: usize,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
}

/// A configuration that is missing, malformed or inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: missing `{key}`")]
    Missing { source_name: String, key: String },
    #[error("{source_name}: `{key}` has an invalid value: {what}")]
    Invalid {
        source_name: String,
        key: String,
        what: String,
    },
    #[error("{source_name}: architecture `{arch}` is not DeepSeek-V2/V3 (`deepseek2`)")]
    Architecture { source_name: String, arch: String },
}

impl ModelConfig {
    /// `qk_nope + qk_rope`: the per-head query/key width of the unabsorbed attention.
    pub fn qk_head(&self) -> usize {
        self.qk_nope + self.qk_rope
    }

    /// Width of one latent KV-cache row: the normalised latent plus the rotated shared key.
    pub fn cache_row(&self) -> usize {
        self.kv_lora_rank + self.qk_rope
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.n_dense_layers && self.n_routed > 0
    }

    /// Softmax scale of the attention scores: `qk_head^-1/2`, times `mscale^2` under YaRN.
    pub fn softmax_scale(&self) -> f32 {
        let mut s = 1.0 / (self.qk_head() as f64).sqrt();
        if let Some(y) = self.rope.yarn {
            if y.mscale_all_dim != 0.0 {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                s *= m * m;
            }
        }
        s as f32
    }

    /// Reads a Hugging Face `config.json` (DeepseekV3/V2 keys).
    pub fn from_hf(cfg: &Value, source_name: &str) -> Result<Self, ConfigError> {
        let r = JsonReader {
            v: cfg,
            src: source_name,
        };
        let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
        if !model_type.starts_with("deepseek") {
            return Err(ConfigError::Architecture {
                source_name: source_name.into(),
                arch: model_type.into(),
            });
        }
        let scoring = match cfg
            .get("scoring_func")
            .and_then(Value::as_str)
            .unwrap_or("softmax")
        {
            "sigmoid" => Scoring::Sigmoid,
            "softmax" => Scoring::Softmax,
            other => return Err(r.invalid("scoring_func", format!("unknown `{other}`"))),
        };
        let rope_scaling = cfg.get("rope_scaling").filter(|v| !v.is_null());
        let yarn = match rope_scaling {
            None => None,
            Some(rs) => {
                let ty = rs
                    .get("type")
                    .or_else(|| rs.get("rope_type"))
                    .and_then(Value::as_str);
                if ty != Some("yarn") {
                    return Err(r.invalid("rope_scaling.type", format!("{ty:?} (only yarn)")));
                }
                let f = |k: &str, d: f64| rs.get(k).and_then(Value::as_f64).unwrap_or(d);
                let factor = rs
                    .get("factor")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| r.missing("rope_scaling.factor"))?;
                Some(Yarn {
                    factor,
                    original_max_position: f("original_max_position_embeddings", 4096.0),
                    beta_fast: f("beta_fast", 32.0),
                    beta_slow: f("beta_slow", 1.0),
                    mscale: f("mscale", 0.0),
                    mscale_all_dim: f("mscale_all_dim", 0.0),
                })
            }
        };
        let q_lora_rank = match cfg.get("q_lora_rank") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(0) => None,
                Some(n) => Some(n as usize),
                None => return Err(r.invalid("q_lora_rank", v.to_string())),
            },
        };
        let eos_ids = match cfg.get("eos_token_id") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        let n_routed = r.usize_or("n_routed_experts", 0)?;
        let c = ModelConfig {
            vocab_size: r.usize("vocab_size")?,
            hidden: r.usize("hidden_size")?,
            n_layers: r.usize("num_hidden_layers")?,
            n_dense_layers: r.usize_or("first_k_dense_replace", 0)?,
            dense_inter: r.usize("intermediate_size")?,
            moe_inter: r.usize_or("moe_intermediate_size", 0)?,
            n_heads: r.usize("num_attention_heads")?,
            n_routed,
            n_shared: r.usize_or("n_shared_experts", 0)?,
            top_k: r.usize_or("num_experts_per_tok", 0)?,
            n_group: r.usize_or("n_group", 1)?.max(1),
            topk_group: r.usize_or("topk_group", 1)?.max(1),
            routed_scale: cfg
                .get("routed_scaling_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0) as f32,
            norm_topk: cfg
                .get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            scoring,
            q_lora_rank,
            kv_lora_rank: r.usize("kv_lora_rank")?,
            qk_nope: r.usize("qk_nope_head_dim")?,
            qk_rope: r.usize("qk_rope_head_dim")?,
            v_head: r.usize("v_head_dim")?,
            rms_eps: cfg
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6) as f32,
            rope: Rope {
                theta: cfg
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .unwrap_or(10000.0),
                yarn,
                interleaved: cfg
                    .get("rope_interleave")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            },
            max_positions: r.usize_or("max_position_embeddings", 4096)?,
            bos_id: cfg
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|v| v as u32),
            eos_ids,
        };
        c.validate(source_name)?;
        Ok(c)
    }

    /// Reads the `deepseek2.*` metadata of a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ConfigError> {
        let src = g.path().display().to_string();
        let arch = g
            .meta("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if arch != "deepseek2" {
            return Err(ConfigError::Architecture {
                source_name: src,
                arch: arch.into(),
            });
        }
        let r = GgufReader {
            g,
            src: &src,
            prefix: "deepseek2.",
        };
        let n_routed = r.usize_or("expert_count", 0)?;
        // Files converted before `expert_group_count` existed: DeepSeek-V3's 256 experts are
        // always 8 groups keeping 4; other expert counts get plain top-k.
        let (n_group, topk_group) = match (
            r.opt_usize("expert_group_count")?,
            r.opt_usize("expert_group_used_count")?,
        ) {
            (Some(g), Some(k)) => (g.max(1), k.max(1)),
            _ if n_routed == 256 => {
                tracing::warn!(
                    "{src}: no expert_group_count; using DeepSeek-V3's 8 groups / 4 kept"
                );
                (8, 4)
            }
            _ => {
                tracing::warn!("{src}: no expert_group_count; routing with plain top-k");
                (1, 1)
            }
        };
        let scoring = match r.usize_or("expert_gating_func", 1)? {
            1 => Scoring::Softmax,
            2 => Scoring::Sigmoid,
            other => return Err(r.invalid("expert_gating_func", format!("{other}"))),
        };
        // MLA files store the absorbed widths in key_length/value_length and the per-head ones
        // in the *_mla keys; legacy files only have the per-head ones.
        let qk_rope = r.usize("rope.dimension_count")?;
        let kv_lora_rank = r.usize("attention.kv_lora_rank")?;
        let qk_head = match r.opt_usize("attention.key_length_mla")? {
            Some(k) => k,
            None => r.usize("attention.key_length")?,
        };
        let v_head = match r.opt_usize("attention.value_length_mla")? {
            Some(v) => v,
            None => r.usize("attention.value_length")?,
        };
        if qk_head <= qk_rope {
            return Err(r.invalid(
                "attention.key_length",
                format!("{qk_head} <= rope dims {qk_rope}"),
            ));
        }
        let yarn = match g
            .meta("deepseek2.rope.scaling.type")
            .and_then(|v| v.as_str())
        {
            None | Some("none") => None,
            Some("yarn") => {
                // GGUF stores 0.1 * mscale_all_dim; DeepSeek uses mscale == mscale_all_dim.
                let log_mul = r.f64_or("rope.scaling.yarn_log_multiplier", 0.0)?;
                let m = log_mul / 0.1;
                Some(Yarn {
                    factor: r.f64("rope.scaling.factor")?,
                    original_max_position: r
                        .f64_or("rope.scaling.original_context_length", 4096.0)?,
                    beta_fast: r.f64_or("rope.scaling.yarn_beta_fast", 32.0)?,
                    beta_slow: r.f64_or("rope.scaling.yarn_beta_slow", 1.0)?,
                    mscale: m,
                    mscale_all_dim: m,
                })
            }
            Some(other) => return Err(r.invalid("rope.scaling.type", other.to_string())),
        };
        let vocab_size = match r.opt_usize("vocab_size")? {
            Some(v) => v,
            None => g
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| r.missing("vocab_size"))?,
        };
        let q_lora = r.usize_or("attention.q_lora_rank", 0)?;
        let tok = |k: &str| g.meta(k).and_then(|v| v.as_u64()).map(|v| v as u32);
        let c = ModelConfig {
            vocab_size,
            hidden: r.usize("embedding_length")?,
            n_layers: r.usize("block_count")?,
            n_dense_layers: r.usize_or("leading_dense_block_count", 0)?,
            dense_inter: r.usize("feed_forward_length")?,
            moe_inter: r.usize_or("expert_feed_forward_length", 0)?,
            n_heads: r.usize("attention.head_count")?,
            n_routed,
            n_shared: r.usize_or("expert_shared_count", 0)?,
            top_k: r.usize_or("expert_used_count", 0)?,
            n_group,
            topk_group,
            routed_scale: r.f64_or("expert_weights_scale", 1.0)? as f32,
            norm_topk: g
                .meta("deepseek2.expert_weights_norm")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            scoring,
            q_lora_rank: (q_lora > 0).then_some(q_lora),
            kv_lora_rank,
            qk_nope: qk_head - qk_rope,
            qk_rope,
            v_head,
            rms_eps: r.f64_or("attention.layer_norm_rms_epsilon", 1e-6)? as f32,
            rope: Rope {
                theta: r.f64_or("rope.freq_base", 10000.0)?,
                yarn,
                interleaved: true,
            },
            max_positions: r.usize_or("context_length", 4096)?,
            bos_id: tok("tokenizer.ggml.bos_token_id"),
            eos_ids: tok("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        c.validate(&src)?;
        Ok(c)
    }

    /// Cross-field checks: nothing later may divide by zero or index out of range.
    fn validate(&self, src: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, what: String| ConfigError::Invalid {
            source_name: src.into(),
            key: key.into(),
            what,
        };
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden", self.hidden),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope", self.qk_nope),
            ("v_head", self.v_head),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return Err(bad(k, "must be > 0".into()));
            }
        }
        if self.qk_rope % 2 != 0 {
            return Err(bad("qk_rope", format!("{} is odd", self.qk_rope)));
        }
        if self.n_dense_layers < self.n_layers && self.n_routed > 0 {
            if self.top_k == 0 || self.top_k > self.n_routed {
                return Err(bad(
                    "top_k",
                    format!("{} of {} experts", self.top_k, self.n_routed),
                ));
            }
            if self.moe_inter == 0 {
                return Err(bad("moe_inter", "must be > 0".into()));
            }
            if self.n_routed % self.n_group != 0 || self.topk_group > self.n_group {
                return Err(bad(
                    "n_group",
                    format!(
                        "{} experts, {} groups, {} kept",
                        self.n_routed, self.n_group, self.topk_group
                    ),
                ));
            }
            if self.topk_group * (self.n_routed / self.n_group) < self.top_k {
                return Err(bad(
                    "topk_group",
                    "kept groups hold fewer experts than top_k".into(),
                ));
            }
        }
        if self.n_dense_layers > 0 && self.dense_inter == 0 {
            return Err(bad("dense_inter", "must be > 0".into()));
        }
        Ok(())
    }
}

/// YaRN's magnitude correction `0.1 * m * ln(s) + 1` (1 for `s <= 1`).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

struct JsonReader<'a> {
    v: &'a Value,
    src: &'a str,
}

impl JsonReader<'_> {
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            source_name: self.src.into(),
            key: key.into(),
        }
    }
    fn invalid(&self, key: &str, what: String) -> ConfigError {
        ConfigError::Invalid {
            source_name: self.src.into(),
            key: key.into(),
            what,
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Err(self.missing(key)),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.invalid(key, v.to_string())),
        }
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }
}

struct GgufReader<'a> {
    g: &'a GgufFile,
    src: &'a str,
    prefix: &'a str,
}

impl GgufReader<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}{}", self.prefix, k)
    }
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError::Missing {
            source_name: self.src.into(),
            key: self.key(key),
        }
    }
    fn invalid(&self, key: &str, what: String) -> ConfigError {
        ConfigError::Invalid {
            source_name: self.src.into(),
            key: self.key(key),
            what,
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.g.meta(&self.key(key)) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.invalid(key, format!("{v:?}"))),
            },
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn usize_or(&self, key: &str, d: usize) -> Result<usize, ConfigError> {
        Ok(self.opt_usize(key)?.unwrap_or(d))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.g.meta(&self.key(key)) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.invalid(key, format!("{v:?}"))),
            },
        }
    }
    fn f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }
    fn f64_or(&self, key: &str, d: f64) -> Result<f64, ConfigError> {
        Ok(self.opt_f64(key)?.unwrap_or(d))
    }
}
