//! The CPU backend's matrix kernels: threaded matvec (decode) and matmul (prefill) over packed
//! weight rows, calling the quant layer's dot products.
//!
//! Work is split by output rows into contiguous chunks (a few per thread, so a thread that
//! is descheduled on a busy machine does not hold up the call: the others steal its chunks).
//! Each chunk streams its rows once, front to back, which keeps the hardware prefetchers busy.
//! The dot kernel is resolved once per call, not per row.
//!
//! `matmul` walks each chunk in tiles of rows small enough to stay in L1/L2 and runs every
//! activation row against a tile before moving on, so weights come from memory once per call
//! however many tokens there are; `matmul` with `n == 1` is `matvec`.
//!
//! This module knows nothing about the model: it sees a [`Matrix`] and packed activations.

pub mod pool;

use crate::quant::f32dot::{self, MULTI_MAX};
use crate::quant::{self, MultiDotFn, QuantType, Tile};

/// A row kernel: `(n, weight row bytes, activation row bytes) -> dot`.
type DotFn = fn(usize, &[u8], &[u8]) -> f32;
/// Rows per call of a multi-token kernel in `matmul` (its results pass through a buffer on
/// the stack, as other threads own the rows in between in the output).
const SUB_ROWS: usize = 64;
/// Tokens per pass of a multi-token integer kernel.
#[cfg(target_arch = "x86_64")]
const MULTI_I8: usize = quant::avx2::MULTI;
#[cfg(not(target_arch = "x86_64"))]
const MULTI_I8: usize = 8;
use crate::tensor::Matrix;

/// Rows per chunk are a multiple of this (64 bytes of f32 output: no false sharing).
const ROW_ALIGN: usize = 16;
/// Chunks per thread: enough for stealing to even out a slow thread, few enough to be cheap.
const CHUNKS_PER_THREAD: usize = 8;
/// Below this many weight bytes a product runs on the calling thread: splitting costs more.
const PARALLEL_MIN_BYTES: usize = 64 * 1024;
/// Weight bytes of one `matmul` row tile (stays in L2 while every token passes over it).
const TILE_BYTES: usize = 64 * 1024;

/// `out[r] = W[r] · x` where `xq` is `x` already in `w.act_type()` format.
pub fn matvec(w: &Matrix, xq: &[u8], out: &mut [f32]) {
    debug_assert_eq!(out.len(), w.rows);
    let dot = RowDot::new(w);
    let pool = pool::global();
    let chunk = chunk_rows(w, pool.threads());
    if chunk >= w.rows {
        dot.rows(0, xq, out);
        return;
    }
    let rows = w.rows;
    let out = SharedOut(out.as_mut_ptr(), out.len());
    pool.for_each(rows.div_ceil(chunk), |c| {
        let r0 = c * chunk;
        let len = chunk.min(rows - r0);
        // SAFETY: chunks are disjoint row ranges.
        dot.rows(r0, xq, unsafe { out.slice(r0, len) });
    });
}

/// `out[t * rows + r] = W[r] · x_t` for `n` activation rows packed back to back in `xq`.
pub fn matmul(w: &Matrix, xq: &[u8], n: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), n * w.rows);
    if n == 0 {
        return;
    }
    if n == 1 {
        return matvec(w, xq, out);
    }
    let dot = RowDot::new(w);
    let pool = pool::global();
    let chunk = chunk_rows(w, pool.threads());
    let nchunks = w.rows.div_ceil(chunk);
    let out = SharedOut(out.as_mut_ptr(), out.len());
    pool.for_each(nchunks, |c| {
        let end = ((c + 1) * chunk).min(w.rows);
        // SAFETY: chunks are disjoint row ranges.
        unsafe { run_rows(&dot, xq, n, c * chunk, end, &out) };
    });
}

/// One product of a [`matmul_group`], by raw parts (the caller keeps them alive and
/// unaliased): `out[t * rows + r] = W[r] · x_t` for `n` activation rows in `xq` (already in
/// `w.act_type()` format), `out` being `n * w.rows` floats.
#[derive(Clone, Copy)]
pub(crate) struct RawJob {
    pub w: *const Matrix,
    pub xq: *const u8,
    pub xq_len: usize,
    pub n: usize,
    pub out: *mut f32,
}

// SAFETY: the pointers are only dereferenced during `matmul_group`, whose caller guarantees
// they are valid and that outputs do not overlap.
unsafe impl Sync for RawJob {}
unsafe impl Send for RawJob {}

/// A row range of one job of a group.
#[derive(Clone, Copy)]
pub(crate) struct Task {
    job: u32,
    r0: u32,
    r1: u32,
}

/// Runs several independent products in one pool dispatch: every job is cut into row chunks
/// sized by the group's total weight bytes, and the threads claim chunks from one list. Each
/// job's result equals its own [`matmul`]'s (the same kernels per row). `tasks` is scratch.
///
/// # Safety
/// Every job's matrix, activations and output must be valid for the call, and no two outputs
/// may overlap each other or any input.
pub(crate) unsafe fn matmul_group(jobs: &[RawJob], tasks: &mut Vec<Task>) {
    let pool = pool::global();
    let threads = pool.threads();
    // A job's cost: its weight bytes times its tokens (each token passes over every byte).
    let cost = |j: &RawJob| (*j.w).rows * (*j.w).row_bytes * j.n;
    let total: usize = jobs.iter().map(cost).sum();
    tasks.clear();
    // Chunk cost: a few chunks per thread over the whole group (whole jobs when small), so
    // a job with many tokens is cut finer than one with few and the threads finish together.
    let serial = threads <= 1 || total < PARALLEL_MIN_BYTES;
    let target = (total / (threads * CHUNKS_PER_THREAD)).max(PARALLEL_MIN_BYTES / 4);
    for (k, j) in jobs.iter().enumerate() {
        let w = &*j.w;
        if j.n == 0 || w.rows == 0 {
            continue;
        }
        let chunk = if serial {
            w.rows
        } else {
            (target / (w.row_bytes * j.n).max(1))
                .next_multiple_of(ROW_ALIGN)
                .clamp(1, w.rows)
        };
        let mut r0 = 0;
        while r0 < w.rows {
            let r1 = (r0 + chunk).min(w.rows);
            tasks.push(Task {
                job: k as u32,
                r0: r0 as u32,
                r1: r1 as u32,
            });
            r0 = r1;
        }
    }
    let tasks = &*tasks;
    let run = |i: usize| {
        let t = tasks[i];
        let j = jobs[t.job as usize];
        let w = &*j.w;
        let dot = RowDot::new(w);
        let xq = std::slice::from_raw_parts(j.xq, j.xq_len);
        let out = SharedOut(j.out, j.n * w.rows);
        run_rows(&dot, xq, j.n, t.r0 as usize, t.r1 as usize, &out);
    };
    if serial {
        (0..tasks.len()).for_each(run);
    } else {
        pool.for_each(tasks.len(), run);
    }
}

/// Rows `r0..end` of `W · x_t` for the `n` activation rows in `xq`, into `out` (laid out
/// `n x rows`). Walks the rows in tiles that stay in cache while every token passes.
///
/// # Safety
/// No other thread may write rows `r0..end` of `out` meanwhile.
unsafe fn run_rows(dot: &RowDot, xq: &[u8], n: usize, r0: usize, end: usize, out: &SharedOut) {
    let w = dot.w;
    if n == 1 {
        dot.rows(r0, xq, out.slice(r0, end - r0));
        return;
    }
    let arb = xq.len() / n;
    let tile = (TILE_BYTES / w.row_bytes.max(1)).max(1);
    let mut r0 = r0;
    while r0 < end {
        let r1 = (r0 + tile).min(end);
        if let Kind::Portable(ty) = dot.kind {
            // Quantized rows: each block is unpacked once for up to MULTI_MAX tokens.
            let xf: &[f32] = bytemuck::cast_slice(xq);
            let cols = w.cols;
            let mut t0 = 0;
            while t0 < n {
                let g = (n - t0).min(MULTI_MAX);
                let xs: [&[f32]; MULTI_MAX] = std::array::from_fn(|i| {
                    if i < g {
                        &xf[(t0 + i) * cols..(t0 + i + 1) * cols]
                    } else {
                        &[]
                    }
                });
                let mut res = [0f32; MULTI_MAX];
                for r in r0..r1 {
                    f32dot::vec_dot_f32_multi(ty, w.row(r), &xs[..g], &mut res[..g]);
                    for (i, &v) in res[..g].iter().enumerate() {
                        out.slice((t0 + i) * w.rows + r, 1)[0] = v;
                    }
                }
                t0 += g;
            }
            r0 = r1;
            continue;
        }
        if let Kind::Multi(multi, width) = dot.kind {
            // Integer kernels: each weight block is unpacked once for up to `width` tokens,
            // `SUB_ROWS` rows per call. The same calls whatever `n` is, so a token's result
            // does not depend on the others.
            let rb = w.row_bytes;
            let mut buf = [0f32; MULTI_I8 * SUB_ROWS];
            let mut s0 = r0;
            while s0 < r1 {
                let s1 = (s0 + SUB_ROWS).min(r1);
                let len = s1 - s0;
                let mut t0 = 0;
                while t0 < n {
                    let g = (n - t0).min(width);
                    let tile = Tile {
                        cols: w.cols,
                        w: &dot.data[s0 * rb..s1 * rb],
                        row_bytes: rb,
                        a: &xq[t0 * arb..],
                        stride: arb,
                        tokens: g,
                        out_stride: len,
                    };
                    multi(&tile, &mut buf[..g * len]);
                    for (i, res) in buf[..g * len].chunks_exact(len).enumerate() {
                        out.slice((t0 + i) * w.rows + s0, len).copy_from_slice(res);
                    }
                    t0 += g;
                }
                s0 = s1;
            }
            r0 = r1;
            continue;
        }
        for t in 0..n {
            let x = &xq[t * arb..(t + 1) * arb];
            let o = out.slice(t * w.rows + r0, r1 - r0);
            dot.rows(r0, x, o);
        }
        r0 = r1;
    }
}

/// Rows per parallel chunk for `w` (all of them when the matrix is too small to split).
fn chunk_rows(w: &Matrix, threads: usize) -> usize {
    let bytes = w.rows * w.row_bytes;
    if threads <= 1 || bytes < PARALLEL_MIN_BYTES {
        return w.rows.max(1);
    }
    let per = w.rows.div_ceil(threads * CHUNKS_PER_THREAD);
    per.next_multiple_of(ROW_ALIGN).min(w.rows).max(1)
}

/// An output buffer written from several threads at disjoint indices.
struct SharedOut(*mut f32, usize);

// SAFETY: only used to hand disjoint sub-slices to parallel tasks.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// No two live slices may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// One weight matrix's row dot product, with the kernel chosen once.
struct RowDot<'a> {
    w: &'a Matrix,
    data: &'a [u8],
    kind: Kind,
}

enum Kind {
    /// A SIMD kernel for this CPU, one row at a time.
    Fast(DotFn),
    /// Integer activations (int8, or Q16_K) through a kernel that takes several tokens per
    /// weight pass and a whole row range per call, with the number of tokens it takes best
    /// (at most `MULTI_I8`).
    Multi(MultiDotFn, usize),
    /// `quant::vec_dot_f32`: blocks dequantised against f32 activations.
    Portable(QuantType),
    /// `quant::vec_dot` against activations in the type's int8 `vec_dot_type`.
    PortableInt8(QuantType),
    /// FP8 rows with block scales and f32 activations.
    Fp8,
}

impl<'a> RowDot<'a> {
    fn new(w: &'a Matrix) -> Self {
        let act = w.act_type();
        let kind = if w.block_scales.is_some() {
            Kind::Fp8
        } else if act == QuantType::Q16_K {
            let (f, width) =
                fast_kernel_q16(w.ty).expect("Q16_K is taken only where the kernel exists");
            Kind::Multi(f, width)
        } else if act == QuantType::F32 {
            match w.ty {
                // Float weights: the SIMD kernels take f32 activations directly.
                QuantType::F32 | QuantType::F16 | QuantType::BF16 => match fast_kernel(w.ty) {
                    Some(f) => Kind::Fast(f),
                    None => Kind::Portable(w.ty),
                },
                // Quantized weights: dequantised block by block against f32 activations.
                ty => Kind::Portable(ty),
            }
        } else {
            // Int8 activations (ggml's scheme): integer kernels.
            match (fast_kernel_multi(w.ty), fast_kernel(w.ty)) {
                (Some((f, width)), _) => Kind::Multi(f, width),
                (None, Some(f)) => Kind::Fast(f),
                (None, None) => Kind::PortableInt8(w.ty),
            }
        };
        RowDot {
            w,
            data: &w.data,
            kind,
        }
    }

    /// `out[i] = W[r0 + i] · x` for `i in 0..out.len()`.
    #[inline]
    fn rows(&self, r0: usize, x: &[u8], out: &mut [f32]) {
        let (n, rb) = (self.w.cols, self.w.row_bytes);
        let rows = &self.data[r0 * rb..(r0 + out.len()) * rb];
        match self.kind {
            Kind::Multi(multi, _) => {
                // The whole row range in one call.
                let tile = Tile {
                    cols: n,
                    w: rows,
                    row_bytes: rb,
                    a: x,
                    stride: x.len(),
                    tokens: 1,
                    out_stride: out.len(),
                };
                multi(&tile, out)
            }
            Kind::Fast(f) => {
                for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                    *o = f(n, row, x);
                }
            }
            Kind::Portable(ty) => {
                let xf: &[f32] = bytemuck::cast_slice(x);
                for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                    *o = quant::vec_dot_f32(ty, row, xf);
                }
            }
            Kind::PortableInt8(ty) => {
                for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                    *o = quant::vec_dot(ty, n, row, x);
                }
            }
            Kind::Fp8 => {
                let xf: &[f32] = bytemuck::cast_slice(x);
                for (i, (o, row)) in out.iter_mut().zip(rows.chunks_exact(rb)).enumerate() {
                    let scales = self.w.row_scales(r0 + i).expect("FP8 matrix has scales");
                    *o = fp8_dot(row, scales, xf);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn fast_kernel(ty: QuantType) -> Option<DotFn> {
    quant::avx2::kernel(ty)
}

#[cfg(not(target_arch = "x86_64"))]
fn fast_kernel(_ty: QuantType) -> Option<DotFn> {
    None
}

#[cfg(target_arch = "x86_64")]
fn fast_kernel_multi(ty: QuantType) -> Option<(MultiDotFn, usize)> {
    quant::avx2::kernel_multi(ty)
}

#[cfg(not(target_arch = "x86_64"))]
fn fast_kernel_multi(_ty: QuantType) -> Option<(MultiDotFn, usize)> {
    None
}

#[cfg(target_arch = "x86_64")]
fn fast_kernel_q16(ty: QuantType) -> Option<(MultiDotFn, usize)> {
    quant::avx2::kernel_q16(ty)
}

#[cfg(not(target_arch = "x86_64"))]
fn fast_kernel_q16(_ty: QuantType) -> Option<(MultiDotFn, usize)> {
    None
}

#[inline]
fn fp8_dot(row: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = quant::avx2::fp8_dot_row(row, scales, x) {
        return v;
    }
    quant::fp8::dot_row(row, scales, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{random_f32, random_weights};
    use crate::Bytes;

    fn matrix(ty: QuantType, rows: usize, cols: usize, seed: u64) -> Matrix {
        let data = random_weights(ty, rows * cols, seed);
        Matrix::new(ty, rows, cols, Bytes::from_vec(data)).unwrap()
    }

    /// Runs `f` with the kernels' pool at `threads` threads (tests share the global pool, so
    /// they take turns).
    fn with_threads(threads: usize, f: impl FnOnce()) {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _t = TURN.lock().unwrap_or_else(|e| e.into_inner());
        pool::set_threads(threads);
        f();
    }

    /// Every row against `quant::vec_dot`, one thread and several, small and split matrices.
    #[test]
    fn matvec_matches_rowwise_dots() {
        for (ty, rows, cols) in [
            (QuantType::Q4_K, 3, 256),
            (QuantType::Q4_K, 200, 2048),
            (QuantType::Q6_K, 77, 1024),
            (QuantType::Q8_0, 300, 512),
            (QuantType::F32, 50, 100),
        ] {
            let w = matrix(ty, rows, cols, 1);
            let x = random_f32(cols, 2);
            let xq: &[u8] = bytemuck::cast_slice(&x);
            let want: Vec<f32> = (0..rows)
                .map(
                    |r| match fast_kernel(ty).filter(|_| matches!(ty, QuantType::F32)) {
                        Some(f) => f(cols, w.row(r), xq),
                        None => quant::vec_dot_f32(ty, w.row(r), &x),
                    },
                )
                .collect();
            for threads in [1, 3] {
                let mut out = vec![f32::NAN; rows];
                with_threads(threads, || matvec(&w, xq, &mut out));
                assert_eq!(out, want, "{ty} {rows}x{cols}, {threads} threads");
            }
        }
    }

    #[test]
    fn matmul_is_matvec_per_token() {
        for (ty, rows, cols, n) in [
            (QuantType::Q4_K, 300, 512, 5),
            (QuantType::Q8_0, 40, 256, 3),
            (QuantType::Q6_K, 1000, 256, 2),
            // Rows large enough that a chunk spans several tiles.
            (QuantType::Q8_0, 200, 16384, 2),
        ] {
            let w = matrix(ty, rows, cols, 3);
            let arb = 4 * cols;
            let xq: Vec<u8> = (0..n)
                .flat_map(|t| {
                    bytemuck::cast_slice::<f32, u8>(&random_f32(cols, 10 + t as u64)).to_vec()
                })
                .collect();
            for threads in [1, 2, 3] {
                with_threads(threads, || {
                    let mut out = vec![f32::NAN; rows * n];
                    matmul(&w, &xq, n, &mut out);
                    for t in 0..n {
                        let mut one = vec![f32::NAN; rows];
                        matvec(&w, &xq[t * arb..(t + 1) * arb], &mut one);
                        assert_eq!(bits(&out[t * rows..(t + 1) * rows]), bits(&one), "{ty} {t}");
                    }
                    let mut single = vec![f32::NAN; rows];
                    matmul(&w, &xq[..arb], 1, &mut single);
                    let mut one = vec![f32::NAN; rows];
                    matvec(&w, &xq[..arb], &mut one);
                    assert_eq!(single, one, "matmul with one token is matvec");
                });
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Batch invariance: each token's rows of a `matmul` are bit for bit its own `matvec`, for
    /// every weight type, in batches of 1 to 9 tokens (tiles of up to `MULTI_MAX` and a
    /// remainder) with every token at every position, on one thread and several.
    #[test]
    fn matmul_rows_are_batch_invariant() {
        use QuantType::*;
        let (rows, cols) = (48, 512);
        let fp8 = {
            let data: Vec<u8> = (0..rows * cols)
                .map(|i| crate::bench::splitmix(i as u64) as u8 & 0x77)
                .collect();
            let scales: Vec<f32> = (0..4).map(|k| 0.5 + k as f32).collect();
            Matrix::new_fp8(rows, cols, Bytes::from_vec(data), scales).unwrap()
        };
        let types = [
            Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, F32, F16, BF16,
        ];
        let mats = types
            .iter()
            .enumerate()
            .map(|(i, &ty)| matrix(ty, rows, cols, 20 + i as u64))
            .chain([fp8]);
        let xs: Vec<Vec<f32>> = (0..9).map(|t| random_f32(cols, 40 + t)).collect();
        for w in mats {
            assert_eq!(w.act_type(), QuantType::F32);
            let want: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| {
                    let mut o = vec![f32::NAN; rows];
                    matvec(&w, bytemuck::cast_slice(x), &mut o);
                    o
                })
                .collect();
            for threads in [1, 3] {
                with_threads(threads, || {
                    for n in 1..=xs.len() {
                        for shift in 0..n {
                            let order: Vec<usize> = (0..n).map(|i| (i + shift) % n).collect();
                            let batch: Vec<f32> =
                                order.iter().flat_map(|&k| xs[k].iter().copied()).collect();
                            let mut out = vec![f32::NAN; n * rows];
                            matmul(&w, bytemuck::cast_slice(&batch), n, &mut out);
                            for (p, &k) in order.iter().enumerate() {
                                assert_eq!(
                                    bits(&out[p * rows..(p + 1) * rows]),
                                    bits(&want[k]),
                                    "{} token {k} at {p} of {n}, {threads} threads",
                                    w.ty
                                );
                            }
                        }
                    }
                });
            }
        }
    }

    #[test]
    fn fp8_rows_use_their_block_scales() {
        let (rows, cols) = (260, 300);
        let data: Vec<u8> = (0..rows * cols)
            .map(|i| crate::bench::splitmix(i as u64) as u8 & 0x77)
            .collect();
        let scales: Vec<f32> = (0..3 * 3).map(|k| 1.0 + k as f32).collect();
        let w = Matrix::new_fp8(rows, cols, Bytes::from_vec(data), scales).unwrap();
        let x = random_f32(cols, 5);
        let xq: &[u8] = bytemuck::cast_slice(&x);
        let mut out = vec![0f32; rows];
        with_threads(2, || matvec(&w, xq, &mut out));
        let mut deq = vec![0f32; cols];
        for (r, &o) in out.iter().enumerate() {
            w.dequantize_row(r, &mut deq).unwrap();
            let want: f32 = deq.iter().zip(&x).map(|(a, b)| a * b).sum();
            let mag: f32 = deq.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            assert!((o - want).abs() <= 1e-5 * mag, "row {r}: {o} vs {want}");
        }
    }
}
