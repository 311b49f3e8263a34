//! The DeepSeek-V3 graph: embeddings, MLA attention over the latent cache, dense and MoE FFNs,
//! final norm and head. [`Model`] holds the always-active part; the routed experts are reached
//! through a [`moe::RoutedExperts`] so that they can live in this process or on other machines.

pub mod attention;
#[cfg(test)]
mod batch_tests;
pub mod kv_cache;
pub mod moe;
pub mod ops;
pub mod rope;
pub mod weights;

use std::path::Path;

use crate::config::{ConfigError, ModelConfig};
use crate::gguf::GgufFile;
use crate::hf::HfModel;
use crate::model::attention::AttnScratch;
use crate::model::kv_cache::{CacheType, ContextFull, KvCache};
use crate::model::moe::{
    ExpertError, LocalExperts, MoeScratch, RoutedExperts, RouterScratch, Routing,
};
use crate::model::rope::RopeTable;
use crate::model::weights::{DenseWeights, ExpertFilter, ExpertPiece, Ffn, Naming, WeightError};
use crate::source::TensorSource;
use crate::tensor::{ActBuf, GroupBuf};

/// Anything that stops a model from loading.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}: not a GGUF file or a directory with config.json")]
    UnknownFormat(String),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Hf(#[from] crate::hf::HfError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("chat template: {0}")]
    Template(String),
}

/// Anything that stops a forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    UnknownToken { id: u32, vocab: usize },
    #[error(transparent)]
    ContextFull(#[from] ContextFull),
    #[error(transparent)]
    Experts(#[from] ExpertError),
    #[error("empty batch")]
    Empty,
}

/// An opened model file: its configuration and tensors, before anything is loaded.
pub struct ModelFile {
    pub config: ModelConfig,
    pub source: Box<dyn TensorSource>,
    pub naming: Naming,
    /// The GGUF itself when the model is one (tokenizer and template live in its metadata).
    pub gguf: Option<std::sync::Arc<GgufFile>>,
    /// The directory when the model is a Hugging Face checkpoint.
    pub hf_dir: Option<std::path::PathBuf>,
}

impl ModelFile {
    /// Opens a `.gguf` (first split of a split model) or a Hugging Face directory.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if path.is_dir() {
            let hf = HfModel::open(path)?;
            let config = ModelConfig::from_hf(hf.config(), &path.display().to_string())?;
            return Ok(ModelFile {
                config,
                source: Box::new(hf),
                naming: Naming::Hf,
                gguf: None,
                hf_dir: Some(path.to_path_buf()),
            });
        }
        if path.is_file() {
            let g = std::sync::Arc::new(GgufFile::open(path)?);
            let config = ModelConfig::from_gguf(&g)?;
            return Ok(ModelFile {
                config,
                source: Box::new(g.clone()),
                naming: Naming::Gguf,
                gguf: Some(g),
                hf_dir: None,
            });
        }
        Err(LoadError::UnknownFormat(path.display().to_string()))
    }

    /// Multi-token-prediction tensors (the checkpoint's extra layer, GGUF `nextn`) present in
    /// the file; they are recognised and not loaded.
    pub fn mtp_tensors(&self) -> usize {
        let extra = format!("model.layers.{}.", self.config.n_layers);
        self.source
            .names()
            .iter()
            .filter(|n| n.starts_with(&extra) || n.contains(".nextn."))
            .count()
    }

    /// Ids the vocabulary marks as unused (GGUF token type 5: the `[PAD…]` rows that pad the
    /// vocabulary to the embedding's size). They are not tokens and must never be sampled.
    pub fn unused_token_ids(&self) -> Vec<u32> {
        let Some(g) = &self.gguf else {
            return Vec::new();
        };
        g.meta("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .enumerate()
                    .filter(|(_, t)| {
                        t.as_i64() == Some(crate::tokenizer::token_type::UNUSED as i64)
                    })
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The tokenizer the model carries (GGUF metadata or the directory's tokenizer.json).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer, LoadError> {
        use crate::tokenizer::{GgufVocab, Tokenizer};
        if let Some(dir) = &self.hf_dir {
            return Ok(Tokenizer::from_hf_dir(dir)?);
        }
        let g = self.gguf.as_ref().expect("a model is GGUF or a directory");
        let strings = |key: &str| -> Vec<String> {
            g.meta(key)
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |key: &str| {
            g.meta(key)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let id = |key: &str| g.meta(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let vocab = GgufVocab {
            model: text("tokenizer.ggml.model"),
            pre: text("tokenizer.ggml.pre"),
            tokens: strings("tokenizer.ggml.tokens"),
            token_types: g
                .meta("tokenizer.ggml.token_type")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_i64())
                        .map(|v| v as i32)
                        .collect()
                })
                .unwrap_or_default(),
            merges: strings("tokenizer.ggml.merges"),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
        };
        Ok(Tokenizer::from_gguf_vocab(vocab)?)
    }

    /// The chat template the model carries, if any, with its BOS/EOS token strings.
    pub fn chat_template(
        &self,
        tok: &crate::tokenizer::Tokenizer,
    ) -> Result<Option<crate::chat::ChatTemplate>, LoadError> {
        use crate::chat::{ChatTemplate, HfTokenizerConfig};
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i).ok()).unwrap_or_default();
        let (source, bos, eos) = if let Some(dir) = &self.hf_dir {
            let path = dir.join("tokenizer_config.json");
            if !path.exists() {
                return Ok(None);
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| LoadError::Template(format!("{}: {e}", path.display())))?;
            let cfg = HfTokenizerConfig::from_json_bytes(&bytes)
                .map_err(|e| LoadError::Template(e.to_string()))?;
            match cfg.chat_template {
                Some(t) => (
                    t,
                    cfg.bos_token.unwrap_or_else(|| name(tok.bos_id())),
                    cfg.eos_token.unwrap_or_else(|| name(tok.eos_id())),
                ),
                None => return Ok(None),
            }
        } else {
            let g = self.gguf.as_ref().expect("a model is GGUF or a directory");
            match g.meta("tokenizer.chat_template").and_then(|v| v.as_str()) {
                Some(t) => (t.to_string(), name(tok.bos_id()), name(tok.eos_id())),
                None => return Ok(None),
            }
        };
        ChatTemplate::new(source, bos, eos)
            .map(Some)
            .map_err(|e| LoadError::Template(e.to_string()))
    }

    /// Loads the always-active part.
    pub fn load_model(&self) -> Result<Model, LoadError> {
        let mtp = self.mtp_tensors();
        if mtp > 0 {
            tracing::info!(
                "{}: {mtp} multi-token-prediction tensors skipped",
                self.source.describe()
            );
        }
        let weights = weights::load_dense(self.source.as_ref(), self.naming, &self.config)?;
        Ok(Model::new(self.config.clone(), weights))
    }

    /// A short identity of the model's content: a 64-bit FNV-1a hash over every tensor's name,
    /// type, shape, size and first bytes, as `fnv64:<hex>`. Two copies of the same file agree;
    /// different quantisations or models do not. (Not a security measure: peers are
    /// authenticated by TLS; this catches a worker pointed at the wrong file.)
    pub fn fingerprint(&self) -> String {
        let mut names = self.source.names();
        names.sort();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: &[u8]| {
            for &x in b {
                h ^= x as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        for name in &names {
            eat(name.as_bytes());
            if let Ok(t) = self.source.tensor(name) {
                eat(t.ty.name().as_bytes());
                for d in &t.shape {
                    eat(&(*d as u64).to_le_bytes());
                }
                eat(&(t.data.len() as u64).to_le_bytes());
                eat(&t.data[..t.data.len().min(64)]);
            }
        }
        format!("fnv64:{h:016x}")
    }

    /// Per MoE layer: `(layer, routed experts, bytes of one expert as stored)`, the input of
    /// expert placement. Reads tensor headers only (expert 0's slices of every layer).
    pub fn expert_layout(&self) -> Result<Vec<(usize, usize, u64)>, LoadError> {
        let c = &self.config;
        let firsts: std::collections::HashSet<(usize, usize)> = (0..c.n_layers)
            .filter(|&l| c.is_moe_layer(l))
            .map(|l| (l, 0))
            .collect();
        let sets = self.load_experts(&ExpertFilter::Only(firsts))?;
        Ok(sets
            .layers
            .iter()
            .enumerate()
            .filter_map(|(l, set)| {
                let mlp = set.as_ref()?.experts.first()?.as_ref()?;
                Some((l, c.n_routed, mlp.bytes() as u64))
            })
            .collect())
    }

    /// Where every routed expert's bytes are stored: its pieces (GGUF: a slice of each of
    /// the layer's three stacked tensors; Hugging Face: its own tensors, plus the block scales
    /// of FP8 ones), shapes checked against the configuration. What a coordinator streams to
    /// workers that have no copy of the model.
    pub fn expert_pieces(&self) -> Result<Vec<ExpertPiece>, LoadError> {
        Ok(weights::expert_pieces(
            self.source.as_ref(),
            self.naming,
            &self.config,
        )?)
    }

    /// Loads the routed experts that `filter` selects.
    pub fn load_experts(&self, filter: &ExpertFilter) -> Result<LocalExperts, LoadError> {
        let layers =
            weights::load_experts(self.source.as_ref(), self.naming, &self.config, filter)?;
        Ok(LocalExperts {
            hidden: self.config.hidden,
            layers,
        })
    }
}

/// The always-active part of the model, ready to run.
pub struct Model {
    pub cfg: ModelConfig,
    pub w: DenseWeights,
    rope: RopeTable,
    scale: f32,
}

/// One sequence's part of a batched forward pass.
pub struct BatchSeq<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Which logits a forward pass produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// One row per input token (`n x vocab`).
    All,
    /// Only the last token's row.
    Last,
}

/// Every buffer a forward pass needs, reused across calls (no allocation per decoded token
/// once warmed up).
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    xn: Vec<f32>,
    branch: Vec<f32>,
    shared: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    act: ActBuf,
    group: GroupBuf,
    attn: AttnScratch,
    router: RouterScratch,
    moe: MoeScratch,
    routing: Routing,
    /// When set, the hidden state after every layer is appended here (`n x hidden` per layer),
    /// and the routing of every MoE layer to `routing_trace`.
    pub trace: Option<Vec<Vec<f32>>>,
    pub routing_trace: Vec<Routing>,
}

impl Model {
    pub fn new(cfg: ModelConfig, w: DenseWeights) -> Self {
        let rope = RopeTable::new(&cfg.rope, cfg.qk_rope);
        let scale = cfg.softmax_scale();
        Model {
            cfg,
            w,
            rope,
            scale,
        }
    }

    /// A cache for one sequence of at most `capacity` positions (capped by the model's limit).
    pub fn new_cache(&self, ty: CacheType, capacity: usize) -> KvCache {
        KvCache::new(
            ty,
            self.cfg.n_layers,
            self.cfg.cache_row(),
            capacity.min(self.cfg.max_positions),
        )
    }

    /// Runs `tokens` at positions `cache.len()..`, appending them to the cache, and returns the
    /// requested logits. On error the cache keeps its length: rows written past it are ignored
    /// and overwritten by the next call. (A batch of one sequence: see [`Model::forward_batch`].)
    pub fn forward<'w>(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        experts: &dyn RoutedExperts,
        ws: &'w mut Workspace,
        which: Logits,
    ) -> Result<&'w [f32], ForwardError> {
        self.run(&mut [BatchSeq { tokens, cache }], experts, ws, which)
    }

    /// Runs several independent sequences in one pass: each sequence's `tokens` at its own
    /// cache's next positions (prefill chunks and single decode tokens may be mixed). Dense
    /// products, the router and the routed experts (one `RoutedExperts::begin`/`eval` per
    /// MoE layer for all rows of all sequences) run over all rows together; attention runs per
    /// sequence against its own cache. Returns the logits of each sequence's last token,
    /// `seqs.len() x vocab`, row i for seqs[i]. On error no cache changes its length.
    ///
    /// A sequence's logits are bit for bit the same alone (here or in [`Model::forward`] with
    /// [`Logits::Last`]) as beside any other sequences in any order: every step that mixes
    /// rows (the CPU kernels, the routed experts' sums) computes each row in an order that
    /// does not depend on the others.
    pub fn forward_batch<'w>(
        &self,
        seqs: &mut [BatchSeq<'_>],
        experts: &dyn RoutedExperts,
        ws: &'w mut Workspace,
    ) -> Result<&'w [f32], ForwardError> {
        self.run(seqs, experts, ws, Logits::Last)
    }

    /// The forward pass of [`Model::forward_batch`]; `Logits::All` gives every row of every
    /// sequence, `Logits::Last` each sequence's last.
    fn run<'w>(
        &self,
        seqs: &mut [BatchSeq<'_>],
        experts: &dyn RoutedExperts,
        ws: &'w mut Workspace,
        which: Logits,
    ) -> Result<&'w [f32], ForwardError> {
        let c = &self.cfg;
        // Everything is checked before any cache is touched.
        if seqs.is_empty() || seqs.iter().any(|q| q.tokens.is_empty()) {
            return Err(ForwardError::Empty);
        }
        for q in seqs.iter() {
            if let Some(&id) = q.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ForwardError::UnknownToken {
                    id,
                    vocab: c.vocab_size,
                });
            }
            q.cache.reserve(q.tokens.len())?;
        }
        let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        let h = c.hidden;

        ws.x.resize(n * h, 0.0);
        let tokens = seqs.iter().flat_map(|q| q.tokens);
        for (&tok, x) in tokens.zip(ws.x.chunks_exact_mut(h)) {
            self.w
                .embed
                .dequantize_row(tok as usize, x)
                .expect("embedding type checked at load");
        }
        ws.xn.resize(n * h, 0.0);
        ws.branch.resize(n * h, 0.0);
        ws.routing_trace.clear();

        for (l, lw) in self.w.layers.iter().enumerate() {
            norm_rows(&ws.x, &lw.attn.norm, c.rms_eps, &mut ws.xn);
            attention::forward(
                c,
                l,
                &lw.attn,
                &self.rope,
                self.scale,
                &ws.xn,
                seqs,
                &mut ws.branch,
                &mut ws.attn,
            );
            ops::add_into(&mut ws.x, &ws.branch);

            norm_rows(&ws.x, &lw.ffn_norm, c.rms_eps, &mut ws.xn);
            match &lw.ffn {
                Ffn::Dense(mlp) => {
                    moe::mlp_forward(
                        mlp,
                        &ws.xn,
                        n,
                        &mut ws.gate,
                        &mut ws.up,
                        &mut ws.shared,
                        &mut ws.group,
                    );
                    ops::add_into(&mut ws.x, &ws.shared);
                }
                Ffn::Moe(mw) => {
                    // The router's product and the shared expert's gate and up read the same
                    // input: one dispatch for the three.
                    {
                        let logits = moe::router_logits(c, n, &mut ws.router);
                        let mut g = ws.group.group();
                        g.push(&mw.router, &ws.xn, n, logits);
                        if let Some(sh) = &mw.shared {
                            ws.gate.resize(n * sh.gate.rows, 0.0);
                            ws.up.resize(n * sh.up.rows, 0.0);
                            g.push(&sh.gate, &ws.xn, n, &mut ws.gate);
                            g.push(&sh.up, &ws.xn, n, &mut ws.up);
                        }
                        g.run();
                    }
                    moe::select(c, mw, n, &mut ws.routing, &mut ws.router);
                    // Routed experts may be computed elsewhere: send them off first, compute
                    // the shared expert's down projection meanwhile, then collect.
                    experts.begin(l, &ws.xn, &ws.routing)?;
                    ws.branch.fill(0.0);
                    if let Some(sh) = &mw.shared {
                        moe::mlp_down(sh, &mut ws.gate, &ws.up, n, &mut ws.branch, &mut ws.group);
                    }
                    experts.eval(l, &ws.xn, &ws.routing, &mut ws.branch, &mut ws.moe)?;
                    ops::add_into(&mut ws.x, &ws.branch);
                    if ws.trace.is_some() {
                        ws.routing_trace.push(ws.routing.clone());
                    }
                }
            }
            if let Some(tr) = ws.trace.as_mut() {
                tr.push(ws.x.clone());
            }
        }
        for q in seqs.iter_mut() {
            let len = q.cache.len() + q.tokens.len();
            q.cache.set_len(len);
        }

        // The rows whose logits are wanted, normalised into `xn`.
        let rows = match which {
            Logits::All => {
                norm_rows(&ws.x, &self.w.out_norm, c.rms_eps, &mut ws.xn);
                n
            }
            Logits::Last => {
                let mut end = 0;
                for (q, dst) in seqs.iter().zip(ws.xn.chunks_exact_mut(h)) {
                    end += q.tokens.len();
                    let src = &ws.x[(end - 1) * h..end * h];
                    ops::rms_norm(src, &self.w.out_norm, c.rms_eps, dst);
                }
                seqs.len()
            }
        };
        ws.logits.resize(rows * c.vocab_size, 0.0);
        self.w
            .head
            .matmul(&ws.xn[..rows * h], rows, &mut ws.logits, &mut ws.act);
        Ok(&ws.logits)
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (src, dst) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        ops::rms_norm(src, w, eps, dst);
    }
}
