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
use crate::tensor::{ActBuf, GroupBuf, Matrix};

/// Reusable buffers of the attention block.
#[derive(Default)]
pub struct AttnScratch {
    q_lora: Vec<f32>,
    q: Vec<f32>,
    kv: Vec<f32>,
    /// Cached rows converted to f32 when a cache stores f16/bf16, sequence after sequence.
    rows: Vec<f32>,
    /// `n x heads x v_head`: concatenated head outputs.
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
    q_nope: Vec<f32>,
    q_pe: Vec<f32>,
    q_abs: Vec<f32>,
    scores: Vec<f32>,
    latent: Vec<f32>,
}

/// Runs attention for the tokens of several sequences, `xs` (`rows x hidden`, normalised)
/// holding each sequence's tokens back to back in `seqs` order: sequence `i`'s tokens take
/// positions `len..len + tokens.len()` of its own cache (their rows are written here) and
/// attend to that cache only. Writes `out` (`rows x hidden`). The projections run over all
/// rows together; the (token, head) pairs of all sequences run in one pool dispatch.
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
    let (nope, rd, lora, vh) = (cfg.qk_nope, cfg.qk_rope, cfg.kv_lora_rank, cfg.v_head);
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

    // Attention per (token, head), in parallel on the kernels' pool.
    s.heads_out.resize(n * heads * vh, 0.0);
    let (q, spans, conv, converted) = (&s.q, &s.spans, &s.conv, &s.rows);
    let seqs = &*seqs;
    crate::cpu::pool::global().for_each_chunk_mut(&mut s.heads_out, vh, |th, o| {
        let (t, h) = (th / heads, th % heads);
        let (i, pos) = (spans[t].0 as usize, spans[t].1 as usize);
        let rows = match conv[i] {
            usize::MAX => seqs[i]
                .cache
                .f32_rows(layer, pos + 1)
                .expect("an f32 cache"),
            at => &converted[at..at + (pos + 1) * row],
        };
        let qh = &q[(t * heads + h) * qk..(t * heads + h + 1) * qk];
        HEAD_SCRATCH.with(|hs| {
            let hs = &mut *hs.borrow_mut();
            one_head(
                &w.k_b[h], &w.v_b[h], rope, scale, qh, nope, rd, lora, row, rows, pos, o, hs,
            );
        });
    });

    w.o.matmul(&s.heads_out, n, out, &mut s.act);
}

/// One head of one token at position `pos` (attends to positions `0..=pos`).
#[allow(clippy::too_many_arguments)]
fn one_head(
    k_b: &Matrix,
    v_b: &Matrix,
    rope: &RopeTable,
    scale: f32,
    qh: &[f32],
    nope: usize,
    rd: usize,
    lora: usize,
    row: usize,
    rows: &[f32],
    pos: usize,
    out: &mut [f32],
    hs: &mut HeadScratch,
) {
    hs.q_nope.clear();
    hs.q_nope.extend_from_slice(&qh[..nope]);
    hs.q_pe.clear();
    hs.q_pe.extend_from_slice(&qh[nope..nope + rd]);
    rope.apply(&mut hs.q_pe, pos);

    hs.q_abs.resize(lora, 0.0);
    serial_matvec(k_b, &hs.q_nope, &mut hs.q_abs);

    hs.scores.resize(pos + 1, 0.0);
    for (p, sc) in hs.scores.iter_mut().enumerate() {
        let r = &rows[p * row..(p + 1) * row];
        *sc = scale * (ops::dot(&hs.q_abs, &r[..lora]) + ops::dot(&hs.q_pe, &r[lora..]));
    }
    ops::softmax(&mut hs.scores);

    hs.latent.clear();
    hs.latent.resize(lora, 0.0);
    for (p, &pr) in hs.scores.iter().enumerate() {
        ops::axpy(&mut hs.latent, pr, &rows[p * row..p * row + lora]);
    }
    serial_matvec(v_b, &hs.latent, out);
}

/// Single-threaded matvec with f32 activations for the small per-head matrices (already inside
/// a parallel loop): quantising `q_nope` or the attended latent to 8 bits would cost accuracy
/// where the scores are most sensitive, and these products are a negligible share of the work.
fn serial_matvec(m: &Matrix, x: &[f32], out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = quant::vec_dot_f32(m.ty, m.row(r), x);
    }
}
