//! The model's GPU kernels against the CPU implementations (lavapipe in CI; skipped with one
//! line without an adapter, failed under `REQUIRE_GPU_TESTS=1`).
//!
//! Tolerances (absolute, on values of order 1): RMSNorm, RoPE, SwiGLU and adds 1e-5 · (1 +
//! |ref|); softmax 1e-6; attention (cache write, scores, softmax, latent sum) 1e-5 · (1 +
//! |ref|) against the CPU reading a `KvCache` of the same type; cache rounding bit-exact; routed
//! experts 1e-5 · max |ref| (two chained products of random Q8_0/Q4_K/F32 weights whose
//! outputs reach ~100).

use std::sync::Arc;

use super::model::{AttnBufs, AttnShape, GpuAttention};
use super::ops::{cache_row, grid_1d, Kernels, Op};
use super::*;
use crate::config::{Rope, Yarn};
use crate::model::kv_cache::{CacheType, KvCache};
use crate::model::moe::{LocalExperts, MoeScratch, Pair};
use crate::model::ops;
use crate::model::rope::RopeTable;
use crate::model::weights::{ExpertSet, Mlp};
use crate::quant::dequant::test_util::{random_row, Rng};
use crate::quant::QuantType;
use crate::tensor::{ActBuf, Matrix};
use crate::Bytes;

/// The f32 products: these kernels are held to f32 bounds (f16 products are `tests.rs`'s).
fn ctx() -> Option<Arc<GpuContext>> {
    test_context(GpuOptions::default()).map(Arc::new)
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: [{i}] gpu {g} cpu {w}"
        );
    }
}

fn run(ctx: &GpuContext, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
    let mut enc = ctx.encoder("test");
    f(&mut enc);
    ctx.submit_and_wait(enc).unwrap();
}

#[test]
fn rmsnorm_rows_match_the_cpu() {
    let Some(ctx) = ctx() else { return };
    let k = Kernels::new(&ctx, CacheType::F32).unwrap();
    for (rows, width) in [(1, 7), (3, 256), (5, 1000), (2, 4097)] {
        let x = rand(rows * width, 1);
        let w: Vec<f32> = rand(width, 2).iter().map(|v| 1.0 + 0.1 * v).collect();
        let (xb, wb) = (
            ctx.upload_f32("x", &x).unwrap(),
            ctx.upload_f32("w", &w).unwrap(),
        );
        let yb = ctx.alloc_f32("y", rows * width).unwrap();
        let op = Op::new(&ctx, &k.rms, &[(1, &wb), (2, &xb), (3, &yb)]).unwrap();
        let eps = 1e-6f32;
        let wd = width as u32;
        run(&ctx, |e| {
            op.encode(
                &ctx,
                e,
                &[rows as u32, wd, 0, wd, 0, wd, eps.to_bits()],
                (rows as u32, 1, 1),
            )
        });
        let mut want = vec![0f32; rows * width];
        for (s, d) in x.chunks(width).zip(want.chunks_mut(width)) {
            ops::rms_norm(s, &w, eps, d);
        }
        close(
            &ctx.read_f32(&yb, 0, rows * width).unwrap(),
            &want,
            1e-5,
            "rmsnorm",
        );
        // In place on the first `width - 3` values of each row (a strided sub-row).
        let sub = width.saturating_sub(3).max(1);
        let op = Op::new(&ctx, &k.rms_inplace, &[(1, &wb), (3, &xb)]).unwrap();
        run(&ctx, |e| {
            op.encode(
                &ctx,
                e,
                &[rows as u32, sub as u32, 0, wd, 0, 0, eps.to_bits()],
                (rows as u32, 1, 1),
            )
        });
        let mut want = x.clone();
        for r in want.chunks_mut(width) {
            ops::rms_norm_rows(&mut r[..sub], &w[..sub], eps);
        }
        close(
            &ctx.read_f32(&xb, 0, rows * width).unwrap(),
            &want,
            1e-5,
            "rmsnorm in place",
        );
    }
}

#[test]
fn rope_matches_the_cpu_table() {
    let Some(ctx) = ctx() else { return };
    let k = Kernels::new(&ctx, CacheType::F32).unwrap();
    // Each token's position comes from the token table, in any order.
    for (dim, interleaved, heads, pos) in [
        (16, true, 3, vec![17, 3, 21, 0, 9]),
        (64, false, 2, vec![4000, 4001, 4002]),
        (6, true, 1, vec![0]),
    ] {
        let n = pos.len();
        let rope = Rope {
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
            }),
            interleaved,
        };
        let table = RopeTable::new(&rope, dim);
        // Rows of `head_dim` = dim + 5 values with the rotary part at offset 5.
        let hd = dim + 5;
        let x = rand(n * heads * hd, 3);
        let xb = ctx.upload_f32("x", &x).unwrap();
        let end = pos.iter().max().unwrap() + 1;
        let cs = ctx.upload_f32("cs", &table.cos_sin_table(end)).unwrap();
        let tok = tok_table(&ctx, pos.iter().map(|&p| (0, p)));
        let op = Op::new(&ctx, &k.rope, &[(1, &cs), (2, &xb), (3, &tok)]).unwrap();
        let half = (dim / 2) as u32;
        run(&ctx, |e| {
            op.encode(
                &ctx,
                e,
                &[
                    n as u32,
                    heads as u32,
                    5,
                    (heads * hd) as u32,
                    hd as u32,
                    0,
                    half,
                    interleaved as u32,
                ],
                ((heads as u32 * half).div_ceil(64), n as u32, 1),
            )
        });
        let mut want = x.clone();
        for (t, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let b = (t * heads + h) * hd + 5;
                table.apply(&mut want[b..b + dim], p);
            }
        }
        close(&ctx.read_f32(&xb, 0, x.len()).unwrap(), &want, 1e-5, "rope");
    }
}

#[test]
fn softmax_and_elementwise_match_the_cpu() {
    let Some(ctx) = ctx() else { return };
    let k = Kernels::new(&ctx, CacheType::F32).unwrap();
    // Attention rows: 3 tokens (positions 6, 4, 8 of their sequences) x 2 heads, lengths 7,
    // 7, 5, 5, 9, 9 (position + 1, from the token table) in rows of stride 9.
    let (rows, stride, per, pos) = (6usize, 9usize, 2usize, [6usize, 4, 8]);
    let x: Vec<f32> = rand(rows * stride, 4).iter().map(|v| 4.0 * v).collect();
    let xb = ctx.upload_f32("x", &x).unwrap();
    let tok = tok_table(&ctx, pos.iter().map(|&p| (3, p)));
    let op = Op::new(&ctx, &k.softmax, &[(1, &xb), (2, &tok)]).unwrap();
    run(&ctx, |e| {
        op.encode(
            &ctx,
            e,
            &[rows as u32, stride as u32, per as u32, 0, 2, 1, 1],
            (rows as u32, 1, 1),
        )
    });
    let mut want = x.clone();
    for r in 0..rows {
        let len = pos[r / per] + 1;
        ops::softmax(&mut want[r * stride..r * stride + len]);
    }
    let got = ctx.read_f32(&xb, 0, x.len()).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "softmax [{i}] {g} vs {w}");
    }

    for count in [1usize, 63, 1000, 4099] {
        let (g, u) = (rand(count, 5), rand(count, 6));
        let (gb, ub) = (
            ctx.upload_f32("g", &g).unwrap(),
            ctx.upload_f32("u", &u).unwrap(),
        );
        let sw = Op::new(&ctx, &k.swiglu, &[(1, &gb), (2, &ub)]).unwrap();
        let add = Op::new(&ctx, &k.add, &[(3, &ub), (4, &gb)]).unwrap();
        let (wg_x, grid) = grid_1d(&ctx, count);
        run(&ctx, |e| sw.encode(&ctx, e, &[count as u32, wg_x], grid));
        run(&ctx, |e| add.encode(&ctx, e, &[count as u32, wg_x], grid));
        let mut wg = g.clone();
        ops::swiglu(&mut wg, &u);
        let mut wu = u.clone();
        ops::add_into(&mut wu, &wg);
        close(&ctx.read_f32(&gb, 0, count).unwrap(), &wg, 1e-5, "swiglu");
        close(&ctx.read_f32(&ub, 0, count).unwrap(), &wu, 1e-5, "add");
    }
}

/// The attention's token table: per token, the first cache row of its sequence and its
/// position.
fn tok_table(ctx: &GpuContext, toks: impl Iterator<Item = (usize, usize)>) -> GpuBuffer {
    let words: Vec<f32> = toks
        .flat_map(|(base, pos)| [f32::from_bits(base as u32), f32::from_bits(pos as u32)])
        .collect();
    ctx.upload_f32("token table", &words).unwrap()
}

/// The attention kernels' parameter words: `n` tokens, cache rows of `crow` elements.
#[allow(clippy::too_many_arguments)]
fn att_words(
    n: usize,
    heads: usize,
    lora: usize,
    rd: usize,
    nope: usize,
    scale: f32,
    sstride: usize,
    crow: usize,
) -> [u32; 11] {
    [
        n as u32,
        heads as u32,
        0,
        lora as u32,
        rd as u32,
        (lora + rd) as u32,
        (nope + rd) as u32,
        nope as u32,
        scale.to_bits(),
        sstride as u32,
        crow as u32,
    ]
}

/// Writes `rows` (`n x row` f32) into a fresh `cap`-position cache of type `ty` with the
/// `write` kernel (token t at row t); returns the cache buffer and its row stride.
fn gpu_cache(
    ctx: &GpuContext,
    k: &Kernels,
    ty: CacheType,
    row: usize,
    cap: usize,
    rows: &[f32],
) -> (GpuBuffer, usize) {
    let (crow, bytes) = cache_row(ty, row);
    let cb = ctx
        .create_buffer(
            "cache",
            (cap * bytes) as u64,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )
        .unwrap();
    let kv = ctx.upload_f32("kv", rows).unwrap();
    let n = rows.len() / row;
    let tok = tok_table(ctx, (0..n).map(|t| (0, t)));
    let op = Op::new(ctx, &k.cache_write, &[(7, &cb), (8, &kv), (9, &tok)]).unwrap();
    let w = att_words(n, 1, row, 0, 0, 1.0, 0, crow);
    run(ctx, |e| {
        op.encode(ctx, e, &w, ((bytes as u32 / 4).div_ceil(64), n as u32, 1))
    });
    (cb, crow)
}

/// The cache `write` kernel rounds to f16/bf16 bit for bit as `half` (the CPU cache) does:
/// ties, subnormals, overflow, signed zeros, infinities, NaN; odd rows are padded.
#[test]
fn cache_write_rounds_like_the_cpu() {
    let Some(ctx) = ctx() else { return };
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65520.0,
        65519.99,
        -1e6,
        1e-8,
        -3e-8,
        2.9802322e-8,
        5.9604645e-8,
        8.940697e-8,
        6.1035156e-5,
        6.097555e-5,
        1.0009766,
        1.0004883,
        1.0014648,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1e-40,
        3.0e38,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_8001),
    ];
    let mut r = Rng(21);
    vals.extend((0..2000).map(|i| r.normal() * 10f32.powi(i % 13 - 8)));
    vals.extend((0..500).map(|_| f32::from_bits(r.next_u64() as u32)));
    let row = 7;
    vals.resize(vals.len().next_multiple_of(row), 0.5);
    let n = vals.len() / row;
    for ty in [CacheType::F16, CacheType::BF16] {
        let k = Kernels::new(&ctx, ty).unwrap();
        let (cb, crow) = gpu_cache(&ctx, &k, ty, row, n, &vals);
        assert_eq!(crow, 8);
        let words: Vec<u32> = ctx
            .read_f32(&cb, 0, n * crow / 2)
            .unwrap()
            .iter()
            .map(|w| w.to_bits())
            .collect();
        for t in 0..n {
            for j in 0..crow {
                let got = (words[(t * crow + j) / 2] >> (16 * (j % 2))) & 0xffff;
                let v = if j < row { vals[t * row + j] } else { 0.0 };
                let (want, nan) = match ty {
                    CacheType::F16 => {
                        let h = half::f16::from_f32(v);
                        (h.to_bits() as u32, h.is_nan())
                    }
                    _ => {
                        let h = half::bf16::from_f32(v);
                        (h.to_bits() as u32, h.is_nan())
                    }
                };
                if nan {
                    let is_nan = match ty {
                        CacheType::F16 => half::f16::from_bits(got as u16).is_nan(),
                        _ => half::bf16::from_bits(got as u16).is_nan(),
                    };
                    assert!(is_nan, "{ty:?}: {v} gave {got:#06x}, want NaN");
                } else {
                    assert_eq!(got, want, "{ty:?}: {v:e} ({:#010x})", v.to_bits());
                }
            }
        }
    }
}

/// Cache write, scores, causal softmax and latent sum against `attention.rs`'s per-head
/// formula over a `KvCache` of each type (odd rows pad the packed caches). The cache holds
/// `slots` sequences of `cap` positions; token t belongs to sequence t % slots, at position
/// pos0 + t, and attends only to its own sequence's rows.
#[test]
fn absorbed_attention_matches_the_cpu() {
    let Some(ctx) = ctx() else { return };
    for ty in [CacheType::F32, CacheType::F16, CacheType::BF16] {
        let k = Kernels::new(&ctx, ty).unwrap();
        for (heads, lora, rd, nope, n, pos0, slots) in [
            (3, 20, 6, 5, 4, 3, 1),
            (2, 64, 16, 32, 1, 70, 1),
            (1, 7, 2, 3, 9, 0, 1),
            (2, 20, 6, 5, 7, 2, 3),
        ] {
            let (qk, row) = (nope + rd, lora + rd);
            let cap = pos0 + n + 2;
            let scale = 0.3f32;
            let rows = rand(slots * cap * row, 7);
            let q = rand(n * heads * qk, 8);
            let qa = rand(n * heads * lora, 9);
            let (cb, crow) = gpu_cache(&ctx, &k, ty, row, slots * cap, &rows);
            let mut kv = KvCache::new(ty, 1, row, slots * cap);
            for (p, r) in rows.chunks(row).enumerate() {
                kv.write(0, p, r);
            }
            let mut cache = vec![0f32; slots * cap * row];
            for (p, r) in cache.chunks_mut(row).enumerate() {
                kv.read(0, p, r);
            }
            let toks: Vec<(usize, usize)> = (0..n).map(|t| ((t % slots) * cap, pos0 + t)).collect();
            let tok = tok_table(&ctx, toks.iter().copied());
            let qb = ctx.upload_f32("q", &q).unwrap();
            let qab = ctx.upload_f32("qa", &qa).unwrap();
            let sb = ctx.alloc_f32("s", n * heads * cap).unwrap();
            let lb = ctx.alloc_f32("l", n * heads * lora).unwrap();
            let scores = Op::new(
                &ctx,
                &k.scores,
                &[(1, &qab), (2, &qb), (3, &cb), (4, &sb), (9, &tok)],
            )
            .unwrap();
            let softmax = Op::new(&ctx, &k.softmax, &[(1, &sb), (2, &tok)]).unwrap();
            let latent =
                Op::new(&ctx, &k.latent, &[(3, &cb), (5, &sb), (6, &lb), (9, &tok)]).unwrap();
            let w = att_words(n, heads, lora, rd, nope, scale, cap, crow);
            run(&ctx, |e| {
                scores.encode(
                    &ctx,
                    e,
                    &w,
                    (((pos0 + n) as u32).div_ceil(64), heads as u32, n as u32),
                );
                softmax.encode(
                    &ctx,
                    e,
                    &[(n * heads) as u32, cap as u32, heads as u32, 0, 2, 1, 1],
                    ((n * heads) as u32, 1, 1),
                );
                latent.encode(
                    &ctx,
                    e,
                    &w,
                    ((lora as u32).div_ceil(64), heads as u32, n as u32),
                );
            });
            let mut want = vec![0f32; n * heads * lora];
            for (t, &(base, pos)) in toks.iter().enumerate() {
                for h in 0..heads {
                    let th = t * heads + h;
                    let qh = &qa[th * lora..(th + 1) * lora];
                    let qpe = &q[th * qk + nope..(th + 1) * qk];
                    let rows_of = |p: usize| &cache[(base + p) * row..(base + p + 1) * row];
                    let mut s: Vec<f32> = (0..=pos)
                        .map(|p| {
                            let r = rows_of(p);
                            scale * (ops::dot(qh, &r[..lora]) + ops::dot(qpe, &r[lora..]))
                        })
                        .collect();
                    ops::softmax(&mut s);
                    let o = &mut want[th * lora..(th + 1) * lora];
                    for (p, &pr) in s.iter().enumerate() {
                        ops::axpy(o, pr, &rows_of(p)[..lora]);
                    }
                }
            }
            close(
                &ctx.read_f32(&lb, 0, want.len()).unwrap(),
                &want,
                1e-5,
                &format!("attention, {ty:?} cache"),
            );
        }
    }
}

/// The attention stage as the model runs it (`GpuAttention`: cache write, all heads' `k_b`
/// and `v_b` stacked into grouped products, scores, softmax, latent sum: one dispatch per
/// stage) against the CPU formula with `Matrix::matvec` per head: 3 heads of odd sizes, a
/// prefill chunk of 5, a decode step, a chunk of 4 (cache lengths 5, 6, 7..10), f32 and f16
/// caches. Bound 1e-5 · max |ref| (two chained products around the softmax, as for experts).
#[test]
fn attention_stage_runs_all_heads_at_once() {
    let Some(ctx) = ctx() else { return };
    let (heads, lora, rd, nope, vh, cap, nmax) = (3, 20, 6, 5, 7, 11, 5);
    let (qk, row) = (nope + rd, lora + rd);
    let mut rng = Rng(31);
    let k_b: Vec<Matrix> = (0..heads)
        .map(|_| random_matrix(QuantType::F16, lora, nope, &mut rng))
        .collect();
    let v_b: Vec<Matrix> = (0..heads)
        .map(|_| random_matrix(QuantType::F32, vh, lora, &mut rng))
        .collect();
    let alloc = |what, len| ctx.alloc_f32(what, len).unwrap();
    let (q, kv) = (alloc("q", nmax * heads * qk), alloc("kv", nmax * row));
    let (qabs, lat) = (
        alloc("qabs", nmax * heads * lora),
        alloc("lat", nmax * heads * lora),
    );
    let (scores, out) = (
        alloc("scores", nmax * heads * cap),
        alloc("out", nmax * heads * vh),
    );
    let tok = alloc("token table", nmax * 2);
    let bufs = AttnBufs {
        tok: &tok,
        q: &q,
        kv: &kv,
        qabs: &qabs,
        scores: &scores,
        lat: &lat,
        out: &out,
    };
    let mut act = ActBuf::default();
    for ty in [CacheType::F32, CacheType::F16] {
        let k = Kernels::new(&ctx, ty).unwrap();
        let shape = AttnShape {
            heads,
            lora,
            rd,
            nope,
            vh,
            scale: 0.3,
            capacity: cap,
            cache: ty,
        };
        let cb = ctx
            .create_buffer(
                "cache",
                (cap * cache_row(ty, row).1) as u64,
                wgpu::BufferUsages::STORAGE,
            )
            .unwrap();
        let att = GpuAttention::new(&ctx, &k, &k_b, &v_b, &cb, &bufs).unwrap();
        let mut cpu = KvCache::new(ty, 1, row, cap);
        let mut pos0 = 0;
        for (step, n) in [5usize, 1, 4].into_iter().enumerate() {
            let qs = rand(n * heads * qk, 40 + step as u64);
            let kvs = rand(n * row, 50 + step as u64);
            ctx.write_f32(&q, 0, &qs).unwrap();
            ctx.write_f32(&kv, 0, &kvs).unwrap();
            let words: Vec<u32> = (0..n).flat_map(|t| [0, (pos0 + t) as u32]).collect();
            ctx.write_f32(&tok, 0, bytemuck::cast_slice(&words))
                .unwrap();
            run(&ctx, |e| {
                att.encode(&ctx, e, &shape, &bufs, n, pos0 + n).unwrap()
            });
            for (t, r) in kvs.chunks(row).enumerate() {
                cpu.write(0, pos0 + t, r);
            }
            let mut cache = vec![0f32; (pos0 + n) * row];
            for (p, r) in cache.chunks_mut(row).enumerate() {
                cpu.read(0, p, r);
            }
            let mut want = vec![0f32; n * heads * vh];
            let (mut qa, mut l) = (vec![0f32; lora], vec![0f32; lora]);
            for t in 0..n {
                for h in 0..heads {
                    let th = t * heads + h;
                    let qt = &qs[th * qk..(th + 1) * qk];
                    k_b[h].matvec(&qt[..nope], &mut qa, &mut act);
                    let mut s: Vec<f32> = cache
                        .chunks(row)
                        .take(pos0 + t + 1)
                        .map(|r| {
                            0.3 * (ops::dot(&qa, &r[..lora]) + ops::dot(&qt[nope..], &r[lora..]))
                        })
                        .collect();
                    ops::softmax(&mut s);
                    l.fill(0.0);
                    for (r, &pr) in cache.chunks(row).zip(&s) {
                        ops::axpy(&mut l, pr, &r[..lora]);
                    }
                    v_b[h].matvec(&l, &mut want[th * vh..(th + 1) * vh], &mut act);
                }
            }
            let got = ctx.read_f32(&out, 0, want.len()).unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * scale,
                    "{ty:?} cache, {n} tokens at {pos0}: [{i}] gpu {g} cpu {w} (scale {scale})"
                );
            }
            pos0 += n;
        }
    }
}

fn random_matrix(ty: QuantType, rows: usize, cols: usize, rng: &mut Rng) -> Matrix {
    let mut data = Vec::new();
    for _ in 0..rows {
        data.extend(random_row(ty, cols, rng));
    }
    Matrix::new(ty, rows, cols, Bytes::from_vec(data)).unwrap()
}

/// `GpuExperts::eval_pairs` against `LocalExperts::eval_pairs`: experts of three types, a
/// missing expert, batches past `max_tokens` (several passes), tokens with 0..3 experts.
#[test]
fn gpu_experts_match_local_experts() {
    let Some(ctx) = ctx() else { return };
    let (h, inter, ne) = (96, 256, 6);
    let mut rng = Rng(11);
    let tys = [QuantType::Q8_0, QuantType::F32, QuantType::Q4_K];
    let experts = (0..ne)
        .map(|e| {
            (e != 4).then(|| {
                let ty = tys[e % 3];
                let hidden_ty = if ty == QuantType::Q4_K {
                    QuantType::Q8_0
                } else {
                    ty
                };
                Mlp {
                    gate: random_matrix(hidden_ty, inter, h, &mut rng),
                    up: random_matrix(hidden_ty, inter, h, &mut rng),
                    down: random_matrix(ty, h, inter, &mut rng),
                }
            })
        })
        .collect();
    let local = LocalExperts {
        hidden: h,
        layers: vec![None, Some(ExpertSet { experts })],
    };
    let gpu = GpuExperts::upload(ctx.clone(), &local, 3).unwrap();
    assert_eq!(gpu.max_tokens(), 3);
    let n = 7;
    let xs = rand(n * h, 12);
    let mut pairs = Vec::new();
    for t in 0..n as u32 {
        for e in [0u32, 1, 2, 3, 5] {
            if (t + e) % 3 != 0 && (t as usize + e as usize) < 9 {
                pairs.push(Pair {
                    token: t,
                    expert: e,
                    weight: 0.1 + 0.2 * e as f32,
                });
            }
        }
    }
    let mut want = rand(n * h, 13);
    let mut got = want.clone();
    local
        .eval_pairs(1, &xs, &pairs, &mut want, &mut MoeScratch::default())
        .unwrap();
    gpu.eval_pairs(1, &xs, &pairs, &mut got).unwrap();
    // Outputs reach ~100 here (random weights of order 1): bound the error by the largest.
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * scale,
            "experts [{i}] gpu {g} cpu {w} (scale {scale})"
        );
    }
    // A missing expert is refused and nothing is added.
    let before = got.clone();
    let bad = [Pair {
        token: 0,
        expert: 4,
        weight: 1.0,
    }];
    assert_eq!(
        gpu.eval_pairs(1, &xs, &bad, &mut got),
        Err(crate::model::moe::ExpertError::NotHeld {
            layer: 1,
            expert: 4
        })
    );
    assert_eq!(got, before);
}
