//! Multi-head latent attention in the absorbed form, for a batch of sequences, each with a
//! run of consecutive positions in its own cache.
//!
//! Per token: the latent `c = RMSNorm(kv_a x)[..lora]` and the rotated shared key `k_pe` are
//! cached; per head, `q̃ = W_UKᵀ q_nope`, `score(t) = scale (q̃·c_t + q_pe·k_pe_t)`,
//! `õ = Σ_t p(t) c_t`, `o = W_UV õ`. Prefill and decode run the same code (a decode step is a
//! batch of one), so they give the same logits by construction.

use std::cell::RefCell;

use crate::config::ModelConfig;
use crate::model::ops;
use crate::model::rope::RopeTable;
use crate::model::weights::{AttnWeights, QProj};
use crate::model::BatchSeq;
use crate::quant;
use crate::quant::f32dot::MULTI_MAX;
use crate::tensor::{ActBuf, GroupBuf, Matrix};

/// Reusable buffers of the attention block.
#[derive(Default)]
pub struct AttnScratch {
    q_lora: Vec<f32>,
    q: Vec<f32>,
    kv: Vec<f32>,
    /// Cached rows converted to f32 when a cache stores f16/bf16, sequence after sequence.
    rows: Vec<f32>,
    /// `heads x n_pad x kv_lora`: absorbed queries, then attended latents.
    q_abs: Vec<f32>,
    latent: Vec<f32>,
    /// `heads x n_pad x v_head`: head outputs, then `heads_out`: the same `n x heads x v_head`.
    v_out: Vec<f32>,
    heads_out: Vec<f32>,
    /// Per row of the batch: its sequence and position.
    spans: Vec<(u32, u32)>,
    /// Per sequence: `usize::MAX` when its cache is read in place (f32), else the offset of
    /// its converted rows in `rows`.
    conv: Vec<usize>,
    act: ActBuf,
    group: GroupBuf,
}

thread_local! {
    static HEAD_SCRATCH: RefCell<HeadScratch> = RefCell::new(HeadScratch::default());
}

#[derive(Default)]
struct HeadScratch {
    q_pe: Vec<f32>,
    scores: Vec<f32>,
}

/// Runs attention for the tokens of several sequences, `xs` (`rows x hidden`, normalised)
/// holding each sequence's tokens back to back in `seqs` order: sequence `i`'s tokens take
/// positions `len..len + tokens.len()` of its own cache (their rows are written here) and
/// attend to that cache only. Writes `out` (`rows x hidden`). The projections run over all
/// rows together; the per-head work of all sequences runs in three pool dispatches.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    cfg: &ModelConfig,
    layer: usize,
    w: &AttnWeights,
    rope: &RopeTable,
    scale: f32,
    xs: &[f32],
    seqs: &mut [BatchSeq<'_>],
    out: &mut [f32],
    s: &mut AttnScratch,
) {
    let heads = cfg.n_heads;
    let (nope, lora, vh) = (cfg.qk_nope, cfg.kv_lora_rank, cfg.v_head);
    let qk = cfg.qk_head();
    let row = cfg.cache_row();
    let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();

    // Queries (the low-rank projection together with kv_a: one dispatch for both).
    s.q.resize(n * heads * qk, 0.0);
    s.kv.resize(n * row, 0.0);
    match &w.q {
        QProj::LoRa { a, norm, b } => {
            s.q_lora.resize(n * a.rows, 0.0);
            let mut g = s.group.group();
            g.push(a, xs, n, &mut s.q_lora);
            g.push(&w.kv_a, xs, n, &mut s.kv);
            g.run();
            ops::rms_norm_rows(&mut s.q_lora, norm, cfg.rms_eps);
            b.matmul(&s.q_lora, n, &mut s.q, &mut s.act);
        }
        QProj::Direct(m) => {
            let mut g = s.group.group();
            g.push(m, xs, n, &mut s.q);
            g.push(&w.kv_a, xs, n, &mut s.kv);
            g.run();
        }
    }

    // Latent and shared rotary key of every new token, into its sequence's cache; per row of
    // the batch, its sequence and position (`spans`), and per sequence where its cached rows
    // are read from (`conv`: an offset into `rows` when they need converting to f32).
    s.spans.clear();
    s.conv.clear();
    let mut kv_rows = s.kv.chunks_exact_mut(row);
    let mut converted = 0;
    for (i, q) in seqs.iter_mut().enumerate() {
        let pos0 = q.cache.len();
        for (t, r) in kv_rows.by_ref().take(q.tokens.len()).enumerate() {
            let (c, kpe) = r.split_at_mut(lora);
            ops::rms_norm_rows(c, &w.kv_norm, cfg.rms_eps);
            rope.apply(kpe, pos0 + t);
            q.cache.write(layer, pos0 + t, r);
            s.spans.push((i as u32, (pos0 + t) as u32));
        }
        let ctx = pos0 + q.tokens.len();
        if q.cache.f32_rows(layer, ctx).is_some() {
            s.conv.push(usize::MAX);
        } else {
            s.conv.push(converted);
            converted += ctx * row;
        }
    }
    s.rows.resize(converted, 0.0);
    for (q, &at) in seqs.iter().zip(&s.conv) {
        if at != usize::MAX {
            let ctx = q.cache.len() + q.tokens.len();
            for (p, dst) in s.rows[at..at + ctx * row].chunks_exact_mut(row).enumerate() {
                q.cache.read(layer, p, dst);
            }
        }
    }

    // Attention in three passes on the kernels' pool. The two per-head products run per head
    // over groups of tokens (each weight block unpacked once per group); the scores and the
    // attended latent per (token, head). Buffers are head-major (`heads x n_pad x width`), so
    // every task writes one contiguous piece; `n_pad` rounds `n` up to whole groups of `gsz`
    // tokens (a decode step is a group of one, with no padding).
    let gsz = n.clamp(1, MULTI_MAX);
    let n_pad = n.next_multiple_of(gsz);
    let groups = n_pad / gsz;
    let pool = crate::cpu::pool::global();
    let q = &s.q;
    s.q_abs.resize(heads * n_pad * lora, 0.0);
    pool.for_each_chunk_mut(&mut s.q_abs, gsz * lora, |c, dst| {
        let (h, t0) = (c / groups, (c % groups) * gsz);
        let xs = |t: usize| &q[(t * heads + h) * qk..(t * heads + h) * qk + nope];
        head_products(&w.k_b[h], t0..n.min(t0 + gsz), xs, dst);
    });

    s.latent.resize(heads * n_pad * lora, 0.0);
    let (q_abs, spans, conv, converted) = (&s.q_abs, &s.spans, &s.conv, &s.rows);
    let seqs = &*seqs;
    pool.for_each_chunk_mut(&mut s.latent, lora, |c, latent| {
        let (h, t) = (c / n_pad, c % n_pad);
        if t >= n {
            return;
        }
        let (i, pos) = (spans[t].0 as usize, spans[t].1 as usize);
        let rows = match conv[i] {
            usize::MAX => seqs[i]
                .cache
                .f32_rows(layer, pos + 1)
                .expect("an f32 cache"),
            at => &converted[at..at + (pos + 1) * row],
        };
        let q_pe = &q[(t * heads + h) * qk + nope..(t * heads + h + 1) * qk];
        let q_abs = &q_abs[c * lora..(c + 1) * lora];
        HEAD_SCRATCH.with(|hs| {
            let hs = &mut *hs.borrow_mut();
            attend(rope, scale, q_abs, q_pe, lora, row, rows, pos, latent, hs);
        });
    });

    s.v_out.resize(heads * n_pad * vh, 0.0);
    let latent = &s.latent;
    pool.for_each_chunk_mut(&mut s.v_out, gsz * vh, |c, dst| {
        let (h, t0) = (c / groups, (c % groups) * gsz);
        let xs = |t: usize| &latent[(h * n_pad + t) * lora..(h * n_pad + t + 1) * lora];
        head_products(&w.v_b[h], t0..n.min(t0 + gsz), xs, dst);
    });
    // Token-major for the output projection.
    s.heads_out.resize(n * heads * vh, 0.0);
    for (t, o) in s.heads_out.chunks_exact_mut(heads * vh).enumerate() {
        for (h, oh) in o.chunks_exact_mut(vh).enumerate() {
            oh.copy_from_slice(&s.v_out[(h * n_pad + t) * vh..(h * n_pad + t + 1) * vh]);
        }
    }

    w.o.matmul(&s.heads_out, n, out, &mut s.act);
}

/// `dst[(t - t0) * rows + r] = m[r] · xs(t)` for the tokens `t` of `ts` (at most
/// `MULTI_MAX`), single-threaded (already inside a parallel loop), with f32 activations: these
/// are the small per-head matrices, where quantising the query or the attended latent to
/// 8 bits would cost accuracy where the scores are most sensitive. Each token's result is the
/// one-token dot's, bit for bit, whatever the group.
fn head_products<'x>(
    m: &Matrix,
    ts: std::ops::Range<usize>,
    xs: impl Fn(usize) -> &'x [f32],
    dst: &mut [f32],
) {
    let t0 = ts.start;
    let g = ts.len();
    if g == 0 {
        return;
    }
    let xs: [&[f32]; MULTI_MAX] = std::array::from_fn(|i| if i < g { xs(t0 + i) } else { &[] });
    let mut res = [0f32; MULTI_MAX];
    for r in 0..m.rows {
        quant::f32dot::vec_dot_f32_multi(m.ty, m.row(r), &xs[..g], &mut res[..g]);
        for (i, &v) in res[..g].iter().enumerate() {
            dst[i * m.rows + r] = v;
        }
    }
}

/// One head of one token at position `pos` (attends to positions `0..=pos`): the scores of
/// the absorbed query `q_abs` and the rotary part `q_pe` (rotated here) against the cached
/// rows, and the attended latent `Σ_t p(t) c_t` into `latent`.
#[allow(clippy::too_many_arguments)]
fn attend(
    rope: &RopeTable,
    scale: f32,
    q_abs: &[f32],
    q_pe: &[f32],
    lora: usize,
    row: usize,
    rows: &[f32],
    pos: usize,
    latent: &mut [f32],
    hs: &mut HeadScratch,
) {
    hs.q_pe.clear();
    hs.q_pe.extend_from_slice(q_pe);
    rope.apply(&mut hs.q_pe, pos);

    hs.scores.resize(pos + 1, 0.0);
    for (p, sc) in hs.scores.iter_mut().enumerate() {
        let r = &rows[p * row..(p + 1) * row];
        *sc = scale * (ops::dot(q_abs, &r[..lora]) + ops::dot(&hs.q_pe, &r[lora..]));
    }
    ops::softmax(&mut hs.scores);

    latent.fill(0.0);
    for (p, &pr) in hs.scores.iter().enumerate() {
        ops::axpy(latent, pr, &rows[p * row..p * row + lora]);
    }
}
