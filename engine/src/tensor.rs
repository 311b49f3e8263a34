//! Weight matrices as the model uses them: packed rows of any supported type, with the
//! activation-quantisation scratch they need, and the CPU matvec/matmul entry points.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::quant::{self, QuantError, QuantType};
use crate::Bytes;

static ACTIVATIONS: AtomicU8 = AtomicU8::new(Activations::F32 as u8);

/// The activation format of the CPU's quantized matrix products, for the whole process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Activations {
    /// f32: the weights are dequantised block by block inside the dot product (exact).
    #[default]
    F32 = 0,
    /// 16-bit integers per 256-value block (`QuantType::Q16_K`) for the K-quants that have an
    /// integer kernel on this CPU (Q4_K, Q5_K, Q6_K with AVX2): each value within 1/65024 of
    /// its block's largest; every other type stays f32.
    Int16 = 1,
    /// int8 per block as llama.cpp does (fastest; each value within 1/254 of its block's
    /// largest).
    Int8 = 2,
}

impl std::str::FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Activations::F32),
            "int16" => Ok(Activations::Int16),
            "int8" => Ok(Activations::Int8),
            other => Err(format!("unknown activations `{other}` (int16, f32, int8)")),
        }
    }
}

impl Activations {
    /// A phrase for logs and benchmark headers.
    pub fn describe(self) -> &'static str {
        match self {
            Activations::F32 => "f32 (exact)",
            Activations::Int16 => "int16 per block for the K-quants, f32 for the rest",
            Activations::Int8 => "int8 per block",
        }
    }
}

/// Chooses the activation format of quantized matrix products for the whole process. Set it
/// once, before any computation.
pub fn set_activations(a: Activations) {
    ACTIVATIONS.store(a as u8, Ordering::Relaxed);
}

/// The format [`set_activations`] chose.
pub fn activations() -> Activations {
    match ACTIVATIONS.load(Ordering::Relaxed) {
        x if x == Activations::Int16 as u8 => Activations::Int16,
        x if x == Activations::Int8 as u8 => Activations::Int8,
        _ => Activations::F32,
    }
}

/// Block edge of the official FP8 checkpoint's `weight_scale_inv` grid.
pub const FP8_BLOCK: usize = 128;

/// A `rows x cols` weight matrix `W[out, in]` stored as packed rows.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    /// Bytes of one row.
    pub row_bytes: usize,
    /// `rows * row_bytes` bytes.
    pub data: Bytes,
    /// For `F8E4M3` only: the `ceil(rows/128) x ceil(cols/128)` grid of multipliers.
    pub block_scales: Option<Arc<[f32]>>,
}

impl Matrix {
    /// A matrix over `data`, checking that the size matches the shape and the type is usable.
    pub fn new(ty: QuantType, rows: usize, cols: usize, data: Bytes) -> Result<Self, QuantError> {
        if !ty.is_supported() || matches!(ty, QuantType::Q8_1 | QuantType::Q8_K) {
            return Err(QuantError::Unsupported(ty.name()));
        }
        let row_bytes = ty.row_bytes(cols)?;
        let expected = row_bytes * rows;
        if data.len() != expected {
            return Err(QuantError::BadLength {
                ty: ty.name(),
                got: data.len(),
                expected,
            });
        }
        Ok(Matrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
            block_scales: None,
        })
    }

    /// An FP8 matrix with its block-scale grid (row-major, `ceil(rows/128) x ceil(cols/128)`).
    pub fn new_fp8(
        rows: usize,
        cols: usize,
        data: Bytes,
        scales: Vec<f32>,
    ) -> Result<Self, QuantError> {
        let mut m = Matrix::new(QuantType::F8E4M3, rows, cols, data)?;
        let expected = rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK);
        if scales.len() != expected {
            return Err(QuantError::BadLength {
                ty: "F8_E4M3 scales",
                got: scales.len(),
                expected,
            });
        }
        m.block_scales = Some(scales.into());
        Ok(m)
    }

    /// The packed bytes of row `r`.
    #[inline]
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// The FP8 scales that apply to row `r` (one per 128 columns), if this is an FP8 matrix.
    #[inline]
    pub fn row_scales(&self, r: usize) -> Option<&[f32]> {
        let s = self.block_scales.as_ref()?;
        let nb = self.cols.div_ceil(FP8_BLOCK);
        let br = r / FP8_BLOCK;
        Some(&s[br * nb..(br + 1) * nb])
    }

    /// Format the activations take for this matrix, per [`activations`]: f32 (weights are
    /// dequantised block by block inside the dot product, which is exact), `Q16_K` for the
    /// K-quants that take it, or the type's int8 `vec_dot_type` (ggml's scheme). FP8 matrices
    /// and float weights always take f32.
    pub fn act_type(&self) -> QuantType {
        if self.block_scales.is_some() {
            return QuantType::F32;
        }
        match activations() {
            Activations::F32 => QuantType::F32,
            Activations::Int16 if quant::takes_q16_k(self.ty) => QuantType::Q16_K,
            Activations::Int16 => QuantType::F32,
            Activations::Int8 => self.ty.vec_dot_type(),
        }
    }

    /// Dequantises row `r` into `dst` (`cols` elements).
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) -> Result<(), QuantError> {
        match self.row_scales(r) {
            Some(scales) => {
                quant::fp8::dequantize_row(self.row(r), scales, dst);
                Ok(())
            }
            None => quant::dequantize_row(self.ty, self.row(r), dst),
        }
    }

    /// The whole matrix as f32, row-major (for load-time transforms of small tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>, QuantError> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, dst)?;
        }
        Ok(out)
    }

    /// `out = W · x` for one activation vector, multi-threaded.
    pub fn matvec(&self, x: &[f32], out: &mut [f32], scratch: &mut ActBuf) {
        debug_assert_eq!(x.len(), self.cols);
        debug_assert_eq!(out.len(), self.rows);
        let xq = scratch.quantize(self.act_type(), x, self.cols, 1);
        crate::cpu::matvec(self, xq, out);
    }

    /// `out[t] = W · xs[t]` for `n` activation rows (`xs` is `n x cols`, `out` is `n x rows`).
    pub fn matmul(&self, xs: &[f32], n: usize, out: &mut [f32], scratch: &mut ActBuf) {
        debug_assert_eq!(xs.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        let xq = scratch.quantize(self.act_type(), xs, self.cols, n);
        crate::cpu::matmul(self, xq, n, out);
    }
}

/// Reusable buffer for quantised activations (no allocation once warmed up).
#[derive(Default)]
pub struct ActBuf {
    buf: Vec<Line>,
    tasks: Vec<(u32, u32, u32)>,
}

impl ActBuf {
    /// Quantises `n` rows of `cols` values to `ty` and returns the packed rows; f32 activations
    /// are handed through as they are, without a copy.
    pub fn quantize<'a>(
        &'a mut self,
        ty: QuantType,
        xs: &'a [f32],
        cols: usize,
        n: usize,
    ) -> &'a [u8] {
        if ty == QuantType::F32 {
            return bytemuck::cast_slice(&xs[..cols * n]);
        }
        let rb = ty
            .row_bytes(cols)
            .expect("matrix shapes are checked at load time");
        let bytes = lines(&mut self.buf, rb * n);
        let seg = QuantSeg {
            ty,
            src: xs.as_ptr(),
            dst: bytes.as_mut_ptr(),
            cols,
            rb,
            n,
        };
        // SAFETY: `xs` holds `n` rows of `cols` values and `bytes` `n` rows of `rb` bytes.
        unsafe { quantize_segments(&[seg], &mut self.tasks) };
        &bytes[..rb * n]
    }
}

/// 64 bytes on a 64-byte boundary: what quantised activations are stored in, so that every
/// row of a type whose rows are whole cache lines (Q16_K: 576 bytes a block) starts on one and
/// the 16-bit kernels' 32-byte loads never straddle two lines (about 5-10% of their speed).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

// SAFETY: plain bytes, no padding (64 bytes at alignment 64).
unsafe impl bytemuck::Zeroable for Line {}
unsafe impl bytemuck::Pod for Line {}

/// The first `len` bytes of `buf`, grown (zeroed) to hold them.
fn lines(buf: &mut Vec<Line>, len: usize) -> &mut [u8] {
    let n = len.div_ceil(64);
    if buf.len() < n {
        buf.resize(n, Line([0; 64]));
    }
    &mut bytemuck::cast_slice_mut(&mut buf[..n])[..len]
}

/// Rows of activations to quantise: `n` rows of `cols` f32 at `src` into rows of `rb` bytes
/// of `ty` at `dst`.
#[derive(Clone, Copy)]
struct QuantSeg {
    ty: QuantType,
    src: *const f32,
    dst: *mut u8,
    cols: usize,
    rb: usize,
    n: usize,
}

/// Quantises every segment, spread over the kernels' pool when there is enough of it (a
/// prefill's activations: serial, this was the largest part of the time one thread spent
/// alone). `tasks` is scratch.
///
/// # Safety
/// Each segment's `src` must be valid for `n * cols` reads and `dst` for `n * rb` writes,
/// no destination overlapping another or any source.
unsafe fn quantize_segments(segs: &[QuantSeg], tasks: &mut Vec<(u32, u32, u32)>) {
    let run = |k: usize, r0: usize, r1: usize| {
        let g = segs[k];
        for r in r0..r1 {
            // SAFETY: row `r < n` of the segment, per the caller's contract.
            let (src, dst) = unsafe {
                (
                    std::slice::from_raw_parts(g.src.add(r * g.cols), g.cols),
                    std::slice::from_raw_parts_mut(g.dst.add(r * g.rb), g.rb),
                )
            };
            quant::quantize_activation(g.ty, src, dst).expect("activation type is quantisable");
        }
    };
    let total: usize = segs.iter().map(|g| g.n * g.cols).sum();
    let pool = crate::cpu::pool::global();
    if total < crate::cpu::pool::PARALLEL_VALUES || pool.threads() <= 1 {
        for (k, g) in segs.iter().enumerate() {
            run(k, 0, g.n);
        }
        return;
    }
    // Tasks of about a few thousand values each.
    tasks.clear();
    for (k, g) in segs.iter().enumerate() {
        let per = (4096 / g.cols.max(1)).max(1);
        let mut r0 = 0;
        while r0 < g.n {
            let r1 = (r0 + per).min(g.n);
            tasks.push((k as u32, r0 as u32, r1 as u32));
            r0 = r1;
        }
    }
    let tasks = &*tasks;
    pool.for_each(tasks.len(), |i| {
        let (k, r0, r1) = tasks[i];
        run(k as usize, r0 as usize, r1 as usize);
    });
}

/// `QuantSeg` holds raw pointers only for the length of `quantize_segments`.
unsafe impl Sync for QuantSeg {}

/// Reusable buffers of [`Group`]: quantised activations, the job list and the task list.
#[derive(Default)]
pub struct GroupBuf {
    /// Quantised activation rows, one segment per distinct (input, format), each starting on
    /// a cache line.
    buf: Vec<Line>,
    /// Per pushed product: its matrix, input, rows, output, and its activations' byte offset
    /// in `buf` (`usize::MAX`: f32, passed through).
    items: Vec<(crate::cpu::RawJob, *const f32, usize)>,
    jobs: Vec<crate::cpu::RawJob>,
    tasks: Vec<crate::cpu::Task>,
    segs: Vec<QuantSeg>,
    quant_tasks: Vec<(u32, u32, u32)>,
}

// SAFETY: the raw pointers in `items` and `jobs` are only set and read inside a `Group`'s
// lifetime (cleared before a group starts and after it runs).
unsafe impl Send for GroupBuf {}
unsafe impl Sync for GroupBuf {}

impl GroupBuf {
    /// Starts a group of products that run in one pool dispatch.
    pub fn group(&mut self) -> Group<'_> {
        self.items.clear();
        Group {
            b: self,
            _borrows: std::marker::PhantomData,
        }
    }
}

/// Several independent products (`out = W · xs` for `n` rows each) collected and then run in
/// one pool dispatch ([`Group::run`]): cheaper than one dispatch each when every product is
/// small (decode's per-expert matvecs). Inputs shared by several products are quantised once.
pub struct Group<'a> {
    b: &'a mut GroupBuf,
    _borrows: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> Group<'a> {
    /// Adds `out[t] = W · xs[t]` for `n` rows (`xs` is `n x cols`, `out` is `n x rows`).
    pub fn push(&mut self, w: &'a Matrix, xs: &'a [f32], n: usize, out: &'a mut [f32]) {
        assert_eq!(xs.len(), n * w.cols, "group product input");
        assert_eq!(out.len(), n * w.rows, "group product output");
        let job = crate::cpu::RawJob {
            w,
            xq: std::ptr::null(),
            xq_len: 0,
            n,
            out: out.as_mut_ptr(),
        };
        self.b.items.push((job, xs.as_ptr(), xs.len()));
    }

    /// Runs every pushed product.
    pub fn run(self) {
        let b = &mut *self.b;
        // Byte offsets of the quantised inputs, one segment per distinct (input, format).
        let mut total = 0usize;
        let n_items = b.items.len();
        for k in 0..n_items {
            let (job, xs, xs_len) = b.items[k];
            // SAFETY: `job.w` borrows a matrix for 'a.
            let w = unsafe { &*job.w };
            let ty = w.act_type();
            let off = if ty == QuantType::F32 {
                usize::MAX
            } else if let Some(prev) = b.items[..k].iter().position(|&(pj, px, pl)| {
                px == xs && pl == xs_len && unsafe { (*pj.w).act_type() } == ty
            }) {
                b.items[prev].0.xq_len
            } else {
                let rb = ty
                    .row_bytes(w.cols)
                    .expect("matrix shapes are checked at load time");
                let at = total;
                total += (rb * job.n).next_multiple_of(64);
                at
            };
            // `xq_len` holds the offset until the buffer exists.
            b.items[k].0.xq_len = off;
        }
        let bytes = lines(&mut b.buf, total);
        let base = bytes.as_mut_ptr();
        b.jobs.clear();
        b.segs.clear();
        for k in 0..n_items {
            let (mut job, xs, xs_len) = b.items[k];
            // SAFETY: `job.w` borrows a matrix for 'a.
            let w = unsafe { &*job.w };
            let ty = w.act_type();
            let off = job.xq_len;
            if off == usize::MAX {
                job.xq = xs as *const u8;
                job.xq_len = xs_len * 4;
            } else {
                let rb = ty
                    .row_bytes(w.cols)
                    .expect("matrix shapes are checked at load time");
                let len = rb * job.n;
                // An earlier product with the same segment quantises it already.
                let first = b.items[..k].iter().all(|&(pj, _, _)| pj.xq_len != off);
                // SAFETY: segments are disjoint ranges of `buf`.
                let dst = unsafe { base.add(off) };
                if first {
                    b.segs.push(QuantSeg {
                        ty,
                        src: xs,
                        dst,
                        cols: w.cols,
                        rb,
                        n: job.n,
                    });
                }
                job.xq = dst;
                job.xq_len = len;
            }
            b.jobs.push(job);
        }
        // SAFETY: each segment's input is `n x cols` (checked by `push`) and its destination
        // its own range of `buf`.
        unsafe { quantize_segments(&b.segs, &mut b.quant_tasks) };
        // SAFETY: every matrix, input and output is borrowed for 'a (outputs mutably, so they
        // are disjoint from each other and from every input); the quantised inputs live in
        // `buf`, untouched until the dispatch returns.
        unsafe { crate::cpu::matmul_group(&b.jobs, &mut b.tasks) };
        b.items.clear();
        b.jobs.clear();
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        self.b.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quantised activation rows start on cache lines: the line buffer at any length, and so
    /// every Q16_K row (whole lines) of a product's activations.
    #[test]
    fn quantised_rows_start_on_cache_lines() {
        let cols = 512;
        let x: Vec<f32> = (0..3 * cols).map(|i| (i % 17) as f32 - 8.0).collect();
        let rb = QuantType::Q16_K.row_bytes(cols).unwrap();
        assert_eq!(rb % 64, 0);
        let mut act = ActBuf::default();
        let q = act.quantize(QuantType::Q16_K, &x, cols, 3);
        assert_eq!(q.len(), 3 * rb);
        assert_eq!(q.as_ptr() as usize % 64, 0);

        let mut lines_buf = Vec::new();
        for len in [0, 1, 63, 64, 65, 1000] {
            let b = lines(&mut lines_buf, len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % 64, 0);
        }
    }
}
