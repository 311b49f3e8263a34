//! [`GpuModel`]: the always-active part of the model resident on the device, with the latent
//! KV cache, running the same graph as [`crate::model::Model::forward`].
//!
//! What runs where, per forward call (one sequence's consecutive tokens, or with
//! [`GpuModel::forward_batch`] several sequences' in cache slots of their own, packed into passes
//! of at most [`GpuModel::max_batch`] tokens; a token table gives each token's slot and
//! position to the attention kernels):
//! - host: the embedding rows (dequantised from the host copy and uploaded: `n x hidden` f32,
//!   far less traffic than keeping the `vocab x hidden` table resident would cost memory) and,
//!   per MoE layer, the router's selection from the read-back router logits (`n x n_routed`,
//!   with [`crate::model::moe::route_logits`], so the choice is the CPU's exactly);
//! - device: everything else — RMSNorms, the query/KV projections, RoPE from the CPU's own
//!   cos/sin table, absorbed MLA over the latent cache (f32, or f16/bf16 rounded exactly as
//!   the CPU's [`crate::model::kv_cache::KvCache`] rounds: cache write, scores, causal
//!   softmax, latent sum, per-head `W_UK`/`W_UV` products), the output projection, dense and shared-expert
//!   SwiGLU blocks, residual adds, the final norm and the head;
//! - routed experts: on the device when the [`RoutedExperts`] is a [`GpuExperts`] on the same
//!   context; otherwise the MoE layer's normalised hidden state is read back together with the
//!   router logits, `begin` is called, the shared expert is recorded on the device, `eval` runs
//!   on the host buffer and its sum is uploaded and added.
//!
//! Readbacks: one per MoE layer (router logits, plus the hidden state for host experts) and
//! the logits at the end; nothing else leaves the device. Every kernel is bound once at
//! construction; parameter blocks are rewritten per pass; buffers are reused across calls.

use std::sync::Arc;

use super::experts::{routing_pairs, GpuExperts};
use super::ops::{cache_row, grid_1d, Kernels, Op, Readback};
use super::{GpuBuffer, GpuContext, GpuError, GpuMatrix};
use crate::config::ModelConfig;
use crate::model::kv_cache::{CacheType, ContextFull};
use crate::model::moe::{self, MoeScratch, Pair, RoutedExperts, RouterScratch, Routing};
use crate::model::rope::RopeTable;
use crate::model::weights::{Ffn, Mlp, QProj};
use crate::model::{ForwardError, Logits, Model, ModelFile};
use crate::tensor::Matrix;

/// A failure of a forward pass on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuForwardError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// A failure to build a [`GpuModel`] from a file.
#[derive(Debug, thiserror::Error)]
pub enum GpuLoadError {
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

struct GpuMlp {
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
    swiglu: Op,
}

enum GpuQ {
    LoRa {
        a: Box<GpuMatrix>,
        _norm_w: GpuBuffer,
        norm: Op,
        b: Box<GpuMatrix>,
    },
    Direct(Box<GpuMatrix>),
}

// One per layer, built once and never moved afterwards: variant sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum GpuFfn {
    Dense(GpuMlp),
    Moe {
        router: GpuMatrix,
        bias: Option<Vec<f32>>,
        shared: Option<GpuMlp>,
        add_routed: Op,
    },
}

/// One layer on the device; `A` is its attention: [`AttnWeights`] while the model is being
/// built (weights uploaded, no cache yet), [`GpuAttention`] once bound to its cache.
struct Layer<A = GpuAttention> {
    _w: Vec<GpuBuffer>,
    attn_norm: Op,
    q: GpuQ,
    kv_a: GpuMatrix,
    kv_norm: Op,
    rope_k: Op,
    rope_q: Op,
    attn: A,
    o: GpuMatrix,
    add_attn: Op,
    ffn_norm: Op,
    ffn: GpuFfn,
    add_ffn: Op,
}

impl Layer<AttnWeights> {
    /// The layer with its attention bound to a cache.
    fn bind(self, ops: AttnOps) -> Layer {
        Layer {
            _w: self._w,
            attn_norm: self.attn_norm,
            q: self.q,
            kv_a: self.kv_a,
            kv_norm: self.kv_norm,
            rope_k: self.rope_k,
            rope_q: self.rope_q,
            attn: self.attn.join(ops),
            o: self.o,
            add_attn: self.add_attn,
            ffn_norm: self.ffn_norm,
            ffn: self.ffn,
            add_ffn: self.add_ffn,
        }
    }
}

/// The most cache slots, at most `wanted`, for which `alloc` succeeds, with what it made:
/// `wanted` when it fits, otherwise a binary search down to one. Only running out of memory
/// (the accounted budget or the device's) means "fewer"; any other error, or one slot not
/// fitting, is returned. What a failed or superseded attempt made is dropped (freed) before
/// the next one.
fn fit_slots<T>(
    wanted: usize,
    mut alloc: impl FnMut(usize) -> Result<T, GpuError>,
) -> Result<(usize, T), GpuError> {
    let oom = |e: &GpuError| {
        matches!(
            e,
            GpuError::OutOfMemory { .. } | GpuError::DeviceOutOfMemory { .. }
        )
    };
    let wanted = wanted.max(1);
    let first = match alloc(wanted) {
        Ok(t) => return Ok((wanted, t)),
        Err(e) if wanted > 1 && oom(&e) => e,
        Err(e) => return Err(e),
    };
    // `lo` fits (0: none known yet), `hi` does not.
    let (mut lo, mut hi) = (0, wanted);
    let mut last_err = first;
    let mut made: Option<T> = None;
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        made = None;
        match alloc(mid) {
            Ok(t) => {
                lo = mid;
                made = Some(t);
            }
            Err(e) if oom(&e) => {
                hi = mid;
                last_err = e;
            }
            Err(e) => return Err(e),
        }
    }
    if lo == 0 {
        return Err(last_err);
    }
    match made {
        Some(t) => Ok((lo, t)),
        None => alloc(lo).map(|t| (lo, t)),
    }
}

/// The shape of absorbed MLA: the model's head dimensions, the cache's capacity and type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub heads: usize,
    pub lora: usize,
    pub rd: usize,
    pub nope: usize,
    pub vh: usize,
    pub scale: f32,
    pub capacity: usize,
    pub cache: CacheType,
}

impl AttnShape {
    fn qk(&self) -> usize {
        self.nope + self.rd
    }

    fn row(&self) -> usize {
        self.lora + self.rd
    }
}

/// The buffers absorbed MLA reads and writes (every layer shares them): `q` (`n x heads x
/// qk`, q_pe rotated), `kv` (`n x row`, the new cache rows), and the intermediates `qabs` and
/// `lat` (`n x heads x lora`), `scores` (`n x heads x capacity`), `out` (`n x heads x v_head`);
/// `tok` is the token table (`2n` u32: per token, the first cache row of its sequence and its
/// position; see `attention.wgsl`).
pub(crate) struct AttnBufs<'a> {
    pub tok: &'a GpuBuffer,
    pub q: &'a GpuBuffer,
    pub kv: &'a GpuBuffer,
    pub qabs: &'a GpuBuffer,
    pub scores: &'a GpuBuffer,
    pub lat: &'a GpuBuffer,
    pub out: &'a GpuBuffer,
}

/// Absorbed MLA of one layer over its latent cache. Every head and every token of a pass run in
/// one dispatch per stage: cache write, `q̃ = W_UKᵀ q_nope` (all heads' `k_b` stacked, a
/// grouped product), scores, causal softmax, latent sum, `o = W_UV õ` (stacked `v_b`); six
/// dispatches whatever the head count (plus one per extra weight page).
pub(crate) struct GpuAttention {
    k_b: GpuMatrix,
    v_b: GpuMatrix,
    ops: AttnOps,
}

/// A layer's absorbed-attention weights on the device, before they are bound to a cache.
pub(crate) struct AttnWeights {
    k_b: GpuMatrix,
    v_b: GpuMatrix,
}

#[cfg(test)]
impl GpuAttention {
    /// Uploads the weights ([`AttnWeights::upload`]) and binds the kernels to `cache` and `b`.
    pub fn new(
        ctx: &GpuContext,
        k: &Kernels,
        k_b: &[Matrix],
        v_b: &[Matrix],
        cache: &GpuBuffer,
        b: &AttnBufs,
    ) -> Result<Self, GpuError> {
        let w = AttnWeights::upload(ctx, k_b, v_b)?;
        Ok(w.join(AttnOps::new(ctx, k, cache, b)?))
    }
}

impl AttnWeights {
    /// Stacks and uploads the per-head `k_b` (`lora x nope`) and `v_b` (`v_head x lora`).
    pub fn upload(ctx: &GpuContext, k_b: &[Matrix], v_b: &[Matrix]) -> Result<Self, GpuError> {
        Ok(AttnWeights {
            k_b: GpuMatrix::upload_stacked(ctx, k_b)?,
            v_b: GpuMatrix::upload_stacked(ctx, v_b)?,
        })
    }

    /// Joins the weights with the kernels bound to a cache.
    pub fn join(self, ops: AttnOps) -> GpuAttention {
        GpuAttention {
            k_b: self.k_b,
            v_b: self.v_b,
            ops,
        }
    }
}

/// A layer's attention kernels bound to its cache and the shared buffers.
pub(crate) struct AttnOps {
    cache_write: Op,
    scores: Op,
    softmax: Op,
    latent: Op,
}

impl AttnOps {
    /// Binds the kernels to `cache` and `b`.
    pub fn new(
        ctx: &GpuContext,
        k: &Kernels,
        cache: &GpuBuffer,
        b: &AttnBufs,
    ) -> Result<Self, GpuError> {
        Ok(AttnOps {
            cache_write: Op::new(ctx, &k.cache_write, &[(7, cache), (8, b.kv), (9, b.tok)])?,
            scores: Op::new(
                ctx,
                &k.scores,
                &[(1, b.qabs), (2, b.q), (3, cache), (4, b.scores), (9, b.tok)],
            )?,
            softmax: Op::new(ctx, &k.softmax, &[(1, b.scores), (2, b.tok)])?,
            latent: Op::new(
                ctx,
                &k.latent,
                &[(3, cache), (5, b.scores), (6, b.lat), (9, b.tok)],
            )?,
        })
    }
}

impl GpuAttention {
    /// Records attention for the `n` tokens of `b.tok` (the highest position among them
    /// below `ctx_len`): their rows of `b.kv` go into the cache, their head outputs into
    /// `b.out`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        ctx: &GpuContext,
        enc: &mut wgpu::CommandEncoder,
        s: &AttnShape,
        b: &AttnBufs,
        n: usize,
        ctx_len: usize,
    ) -> Result<(), GpuError> {
        let (heads, lora, vh, qk) = (s.heads, s.lora, s.vh, s.qk());
        let (crow, row_bytes) = cache_row(s.cache, s.row());
        let (nn, hh) = (n as u32, heads as u32);
        let att = [
            nn,
            hh,
            0,
            lora as u32,
            s.rd as u32,
            s.row() as u32,
            qk as u32,
            s.nope as u32,
            s.scale.to_bits(),
            s.capacity as u32,
            crow as u32,
        ];
        let words = (row_bytes / 4) as u32;
        self.ops
            .cache_write
            .encode(ctx, enc, &att, (words.div_ceil(64), nn, 1));
        self.k_b.encode_matmul_grouped(
            ctx,
            enc,
            b.q,
            0,
            heads * qk,
            (lora, qk),
            n,
            b.qabs,
            0,
            heads * lora,
        )?;
        let ctx_len = ctx_len as u32;
        self.ops
            .scores
            .encode(ctx, enc, &att, (ctx_len.div_ceil(64), hh, nn));
        self.ops.softmax.encode(
            ctx,
            enc,
            &[nn * hh, s.capacity as u32, hh, 0, 2, 1, 1],
            (nn * hh, 1, 1),
        );
        self.ops
            .latent
            .encode(ctx, enc, &att, ((lora as u32).div_ceil(64), hh, nn));
        self.v_b.encode_matmul_grouped(
            ctx,
            enc,
            b.lat,
            0,
            heads * lora,
            (vh, lora),
            n,
            b.out,
            0,
            heads * vh,
        )
    }
}

struct Bufs {
    tok: GpuBuffer,
    x: GpuBuffer,
    xn: GpuBuffer,
    branch: GpuBuffer,
    routed: GpuBuffer,
    q_lora: GpuBuffer,
    q: GpuBuffer,
    kv: GpuBuffer,
    qabs: GpuBuffer,
    scores: GpuBuffer,
    lat: GpuBuffer,
    heads_out: GpuBuffer,
    gate: GpuBuffer,
    up: GpuBuffer,
    rlogits: GpuBuffer,
    logits: GpuBuffer,
    _rope: GpuBuffer,
}

impl Bufs {
    fn attn(&self) -> AttnBufs<'_> {
        AttnBufs {
            tok: &self.tok,
            q: &self.q,
            kv: &self.kv,
            qabs: &self.qabs,
            scores: &self.scores,
            lat: &self.lat,
            out: &self.heads_out,
        }
    }
}

/// Tokens of one sequence in one pass: `n` tokens of input sequence `seq` from its token
/// `from` (so at positions `lens[slot] + from..` of its cache slot).
#[derive(Clone, Copy, Debug)]
struct Seg {
    seq: usize,
    slot: usize,
    from: usize,
    n: usize,
}

#[derive(Default)]
struct Host {
    segs: Vec<Seg>,
    wanted: Vec<usize>,
    tok: Vec<u32>,
    x: Vec<f32>,
    read: Vec<f32>,
    routed: Vec<f32>,
    routing: Routing,
    router: RouterScratch,
    moe: MoeScratch,
    pairs: Vec<Pair>,
    logits: Vec<f32>,
}

/// The dense part of a model and its latent cache (f32, f16 or bf16) on a GPU; see the module
/// docs.
pub struct GpuModel {
    ctx: Arc<GpuContext>,
    pub cfg: ModelConfig,
    embed: Matrix,
    layers: Vec<Layer>,
    _out_norm: GpuBuffer,
    final_norm: Op,
    head: GpuMatrix,
    b: Bufs,
    _cache: Vec<GpuBuffer>,
    shape: AttnShape,
    /// Positions in each sequence's cache slot.
    lens: Vec<usize>,
    capacity: usize,
    n_max: usize,
    readback: Readback,
    host: Host,
    half: usize,
    interleaved: bool,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("adapter", &self.ctx.adapter().name)
            .field("lens", &self.lens)
            .field("capacity", &self.capacity)
            .field("cache", &self.shape.cache)
            .finish()
    }
}

fn eps_bits(cfg: &ModelConfig) -> u32 {
    cfg.rms_eps.to_bits()
}

impl GpuModel {
    /// Opens the model file's dense part and uploads it (see [`GpuModel::new`]).
    pub fn load(
        ctx: Arc<GpuContext>,
        file: &ModelFile,
        capacity: usize,
        cache: CacheType,
    ) -> Result<Self, GpuLoadError> {
        let model = file.load_model()?;
        Ok(GpuModel::new(ctx, &model, capacity, cache)?)
    }

    /// Uploads `model`'s dense weights and allocates a latent cache of `capacity` positions
    /// (capped by the model's limit) stored as `cache`, and every activation buffer: one
    /// sequence, [`GpuModel::forward`]'s.
    pub fn new(
        ctx: Arc<GpuContext>,
        model: &Model,
        capacity: usize,
        cache: CacheType,
    ) -> Result<Self, GpuError> {
        GpuModel::with_sequences(ctx, model, capacity, 1, cache)
    }

    /// As [`GpuModel::new`], with a cache slot of `capacity` positions for each of up to
    /// `sequences` sequences that [`GpuModel::forward_batch`] runs together
    /// ([`GpuModel::sequences`] says how many there are, at least one). A layer's slots share
    /// one buffer, so they are capped to what one binding holds. The caches are allocated
    /// last, after every weight is resident: when all the slots do not fit in the device's
    /// memory (or the context's budget), the most that do are taken, without uploading
    /// anything again; only when not even one fits is it an error.
    pub fn with_sequences(
        ctx: Arc<GpuContext>,
        model: &Model,
        capacity: usize,
        sequences: usize,
        cache: CacheType,
    ) -> Result<Self, GpuError> {
        let c = model.cfg.clone();
        let capacity = capacity.min(c.max_positions).max(1);
        let (h, heads, lora, rd, nope, vh) = (
            c.hidden,
            c.n_heads,
            c.kv_lora_rank,
            c.qk_rope,
            c.qk_nope,
            c.v_head,
        );
        let (qk, row) = (c.qk_head(), c.cache_row());
        let limit = ctx.page_limit() as usize;
        let (_, row_bytes) = cache_row(cache, row);
        let slot_bytes = capacity * row_bytes;
        if slot_bytes > limit {
            return Err(GpuError::BadArgument(format!(
                "a layer's cache of {capacity} positions ({slot_bytes} bytes) exceeds one binding ({limit} bytes)"
            )));
        }
        let sequences = sequences.clamp(1, limit / slot_bytes);
        let mut n_max = 64usize;
        while n_max > 0
            && (n_max * heads * capacity * 4 > limit || n_max * c.vocab_size * 4 > limit)
        {
            n_max /= 2;
        }
        if n_max == 0 {
            return Err(GpuError::BadArgument(format!(
                "one token's attention scores over {capacity} positions exceed one binding"
            )));
        }
        let k = Kernels::new(&ctx, cache)?;
        let mut inter = 0;
        let mut mlp_inters = |m: &Mlp| inter = inter.max(m.gate.rows);
        for l in &model.w.layers {
            match &l.ffn {
                Ffn::Dense(m) => mlp_inters(m),
                Ffn::Moe(mw) => {
                    if let Some(m) = &mw.shared {
                        mlp_inters(m)
                    }
                }
            }
        }
        let q_lora_rank = c.q_lora_rank.unwrap_or(1);
        let rope = RopeTable::new(&c.rope, rd);
        let b = Bufs {
            tok: ctx.alloc_f32("token table", n_max * 2)?,
            x: ctx.alloc_f32("x", n_max * h)?,
            xn: ctx.alloc_f32("xn", n_max * h)?,
            branch: ctx.alloc_f32("branch", n_max * h)?,
            routed: ctx.alloc_f32("routed", n_max * h)?,
            q_lora: ctx.alloc_f32("q_lora", n_max * q_lora_rank)?,
            q: ctx.alloc_f32("q", n_max * heads * qk)?,
            kv: ctx.alloc_f32("kv", n_max * row)?,
            qabs: ctx.alloc_f32("q_abs", n_max * heads * lora)?,
            scores: ctx.alloc_f32("scores", n_max * heads * capacity)?,
            lat: ctx.alloc_f32("latent", n_max * heads * lora)?,
            heads_out: ctx.alloc_f32("heads out", n_max * heads * vh)?,
            gate: ctx.alloc_f32("gate", n_max * inter.max(1))?,
            up: ctx.alloc_f32("up", n_max * inter.max(1))?,
            rlogits: ctx.alloc_f32("router logits", n_max * c.n_routed.max(1))?,
            logits: ctx.alloc_f32("logits", n_max * c.vocab_size)?,
            _rope: ctx.upload_f32("rope", &rope.cos_sin_table(capacity))?,
        };
        let mut drafts: Vec<Layer<AttnWeights>> = Vec::with_capacity(c.n_layers);
        let up = |m: &Matrix| GpuMatrix::upload(&ctx, m);
        let mlp = |m: &Mlp, b: &Bufs| -> Result<GpuMlp, GpuError> {
            Ok(GpuMlp {
                gate: up(&m.gate)?,
                up: up(&m.up)?,
                down: up(&m.down)?,
                swiglu: Op::new(&ctx, &k.swiglu, &[(1, &b.gate), (2, &b.up)])?,
            })
        };
        let add = |d: &GpuBuffer, s: &GpuBuffer| Op::new(&ctx, &k.add, &[(3, d), (4, s)]);
        for lw in &model.w.layers {
            let a = &lw.attn;
            let attn_norm_w = ctx.upload_f32("attn norm", &a.norm)?;
            let kv_norm_w = ctx.upload_f32("kv norm", &a.kv_norm)?;
            let ffn_norm_w = ctx.upload_f32("ffn norm", &lw.ffn_norm)?;
            let q = match &a.q {
                QProj::LoRa { a: qa, norm, b: qb } => {
                    let nw = ctx.upload_f32("q norm", norm)?;
                    GpuQ::LoRa {
                        a: Box::new(up(qa)?),
                        norm: Op::new(&ctx, &k.rms_inplace, &[(1, &nw), (3, &b.q_lora)])?,
                        _norm_w: nw,
                        b: Box::new(up(qb)?),
                    }
                }
                QProj::Direct(m) => GpuQ::Direct(Box::new(up(m)?)),
            };
            let ffn = match &lw.ffn {
                Ffn::Dense(m) => GpuFfn::Dense(mlp(m, &b)?),
                Ffn::Moe(mw) => GpuFfn::Moe {
                    router: up(&mw.router)?,
                    bias: mw.bias.clone(),
                    shared: mw.shared.as_ref().map(|m| mlp(m, &b)).transpose()?,
                    add_routed: add(&b.branch, &b.routed)?,
                },
            };
            drafts.push(Layer {
                attn_norm: Op::new(&ctx, &k.rms, &[(1, &attn_norm_w), (2, &b.x), (3, &b.xn)])?,
                q,
                kv_a: up(&a.kv_a)?,
                kv_norm: Op::new(&ctx, &k.rms_inplace, &[(1, &kv_norm_w), (3, &b.kv)])?,
                rope_k: Op::new(&ctx, &k.rope, &[(1, &b._rope), (2, &b.kv), (3, &b.tok)])?,
                rope_q: Op::new(&ctx, &k.rope, &[(1, &b._rope), (2, &b.q), (3, &b.tok)])?,
                attn: AttnWeights::upload(&ctx, &a.k_b, &a.v_b)?,
                o: up(&a.o)?,
                add_attn: add(&b.x, &b.branch)?,
                ffn_norm: Op::new(&ctx, &k.rms, &[(1, &ffn_norm_w), (2, &b.x), (3, &b.xn)])?,
                ffn,
                add_ffn: add(&b.x, &b.branch)?,
                _w: vec![attn_norm_w, kv_norm_w, ffn_norm_w],
            });
        }
        let out_norm = ctx.upload_f32("out norm", &model.w.out_norm)?;
        let final_norm = Op::new(&ctx, &k.rms, &[(1, &out_norm), (2, &b.x), (3, &b.xn)])?;
        let head = up(&model.w.head)?;
        let readback = Readback::new(&ctx, (n_max * c.vocab_size).max(n_max * (c.n_routed + h)))?;
        // The caches last, once everything else is resident: as many slots as fit.
        let (sequences, bound) = fit_slots(sequences, |slots| {
            let bytes = (slots * slot_bytes) as u64;
            (0..drafts.len())
                .map(|_| {
                    let cl = ctx.create_buffer("kv cache", bytes, wgpu::BufferUsages::STORAGE)?;
                    let ops = AttnOps::new(&ctx, &k, &cl, &b.attn())?;
                    Ok((cl, ops))
                })
                .collect::<Result<Vec<_>, GpuError>>()
        })?;
        let (caches, ops): (Vec<GpuBuffer>, Vec<AttnOps>) = bound.into_iter().unzip();
        let layers = drafts
            .into_iter()
            .zip(ops)
            .map(|(d, o)| d.bind(o))
            .collect();
        Ok(GpuModel {
            embed: model.w.embed.clone(),
            layers,
            _out_norm: out_norm,
            final_norm,
            head,
            b,
            _cache: caches,
            shape: AttnShape {
                heads,
                lora,
                rd,
                nope,
                vh,
                scale: c.softmax_scale(),
                capacity,
                cache,
            },
            lens: vec![0; sequences],
            capacity,
            n_max,
            readback,
            host: Host::default(),
            half: rd / 2,
            interleaved: rope.interleaved(),
            cfg: c,
            ctx,
        })
    }

    /// The device context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Positions in the cache of [`GpuModel::forward`]'s sequence (slot 0).
    pub fn len(&self) -> usize {
        self.lens[0]
    }

    pub fn is_empty(&self) -> bool {
        self.lens[0] == 0
    }

    /// Sequences with a cache slot of their own ([`GpuModel::forward_batch`]).
    pub fn sequences(&self) -> usize {
        self.lens.len()
    }

    /// Positions in slot `slot`'s cache (0 past the last slot).
    pub fn seq_len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// How the latent cache stores its values.
    pub fn cache_type(&self) -> CacheType {
        self.shape.cache
    }

    /// Positions a sequence's cache holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens one pass handles (longer batches run in several passes).
    pub fn max_batch(&self) -> usize {
        self.n_max
    }

    /// Forgets positions from `len` on, in slot 0's cache.
    pub fn truncate(&mut self, len: usize) {
        self.truncate_seq(0, len);
    }

    /// Forgets positions from `len` on, in slot `slot`'s cache.
    pub fn truncate_seq(&mut self, slot: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = (*l).min(len);
        }
    }

    /// Runs `tokens` at positions `len()..` of slot 0, appending them to its device cache,
    /// and returns the requested logits (`n x vocab` or the last row), as [`Model::forward`]
    /// does. On error the cache keeps its length.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        experts: &dyn RoutedExperts,
        which: Logits,
    ) -> Result<&[f32], GpuForwardError> {
        self.run(&[(0, tokens)], experts, which == Logits::All)
    }

    /// Runs several sequences together, each `(slot, tokens)` appending its tokens to its
    /// slot's cache, and returns one row of logits per sequence (after its last token), in
    /// order. The sequences share every pass of at most [`GpuModel::max_batch`] tokens; a
    /// sequence's logits do not depend on the others. On error no slot changes its length.
    pub fn forward_batch(
        &mut self,
        seqs: &[(usize, &[u32])],
        experts: &dyn RoutedExperts,
    ) -> Result<&[f32], GpuForwardError> {
        self.run(seqs, experts, false)
    }

    /// Checks `seqs`, packs their tokens into passes and runs them; `all`: logits for every
    /// token, else for each sequence's last.
    fn run(
        &mut self,
        seqs: &[(usize, &[u32])],
        experts: &dyn RoutedExperts,
        all: bool,
    ) -> Result<&[f32], GpuForwardError> {
        if seqs.is_empty() {
            return Err(ForwardError::Empty.into());
        }
        let vocab = self.cfg.vocab_size;
        for (i, &(slot, tokens)) in seqs.iter().enumerate() {
            if slot >= self.lens.len() || seqs[..i].iter().any(|s| s.0 == slot) {
                return Err(GpuError::BadArgument(format!(
                    "sequence slot {slot} is out of range or given twice ({} slots)",
                    self.lens.len()
                ))
                .into());
            }
            if tokens.is_empty() {
                return Err(ForwardError::Empty.into());
            }
            if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ForwardError::UnknownToken { id, vocab }.into());
            }
            let needed = self.lens[slot] + tokens.len();
            if needed > self.capacity {
                return Err(ForwardError::ContextFull(ContextFull {
                    needed,
                    capacity: self.capacity,
                })
                .into());
            }
        }
        let gpu = experts
            .as_gpu()
            .filter(|g| Arc::ptr_eq(g.context(), &self.ctx));
        let step = gpu.map_or(self.n_max, |g| self.n_max.min(g.max_tokens()));
        let mut logits = std::mem::take(&mut self.host.logits);
        let mut segs = std::mem::take(&mut self.host.segs);
        let mut wanted = std::mem::take(&mut self.host.wanted);
        logits.clear();
        segs.clear();
        wanted.clear();
        let mut in_pass = 0;
        let mut r = Ok(());
        'seqs: for (seq, &(slot, tokens)) in seqs.iter().enumerate() {
            let mut from = 0;
            while from < tokens.len() {
                let n = (tokens.len() - from).min(step - in_pass);
                segs.push(Seg { seq, slot, from, n });
                if all {
                    wanted.extend(in_pass..in_pass + n);
                } else if from + n == tokens.len() {
                    wanted.push(in_pass + n - 1);
                }
                in_pass += n;
                from += n;
                let last = seq + 1 == seqs.len() && from == tokens.len();
                if in_pass == step || last {
                    r = self.pass(seqs, &segs, experts, gpu, &wanted, &mut logits);
                    if r.is_err() {
                        break 'seqs;
                    }
                    segs.clear();
                    wanted.clear();
                    in_pass = 0;
                }
            }
        }
        self.host.logits = logits;
        self.host.segs = segs;
        self.host.wanted = wanted;
        r?;
        for &(slot, tokens) in seqs {
            self.lens[slot] += tokens.len();
        }
        Ok(&self.host.logits)
    }

    /// One pass of at most `n_max` tokens: the segments `segs` of `seqs`, in order. Appends
    /// the logits of the pass's rows `wanted` (ascending) to `logits`.
    fn pass(
        &mut self,
        seqs: &[(usize, &[u32])],
        segs: &[Seg],
        experts: &dyn RoutedExperts,
        gpu: Option<&GpuExperts>,
        wanted: &[usize],
        logits: &mut Vec<f32>,
    ) -> Result<(), GpuForwardError> {
        let ctx = &*self.ctx;
        let c = &self.cfg;
        let b = &self.b;
        let n: usize = segs.iter().map(|s| s.n).sum();
        let (h, heads, lora, nope) = (c.hidden, c.n_heads, c.kv_lora_rank, c.qk_nope);
        let (qk, row, ne) = (c.qk_head(), c.cache_row(), c.n_routed);
        let eps = eps_bits(c);
        let hs = &mut self.host;
        hs.x.resize(n * h, 0.0);
        hs.tok.clear();
        let mut ctx_len = 0;
        for sg in segs {
            let tokens = &seqs[sg.seq].1[sg.from..sg.from + sg.n];
            let pos0 = self.lens[sg.slot] + sg.from;
            for (i, &tok) in tokens.iter().enumerate() {
                let t = hs.tok.len() / 2;
                self.embed
                    .dequantize_row(tok as usize, &mut hs.x[t * h..(t + 1) * h])
                    .map_err(|e| GpuError::BadArgument(format!("embedding row: {e}")))?;
                hs.tok
                    .extend([(sg.slot * self.capacity) as u32, (pos0 + i) as u32]);
            }
            ctx_len = ctx_len.max(pos0 + sg.n);
        }
        ctx.write_f32(&b.x, 0, &hs.x)?;
        ctx.write_f32(&b.tok, 0, bytemuck::cast_slice(&hs.tok))?;
        let (nn, hh) = (n as u32, h as u32);
        let add_words = |count: usize| {
            let (wg_x, grid) = grid_1d(ctx, count);
            ([count as u32, wg_x], grid)
        };
        let norm_words = [nn, hh, 0, hh, 0, hh, eps];
        let mut enc = ctx.encoder("forward");
        for (l, lw) in self.layers.iter().enumerate() {
            lw.attn_norm.encode(ctx, &mut enc, &norm_words, (nn, 1, 1));
            match &lw.q {
                GpuQ::LoRa { a, norm, b: qb, .. } => {
                    a.encode_matmul(ctx, &mut enc, &b.xn, 0, n, &b.q_lora, 0)?;
                    let r = a.rows as u32;
                    norm.encode(ctx, &mut enc, &[nn, r, 0, r, 0, r, eps], (nn, 1, 1));
                    qb.encode_matmul(ctx, &mut enc, &b.q_lora, 0, n, &b.q, 0)?;
                }
                GpuQ::Direct(m) => m.encode_matmul(ctx, &mut enc, &b.xn, 0, n, &b.q, 0)?,
            }
            lw.kv_a
                .encode_matmul(ctx, &mut enc, &b.xn, 0, n, &b.kv, 0)?;
            lw.kv_norm.encode(
                ctx,
                &mut enc,
                &[nn, lora as u32, 0, row as u32, 0, 0, eps],
                (nn, 1, 1),
            );
            let half = self.half as u32;
            let inter = self.interleaved as u32;
            lw.rope_k.encode(
                ctx,
                &mut enc,
                &[nn, 1, lora as u32, row as u32, 0, 0, half, inter],
                (half.div_ceil(64), nn, 1),
            );
            lw.rope_q.encode(
                ctx,
                &mut enc,
                &[
                    nn,
                    heads as u32,
                    nope as u32,
                    (heads * qk) as u32,
                    qk as u32,
                    0,
                    half,
                    inter,
                ],
                ((heads as u32 * half).div_ceil(64), nn, 1),
            );
            lw.attn
                .encode(ctx, &mut enc, &self.shape, &b.attn(), n, ctx_len)?;
            lw.o.encode_matmul(ctx, &mut enc, &b.heads_out, 0, n, &b.branch, 0)?;
            let (w, g) = add_words(n * h);
            lw.add_attn.encode(ctx, &mut enc, &w, g);
            lw.ffn_norm.encode(ctx, &mut enc, &norm_words, (nn, 1, 1));
            let run_mlp = |m: &GpuMlp, enc: &mut wgpu::CommandEncoder| -> Result<(), GpuError> {
                m.gate.encode_matmul(ctx, enc, &b.xn, 0, n, &b.gate, 0)?;
                m.up.encode_matmul(ctx, enc, &b.xn, 0, n, &b.up, 0)?;
                let (w, g) = add_words(n * m.gate.rows);
                m.swiglu.encode(ctx, enc, &w, g);
                m.down.encode_matmul(ctx, enc, &b.gate, 0, n, &b.branch, 0)
            };
            match &lw.ffn {
                GpuFfn::Dense(m) => run_mlp(m, &mut enc)?,
                GpuFfn::Moe {
                    router,
                    bias,
                    shared,
                    add_routed,
                } => {
                    router.encode_matmul(ctx, &mut enc, &b.xn, 0, n, &b.rlogits, 0)?;
                    let mut copies = vec![(&b.rlogits, 0, n * ne)];
                    if gpu.is_none() {
                        copies.push((&b.xn, 0, n * h));
                    }
                    let done = std::mem::replace(&mut enc, ctx.encoder("forward"));
                    hs.read.clear();
                    self.readback.read(ctx, done, &copies, &mut hs.read)?;
                    moe::route_logits(
                        c,
                        bias.as_deref(),
                        &hs.read[..n * ne],
                        n,
                        &mut hs.routing,
                        &mut hs.router,
                    );
                    let shared_into_branch =
                        |enc: &mut wgpu::CommandEncoder| -> Result<(), GpuError> {
                            match shared {
                                Some(m) => run_mlp(m, enc),
                                None => {
                                    enc.clear_buffer(
                                        b.branch.buffer(),
                                        0,
                                        Some((n * h * 4) as u64),
                                    );
                                    Ok(())
                                }
                            }
                        };
                    match gpu {
                        Some(g) => {
                            shared_into_branch(&mut enc)?;
                            routing_pairs(&hs.routing, &mut hs.pairs);
                            g.encode_pairs(&mut enc, l, &b.xn, n, &hs.pairs, &b.branch)
                                .map_err(ForwardError::from)?;
                        }
                        None => {
                            let xs = &hs.read[n * ne..n * ne + n * h];
                            experts
                                .begin(l, xs, &hs.routing)
                                .map_err(ForwardError::from)?;
                            shared_into_branch(&mut enc)?;
                            hs.routed.clear();
                            hs.routed.resize(n * h, 0.0);
                            experts
                                .eval(l, xs, &hs.routing, &mut hs.routed, &mut hs.moe)
                                .map_err(ForwardError::from)?;
                            ctx.write_f32(&b.routed, 0, &hs.routed)?;
                            let (w, g) = add_words(n * h);
                            add_routed.encode(ctx, &mut enc, &w, g);
                        }
                    }
                }
            }
            let (w, g) = add_words(n * h);
            lw.add_ffn.encode(ctx, &mut enc, &w, g);
        }
        let Some((&first, &end)) = wanted.first().zip(wanted.last()) else {
            return Ok(ctx.submit_and_wait(enc)?);
        };
        let rows = wanted.len();
        // Consecutive wanted rows are normalised to the front of xn; others are normalised
        // all together and gathered to the front of `branch` (free after the last layer).
        let contiguous = end + 1 - first == rows;
        let (from, count) = if contiguous { (first, rows) } else { (0, n) };
        let r = count as u32;
        self.final_norm.encode(
            ctx,
            &mut enc,
            &[r, hh, (from * h) as u32, hh, 0, hh, eps],
            (r, 1, 1),
        );
        let input = if contiguous {
            &b.xn
        } else {
            let row_bytes = (h * 4) as u64;
            for (k, &i) in wanted.iter().enumerate() {
                enc.copy_buffer_to_buffer(
                    b.xn.buffer(),
                    i as u64 * row_bytes,
                    b.branch.buffer(),
                    k as u64 * row_bytes,
                    row_bytes,
                );
            }
            &b.branch
        };
        self.head
            .encode_matmul(ctx, &mut enc, input, 0, rows, &b.logits, 0)?;
        self.readback.read(
            ctx,
            enc,
            &[(&b.logits, 0, rows * self.cfg.vocab_size)],
            logits,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod fit_tests {
    use super::{fit_slots, GpuError};
    use std::cell::Cell;
    use std::rc::Rc;

    /// Stands for what one attempt allocated: counts the live ones.
    struct Held(Rc<Cell<usize>>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }

    fn oom() -> GpuError {
        GpuError::OutOfMemory {
            requested: 1,
            used: 0,
            budget: 0,
        }
    }

    /// An allocator for which `fits(slots)` says whether that many fit; it checks that no
    /// earlier attempt is still held, and logs the attempts.
    fn run(wanted: usize, fits: impl Fn(usize) -> bool) -> (Result<usize, String>, Vec<usize>) {
        let live = Rc::new(Cell::new(0));
        let mut tried = Vec::new();
        let r = fit_slots(wanted, |s| {
            assert_eq!(live.get(), 0, "an earlier attempt is still allocated");
            tried.push(s);
            if fits(s) {
                live.set(1);
                Ok(Held(live.clone()))
            } else {
                Err(oom())
            }
        });
        let r = r.map(|(s, held)| {
            assert_eq!(live.get(), 1);
            drop(held);
            s
        });
        (r.map_err(|e| e.to_string()), tried)
    }

    #[test]
    fn takes_all_when_all_fit() {
        assert_eq!(run(8, |_| true), (Ok(8), vec![8]));
        assert_eq!(run(0, |_| true), (Ok(1), vec![1]), "at least one");
    }

    #[test]
    fn finds_the_most_that_fit() {
        for limit in 1..=16 {
            let (r, tried) = run(16, |s| s <= limit);
            assert_eq!(r, Ok(limit.min(16)), "limit {limit}");
            assert!(tried.len() <= 7, "{tried:?}");
        }
        let (r, tried) = run(16, |s| s <= 11);
        assert_eq!(r, Ok(11));
        assert_eq!(tried, vec![16, 8, 12, 10, 11]);
    }

    #[test]
    fn none_fitting_is_the_out_of_memory_error() {
        let (r, tried) = run(16, |_| false);
        assert!(r.unwrap_err().contains("memory"));
        assert_eq!(tried, vec![16, 8, 4, 2, 1]);
        assert!(run(1, |_| false).0.is_err());
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut tried = 0;
        let r = fit_slots(8, |_| -> Result<(), GpuError> {
            tried += 1;
            Err(GpuError::BadArgument("no".into()))
        });
        assert!(matches!(r, Err(GpuError::BadArgument(_))));
        assert_eq!(tried, 1);
    }
}
