//! Loading the model's tensors from any container into the graph's structures, by name and
//! with every shape checked against the configuration.
//!
//! Two naming schemes exist: GGUF (`blk.N.attn_q_a.weight`, experts stacked per layer) and
//! Hugging Face (`model.layers.N.self_attn.q_a_proj.weight`, one tensor per expert, FP8 weights
//! with a `weight_scale_inv` companion). Both end up in the same structures.

use std::collections::HashSet;

use crate::config::ModelConfig;
use crate::quant::{self, QuantError, QuantType};
use crate::source::{RawTensor, SourceError, TensorSource};
use crate::tensor::Matrix;
use crate::Bytes;

/// Which container's names to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Gguf,
    Hf,
}

/// A failure to build the model from its tensors.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{source_name}: tensor `{tensor}` has shape {got:?}, the configuration implies {expected:?}")]
    Shape {
        source_name: String,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{source_name}: tensor `{tensor}`: {err}")]
    Quant {
        source_name: String,
        tensor: String,
        err: QuantError,
    },
}

/// Query projection: through a low-rank bottleneck (V3) or direct (V2-Lite style).
pub enum QProj {
    LoRa {
        a: Matrix,
        norm: Vec<f32>,
        b: Matrix,
    },
    Direct(Matrix),
}

/// Multi-head latent attention weights of one layer, in the absorbed form.
pub struct AttnWeights {
    pub norm: Vec<f32>,
    pub q: QProj,
    /// `[kv_lora + rope, hidden]`.
    pub kv_a: Matrix,
    pub kv_norm: Vec<f32>,
    /// Per head `W_UK,hᵀ`: `[kv_lora, nope]` (so `q̃ = k_b · q_nope` is a plain matvec).
    pub k_b: Vec<Matrix>,
    /// Per head `W_UV,h`: `[v_head, kv_lora]`.
    pub v_b: Vec<Matrix>,
    /// `[hidden, heads * v_head]`.
    pub o: Matrix,
}

/// A SwiGLU feed-forward block (dense layer, shared expert or routed expert).
pub struct Mlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl Mlp {
    /// One of the three matrices.
    pub fn matrix(&self, m: ExpertMatrix) -> &Matrix {
        match m {
            ExpertMatrix::Gate => &self.gate,
            ExpertMatrix::Up => &self.up,
            ExpertMatrix::Down => &self.down,
        }
    }

    /// Bytes of the three matrices as stored (FP8 block scales not counted).
    pub fn bytes(&self) -> usize {
        self.gate.data.len() + self.up.data.len() + self.down.data.len()
    }

    /// The stored bytes of its three matrices.
    pub fn data(&self) -> [&crate::Bytes; 3] {
        [&self.gate.data, &self.up.data, &self.down.data]
    }
}

/// The three matrices of a routed expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertMatrix {
    Gate,
    Up,
    Down,
}

impl ExpertMatrix {
    pub const ALL: [ExpertMatrix; 3] = [ExpertMatrix::Gate, ExpertMatrix::Up, ExpertMatrix::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            ExpertMatrix::Gate => "gate",
            ExpertMatrix::Up => "up",
            ExpertMatrix::Down => "down",
        }
    }

    /// The GGUF tensor that stacks this matrix of every expert of `layer`
    /// (`blk.{layer}.ffn_{gate,up,down}_exps.weight`, expert outermost).
    pub fn gguf_name(self, layer: usize) -> String {
        format!("blk.{layer}.ffn_{}_exps.weight", self.as_str())
    }

    /// The Hugging Face tensor of this matrix of one expert
    /// (`model.layers.{layer}.mlp.experts.{expert}.{gate,up,down}_proj.weight`).
    pub fn hf_name(self, layer: usize, expert: usize) -> String {
        format!(
            "model.layers.{layer}.mlp.experts.{expert}.{}_proj.weight",
            self.as_str()
        )
    }

    /// `[rows, cols]` of this matrix of a routed expert.
    pub fn dims(self, hidden: usize, inter: usize) -> [usize; 2] {
        match self {
            ExpertMatrix::Down => [hidden, inter],
            ExpertMatrix::Gate | ExpertMatrix::Up => [inter, hidden],
        }
    }
}

/// The companion tensor holding the FP8 block scales of weight tensor `weight`
/// (`<stem>.weight_scale_inv`).
pub fn scale_name(weight: &str) -> String {
    match weight.strip_suffix(".weight") {
        Some(stem) => format!("{stem}.weight_scale_inv"),
        None => format!("{weight}_scale_inv"),
    }
}

/// The `[rows, cols]` grid of 128x128 block scales of an FP8 `rows x cols` matrix (partial
/// edge blocks included).
pub fn scale_grid(rows: usize, cols: usize) -> [usize; 2] {
    [
        rows.div_ceil(crate::tensor::FP8_BLOCK),
        cols.div_ceil(crate::tensor::FP8_BLOCK),
    ]
}

/// An FP8 matrix from its weights and its stored block-scale grid (`scale_grid(rows, cols)`
/// elements of `scale_ty`). The weights' length is checked before anything is allocated.
pub fn fp8_matrix(
    rows: usize,
    cols: usize,
    data: Bytes,
    scale_ty: QuantType,
    scales: &[u8],
) -> Result<Matrix, QuantError> {
    let m = Matrix::new(QuantType::F8E4M3, rows, cols, data)?;
    let [gr, gc] = scale_grid(rows, cols);
    let mut grid = vec![0f32; gr * gc];
    quant::dequantize_row(scale_ty, scales, &mut grid)?;
    Matrix::new_fp8(rows, cols, m.data, grid)
}

/// One piece of a routed expert's weights as stored: a byte range of one tensor of the model.
/// A GGUF expert has three (its slices of the layer's stacked tensors); a Hugging Face expert
/// has three whole tensors, plus their block scales when they are FP8. The unit in which
/// experts are streamed to workers without the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPiece {
    pub layer: usize,
    pub expert: usize,
    pub matrix: ExpertMatrix,
    /// The FP8 block scales of `matrix` rather than its weights.
    pub scales: bool,
    /// The tensor's name in the model.
    pub tensor: String,
    /// Within the tensor's data.
    pub range: std::ops::Range<u64>,
    pub ty: QuantType,
    /// `[rows, cols]` of the matrix, or of its scale grid.
    pub shape: [usize; 2],
}

impl std::fmt::Display for ExpertMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A matrix as stored (type, `[rows, cols]`, bytes), before it is checked and wrapped: the
/// input of [`crate::model::moe::LocalExperts::insert`] for experts that do not come from a
/// model file (a worker's cache of streamed weights).
#[derive(Clone, Debug)]
pub struct RawMatrix {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub data: Bytes,
    /// For `F8E4M3` weights (required there, refused elsewhere): the stored block-scale grid,
    /// `scale_grid(rows, cols)` elements of the given type.
    pub scales: Option<(QuantType, Bytes)>,
}

/// The routed-expert part of a MoE layer held in this process: `experts[e]` is `None` for
/// experts that live elsewhere.
pub struct ExpertSet {
    pub experts: Vec<Option<Mlp>>,
}

/// Router and shared expert of a MoE layer (always on the coordinator).
pub struct MoeWeights {
    /// `[n_routed, hidden]`.
    pub router: Matrix,
    pub bias: Option<Vec<f32>>,
    pub shared: Option<Mlp>,
}

pub enum Ffn {
    Dense(Mlp),
    Moe(MoeWeights),
}

pub struct LayerWeights {
    pub attn: AttnWeights,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

/// Every weight of the model except the routed experts.
pub struct DenseWeights {
    pub embed: Matrix,
    pub layers: Vec<LayerWeights>,
    pub out_norm: Vec<f32>,
    pub head: Matrix,
}

/// Which routed experts to load.
#[derive(Clone, Debug)]
pub enum ExpertFilter {
    All,
    None,
    /// `(layer, expert)` pairs.
    Only(HashSet<(usize, usize)>),
}

impl ExpertFilter {
    pub fn wants(&self, layer: usize, expert: usize) -> bool {
        match self {
            ExpertFilter::All => true,
            ExpertFilter::None => false,
            ExpertFilter::Only(s) => s.contains(&(layer, expert)),
        }
    }
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    naming: Naming,
    cfg: &'a ModelConfig,
}

impl<'a> Loader<'a> {
    fn name(&self, gguf: &str, hf: &str) -> String {
        match self.naming {
            Naming::Gguf => gguf.to_string(),
            Naming::Hf => hf.to_string(),
        }
    }

    fn layer_name(&self, l: usize, gguf: &str, hf: &str) -> String {
        match self.naming {
            Naming::Gguf => format!("blk.{l}.{gguf}"),
            Naming::Hf => format!("model.layers.{l}.{hf}"),
        }
    }

    fn shape_err(&self, t: &RawTensor, expected: &[usize]) -> WeightError {
        WeightError::Shape {
            source_name: self.src.describe(),
            tensor: t.name.clone(),
            expected: expected.to_vec(),
            got: t.shape.clone(),
        }
    }

    fn quant_err(&self, tensor: &str, err: QuantError) -> WeightError {
        WeightError::Quant {
            source_name: self.src.describe(),
            tensor: tensor.to_string(),
            err,
        }
    }

    fn raw(&self, name: &str, expected: &[usize]) -> Result<RawTensor, WeightError> {
        let t = self.src.tensor(name)?;
        if t.shape != expected {
            return Err(self.shape_err(&t, expected));
        }
        Ok(t)
    }

    /// A 1-D tensor as f32 (norm weights, biases).
    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, WeightError> {
        let t = self.raw(name, &[n])?;
        let mut out = vec![0f32; n];
        quant::dequantize_row(t.ty, &t.data, &mut out).map_err(|e| self.quant_err(name, e))?;
        Ok(out)
    }

    /// A `[rows, cols]` matrix, with FP8 block scales when the container has them.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        let t = self.raw(name, &[rows, cols])?;
        self.to_matrix(t, rows, cols)
    }

    fn to_matrix(&self, t: RawTensor, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        if t.ty == QuantType::F8E4M3 {
            let s = self.raw(&scale_name(&t.name), &scale_grid(rows, cols))?;
            return fp8_matrix(rows, cols, t.data, s.ty, &s.data)
                .map_err(|e| self.quant_err(&t.name, e));
        }
        Matrix::new(t.ty, rows, cols, t.data).map_err(|e| self.quant_err(&t.name, e))
    }

    fn mlp(&self, l: usize, kind: MlpKind, inter: usize) -> Result<Mlp, WeightError> {
        let h = self.cfg.hidden;
        let (g, u, d) = match kind {
            MlpKind::Dense => (
                self.layer_name(l, "ffn_gate.weight", "mlp.gate_proj.weight"),
                self.layer_name(l, "ffn_up.weight", "mlp.up_proj.weight"),
                self.layer_name(l, "ffn_down.weight", "mlp.down_proj.weight"),
            ),
            MlpKind::Shared => (
                self.layer_name(
                    l,
                    "ffn_gate_shexp.weight",
                    "mlp.shared_experts.gate_proj.weight",
                ),
                self.layer_name(
                    l,
                    "ffn_up_shexp.weight",
                    "mlp.shared_experts.up_proj.weight",
                ),
                self.layer_name(
                    l,
                    "ffn_down_shexp.weight",
                    "mlp.shared_experts.down_proj.weight",
                ),
            ),
        };
        Ok(Mlp {
            gate: self.matrix(&g, inter, h)?,
            up: self.matrix(&u, inter, h)?,
            down: self.matrix(&d, h, inter)?,
        })
    }

    fn attention(&self, l: usize) -> Result<AttnWeights, WeightError> {
        let c = self.cfg;
        let (h, heads) = (c.hidden, c.n_heads);
        let q = match c.q_lora_rank {
            Some(r) => QProj::LoRa {
                a: self.matrix(
                    &self.layer_name(l, "attn_q_a.weight", "self_attn.q_a_proj.weight"),
                    r,
                    h,
                )?,
                norm: self.vector(
                    &self.layer_name(l, "attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
                    r,
                )?,
                b: self.matrix(
                    &self.layer_name(l, "attn_q_b.weight", "self_attn.q_b_proj.weight"),
                    heads * c.qk_head(),
                    r,
                )?,
            },
            None => QProj::Direct(self.matrix(
                &self.layer_name(l, "attn_q.weight", "self_attn.q_proj.weight"),
                heads * c.qk_head(),
                h,
            )?),
        };
        let kv_a = self.matrix(
            &self.layer_name(
                l,
                "attn_kv_a_mqa.weight",
                "self_attn.kv_a_proj_with_mqa.weight",
            ),
            c.cache_row(),
            h,
        )?;
        let kv_norm = self.vector(
            &self.layer_name(
                l,
                "attn_kv_a_norm.weight",
                "self_attn.kv_a_layernorm.weight",
            ),
            c.kv_lora_rank,
        )?;
        let (k_b, v_b) = self.absorbed_kv_b(l)?;
        let o = self.matrix(
            &self.layer_name(l, "attn_output.weight", "self_attn.o_proj.weight"),
            h,
            heads * c.v_head,
        )?;
        let norm = self.vector(
            &self.layer_name(l, "attn_norm.weight", "input_layernorm.weight"),
            h,
        )?;
        Ok(AttnWeights {
            norm,
            q,
            kv_a,
            kv_norm,
            k_b,
            v_b,
            o,
        })
    }

    /// Per-head `W_UK,hᵀ` and `W_UV,h`: taken as stored from MLA GGUFs (`attn_k_b`/`attn_v_b`),
    /// or split and transposed from `kv_b` (Hugging Face files and legacy GGUFs) at load time.
    fn absorbed_kv_b(&self, l: usize) -> Result<(Vec<Matrix>, Vec<Matrix>), WeightError> {
        let c = self.cfg;
        let (heads, lora, nope, vh) = (c.n_heads, c.kv_lora_rank, c.qk_nope, c.v_head);
        let kb_name = format!("blk.{l}.attn_k_b.weight");
        if self.naming == Naming::Gguf && self.src.contains(&kb_name) {
            let kb = self.raw(&kb_name, &[heads, lora, nope])?;
            let vb_name = format!("blk.{l}.attn_v_b.weight");
            let vb = self.raw(&vb_name, &[heads, vh, lora])?;
            let split =
                |t: RawTensor, rows: usize, cols: usize| -> Result<Vec<Matrix>, WeightError> {
                    let per = t.data.len() / heads;
                    (0..heads)
                        .map(|hd| {
                            let bytes = t.data.slice(hd * per..(hd + 1) * per).expect("in range");
                            Matrix::new(t.ty, rows, cols, bytes)
                                .map_err(|e| self.quant_err(&t.name, e))
                        })
                        .collect()
                };
            return Ok((split(kb, lora, nope)?, split(vb, vh, lora)?));
        }
        let name = self.layer_name(l, "attn_kv_b.weight", "self_attn.kv_b_proj.weight");
        let kv_b = self.matrix(&name, heads * (nope + vh), lora)?;
        let full = kv_b.to_f32().map_err(|e| self.quant_err(&name, e))?;
        let mut k_b = Vec::with_capacity(heads);
        let mut v_b = Vec::with_capacity(heads);
        for hd in 0..heads {
            let base = hd * (nope + vh);
            // k_b[c][n] = kv_b[base + n][c]
            let mut kt = vec![0f32; lora * nope];
            for n in 0..nope {
                for ci in 0..lora {
                    kt[ci * nope + n] = full[(base + n) * lora + ci];
                }
            }
            let vt = full[(base + nope) * lora..(base + nope + vh) * lora].to_vec();
            let f32m = |v: Vec<f32>, rows, cols| {
                Matrix::new(
                    QuantType::F32,
                    rows,
                    cols,
                    Bytes::from_vec(bytemuck::cast_slice(&v).to_vec()),
                )
                .map_err(|e| self.quant_err(&name, e))
            };
            k_b.push(f32m(kt, lora, nope)?);
            v_b.push(f32m(vt, vh, lora)?);
        }
        Ok((k_b, v_b))
    }

    fn moe(&self, l: usize) -> Result<MoeWeights, WeightError> {
        let c = self.cfg;
        let router = self.matrix(
            &self.layer_name(l, "ffn_gate_inp.weight", "mlp.gate.weight"),
            c.n_routed,
            c.hidden,
        )?;
        let bias_name = self.layer_name(l, "exp_probs_b.bias", "mlp.gate.e_score_correction_bias");
        let bias = if self.src.contains(&bias_name) {
            Some(self.vector(&bias_name, c.n_routed)?)
        } else {
            None
        };
        let shared = if c.n_shared > 0 {
            Some(self.mlp(l, MlpKind::Shared, c.moe_inter * c.n_shared)?)
        } else {
            None
        };
        Ok(MoeWeights {
            router,
            bias,
            shared,
        })
    }

    fn experts(&self, l: usize, filter: &ExpertFilter) -> Result<ExpertSet, WeightError> {
        let c = self.cfg;
        let (n, h, inter) = (c.n_routed, c.hidden, c.moe_inter);
        let mut experts: Vec<Option<Mlp>> = (0..n).map(|_| None).collect();
        if !(0..n).any(|e| filter.wants(l, e)) {
            return Ok(ExpertSet { experts });
        }
        match self.naming {
            Naming::Gguf => {
                let stack =
                    |what: &str, rows: usize, cols: usize| -> Result<RawTensor, WeightError> {
                        self.raw(&format!("blk.{l}.ffn_{what}_exps.weight"), &[n, rows, cols])
                    };
                let (g, u, d) = (
                    stack("gate", inter, h)?,
                    stack("up", inter, h)?,
                    stack("down", h, inter)?,
                );
                let one = |t: &RawTensor,
                           e: usize,
                           rows: usize,
                           cols: usize|
                 -> Result<Matrix, WeightError> {
                    let per = t.data.len() / n;
                    let bytes = t.data.slice(e * per..(e + 1) * per).expect("in range");
                    Matrix::new(t.ty, rows, cols, bytes).map_err(|err| self.quant_err(&t.name, err))
                };
                for (e, slot) in experts.iter_mut().enumerate() {
                    if filter.wants(l, e) {
                        *slot = Some(Mlp {
                            gate: one(&g, e, inter, h)?,
                            up: one(&u, e, inter, h)?,
                            down: one(&d, e, h, inter)?,
                        });
                    }
                }
            }
            Naming::Hf => {
                for (e, slot) in experts.iter_mut().enumerate() {
                    if filter.wants(l, e) {
                        let m = |m: ExpertMatrix| {
                            let [rows, cols] = m.dims(h, inter);
                            self.matrix(&m.hf_name(l, e), rows, cols)
                        };
                        *slot = Some(Mlp {
                            gate: m(ExpertMatrix::Gate)?,
                            up: m(ExpertMatrix::Up)?,
                            down: m(ExpertMatrix::Down)?,
                        });
                    }
                }
            }
        }
        Ok(ExpertSet { experts })
    }

    /// Where every routed expert of layer `l` is stored, each shape checked: per expert, its
    /// slice of each stacked GGUF tensor, or its Hugging Face tensors and their FP8 scales.
    fn expert_pieces(&self, l: usize, out: &mut Vec<ExpertPiece>) -> Result<(), WeightError> {
        let c = self.cfg;
        let (n, h, inter) = (c.n_routed, c.hidden, c.moe_inter);
        let piece =
            |e: usize, m: ExpertMatrix, scales: bool, t: &RawTensor, range, shape| ExpertPiece {
                layer: l,
                expert: e,
                matrix: m,
                scales,
                tensor: t.name.clone(),
                range,
                ty: t.ty,
                shape,
            };
        match self.naming {
            Naming::Gguf => {
                for m in ExpertMatrix::ALL {
                    let [rows, cols] = m.dims(h, inter);
                    let t = self.raw(&m.gguf_name(l), &[n, rows, cols])?;
                    let per = t.data.len() as u64 / n.max(1) as u64;
                    for e in 0..n as u64 {
                        out.push(piece(
                            e as usize,
                            m,
                            false,
                            &t,
                            e * per..(e + 1) * per,
                            [rows, cols],
                        ));
                    }
                }
            }
            Naming::Hf => {
                for e in 0..n {
                    for m in ExpertMatrix::ALL {
                        let [rows, cols] = m.dims(h, inter);
                        let t = self.raw(&m.hf_name(l, e), &[rows, cols])?;
                        out.push(piece(e, m, false, &t, 0..t.data.len() as u64, [rows, cols]));
                        if t.ty == QuantType::F8E4M3 {
                            let grid = scale_grid(rows, cols);
                            let s = self.raw(&scale_name(&t.name), &grid)?;
                            out.push(piece(e, m, true, &s, 0..s.data.len() as u64, grid));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum MlpKind {
    Dense,
    Shared,
}

/// Loads everything but the routed experts.
pub fn load_dense(
    src: &dyn TensorSource,
    naming: Naming,
    cfg: &ModelConfig,
) -> Result<DenseWeights, WeightError> {
    let ld = Loader { src, naming, cfg };
    let (v, h) = (cfg.vocab_size, cfg.hidden);
    let embed = ld.matrix(
        &ld.name("token_embd.weight", "model.embed_tokens.weight"),
        v,
        h,
    )?;
    let head = ld.matrix(&ld.name("output.weight", "lm_head.weight"), v, h)?;
    let out_norm = ld.vector(&ld.name("output_norm.weight", "model.norm.weight"), h)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let attn = ld.attention(l)?;
        let ffn_norm = ld.vector(
            &ld.layer_name(l, "ffn_norm.weight", "post_attention_layernorm.weight"),
            h,
        )?;
        let ffn = if cfg.is_moe_layer(l) {
            Ffn::Moe(ld.moe(l)?)
        } else {
            Ffn::Dense(ld.mlp(l, MlpKind::Dense, cfg.dense_inter)?)
        };
        layers.push(LayerWeights {
            attn,
            ffn_norm,
            ffn,
        });
    }
    Ok(DenseWeights {
        embed,
        layers,
        out_norm,
        head,
    })
}

/// Every piece of every routed expert of the model (see [`ExpertPiece`]), layer by layer.
pub fn expert_pieces(
    src: &dyn TensorSource,
    naming: Naming,
    cfg: &ModelConfig,
) -> Result<Vec<ExpertPiece>, WeightError> {
    let ld = Loader { src, naming, cfg };
    let mut out = Vec::new();
    for l in (0..cfg.n_layers).filter(|&l| cfg.is_moe_layer(l)) {
        ld.expert_pieces(l, &mut out)?;
    }
    Ok(out)
}

/// Loads the routed experts that `filter` selects, per MoE layer (`None` for dense layers).
pub fn load_experts(
    src: &dyn TensorSource,
    naming: Naming,
    cfg: &ModelConfig,
    filter: &ExpertFilter,
) -> Result<Vec<Option<ExpertSet>>, WeightError> {
    let ld = Loader { src, naming, cfg };
    (0..cfg.n_layers)
        .map(|l| {
            if cfg.is_moe_layer(l) {
                ld.experts(l, filter).map(Some)
            } else {
                Ok(None)
            }
        })
        .collect()
}
