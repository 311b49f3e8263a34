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
    /// `heads x n_pad x kv_lora`: absorbed queries.
    q_abs: Vec<f32>,
    /// `n x heads x kv_lora`: attended latents.
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
    /// A group of heads' absorbed queries and rotated rotary queries, then their scores.
    q_abs: Vec<f32>,
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

    // Scores and attended latents per token for a group of heads at a time (every head
    // reads the same cached rows, so a group shares their loads); `latent` is token-major
    // (`n x heads x kv_lora`).
    let hg = [4, 2]
        .into_iter()
        .find(|&g| heads.is_multiple_of(g))
        .unwrap_or(1);
    s.latent.resize(n * heads * lora, 0.0);
    let (q_abs, spans, conv, converted) = (&s.q_abs, &s.spans, &s.conv, &s.rows);
    let seqs = &*seqs;
    pool.for_each_chunk_mut(&mut s.latent, hg * lora, |c, latent| {
        let (t, h0) = (c / (heads / hg), (c % (heads / hg)) * hg);
        let (i, pos) = (spans[t].0 as usize, spans[t].1 as usize);
        let rows = match conv[i] {
            usize::MAX => seqs[i]
                .cache
                .f32_rows(layer, pos + 1)
                .expect("an f32 cache"),
            at => &converted[at..at + (pos + 1) * row],
        };
        HEAD_SCRATCH.with(|hs| {
            let hs = &mut *hs.borrow_mut();
            hs.q_abs.clear();
            hs.q_pe.clear();
            for h in h0..h0 + hg {
                hs.q_abs
                    .extend_from_slice(&q_abs[(h * n_pad + t) * lora..(h * n_pad + t + 1) * lora]);
                hs.q_pe
                    .extend_from_slice(&q[(t * heads + h) * qk + nope..(t * heads + h + 1) * qk]);
            }
            rope.apply(&mut hs.q_pe, pos);
            attend(scale, lora, row, rows, pos + 1, latent, hs);
        });
    });

    s.v_out.resize(heads * n_pad * vh, 0.0);
    let latent = &s.latent;
    pool.for_each_chunk_mut(&mut s.v_out, gsz * vh, |c, dst| {
        let (h, t0) = (c / groups, (c % groups) * gsz);
        let xs = |t: usize| &latent[(t * heads + h) * lora..(t * heads + h + 1) * lora];
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
    quant::f32dot::vec_dot_f32_rows(m.ty, &m.data, m.row_bytes, m.rows, &xs[..g], dst, m.rows);
}

/// A group of heads of one token attending to the first `npos` cached rows: the scores of
/// the absorbed queries (`hs.q_abs`, `g x kv_lora`) and the rotated rotary parts (`hs.q_pe`,
/// `g x rope`) against the rows, a softmax per head, and the attended latents
/// `Σ_t p(t) c_t` into `latent` (`g x kv_lora`).
fn attend(
    scale: f32,
    lora: usize,
    row: usize,
    rows: &[f32],
    npos: usize,
    latent: &mut [f32],
    hs: &mut HeadScratch,
) {
    let g = latent.len() / lora;
    let rope_dim = row - lora;
    hs.scores.resize(g * npos, 0.0);
    let rows = &rows[..npos * row];
    // Four heads in one pass over the rows where the CPU has AVX2, else head by head.
    #[cfg(target_arch = "x86_64")]
    let four = g == 4 && ops::simd_available();
    #[cfg(not(target_arch = "x86_64"))]
    let four = false;
    if four {
        // SAFETY: the CPU has AVX2/FMA (the kernels check the slices' sizes).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            simd::scores4(
                &hs.q_abs,
                &hs.q_pe,
                lora,
                rows,
                row,
                npos,
                scale,
                &mut hs.scores,
            )
        };
    } else {
        for (h, sc) in hs.scores.chunks_exact_mut(npos).enumerate() {
            let q_abs = &hs.q_abs[h * lora..(h + 1) * lora];
            let q_pe = &hs.q_pe[h * rope_dim..(h + 1) * rope_dim];
            for (p, v) in sc.iter_mut().enumerate() {
                let r = &rows[p * row..(p + 1) * row];
                *v = scale * (ops::dot(q_abs, &r[..lora]) + ops::dot(q_pe, &r[lora..]));
            }
        }
    }
    for sc in hs.scores.chunks_exact_mut(npos) {
        ops::softmax(sc);
    }
    if four {
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            simd::latent4(&hs.scores, rows, row, npos, lora, latent)
        };
    } else {
        for (sc, out) in hs
            .scores
            .chunks_exact(npos)
            .zip(latent.chunks_exact_mut(lora))
        {
            out.fill(0.0);
            for (p, &pr) in sc.iter().enumerate() {
                ops::axpy(out, pr, &rows[p * row..p * row + lora]);
            }
        }
    }
}

/// Four heads at a time: each cached value loaded once for all four.
#[cfg(target_arch = "x86_64")]
mod simd {
    use core::arch::x86_64::*;

    /// `scores[h * npos + p] = scale (q_abs[h] · c_p + q_pe[h] · kpe_p)` for 4 heads.
    ///
    /// # Safety
    /// AVX2 and FMA present; `q_abs` is `4 x lora`, `q_pe` `4 x (row - lora)`, `rows`
    /// `npos x row`, `scores` `4 x npos`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores4(
        q_abs: &[f32],
        q_pe: &[f32],
        lora: usize,
        rows: &[f32],
        row: usize,
        npos: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let rd = row - lora;
        assert!(q_abs.len() >= 4 * lora && q_pe.len() >= 4 * rd);
        assert!(rows.len() >= npos * row && scores.len() >= 4 * npos);
        let (qa, qp) = (q_abs.as_ptr(), q_pe.as_ptr());
        for p in 0..npos {
            let r = rows.as_ptr().add(p * row);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut tail = [0f32; 4];
            // The latent part against q_abs, then the rotary part against q_pe.
            for (q, width, base) in [(qa, lora, 0), (qp, rd, lora)] {
                let mut k = 0;
                while k + 8 <= width {
                    let c = _mm256_loadu_ps(r.add(base + k));
                    for (h, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * width + k)), c, *a);
                    }
                    k += 8;
                }
                while k < width {
                    let c = *r.add(base + k);
                    for (h, t) in tail.iter_mut().enumerate() {
                        *t = (*q.add(h * width + k)).mul_add(c, *t);
                    }
                    k += 1;
                }
            }
            // Four horizontal sums with three hadds.
            let s = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let mut four = [0f32; 4];
            _mm_storeu_ps(four.as_mut_ptr(), s);
            for h in 0..4 {
                scores[h * npos + p] = scale * (four[h] + tail[h]);
            }
        }
    }

    /// `latent[h * lora + k] = Σ_p probs[h * npos + p] · c_p[k]` for 4 heads.
    ///
    /// # Safety
    /// AVX2 and FMA present; `probs` is `4 x npos`, `rows` `npos x row` with `lora <= row`,
    /// `latent` `4 x lora`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn latent4(
        probs: &[f32],
        rows: &[f32],
        row: usize,
        npos: usize,
        lora: usize,
        latent: &mut [f32],
    ) {
        assert!(probs.len() >= 4 * npos && rows.len() >= npos * row && lora <= row);
        assert!(latent.len() >= 4 * lora);
        let (pr, out) = (probs.as_ptr(), latent.as_mut_ptr());
        let mut k = 0;
        // 16 values of 4 heads (8 accumulators) per pass over the rows.
        while k + 16 <= lora {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for p in 0..npos {
                let r = rows.as_ptr().add(p * row + k);
                let (c0, c1) = (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*pr.add(h * npos + p));
                    a[0] = _mm256_fmadd_ps(w, c0, a[0]);
                    a[1] = _mm256_fmadd_ps(w, c1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(h * lora + k), a[0]);
                _mm256_storeu_ps(out.add(h * lora + k + 8), a[1]);
            }
            k += 16;
        }
        while k < lora {
            for h in 0..4 {
                let mut v = 0f32;
                for p in 0..npos {
                    v = (*pr.add(h * npos + p)).mul_add(*rows.as_ptr().add(p * row + k), v);
                }
                *out.add(h * lora + k) = v;
            }
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::random_f32;

    /// Four heads at once (the vector kernels where the CPU has them) against each head alone
    /// (the plain path), at widths with and without vector tails.
    #[test]
    fn a_group_of_heads_attends_like_each_head_alone() {
        for (lora, rd, npos) in [(64, 16, 1), (64, 16, 9), (40, 12, 5), (512, 64, 33)] {
            let row = lora + rd;
            let rows = random_f32(npos * row, 1);
            let mut group = HeadScratch {
                q_abs: random_f32(4 * lora, 2),
                q_pe: random_f32(4 * rd, 3),
                scores: Vec::new(),
            };
            let mut together = vec![0f32; 4 * lora];
            attend(0.3, lora, row, &rows, npos, &mut together, &mut group);
            for h in 0..4 {
                let mut one = HeadScratch {
                    q_abs: group.q_abs[h * lora..(h + 1) * lora].to_vec(),
                    q_pe: group.q_pe[h * rd..(h + 1) * rd].to_vec(),
                    scores: Vec::new(),
                };
                let mut alone = vec![0f32; lora];
                attend(0.3, lora, row, &rows, npos, &mut alone, &mut one);
                for (k, (&a, &b)) in together[h * lora..].iter().zip(&alone).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "lora {lora} npos {npos} head {h} value {k}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
