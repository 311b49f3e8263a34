//! Dot products of packed weight rows with f32 activations, dequantising each block in
//! registers: exact (every weight is the value `dequant` gives, bit for bit; only the summation
//! order differs from dequantise-then-dot), allocation-free, and fast enough to keep a threaded
//! matvec at memory bandwidth.
//!
//! `vec_dot_f32` dots one row with one vector; `vec_dot_f32_multi` dots one row with several
//! vectors, unpacking each block once and reusing it for every vector (prefill's matrix
//! product). On x86-64 CPUs with AVX2, FMA and F16C (checked once) the AVX2 kernels run;
//! everything else (other CPUs, F8E4M3, rows whose lengths break the caller's contract) takes
//! the portable path, which dequantises block by block on the stack.
//!
//! The AVX2 kernels share one shape: a block is unpacked with byte operations into signed 8-bit
//! quants on the stack plus one f32 scale (and, for formats with mins, one f32 bias) per
//! sub-block; then each group of 8 quants is widened to f32, turned into weights with one FMA
//! (`q * scale + bias`, the reference's own operation: `scale * q` is exact for every format
//! with a bias, so the fused form rounds the same way) and summed into per-vector accumulators
//! in one fixed order: a vector's result is bit for bit the same whether it is dotted alone or
//! together with up to seven others, in any position (what batched inference relies on).

use super::{dequant, QuantType, QK_K};

/// `w · x` for one packed row `w` of `x.len()` elements (a whole number of blocks: the
/// caller's contract, checked in debug builds). Uses AVX2 kernels when the CPU has them. Types
/// without a kernel (F8E4M3, IQ formats) give NaN.
#[inline]
pub fn vec_dot_f32(ty: QuantType, w: &[u8], x: &[f32]) -> f32 {
    debug_assert_eq!(Ok(w.len()), ty.row_bytes(x.len()), "{ty} row");
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() {
            if let Some([v]) = x86::dot::<1>(ty, w, [x]) {
                return v;
            }
        }
    }
    vec_dot_f32_generic(ty, w, x)
}

/// Most activation vectors one kernel call takes; `vec_dot_f32_multi` splits longer lists.
pub const MULTI_MAX: usize = 8;

/// `out[j] = w · xs[j]` for one packed row against several activation vectors of the same
/// length (`out.len() == xs.len()`), unpacking each weight block once for up to
/// [`MULTI_MAX`] vectors. Results equal `vec_dot_f32(ty, w, xs[j])` bit for bit (the same
/// weights summed in the same order), whatever the other vectors are.
pub fn vec_dot_f32_multi(ty: QuantType, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    debug_assert_eq!(xs.len(), out.len());
    for (xg, og) in xs.chunks(MULTI_MAX).zip(out.chunks_mut(MULTI_MAX)) {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::available() && x86::dot_group(ty, w, xg, og) {
                continue;
            }
        }
        for (x, o) in xg.iter().zip(og.iter_mut()) {
            *o = vec_dot_f32_generic(ty, w, x);
        }
    }
}

/// `out[j * out_stride + r] = row r · xs[j]` for `rows` packed rows of `row_bytes` bytes back
/// to back in `w`, against up to [`MULTI_MAX`] vectors of the same length: the rows of a small
/// matrix in one call (the per-call checks and dispatch once, not per row). Every result
/// equals `vec_dot_f32` of its row and vector bit for bit.
///
/// # Panics
/// When the lengths do not hold `rows` rows or the outputs.
pub fn vec_dot_f32_rows(
    ty: QuantType,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    xs: &[&[f32]],
    out: &mut [f32],
    out_stride: usize,
) {
    let g = xs.len();
    assert!(g <= MULTI_MAX, "at most {MULTI_MAX} vectors");
    if g == 0 || rows == 0 {
        return;
    }
    assert!(
        rows * row_bytes <= w.len(),
        "{rows} rows of {row_bytes} bytes"
    );
    assert!((g - 1) * out_stride + rows <= out.len() && (g == 1 || out_stride >= rows));
    #[cfg(target_arch = "x86_64")]
    {
        if x86::available() && x86::rows_group(ty, w, row_bytes, rows, xs, out, out_stride) {
            return;
        }
    }
    let mut res = [0f32; MULTI_MAX];
    for r in 0..rows {
        vec_dot_f32_multi(
            ty,
            &w[r * row_bytes..(r + 1) * row_bytes],
            xs,
            &mut res[..g],
        );
        for (j, &v) in res[..g].iter().enumerate() {
            out[j * out_stride + r] = v;
        }
    }
}

/// The portable path: dequantises one block (or 64 scalars) at a time on the stack, then dots
/// over 8 lanes. Rows of unsupported types give NaN.
pub fn vec_dot_f32_generic(ty: QuantType, w: &[u8], x: &[f32]) -> f32 {
    let be = ty.block_elems().max(1);
    let bb = ty.block_bytes();
    // Scalar types: dequantise in chunks of 64 elements.
    let (be, bb) = if be == 1 { (64, 64 * bb) } else { (be, bb) };
    let mut buf = [0f32; QK_K];
    let mut total = 0f32;
    for (wb, xb) in w.chunks(bb).zip(x.chunks(be)) {
        let d = &mut buf[..xb.len()];
        if dequant::dequantize_row(ty, wb, d).is_err() {
            return f32::NAN;
        }
        let mut acc = [0f32; 8];
        let (dc, xc) = (d.chunks_exact(8), xb.chunks_exact(8));
        let (dr, xr) = (dc.remainder(), xc.remainder());
        for (a, b) in dc.zip(xc) {
            for k in 0..8 {
                acc[k] += a[k] * b[k];
            }
        }
        total += acc.iter().sum::<f32>() + dr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::super::QuantType;
    use crate::quant::avx2::prefetch_ahead;

    /// Block `i` (of `size` bytes) of the row at `w`. With one vector (`N == 1`) there is
    /// little work per weight byte and memory latency shows, so the weights further on are
    /// asked for too, as the integer kernels do.
    #[inline(always)]
    unsafe fn block<const N: usize>(w: *const u8, size: usize, i: usize) -> *const u8 {
        let b = w.add(size * i);
        if N == 1 {
            prefetch_ahead(b, size);
        }
        b
    }

    /// `$arm!(k)` for `k = $n` in 1..=8 (a const generic per count), else `false`.
    macro_rules! by_count {
        ($n:expr, $arm:ident) => {
            match $n {
                1 => $arm!(1),
                2 => $arm!(2),
                3 => $arm!(3),
                4 => $arm!(4),
                5 => $arm!(5),
                6 => $arm!(6),
                7 => $arm!(7),
                8 => $arm!(8),
                _ => false,
            }
        };
    }

    /// Whether the CPU has AVX2, FMA and F16C (checked once).
    #[inline]
    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    /// Runs the kernel for `xs.len()` (1..=8) vectors; false when there is none for `ty`.
    pub fn dot_group(ty: QuantType, w: &[u8], xs: &[&[f32]], out: &mut [f32]) -> bool {
        macro_rules! arm {
            ($n:literal) => {{
                let xa: [&[f32]; $n] = std::array::from_fn(|j| xs[j]);
                match dot::<$n>(ty, w, xa) {
                    Some(r) => {
                        out.copy_from_slice(&r);
                        true
                    }
                    None => false,
                }
            }};
        }
        by_count!(xs.len(), arm)
    }

    /// A kernel of [`dot`]: `(row, blocks or, for float rows, elements, vectors) -> dots`.
    type Kernel<const N: usize> = unsafe fn(*const u8, usize, &[*const f32; N]) -> [f32; N];

    /// The kernel for `ty` with `N` vectors (its length argument counts blocks of
    /// `ty.block_elems()` elements: single elements for float rows).
    fn kernel<const N: usize>(ty: QuantType) -> Option<Kernel<N>> {
        use QuantType::*;
        let k: Kernel<N> = match ty {
            F32 => float::<N, 4>,
            F16 => float::<N, 2>,
            BF16 => float::<N, 3>,
            Q4_0 => q4_0::<N>,
            Q4_1 => q4_1::<N>,
            Q5_0 => q5_0::<N>,
            Q5_1 => q5_1::<N>,
            Q8_0 => q8_0::<N>,
            Q2_K => q2_k::<N>,
            Q3_K => q3_k::<N>,
            Q4_K => q4_k::<N>,
            Q5_K => q5_k::<N>,
            Q6_K => q6_k::<N>,
            _ => return None,
        };
        Some(k)
    }

    /// [`super::vec_dot_f32_rows`] (the caller has checked the row and output bounds and
    /// `available()`); false when there is no kernel for `ty` or the vectors' lengths do not
    /// suit it.
    pub fn rows_group(
        ty: QuantType,
        w: &[u8],
        rb: usize,
        rows: usize,
        xs: &[&[f32]],
        out: &mut [f32],
        os: usize,
    ) -> bool {
        macro_rules! arm {
            ($n:literal) => {{
                let (Some(kern), Some(len)) = (kernel::<$n>(ty), units(ty, xs, rb)) else {
                    return false;
                };
                let xp: [*const f32; $n] = std::array::from_fn(|j| xs[j].as_ptr());
                // SAFETY: features checked by the caller; every row is `rb` bytes, exactly the
                // `len` units the kernel reads, `rows` of them lie in `w` and every output
                // index below `(N - 1) * os + rows` in `out` (the caller's checks); each vector
                // holds as many values.
                unsafe { each_row(kern, w.as_ptr(), rb, rows, len, &xp, out.as_mut_ptr(), os) };
                true
            }};
        }
        by_count!(xs.len(), arm)
    }

    /// `out[j * os + r] = kern(row r)[j]` for `rows` rows `rb` bytes apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn each_row<const N: usize>(
        kern: Kernel<N>,
        w: *const u8,
        rb: usize,
        rows: usize,
        len: usize,
        xs: &[*const f32; N],
        out: *mut f32,
        os: usize,
    ) {
        for r in 0..rows {
            let v = kern(w.add(r * rb), len, xs);
            for (j, &x) in v.iter().enumerate() {
                *out.add(j * os + r) = x;
            }
        }
    }

    /// `Some([w · xs[j]])` when an AVX2 kernel exists for `ty` and the lengths agree (whole
    /// blocks, `w` exactly the row's bytes, every vector the same length); `None` otherwise.
    /// The caller has checked `available()`.
    #[inline]
    pub fn dot<const N: usize>(ty: QuantType, w: &[u8], xs: [&[f32]; N]) -> Option<[f32; N]> {
        let len = units(ty, &xs, w.len())?;
        let kern = kernel::<N>(ty)?;
        let xp: [*const f32; N] = std::array::from_fn(|j| xs[j].as_ptr());
        // SAFETY: the CPU features were checked by the caller; `w` holds exactly `len` blocks
        // (elements of float rows) and every vector as many values, all the kernels read.
        Some(unsafe { kern(w.as_ptr(), len, &xp) })
    }

    /// The length argument of `ty`'s kernels (blocks; elements for float rows) when every
    /// vector has the same whole number of blocks and a row of them is exactly `row_bytes`.
    fn units(ty: QuantType, xs: &[&[f32]], row_bytes: usize) -> Option<usize> {
        let n = xs.first()?.len();
        let be = ty.block_elems();
        let ok = be > 0
            && n.is_multiple_of(be)
            && xs.iter().all(|x| x.len() == n)
            && n / be * ty.block_bytes() == row_bytes;
        ok.then_some(n / be)
    }

    /// One accumulator per vector, and one order of operations per vector whatever `N` is:
    /// weights come in groups of 32 (four 8-lane chunks), each vector's group is summed in a
    /// temporary (`w0 x0`, then three FMAs) that is then added to its accumulator; lone 8-lane
    /// chunks (float rows' tails) are FMA'd straight in. So a vector's result is bit for bit
    /// the same alone (`N` = 1) or beside up to 7 others in any position (batch invariance),
    /// and the chain through the accumulator (one add per 32 weights) is short enough that a
    /// single vector is not held up by FMA latency.
    struct Acc<const N: usize> {
        a: [__m256; N],
    }

    impl<const N: usize> Acc<N> {
        #[inline(always)]
        unsafe fn new() -> Self {
            Acc {
                a: [_mm256_setzero_ps(); N],
            }
        }

        /// `acc[j] += wv * xs[j][off..off + 8]` (one fused operation).
        #[inline(always)]
        unsafe fn fma(&mut self, wv: __m256, xs: &[*const f32; N], off: usize) {
            for (a, x) in self.a.iter_mut().zip(xs) {
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(off)), *a);
            }
        }

        /// `acc[j] += Σ_k w[k] * xs[j][off + 8k..off + 8k + 8]`, the group summed first.
        #[inline(always)]
        unsafe fn group(&mut self, w: [__m256; 4], xs: &[*const f32; N], off: usize) {
            for (a, x) in self.a.iter_mut().zip(xs) {
                let x = x.add(off);
                let t = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
                let t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x.add(8)), t);
                let t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x.add(16)), t);
                let t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x.add(24)), t);
                *a = _mm256_add_ps(*a, t);
            }
        }

        /// 32 weights from 32 signed quants at `q`: the first 16 are `q * s0 + b0`, the last
        /// 16 `q * s1 + b1` (`q * s` without a bias), against `xs[j][off..off + 32]`.
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn q32<const BIAS: bool>(
            &mut self,
            q: *const i8,
            s0: __m256,
            b0: __m256,
            s1: __m256,
            b1: __m256,
            xs: &[*const f32; N],
            off: usize,
        ) {
            let f0 = cvt8(q);
            let f1 = cvt8(q.add(8));
            let f2 = cvt8(q.add(16));
            let f3 = cvt8(q.add(24));
            let (w0, w1, w2, w3) = if BIAS {
                (
                    _mm256_fmadd_ps(f0, s0, b0),
                    _mm256_fmadd_ps(f1, s0, b0),
                    _mm256_fmadd_ps(f2, s1, b1),
                    _mm256_fmadd_ps(f3, s1, b1),
                )
            } else {
                (
                    _mm256_mul_ps(f0, s0),
                    _mm256_mul_ps(f1, s0),
                    _mm256_mul_ps(f2, s1),
                    _mm256_mul_ps(f3, s1),
                )
            };
            self.group([w0, w1, w2, w3], xs, off);
        }

        /// The N totals.
        #[inline(always)]
        unsafe fn sum(&self) -> [f32; N] {
            // A loop, not `array::from_fn`: a closure would not inherit the caller's target
            // features, and the intrinsics inside it would become calls.
            let mut out = [0f32; N];
            for (o, &a) in out.iter_mut().zip(&self.a) {
                *o = hsum(a);
            }
            out
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 8 signed bytes at `q` as f32.
    #[inline(always)]
    unsafe fn cvt8(q: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q as *const __m128i)))
    }

    /// The little-endian f16 at `p`, as f32 (exact) in all 8 lanes. (Broadcasting the f16
    /// before converting keeps the load free of any dependency on other registers.)
    #[inline(always)]
    unsafe fn f16x8(p: *const u8) -> __m256 {
        let bits = (p as *const u16).read_unaligned();
        _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
    }

    /// `-v` (exact).
    #[inline(always)]
    unsafe fn neg(v: __m256) -> __m256 {
        _mm256_xor_ps(v, _mm256_set1_ps(-0.0))
    }

    #[inline(always)]
    unsafe fn load256(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    #[inline(always)]
    unsafe fn load128(p: *const u8) -> __m128i {
        _mm_loadu_si128(p as *const __m128i)
    }

    #[inline(always)]
    unsafe fn splat8(v: u8) -> __m256i {
        _mm256_set1_epi8(v as i8)
    }

    /// Unpacked quants of one block (up to 256), 32-byte aligned.
    #[repr(C, align(32))]
    struct Quants([i8; 256]);

    impl Quants {
        /// Makes the compiler treat the unpacked quants as memory it cannot see into, so each
        /// group of 8 is widened straight from the stack (`vpmovsxbd` with a memory operand)
        /// instead of being carved out of the registers that were stored: LLVM otherwise
        /// forwards the stores and spends three shuffles (port 5, the bottleneck here) per 32
        /// quants extracting them (measured: Q4_K 3.4 -> 4.3..5.3 GB/s from L2, one thread).
        #[inline(always)]
        fn settle(&self) {
            // SAFETY: an empty instruction sequence; it only takes the address.
            unsafe {
                core::arch::asm!(
                    "/* {0} */",
                    in(reg) self.0.as_ptr(),
                    options(nostack, preserves_flags)
                );
            }
        }

        #[inline(always)]
        unsafe fn store(&mut self, at: usize, v: __m256i) {
            debug_assert!(at + 32 <= 256);
            _mm256_store_si256(self.0.as_mut_ptr().add(at) as *mut __m256i, v);
        }

        #[inline]
        fn at(&self, i: usize) -> *const i8 {
            self.0[i..].as_ptr()
        }
    }

    /// Per-sub-block scales and biases (up to 16), 32-byte aligned.
    #[repr(C, align(32))]
    struct Scales([f32; 16]);

    impl Scales {
        #[inline(always)]
        unsafe fn store(&mut self, at: usize, v: __m256) {
            debug_assert!(at + 8 <= 16);
            _mm256_store_ps(self.0.as_mut_ptr().add(at), v);
        }

        #[inline(always)]
        unsafe fn splat(&self, i: usize) -> __m256 {
            _mm256_set1_ps(self.0[i])
        }
    }

    // ---- float rows -------------------------------------------------------------------

    /// 8 weights at element `i` of a float row: `W` = 4 (F32), 2 (F16) or 3 (BF16).
    #[inline(always)]
    unsafe fn float8<const W: usize>(w: *const u8, i: usize) -> __m256 {
        match W {
            4 => _mm256_loadu_ps((w as *const f32).add(i)),
            2 => _mm256_cvtph_ps(load128(w.add(2 * i))),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load128(
                w.add(2 * i),
            )))),
        }
    }

    #[inline]
    fn float1<const W: usize>(w: &[u8]) -> f32 {
        match W {
            4 => f32::from_le_bytes([w[0], w[1], w[2], w[3]]),
            2 => half::f16::from_le_bytes([w[0], w[1]]).to_f32(),
            _ => half::bf16::from_le_bytes([w[0], w[1]]).to_f32(),
        }
    }

    /// Float rows of `n` elements (any length: a scalar tail after the 8-lane part).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn float<const N: usize, const W: usize>(
        w: *const u8,
        n: usize,
        xs: &[*const f32; N],
    ) -> [f32; N] {
        let bytes = if W == 4 { 4 } else { 2 };
        let mut acc = Acc::<N>::new();
        let mut i = 0;
        while i + 32 <= n {
            let w0 = float8::<W>(w, i);
            let w1 = float8::<W>(w, i + 8);
            let w2 = float8::<W>(w, i + 16);
            let w3 = float8::<W>(w, i + 24);
            acc.group([w0, w1, w2, w3], xs, i);
            i += 32;
        }
        while i + 8 <= n {
            acc.fma(float8::<W>(w, i), xs, i);
            i += 8;
        }
        let mut r = acc.sum();
        if i < n {
            let wt = std::slice::from_raw_parts(w.add(bytes * i), bytes * (n - i));
            for (k, c) in wt.chunks_exact(bytes).enumerate() {
                let v = float1::<W>(c);
                for j in 0..N {
                    r[j] += v * *xs[j].add(i + k);
                }
            }
        }
        r
    }

    // ---- 32-element blocks ------------------------------------------------------------

    /// `block_q8_0 { f16 d; i8 qs[32] }`: the quants are read in place.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let z = _mm256_setzero_ps();
        for i in 0..nb {
            let b = block::<N>(w, 34, i);
            let d = f16x8(b);
            acc.q32::<false>(b.add(2) as *const i8, d, z, d, z, xs, 32 * i);
        }
        acc.sum()
    }

    /// The 32 nibbles of 16 bytes at `p`: low nibbles then high nibbles.
    #[inline(always)]
    unsafe fn nibbles32(p: *const u8) -> __m256i {
        let v = load128(p);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), m);
        _mm256_set_m128i(hi, lo)
    }

    /// The 32 bits of the u32 at `p` as bytes holding 0x10 where the bit is set (byte i for
    /// bit i), ggml's `bytes_from_bits_32`.
    #[inline(always)]
    unsafe fn bits32(p: *const u8) -> __m256i {
        let x = (p as *const u32).read_unaligned();
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
        _mm256_and_si256(set, splat8(0x10))
    }

    /// `block_q4_0 { f16 d; u8 qs[16] }`: `(q - 8) * d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let z = _mm256_setzero_ps();
        for i in 0..nb {
            let b = block::<N>(w, 18, i);
            let d = f16x8(b);
            q.store(0, _mm256_sub_epi8(nibbles32(b.add(2)), splat8(8)));
            acc.q32::<false>(q.at(0), d, z, d, z, xs, 32 * i);
        }
        acc.sum()
    }

    /// `block_q4_1 { f16 d; f16 m; u8 qs[16] }`: `q * d + m`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        for i in 0..nb {
            let b = block::<N>(w, 20, i);
            let d = f16x8(b);
            let m = f16x8(b.add(2));
            q.store(0, nibbles32(b.add(4)));
            acc.q32::<true>(q.at(0), d, m, d, m, xs, 32 * i);
        }
        acc.sum()
    }

    /// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }`: `(q - 16) * d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let z = _mm256_setzero_ps();
        for i in 0..nb {
            let b = block::<N>(w, 22, i);
            let d = f16x8(b);
            let v = _mm256_or_si256(nibbles32(b.add(6)), bits32(b.add(2)));
            q.store(0, _mm256_sub_epi8(v, splat8(16)));
            acc.q32::<false>(q.at(0), d, z, d, z, xs, 32 * i);
        }
        acc.sum()
    }

    /// `block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }`: `q * d + m`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_1<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        for i in 0..nb {
            let b = block::<N>(w, 24, i);
            let d = f16x8(b);
            let m = f16x8(b.add(2));
            q.store(0, _mm256_or_si256(nibbles32(b.add(8)), bits32(b.add(4))));
            acc.q32::<true>(q.at(0), d, m, d, m, xs, 32 * i);
        }
        acc.sum()
    }

    // ---- K-quants (256-element super-blocks) --------------------------------------------

    /// `n`, hidden from the optimiser: keeps the sub-block loops of the K-quants as loops that
    /// read the unpacked quants back from the stack. Unrolled, LLVM turns the stack round trip
    /// into register shuffles and schedules all 256 weights ahead of their FMAs, spilling
    /// most of them (about half the speed).
    #[inline(always)]
    fn opaque(n: usize) -> usize {
        std::hint::black_box(n)
    }

    /// Runs the 256 unpacked quants of a super-block with 16-element sub-blocks (scale `sc[s]`,
    /// bias `bi[s]` when `BIAS`) against `xs[..][off..off + 256]`.
    #[inline(always)]
    unsafe fn run16<const N: usize, const BIAS: bool>(
        acc: &mut Acc<N>,
        q: &Quants,
        sc: &Scales,
        bi: &Scales,
        xs: &[*const f32; N],
        off: usize,
    ) {
        q.settle();
        for p in 0..opaque(8) {
            let (s0, s1) = (sc.splat(2 * p), sc.splat(2 * p + 1));
            let (b0, b1) = if BIAS {
                (bi.splat(2 * p), bi.splat(2 * p + 1))
            } else {
                (s0, s1)
            };
            acc.q32::<BIAS>(q.at(32 * p), s0, b0, s1, b1, xs, off + 32 * p);
        }
    }

    /// As `run16` with 32-element sub-blocks (8 scales and biases).
    #[inline(always)]
    unsafe fn run32<const N: usize>(
        acc: &mut Acc<N>,
        q: &Quants,
        sc: &Scales,
        bi: &Scales,
        xs: &[*const f32; N],
        off: usize,
    ) {
        q.settle();
        for s in 0..opaque(8) {
            let (sv, bv) = (sc.splat(s), bi.splat(s));
            acc.q32::<true>(q.at(32 * s), sv, bv, sv, bv, xs, off + 32 * s);
        }
    }

    /// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K block (12 bytes at `p`) times `d` and
    /// `-dmin`: ggml's `utmp` unpacking (scales in bytes 0..8, mins in bytes 8..16).
    #[inline(always)]
    unsafe fn k4_scales(p: *const u8, d: __m256, dmin: __m256, sc: &mut Scales, bi: &mut Scales) {
        const KMASK1: u32 = 0x3f3f3f3f;
        const KMASK2: u32 = 0x0f0f0f0f;
        const KMASK3: u32 = 0x03030303;
        let u = |k: usize| (p.add(4 * k) as *const u32).read_unaligned();
        let (u0, u1, u2) = (u(0), u(1), u(2));
        let scales =
            (u0 & KMASK1) as u64 | (((u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)) as u64) << 32;
        let mins = (u1 & KMASK1) as u64
            | ((((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4)) as u64) << 32;
        let cv = |x: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(x as i64)));
        sc.store(0, _mm256_mul_ps(cv(scales), d));
        bi.store(0, _mm256_mul_ps(cv(mins), neg(dmin)));
    }

    /// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let mut sc = Scales([0.0; 16]);
        let mut bi = Scales([0.0; 16]);
        let m4 = splat8(0x0F);
        for i in 0..nb {
            let b = block::<N>(w, 144, i);
            k4_scales(b.add(4), f16x8(b), f16x8(b.add(2)), &mut sc, &mut bi);
            for c in 0..4 {
                let v = load256(b.add(16 + 32 * c));
                q.store(64 * c, _mm256_and_si256(v, m4));
                q.store(64 * c + 32, _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4));
            }
            run32(&mut acc, &q, &sc, &bi, xs, 256 * i);
        }
        acc.sum()
    }

    /// `block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_k<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let mut sc = Scales([0.0; 16]);
        let mut bi = Scales([0.0; 16]);
        let m4 = splat8(0x0F);
        let m16 = splat8(0x10);
        for i in 0..nb {
            let b = block::<N>(w, 176, i);
            k4_scales(b.add(4), f16x8(b), f16x8(b.add(2)), &mut sc, &mut bi);
            // Chunk c takes bit 2c of qh[l] for its low nibbles and bit 2c+1 for its high ones.
            let mut h = load256(b.add(16));
            for c in 0..4 {
                let v = load256(b.add(48 + 32 * c));
                let hl = _mm256_and_si256(_mm256_slli_epi16::<4>(h), m16);
                let hh = _mm256_and_si256(_mm256_slli_epi16::<3>(h), m16);
                let lo = _mm256_or_si256(_mm256_and_si256(v, m4), hl);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(v), m4), hh);
                q.store(64 * c, lo);
                q.store(64 * c + 32, hi);
                h = _mm256_srli_epi16::<2>(h);
            }
            run32(&mut acc, &q, &sc, &bi, xs, 256 * i);
        }
        acc.sum()
    }

    /// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let mut sc = Scales([0.0; 16]);
        let m4 = splat8(0x0F);
        let m30 = splat8(0x30);
        let m32 = splat8(32);
        for i in 0..nb {
            let b = block::<N>(w, 210, i);
            let d = f16x8(b.add(208));
            let s = load128(b.add(192));
            sc.store(
                0,
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)), d),
            );
            let s_hi = _mm_unpackhi_epi64(s, s);
            sc.store(
                8,
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s_hi)), d),
            );
            for n in 0..2 {
                let a = load256(b.add(64 * n));
                let c = load256(b.add(64 * n + 32));
                let h = load256(b.add(128 + 32 * n));
                let q1 = _mm256_or_si256(
                    _mm256_and_si256(a, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(h), m30),
                );
                let q2 = _mm256_or_si256(
                    _mm256_and_si256(c, m4),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(h), m30),
                );
                let q3 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(a), m4),
                    _mm256_and_si256(h, m30),
                );
                let q4 = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(c), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(h), m30),
                );
                q.store(128 * n, _mm256_sub_epi8(q1, m32));
                q.store(128 * n + 32, _mm256_sub_epi8(q2, m32));
                q.store(128 * n + 64, _mm256_sub_epi8(q3, m32));
                q.store(128 * n + 96, _mm256_sub_epi8(q4, m32));
            }
            run16::<N, false>(&mut acc, &q, &sc, &sc, xs, 256 * i);
        }
        acc.sum()
    }

    /// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d }`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q3_k<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let mut sc = Scales([0.0; 16]);
        let m3 = splat8(3);
        let m4 = splat8(4);
        for i in 0..nb {
            let b = block::<N>(w, 110, i);
            let d = f16x8(b.add(108));
            // The 16 six-bit scales: low nibbles from bytes 0..8, top bits from bytes 8..12
            // (ggml's `aux` unpacking), then minus 32.
            let u = |k: usize| (b.add(96 + 4 * k) as *const u32).read_unaligned();
            let (a0, a1, a2) = (u(0), u(1), u(2));
            const K1: u32 = 0x03030303;
            const K2: u32 = 0x0f0f0f0f;
            let s = _mm_set_epi32(
                (((a1 >> 4) & K2) | (((a2 >> 6) & K1) << 4)) as i32,
                (((a0 >> 4) & K2) | (((a2 >> 4) & K1) << 4)) as i32,
                ((a1 & K2) | (((a2 >> 2) & K1) << 4)) as i32,
                ((a0 & K2) | ((a2 & K1) << 4)) as i32,
            );
            let s = _mm_sub_epi8(s, _mm_set1_epi8(32));
            sc.store(
                0,
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s)), d),
            );
            let s_hi = _mm_unpackhi_epi64(s, s);
            sc.store(
                8,
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s_hi)), d),
            );
            // Value (half, j, l) is ((qs[32 half + l] >> 2j) & 3) - (hmask bit 4 half + j of
            // byte l clear ? 4 : 0).
            let mut hm = load256(b);
            for half in 0..2 {
                let mut v = load256(b.add(32 + 32 * half));
                for j in 0..4 {
                    let lo = _mm256_and_si256(v, m3);
                    let hb = _mm256_and_si256(_mm256_slli_epi16::<2>(hm), m4);
                    q.store(
                        128 * half + 32 * j,
                        _mm256_sub_epi8(_mm256_or_si256(lo, hb), m4),
                    );
                    v = _mm256_srli_epi16::<2>(v);
                    hm = _mm256_srli_epi16::<1>(hm);
                }
            }
            run16::<N, false>(&mut acc, &q, &sc, &sc, xs, 256 * i);
        }
        acc.sum()
    }

    /// `block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin }`: `d * (sc & 15) * q -
    /// dmin * (sc >> 4)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q2_k<const N: usize>(w: *const u8, nb: usize, xs: &[*const f32; N]) -> [f32; N] {
        let mut acc = Acc::<N>::new();
        let mut q = Quants([0; 256]);
        let mut sc = Scales([0.0; 16]);
        let mut bi = Scales([0.0; 16]);
        let m3 = splat8(3);
        for i in 0..nb {
            let b = block::<N>(w, 84, i);
            let d = f16x8(b.add(80));
            let dmin = neg(f16x8(b.add(82)));
            for h in 0..2 {
                let s = _mm_cvtsi64_si128((b.add(8 * h) as *const i64).read_unaligned());
                let lo = _mm_and_si128(s, _mm_set1_epi8(0x0F));
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(s), _mm_set1_epi8(0x0F));
                let cv = |x| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
                sc.store(8 * h, _mm256_mul_ps(cv(lo), d));
                bi.store(8 * h, _mm256_mul_ps(cv(hi), dmin));
            }
            for half in 0..2 {
                let mut v = load256(b.add(16 + 32 * half));
                for j in 0..4 {
                    q.store(128 * half + 32 * j, _mm256_and_si256(v, m3));
                    v = _mm256_srli_epi16::<2>(v);
                }
            }
            run16::<N, true>(&mut acc, &q, &sc, &bi, xs, 256 * i);
        }
        acc.sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::test_util::{deq, random_row, Rng};

    const TYPES: [QuantType; 13] = {
        use QuantType::*;
        [
            Q4_K, Q6_K, Q8_0, BF16, F16, F32, Q5_K, Q5_0, Q3_K, Q2_K, Q4_0, Q4_1, Q5_1,
        ]
    };

    fn lengths(ty: QuantType) -> Vec<usize> {
        let be = ty.block_elems();
        let mut v: Vec<usize> = (1..=8).map(|k| k * be).collect();
        v.extend([7168, 2048]);
        if be == 1 {
            v.extend([1, 7, 9, 31, 33, 100]);
        }
        v
    }

    /// `(Σ w·x in f64, Σ |w·x|)` over the reference dequantisation.
    fn reference(w: &[f32], x: &[f32]) -> (f64, f64) {
        w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| {
            let p = w as f64 * x as f64;
            (s + p, a + p.abs())
        })
    }

    #[test]
    fn matches_dequantise_then_dot() {
        let mut rng = Rng(0x5eed_f32d);
        for ty in TYPES {
            for n in lengths(ty) {
                let rows = if n >= 2048 { 12 } else { 100 };
                for _ in 0..rows {
                    let w = random_row(ty, n, &mut rng);
                    let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                    let (want, mag) = reference(&deq(ty, &w, n), &x);
                    let tol = 1e-5 * mag.max(1e-30);
                    let got = vec_dot_f32(ty, &w, &x);
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{ty} n={n}: {got} vs {want} (tol {tol})"
                    );
                    let gen = vec_dot_f32_generic(ty, &w, &x);
                    assert!((gen as f64 - want).abs() <= tol, "{ty} n={n} generic");
                }
            }
        }
    }

    /// The kernels use exactly the reference weights: dotting with unit vectors picks each
    /// weight out bit for bit (the other products are zeros).
    #[test]
    fn weights_are_bit_exact() {
        #[cfg(target_arch = "x86_64")]
        assert!(
            !x86::available()
                || TYPES.iter().all(|&ty| {
                    let be = ty.block_elems();
                    let w = vec![0u8; ty.block_bytes()];
                    x86::dot::<1>(ty, &w, [&vec![0f32; be][..]]).is_some()
                }),
            "every type has an AVX2 kernel"
        );
        let mut rng = Rng(0xb17);
        for ty in TYPES {
            let n = 2 * ty.block_elems().max(64);
            let w = random_row(ty, n, &mut rng);
            let want = deq(ty, &w, n);
            let units: Vec<Vec<f32>> = (0..n)
                .map(|i| (0..n).map(|k| (k == i) as u32 as f32).collect())
                .collect();
            for (c, group) in units.chunks(MULTI_MAX).enumerate() {
                let refs: Vec<&[f32]> = group.iter().map(|v| v.as_slice()).collect();
                let mut out = vec![0f32; refs.len()];
                vec_dot_f32_multi(ty, &w, &refs, &mut out);
                for (k, o) in out.iter().enumerate() {
                    let i = c * MULTI_MAX + k;
                    // (A weight of -0 sums to +0 with the zero products.)
                    let same = |v: f32| v.to_bits() == want[i].to_bits() || v == want[i];
                    assert!(same(*o), "{ty} weight {i}: {o:e} vs {:e}", want[i]);
                    assert!(same(vec_dot_f32(ty, &w, &units[i])), "{ty} weight {i}");
                }
            }
        }
    }

    /// Batch invariance: every vector of a multi call, in every position of every count, gets
    /// exactly the single-vector result (float rows also with 8-lane and scalar tails).
    #[test]
    fn multi_equals_single() {
        let mut rng = Rng(0x000a_11ce);
        for ty in TYPES {
            let be = ty.block_elems();
            let tails: &[usize] = if be == 1 { &[45, 13] } else { &[] };
            for &n in [be, 3 * be, 2048].iter().chain(tails) {
                let w = random_row(ty, n, &mut rng);
                let xs: Vec<Vec<f32>> = (0..19)
                    .map(|_| (0..n).map(|_| rng.normal()).collect())
                    .collect();
                for count in 1..=xs.len() {
                    let refs: Vec<&[f32]> = xs[..count].iter().map(|v| v.as_slice()).collect();
                    let mut out = vec![0f32; count];
                    vec_dot_f32_multi(ty, &w, &refs, &mut out);
                    for (j, (o, x)) in out.iter().zip(&refs).enumerate() {
                        let single = vec_dot_f32(ty, &w, x);
                        assert_eq!(
                            o.to_bits(),
                            single.to_bits(),
                            "{ty} n={n} count={count} vector {j}: {o} vs {single}"
                        );
                    }
                }
            }
        }
    }

    /// The rows of a small matrix in one call: every output is its row's single-vector dot,
    /// bit for bit, at its `j * out_stride + r` (and nothing else is written).
    #[test]
    fn rows_equal_single() {
        let mut rng = Rng(0x0005_eed5);
        for ty in TYPES {
            let n = 2 * ty.block_elems().max(32);
            let rows = 5;
            let w: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(ty, n, &mut rng))
                .collect();
            let rb = w.len() / rows;
            let xs: Vec<Vec<f32>> = (0..MULTI_MAX)
                .map(|_| (0..n).map(|_| rng.normal()).collect())
                .collect();
            for count in 1..=MULTI_MAX {
                let refs: Vec<&[f32]> = xs[..count].iter().map(|v| v.as_slice()).collect();
                let stride = rows + 2;
                let mut out = vec![f32::MAX; count * stride];
                vec_dot_f32_rows(ty, &w, rb, rows, &refs, &mut out, stride);
                for (i, &o) in out.iter().enumerate() {
                    let (j, r) = (i / stride, i % stride);
                    if r >= rows {
                        assert_eq!(o, f32::MAX, "{ty}: wrote past row {rows}");
                        continue;
                    }
                    let single = vec_dot_f32(ty, &w[r * rb..(r + 1) * rb], refs[j]);
                    assert_eq!(o.to_bits(), single.to_bits(), "{ty} count {count} row {r}");
                }
            }
        }
    }

    /// Rows at every byte offset (mmapped rows are not aligned) give the same result.
    #[test]
    fn unaligned_rows() {
        let mut rng = Rng(7);
        for ty in TYPES {
            let n = 2 * ty.block_elems().max(16);
            let w = random_row(ty, n, &mut rng);
            let x: Vec<f32> = (0..n + 8).map(|_| rng.normal()).collect();
            let want = vec_dot_f32(ty, &w, &x[..n]);
            let mut buf = vec![0u8; w.len() + 64];
            for off in 0..33 {
                buf[off..off + w.len()].copy_from_slice(&w);
                let got = vec_dot_f32(ty, &buf[off..off + w.len()], &x[..n]);
                assert_eq!(got.to_bits(), want.to_bits(), "{ty} offset {off}");
                let xo = &x[off % 8..off % 8 + n];
                let (r, mag) = reference(&deq(ty, &w, n), xo);
                assert!((vec_dot_f32(ty, &w, xo) as f64 - r).abs() <= 1e-5 * mag);
            }
        }
    }

    #[test]
    fn unsupported_types_give_nan() {
        let x = [1f32; 256];
        assert!(vec_dot_f32(QuantType::F8E4M3, &[0u8; 256], &x).is_nan());
        assert!(vec_dot_f32(QuantType::IQ2_XXS, &[0u8; 66], &x).is_nan());
        let mut out = [0f32; 2];
        vec_dot_f32_multi(QuantType::IQ2_XXS, &[0u8; 66], &[&x, &x], &mut out);
        assert!(out.iter().all(|v| v.is_nan()));
    }

    /// Throughput of weight bytes per type, single-threaded, from L2 (a ~512 KiB working set)
    /// and from DRAM (rotating over 256 MiB), plus the multi-vector kernels' GFLOP/s.
    /// `cargo test --release -p engine f32dot::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench() {
        use std::hint::black_box;
        use std::time::Instant;
        let only = std::env::var("F32DOT_TYPES").ok();
        let mut rng = Rng(1);
        let n = 7168;
        let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let median = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        println!("type    L2 GB/s  DRAM GB/s  generic-L2 GB/s   x4 GFLOP/s  x8 GFLOP/s");
        for ty in TYPES {
            if let Some(o) = &only {
                if !o.split(',').any(|t| t == ty.name()) {
                    continue;
                }
            }
            let rb = ty.row_bytes(n).unwrap();
            let row = random_row(ty, n, &mut rng);
            let l2_rows = (512 << 10) / rb;
            let l2: Vec<u8> = row.repeat(l2_rows);
            let dram_rows = (256 << 20) / rb;
            let mut dram = vec![0u8; dram_rows * rb];
            for r in dram.chunks_exact_mut(rb) {
                r.copy_from_slice(&row);
            }
            let run = |data: &[u8], rows: usize, reps: usize, f: &dyn Fn(&[u8]) -> f32| {
                let mut v = Vec::new();
                for _ in 0..reps {
                    let t = Instant::now();
                    let mut s = 0f32;
                    for r in 0..rows {
                        s += f(&data[r * rb..(r + 1) * rb]);
                    }
                    black_box(s);
                    v.push((rows * rb) as f64 / t.elapsed().as_secs_f64() / 1e9);
                }
                median(v)
            };
            let fast = |w: &[u8]| vec_dot_f32(ty, w, &x);
            let slow = |w: &[u8]| vec_dot_f32_generic(ty, w, &x);
            let l2gbs = run(&l2, l2_rows, 41, &fast);
            let dgbs = run(&dram, dram_rows, 5, &fast);
            let ggbs = run(&l2, l2_rows, 5, &slow);
            let xs: Vec<Vec<f32>> = (0..8)
                .map(|_| (0..n).map(|_| rng.normal()).collect())
                .collect();
            let multi = |k: usize| {
                let refs: Vec<&[f32]> = xs[..k].iter().map(|v| v.as_slice()).collect();
                let mut out = vec![0f32; k];
                let mut v = Vec::new();
                for _ in 0..21 {
                    let t = Instant::now();
                    for r in 0..l2_rows {
                        vec_dot_f32_multi(ty, &l2[r * rb..(r + 1) * rb], &refs, &mut out);
                        black_box(&out);
                    }
                    v.push((2 * n * k * l2_rows) as f64 / t.elapsed().as_secs_f64() / 1e9);
                }
                median(v)
            };
            let (m4, m8) = (multi(4), multi(8));
            println!(
                "{:<6} {:>8.2} {:>10.2} {:>16.2} {:>12.1} {:>11.1}",
                ty.name(),
                l2gbs,
                dgbs,
                ggbs,
                m4,
                m8
            );
        }
    }
}
