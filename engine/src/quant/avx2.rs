//! AVX2/FMA/F16C dot-product kernels, selected at run time.
//!
//! Each kernel reads packed weight blocks and the matching activation blocks (`vec_dot_type`)
//! straight from byte slices with unaligned loads (rows live in mmaps at arbitrary offsets) and
//! does the integer part exactly: 8-bit products are summed in i16 pairs (`maddubs`, which can
//! not saturate for these value ranges) and widened to i32 while being multiplied by the
//! sub-block scale (`madd`). Only the per-block float scale multiply is inexact, so a kernel
//! agrees with the scalar reference to f32 rounding of the block sums.
//!
//! Where an activation's zero point would cost a multiply per vector, the K-quant kernels use
//! the Q8_K block sums instead: `Σ sc·(q − z)·y = Σ sc·q·y − z·Σ sc·bsum`.
//!
//! Nothing here allocates. The `#[target_feature]` functions are reached only through
//! [`kernel`] / [`vec_dot`], which check the CPU first; the safe wrappers check slice lengths
//! (one compare per row), so a wrong length panics instead of reading out of bounds.

use core::arch::x86_64::*;
use std::array::from_fn;

use super::act::{Q16_BYTES as Z_BYTES, Q16_QS as Z_QS, Q16_SUMS as Z_SUMS};
use super::{QuantType, QK_K};

/// A dot-product kernel: `(n, weight row bytes, activation row bytes) -> dot`.
pub type DotFn = fn(usize, &[u8], &[u8]) -> f32;

/// Whether this CPU has AVX2 and FMA (checked once, cached by std).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// AVX2 + FMA + F16C: what every kernel here is compiled for (all AVX2 CPUs have F16C).
pub(crate) fn full() -> bool {
    available() && is_x86_feature_detected!("f16c")
}

/// The kernel for weights of type `ty`, or `None` when this CPU or type has none. Resolve it
/// once per matrix product rather than per row.
pub fn kernel(ty: QuantType) -> Option<DotFn> {
    if !full() {
        return None;
    }
    use QuantType::*;
    let f: DotFn = match ty {
        Q4_K => q4_k,
        Q6_K => q6_k,
        Q8_0 => q8_0,
        F32 => f32_row,
        BF16 => bf16_row,
        F16 => f16_row,
        Q5_K => q5_k,
        Q5_0 => q5_0,
        Q3_K => q3_k,
        Q2_K => q2_k,
        Q4_0 => q4_0,
        Q4_1 => q4_1,
        Q5_1 => q5_1,
        _ => return None,
    };
    Some(f)
}

/// Bytes ahead of the current block that the one-token kernels prefetch (into L2). Measured
/// on a 2-core Zen 5 reading ~50 GB/s: 2 KiB ahead (into L1) left rows of 16384 columns at
/// two thirds of the speed of narrower ones (0.63-0.66 of the bandwidth against 0.92-1.0),
/// while 12 KiB ahead takes every shape to 0.9-1.0; Q8_0's exact f32 product went from
/// 0.6 to 0.9. Prefetching into L1 that far ahead would crowd out the activations.
const PREFETCH: usize = 12288;

/// Most tokens a multi-token kernel takes at once.
pub const MULTI: usize = 8;

pub use super::{MultiDotFn, Tile};

/// The multi-token kernel for weights of type `ty`, where there is one (the common K-quant and
/// legacy types; prefill's batched products use it), with the number of tokens it is fastest
/// at (measured: Q4_K's unpacking is dear enough to share among 8 tokens; the others run out
/// of registers past 4).
pub fn kernel_multi(ty: QuantType) -> Option<(MultiDotFn, usize)> {
    if !full() {
        return None;
    }
    if let Some(k) = avx512::kernel_multi(ty) {
        return Some(k);
    }
    use QuantType::*;
    let f: (MultiDotFn, usize) = match ty {
        Q4_K => (q4_k_multi, 8),
        Q5_K => (q5_k_multi, 4),
        Q6_K => (q6_k_multi, 4),
        Q8_0 => (q8_0_multi, 4),
        Q4_0 => (q4_0_multi, 4),
        Q5_0 => (q5_0_multi, 4),
        _ => return None,
    };
    Some(f)
}

/// The multi-token kernel for weights of type `ty` against [`QuantType::Q16_K`] activations,
/// with the number of tokens it is fastest at, where there is one (Q4_K, Q5_K, Q6_K).
pub fn kernel_q16(ty: QuantType) -> Option<(MultiDotFn, usize)> {
    if !full() {
        return None;
    }
    if let Some(k) = avx512::kernel_q16(ty) {
        return Some(k);
    }
    use QuantType::*;
    let f: (MultiDotFn, usize) = match ty {
        Q4_K => (q4_k_q16_multi, 8),
        Q5_K => (q5_k_q16_multi, 8),
        Q6_K => (q6_k_q16_multi, 8),
        _ => return None,
    };
    Some(f)
}

/// `Some(dot)` when an AVX2 kernel exists for `ty`, `None` to fall back to the portable one.
#[inline]
pub fn vec_dot(ty: QuantType, n: usize, w: &[u8], a: &[u8]) -> Option<f32> {
    kernel(ty).map(|f| f(n, w, a))
}

/// FP8 E4M3FN row · f32 activations with one scale per 128 columns (as `fp8::dot_row`), or
/// `None` without AVX2/F16C. NaN encodings (`S.1111.111`) read as ±480 here: checkpoints hold
/// none.
pub fn fp8_dot_row(w: &[u8], scales: &[f32], x: &[f32]) -> Option<f32> {
    if !full() {
        return None;
    }
    assert!(x.len() >= w.len() && scales.len() * 128 >= w.len());
    // SAFETY: features checked above, lengths checked by the assert.
    Some(unsafe { fp8_avx2(w, scales, x) })
}

// ---------------------------------------------------------------------------------------------
// Safe wrappers: length checks, then the kernel. Only reachable through `kernel`.

/// Checks that `n` elements of blocks `(be, wb)` and activation blocks of `ab` bytes fit.
#[inline(always)]
fn check(n: usize, w: &[u8], a: &[u8], be: usize, wb: usize, ab: usize) -> usize {
    debug_assert_eq!(n % be, 0, "row length {n} is not a multiple of {be}");
    let nb = n / be;
    assert!(
        w.len() >= nb * wb && a.len() >= nb * ab,
        "row shorter than {n} elements"
    );
    nb
}

macro_rules! wrapper {
    ($name:ident, $kern:ident, $be:expr, $wb:expr, $ab:expr) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = check(n, w, a, $be, $wb, $ab);
            // SAFETY: `kernel` hands this out only when avx2, fma and f16c are present, and
            // `check` proved `nb` blocks of both rows are in bounds.
            unsafe { $kern(nb, w.as_ptr(), a.as_ptr()) }
        }
    };
}

wrapper!(q4_k, q4_k_avx2, QK_K, 144, 292);
wrapper!(q5_k, q5_k_avx2, QK_K, 176, 292);
wrapper!(q6_k, q6_k_avx2, QK_K, 210, 292);
wrapper!(q2_k, q2_k_avx2, QK_K, 84, 292);
wrapper!(q3_k, q3_k_avx2, QK_K, 110, 292);
wrapper!(q8_0, q8_0_avx2, 32, 34, 34);
wrapper!(q4_0, q4_0_avx2, 32, 18, 34);
wrapper!(q5_0, q5_0_avx2, 32, 22, 34);
wrapper!(q4_1, q4_1_avx2, 32, 20, 36);
wrapper!(q5_1, q5_1_avx2, 32, 24, 36);
wrapper!(f32_row, f32_avx2, 1, 4, 4);
wrapper!(f16_row, f16_avx2, 1, 2, 4);
wrapper!(bf16_row, bf16_avx2, 1, 2, 4);

/// Checks a tile against its kernel's blocks (`be` elements, `wb` weight bytes and `ab`
/// activation bytes each) and `out`, panicking on what would read or write out of bounds:
/// `(blocks per row, rows)`.
fn check_tile(j: &Tile, out: &[f32], be: usize, wb: usize, ab: usize) -> (usize, usize) {
    let t = j.tokens;
    assert!((1..=MULTI).contains(&t), "1 to {MULTI} tokens, not {t}");
    let nb = check(j.cols, j.w, &j.a[(t - 1) * j.stride..], be, wb, ab);
    assert!(t == 1 || j.stride >= nb * ab, "activation rows overlap");
    assert!(j.row_bytes >= nb * wb, "weight rows overlap");
    let rows = j.w.len().checked_div(j.row_bytes).unwrap_or(0);
    assert!(
        rows == 0 || (t == 1 || j.out_stride >= rows) && (t - 1) * j.out_stride + rows <= out.len(),
        "output too short"
    );
    (nb, rows)
}

macro_rules! wrapper_multi {
    ($name:ident, $kern:ident, $be:expr, $wb:expr, $ab:expr) => {
        fn $name(j: &Tile, out: &mut [f32]) {
            let (nb, rows) = check_tile(j, out, $be, $wb, $ab);
            let p = |k: usize| j.a[k * j.stride..].as_ptr();
            let (w, rb, o, os) = (j.w.as_ptr(), j.row_bytes, out.as_mut_ptr(), j.out_stride);
            // SAFETY: as in `wrapper!`: every row holds `nb` blocks (`row_bytes` is no shorter,
            // and `rows` whole rows fit in `w`); the last token's row is checked by
            // `check_tile` and the earlier ones lie before it, `stride` apart and no shorter;
            // every output index `t * out_stride + r` is below the bound it checked.
            unsafe {
                match j.tokens {
                    1 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<1>(nb, w, a)),
                    2 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<2>(nb, w, a)),
                    3 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<3>(nb, w, a)),
                    4 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<4>(nb, w, a)),
                    5 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<5>(nb, w, a)),
                    6 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<6>(nb, w, a)),
                    7 => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<7>(nb, w, a)),
                    _ => each_row(rows, w, rb, from_fn(p), o, os, |w, a| $kern::<8>(nb, w, a)),
                }
            }
        }
    };
}

/// `out[t * os + r] = kern(row r, tokens)[t]` for `rows` weight rows `rb` bytes apart.
///
/// # Safety
/// Every row and output index must be valid (the wrappers check them).
#[inline(always)]
unsafe fn each_row<const T: usize>(
    rows: usize,
    w: *const u8,
    rb: usize,
    a: [*const u8; T],
    out: *mut f32,
    os: usize,
    kern: impl Fn(*const u8, [*const u8; T]) -> [f32; T],
) {
    for r in 0..rows {
        let v = kern(w.add(r * rb), a);
        for (t, &x) in v.iter().enumerate() {
            *out.add(t * os + r) = x;
        }
    }
}

wrapper_multi!(q4_k_multi, q4_k_n, QK_K, 144, 292);
wrapper_multi!(q5_k_multi, q5_k_n, QK_K, 176, 292);
wrapper_multi!(q6_k_multi, q6_k_n, QK_K, 210, 292);
wrapper_multi!(q8_0_multi, q8_0_n, 32, 34, 34);
wrapper_multi!(q4_0_multi, q4_0_n, 32, 18, 34);
wrapper_multi!(q5_0_multi, q5_0_n, 32, 22, 34);
wrapper_multi!(q4_k_q16_multi, q4_k_q16, QK_K, 144, Z_BYTES);
wrapper_multi!(q5_k_q16_multi, q5_k_q16, QK_K, 176, Z_BYTES);
wrapper_multi!(q6_k_q16_multi, q6_k_q16, QK_K, 210, Z_BYTES);

pub mod avx512;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Asks for the `len` bytes that lie [`PREFETCH`] bytes after `x`, one request per cache
/// line, into L2: a matvec streams every weight once, and the hardware prefetchers alone
/// left a core waiting on memory between blocks. Past the end of a row it touches the next
/// row or nothing (prefetches do not fault).
/// (Prefetching is baseline SSE: no target features, so it inlines into every kernel.)
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead(x: *const u8, len: usize) {
    let mut k = 0;
    while k < len {
        _mm_prefetch::<_MM_HINT_T1>(x.wrapping_add(PREFETCH + k) as *const i8);
        k += 64;
    }
}

/// Loads 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Loads 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld128(p: *const u8) -> __m128i {
    _mm_loadu_si128(p as *const __m128i)
}

/// An IEEE half at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = core::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The half at `p` in all 8 lanes. A broadcast load, so (unlike a scalar convert, which
/// merges into some register) it starts no dependency chain through the accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(core::ptr::read_unaligned(p as *const i16)))
}

/// The f32 at `p` in all 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32x8(p: *const u8) -> __m256 {
    _mm256_set1_ps(core::ptr::read_unaligned(p as *const f32))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_at(p: *const u8) -> f32 {
    core::ptr::read_unaligned(p as *const f32)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    hsum_ps128(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_ps128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Signed 8-bit `x · y`, summed in groups of four into 8 i32, given `ax = |x|` (shared by
/// several `y`). `y` must not hold -128 (activations never do: they are quantised to ±127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8_split(ax: __m256i, x: __m256i, y: __m256i) -> __m256i {
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// Unsigned 8-bit `x` (< 128) times signed `y`, summed in groups of four into 8 i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// 32 nibbles of a legacy block: low nibbles of 16 bytes in lanes 0..16, high in 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let b = ld128(p);
    let both = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// The 32 bits at `p` spread to 32 bytes: 0xFF where the bit is set, 0 elsewhere.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits_32(p: *const u8) -> __m256i {
    let x = core::ptr::read_unaligned(p as *const u32);
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(x as i32),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    // Every bit except the one this byte tests is forced on, so the byte is all-ones iff set.
    let others = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1))
}

/// Byte shuffle controls, one row per `i` in 0..8: byte `b` of row `i` is `2i + (b / span) % 2`
/// (constants, so the kernels load them instead of building them).
const fn pair_ctrl<const B: usize>(span: usize) -> [[u8; B]; 8] {
    let mut t = [[0u8; B]; 8];
    let mut i = 0;
    while i < 8 {
        let mut b = 0;
        while b < B {
            t[i][b] = (2 * i + (b / span) % 2) as u8;
            b += 1;
        }
        i += 1;
    }
    t
}

/// Controls of [`pair_scales`]: row `i` is eight bytes `2i`, then eight bytes `2i + 1`.
static PAIR_CTRL: [[u8; 16]; 8] = pair_ctrl(8);

/// i16 lanes 0..8 = scale byte `2i`, lanes 8..16 = byte `2i + 1` of `sc` (16 signed bytes):
/// the scales of the two 16-element halves of the `i`-th 32-element vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_scales(sc: __m128i, i: usize) -> __m256i {
    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, ld128(PAIR_CTRL[i & 7].as_ptr())))
}

// ---------------------------------------------------------------------------------------------
// Legacy 32-element blocks.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    q8_0_n::<1>(nb, w, [a])[0]
}

/// Q8_0 rows against `T` activation rows: each weight block is loaded and its sign split
/// once for all of them. Two accumulator chains per token (even and odd blocks).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_n<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    let mut acc0 = [_mm256_setzero_ps(); T];
    let mut acc1 = [_mm256_setzero_ps(); T];
    let mut i = 0;
    while i + 2 <= nb {
        let (x0, x1) = (w.add(i * 34), w.add(i * 34 + 34));
        if T == 1 {
            prefetch_ahead(x0, 68);
        }
        let (q0, q1) = (ld(x0.add(2)), ld(x1.add(2)));
        let (a0, a1) = (_mm256_sign_epi8(q0, q0), _mm256_sign_epi8(q1, q1));
        let (dx0, dx1) = (f16x8(x0), f16x8(x1));
        for t in 0..T {
            let (y0, y1) = (a[t].add(i * 34), a[t].add(i * 34 + 34));
            let p0 = dot_i8_split(a0, q0, ld(y0.add(2)));
            let p1 = dot_i8_split(a1, q1, ld(y1.add(2)));
            let d0 = _mm256_mul_ps(dx0, f16x8(y0));
            let d1 = _mm256_mul_ps(dx1, f16x8(y1));
            acc0[t] = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1[t]);
        }
        i += 2;
    }
    if i < nb {
        let x = w.add(i * 34);
        let q = ld(x.add(2));
        let aq = _mm256_sign_epi8(q, q);
        let dx = f16x8(x);
        for t in 0..T {
            let y = a[t].add(i * 34);
            let p = dot_i8_split(aq, q, ld(y.add(2)));
            let d = _mm256_mul_ps(dx, f16x8(y));
            acc0[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc0[t]);
        }
    }
    for t in 0..T {
        acc0[t] = _mm256_add_ps(acc0[t], acc1[t]);
    }
    hsums(acc0)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    q4_0_n::<1>(nb, w, [a])[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_n<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let x = w.add(i * 18);
        let q = _mm256_sub_epi8(nibbles_32(x.add(2)), _mm256_set1_epi8(8));
        legacy_block_i8(&mut acc, q, f16x8(x), a, i * 34);
    }
    hsums(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    q5_0_n::<1>(nb, w, [a])[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_n<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let x = w.add(i * 22);
        // q - 16: a clear fifth bit means the value is nibble - 16, i.e. the nibble with its
        // top four bits set (two's complement).
        let hi = _mm256_andnot_si256(bits_32(x.add(2)), _mm256_set1_epi8(0xf0u8 as i8));
        let q = _mm256_or_si256(nibbles_32(x.add(6)), hi);
        legacy_block_i8(&mut acc, q, f16x8(x), a, i * 34);
    }
    hsums(acc)
}

/// One signed 32-value weight block `q` (scale `dx`) against the Q8_0 block at byte `off` of
/// each of `T` activation rows, into their accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_block_i8<const T: usize>(
    acc: &mut [__m256; T],
    q: __m256i,
    dx: __m256,
    a: [*const u8; T],
    off: usize,
) {
    let aq = _mm256_sign_epi8(q, q);
    for t in 0..T {
        let y = a[t].add(off);
        let p = dot_i8_split(aq, q, ld(y.add(2)));
        let d = _mm256_mul_ps(dx, f16x8(y));
        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[t]);
    }
}

/// Each accumulator's horizontal sum, always as `((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7))`
/// whatever `T` is, so a token's sum does not depend on the others: four at a time with three
/// `hadd`s (a fraction of four separate sums' shuffles), a lone one with two shuffles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsums<const T: usize>(acc: [__m256; T]) -> [f32; T] {
    let mut out = [0f32; T];
    let z = _mm256_setzero_ps();
    let mut t = 0;
    while t + 1 < T {
        let c = if t + 2 < T { acc[t + 2] } else { z };
        let d = if t + 3 < T { acc[t + 3] } else { z };
        let ab = _mm256_hadd_ps(acc[t], acc[t + 1]);
        let cd = _mm256_hadd_ps(c, d);
        let s = _mm256_hadd_ps(ab, cd);
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let mut four = [0f32; 4];
        _mm_storeu_ps(four.as_mut_ptr(), s);
        for (k, &v) in four.iter().enumerate().take(T - t) {
            out[t + k] = v;
        }
        t += 4;
    }
    if t < T {
        // Pairs (commutative adds: the same bits as `hadd`'s), then pairs of pairs, then halves.
        let v = acc[t];
        let v = _mm256_add_ps(v, _mm256_permute_ps(v, 0b10_11_00_01));
        let v = _mm256_add_ps(v, _mm256_permute_ps(v, 0b01_00_11_10));
        let s = _mm_add_ss(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        out[t] = _mm_cvtss_f32(s);
    }
    out
}

/// `Σ (d·q + m)·dy·qy = d·dy·Σ q·qy + m·s` where Q8_1's `s = dy·Σ qy`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Every lane of `summ` holds the same running sum.
    let mut summ = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(i * 20), a.add(i * 36));
        let p = dot_u8(nibbles_32(x.add(4)), ld(y.add(4)));
        let d = _mm256_mul_ps(f16x8(x), f16x8(y));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        summ = _mm256_fmadd_ps(f16x8(x.add(2)), f16x8(y.add(2)), summ);
    }
    hsum_ps(acc) + _mm256_cvtss_f32(summ)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Every lane of `summ` holds the same running sum.
    let mut summ = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(i * 24), a.add(i * 36));
        let hi = _mm256_and_si256(bits_32(x.add(4)), _mm256_set1_epi8(0x10));
        let q = _mm256_or_si256(nibbles_32(x.add(8)), hi);
        let p = dot_u8(q, ld(y.add(4)));
        let d = _mm256_mul_ps(f16x8(x), f16x8(y));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        summ = _mm256_fmadd_ps(f16x8(x.add(2)), f16x8(y.add(2)), summ);
    }
    hsum_ps(acc) + _mm256_cvtss_f32(summ)
}

// ---------------------------------------------------------------------------------------------
// K-quants against Q8_K (`d` f32 at 0, `qs[256]` at 4, `bsums[16]` i16 at 260).

const Y_QS: usize = 4;
const Y_BSUMS: usize = 260;

/// Q4_K/Q5_K's 8 scales and 8 mins, each as 8 bytes in the low half of a vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_scales_mins_split(p: *const u8) -> (__m128i, __m128i) {
    const M6: u64 = 0x3f3f3f3f;
    const M4: u64 = 0x0f0f0f0f;
    const M2: u64 = 0x03030303;
    let s01 = core::ptr::read_unaligned(p as *const u64);
    let s2 = core::ptr::read_unaligned(p.add(8) as *const u32) as u64;
    let (s0, s1) = (s01 & 0xffff_ffff, s01 >> 32);
    let sc = (s0 & M6) | (((s2 & M4) | (((s0 >> 6) & M2) << 4)) << 32);
    let mn = (s1 & M6) | ((((s2 >> 4) & M4) | (((s1 >> 6) & M2) << 4)) << 32);
    (_mm_cvtsi64_si128(sc as i64), _mm_cvtsi64_si128(mn as i64))
}

/// Controls of [`scale_k`]: row `k` repeats bytes `2k, 2k + 1`.
static SCALE_CTRL: [[u8; 32]; 8] = pair_ctrl(1);

/// Scale `k` of Q4_K/Q5_K in every i16 lane, from the 8 scales as i16 in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_k(scales: __m256i, k: usize) -> __m256i {
    _mm256_shuffle_epi8(scales, ld(SCALE_CTRL[k & 7].as_ptr()))
}

/// The mins term of Q4_K/Q5_K, `Σ_j m_j · (bsum_{2j} + bsum_{2j+1})`, as 8 i32 lanes: each
/// min covers 32 values, i.e. two Q8_K block sums, so it is paired with both.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_mins_dot(mn: __m128i, y: *const u8) -> __m256i {
    let mn2 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn));
    _mm256_madd_epi16(mn2, ld(y.add(Y_BSUMS)))
}

/// Quarter `j` of the Q5_K block at `x` as two vectors of 32 values (0..31): groups `2j` and
/// `2j + 1`. Bit `2j` of `qh[l]` is the fifth bit of low-nibble value `l`, bit `2j + 1` that
/// of the high one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_quarter(x: *const u8, j: usize, m4: __m256i) -> (__m256i, __m256i) {
    let one = _mm256_set1_epi8(1);
    let hbits = _mm256_srl_epi16(ld(x.add(16)), _mm_cvtsi32_si128(2 * j as i32));
    let bits = ld(x.add(48 + 32 * j));
    let h_lo = _mm256_slli_epi16(_mm256_and_si256(hbits, one), 4);
    let h_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 1), one), 4);
    let lo = _mm256_or_si256(_mm256_and_si256(bits, m4), h_lo);
    let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), h_hi);
    (lo, hi)
}

/// Quarter `j` of the Q4_K block at `x` as two vectors of 32 values (0..15): groups `2j` and
/// `2j + 1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_quarter(x: *const u8, j: usize, m4: __m256i) -> (__m256i, __m256i) {
    let bits = ld(x.add(16 + 32 * j));
    (
        _mm256_and_si256(bits, m4),
        _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    q4_k_n::<1>(nb, w, [a])[0]
}

/// Q4_K rows against `T` Q8_K rows: each block's values and scales are unpacked once for all
/// of them.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_n<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    k4_n::<T, false>(nb, w, a, 144, q4_k_quarter)
}

/// Q4_K/Q5_K rows (`bytes` per block, quarters unpacked by `quarter`) against `T` rows of
/// Q8_K activations, or of Q16_K ones with `Q16`.
#[inline(always)]
unsafe fn k4_n<const T: usize, const Q16: bool>(
    nb: usize,
    w: *const u8,
    a: [*const u8; T],
    bytes: usize,
    quarter: unsafe fn(*const u8, usize, __m256i) -> (__m256i, __m256i),
) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let x = w.add(i * bytes);
        if T == 1 {
            prefetch_ahead(x, bytes);
        }
        let (sc, mn) = k4_scales_mins_split(x.add(4));
        let sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc));
        let mut sumi = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            let (lo, hi) = quarter(x, j, m4);
            if Q16 {
                for (g, q) in [(2 * j, lo), (2 * j + 1, hi)] {
                    // Scale masks `[s, 0]` and `[0, s]` per i16: the even and the odd bytes.
                    let even = scale_k(sc, g);
                    let odd = _mm256_slli_epi16(even, 8);
                    let (we, wo) = (_mm256_maddubs_epi16(q, even), _mm256_maddubs_epi16(q, odd));
                    group_q16(&mut sumi, we, wo, a, i * Z_BYTES + Z_QS + 64 * g);
                }
            } else {
                let (sl, sh) = (scale_k(sc, 2 * j), scale_k(sc, 2 * j + 1));
                k4_quarter(&mut sumi, lo, hi, sl, sh, a, i * 292 + Y_QS + 64 * j);
            }
        }
        if Q16 {
            k4_block_end_q16(&mut acc, &sumi, x, mn, a, i * Z_BYTES);
        } else {
            k4_block_end(&mut acc, &sumi, x, mn, a, i * 292);
        }
    }
    hsums(acc)
}

/// One 64-value quarter of a Q4_K/Q5_K block for `T` tokens: `sumi[t] += sl·Σ lo·y + sh·Σ hi·y`
/// with the token's 64 Q8_K values at byte `off` of its row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_quarter<const T: usize>(
    sumi: &mut [__m256i; T],
    lo: __m256i,
    hi: __m256i,
    sl: __m256i,
    sh: __m256i,
    a: [*const u8; T],
    off: usize,
) {
    for t in 0..T {
        let q8 = a[t].add(off);
        let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, ld(q8)));
        let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, ld(q8.add(32))));
        sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(pl, ph));
    }
}

/// The float part of a Q4_K/Q5_K block for `T` tokens: `acc += d·dy·Σ sc·q·y − dmin·dy·Σ m·bsum`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_block_end<const T: usize>(
    acc: &mut [__m256; T],
    sumi: &[__m256i; T],
    x: *const u8,
    mn: __m128i,
    a: [*const u8; T],
    off: usize,
) {
    let (dx, dminx) = (f16x8(x), f16x8(x.add(2)));
    for t in 0..T {
        let y = a[t].add(off);
        let yd = f32x8(y);
        let mins = _mm256_cvtepi32_ps(k4_mins_dot(mn, y));
        acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(yd, dminx), mins, acc[t]);
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(yd, dx), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
    }
}

/// `acc[t] += (dy_t · dx) · sumi[t]`, lane by lane, `dy_t` the activation scale (f32) at
/// `a[t] + off`: the float step of a Q6_K block or half block, whose scales are all in `sumi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_sums<const T: usize>(
    acc: &mut [__m256; T],
    sumi: &[__m256i; T],
    dx: __m256,
    a: [*const u8; T],
    off: usize,
) {
    for t in 0..T {
        let d = _mm256_mul_ps(f32x8(a[t].add(off)), dx);
        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    q5_k_n::<1>(nb, w, [a])[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_n<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    k4_n::<T, false>(nb, w, a, 176, q5_k_quarter)
}

/// `Σ_k sc_k · bsum_k` over the 16 per-16 scales (i8) of a Q2_K/Q3_K/Q6_K block, as 8 i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_bsums(sc: __m128i, y: *const u8) -> __m256i {
    _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc), ld(y.add(Y_BSUMS)))
}

/// The 128 values of half `h` of the Q6_K block at `x`, stored as `q + 32` (0..63), as four
/// vectors of 32 bytes: values `128 h + 32 k + l` in byte `l` of vector `k`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_half(x: *const u8, h: usize, m4: __m256i) -> [__m256i; 4] {
    let ql = x.add(64 * h);
    let qh = ld(x.add(128 + 32 * h));
    let ql0 = ld(ql);
    let ql1 = ld(ql.add(32));
    // The two high bits of value group t sit at bits 2t..2t+2 of qh: move them to 4..6.
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0c)), 2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
            _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
            _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0xc0u8 as i8)), 2),
        ),
    ]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    q6_k_n::<1>(nb, w, [a])[0]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_n<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let x = w.add(i * 210);
        if T == 1 {
            prefetch_ahead(x, 210);
        }
        let sc = ld128(x.add(192));
        // Values are stored as q + 32 (unsigned 0..63): subtract 32·Σ sc·bsum once.
        let mut sumi = [_mm256_setzero_si256(); T];
        for t in 0..T {
            let sb = _mm256_slli_epi32(scaled_bsums(sc, a[t].add(i * 292)), 5);
            sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(), sb);
        }
        for h in 0..2 {
            let q = q6_k_half(x, h, m4);
            for (k, &qk) in q.iter().enumerate() {
                let s = pair_scales(sc, 4 * h + k);
                for t in 0..T {
                    let y = a[t].add(i * 292 + Y_QS + 128 * h + 32 * k);
                    let p = _mm256_madd_epi16(s, _mm256_maddubs_epi16(qk, ld(y)));
                    sumi[t] = _mm256_add_epi32(sumi[t], p);
                }
            }
        }
        scaled_sums(&mut acc, &sumi, f16x8(x.add(208)), a, i * 292);
    }
    hsums(acc)
}

// ---------------------------------------------------------------------------------------------
// K-quants against Q16_K (`d` f32 at 0, `d·sum` of each group f32 at 32, `qs[256]` i16 at 64,
// each 32-value group as its 16 even-indexed values then its 16 odd-indexed ones).
//
// Each 32-value group of weights is widened to two vectors of 16 i16 lanes already multiplied by
// the group's scale: `maddubs(q, [s, 0, s, 0, ..])` gives the even bytes `q·s`, `[0, s, ..]` the
// odd ones (one product of each pair is zero, so nothing saturates). Those are shared by every
// token; each token then costs two `madd` (16-bit products summed in pairs into i32) per group.
//
// The i32 sums cannot overflow: |q| <= 32512 (`act::Q16_LIMIT`) and each lane sums 32 products
// per block: Q4_K |q·s| <= 15·63, 32·945·32512 < 2^30; Q5_K |q·s| <= 31·63, 32·1953·32512 =
// 2.03e9 < 2^31 - 1. Q6_K's `(q - 32)·s` reaches 32·128 = 4096, so its sums are converted every
// half block (16 products: 2.13e9 < 2^31 - 1).

/// One 32-value group of weights, widened and scaled to 16-bit lanes (`we`: its even-indexed
/// values, `wo`: its odd ones), for `T` tokens: `sumi[t] += Σ w·y` over the token's group at
/// byte `off` of its row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_q16<const T: usize>(
    sumi: &mut [__m256i; T],
    we: __m256i,
    wo: __m256i,
    a: [*const u8; T],
    off: usize,
) {
    for t in 0..T {
        let y = a[t].add(off);
        let p = _mm256_add_epi32(
            _mm256_madd_epi16(we, ld(y)),
            _mm256_madd_epi16(wo, ld(y.add(32))),
        );
        sumi[t] = _mm256_add_epi32(sumi[t], p);
    }
}

/// The float part of a Q4_K/Q5_K block against Q16_K for `T` tokens:
/// `acc += d·dy·Σ s·q·y − Σ (dmin·m)·(dy·sum)`, the activations holding `dy·sum` per group.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k4_block_end_q16<const T: usize>(
    acc: &mut [__m256; T],
    sumi: &[__m256i; T],
    x: *const u8,
    mn: __m128i,
    a: [*const u8; T],
    off: usize,
) {
    let (dx, dminx) = (f16x8(x), f16x8(x.add(2)));
    let mins = _mm256_mul_ps(dminx, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
    for t in 0..T {
        let y = a[t].add(off);
        let sums = _mm256_loadu_ps(y.add(Z_SUMS) as *const f32);
        acc[t] = _mm256_fnmadd_ps(mins, sums, acc[t]);
        acc[t] = _mm256_fmadd_ps(
            _mm256_mul_ps(f32x8(y), dx),
            _mm256_cvtepi32_ps(sumi[t]),
            acc[t],
        );
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_q16<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    k4_n::<T, true>(nb, w, a, 144, q4_k_quarter)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_q16<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    k4_n::<T, true>(nb, w, a, 176, q5_k_quarter)
}

/// Q6_K rows against `T` Q16_K rows. The stored values are `q + 32` (0..63): each group's
/// 16-bit weights are `(q + 32)·s − 32·s`, |.| <= 4096.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_q16<const T: usize>(nb: usize, w: *const u8, a: [*const u8; T]) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0x0f);
    let low_byte = _mm256_set1_epi16(0xff);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let x = w.add(i * 210);
        if T == 1 {
            prefetch_ahead(x, 210);
        }
        let sc = ld128(x.add(192));
        let dx = f16x8(x.add(208));
        for h in 0..2 {
            let q = q6_k_half(x, h, m4);
            let mut sumi = [_mm256_setzero_si256(); T];
            for (k, &qk) in q.iter().enumerate() {
                // Scales of the group's two 16-value halves, sign-extended to i16.
                let s = pair_scales(sc, 4 * h + k);
                let off = _mm256_slli_epi16(s, 5);
                let we =
                    _mm256_sub_epi16(_mm256_maddubs_epi16(qk, _mm256_and_si256(s, low_byte)), off);
                let wo = _mm256_sub_epi16(_mm256_maddubs_epi16(qk, _mm256_slli_epi16(s, 8)), off);
                group_q16(&mut sumi, we, wo, a, i * Z_BYTES + Z_QS + 256 * h + 64 * k);
            }
            scaled_sums(&mut acc, &sumi, dx, a, i * Z_BYTES);
        }
    }
    hsums(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_k_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    const M4: u32 = 0x0f0f0f0f;
    const M2: u32 = 0x03030303;
    let m2 = _mm256_set1_epi8(0x03);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(i * 110), a.add(i * 292));
        let d = _mm256_mul_ps(f32x8(y), f16x8(x.add(108)));
        let s = x.add(96);
        let s0 = core::ptr::read_unaligned(s as *const u32);
        let s1 = core::ptr::read_unaligned(s.add(4) as *const u32);
        let s2 = core::ptr::read_unaligned(s.add(8) as *const u32);
        let sc = _mm_set_epi32(
            (((s1 >> 4) & M4) | (((s2 >> 6) & M2) << 4)) as i32,
            (((s0 >> 4) & M4) | (((s2 >> 4) & M2) << 4)) as i32,
            ((s1 & M4) | (((s2 >> 2) & M2) << 4)) as i32,
            ((s0 & M4) | ((s2 & M2) << 4)) as i32,
        );
        let sc = _mm_sub_epi8(sc, _mm_set1_epi8(32));
        let q8 = y.add(Y_QS);
        // Values are stored as q + 4 (0..7, the high bit set meaning "no -4").
        let mut sumi = _mm256_slli_epi32(scaled_bsums(sc, y), 2);
        sumi = _mm256_sub_epi32(_mm256_setzero_si256(), sumi);
        let mut hm = ld(x);
        for h in 0..2 {
            let mut qs = ld(x.add(32 + 32 * h));
            for t in 0..4 {
                let lo = _mm256_and_si256(qs, m2);
                qs = _mm256_srli_epi16(qs, 2);
                let hb = _mm256_slli_epi16(_mm256_and_si256(hm, one), 2);
                hm = _mm256_srli_epi16(hm, 1);
                let q = _mm256_or_si256(lo, hb);
                let p = _mm256_maddubs_epi16(q, ld(q8.add(128 * h + 32 * t)));
                let p = _mm256_madd_epi16(pair_scales(sc, 4 * h + t), p);
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2_k_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let m2 = _mm256_set1_epi8(0x03);
    let m4 = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for i in 0..nb {
        let (x, y) = (w.add(i * 84), a.add(i * 292));
        let yd = f32x8(y);
        let d = _mm256_mul_ps(yd, f16x8(x.add(80)));
        let dmin = _mm256_mul_ps(yd, f16x8(x.add(82)));
        let raw = ld128(x);
        let sc = _mm_and_si128(raw, m4);
        let mins = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        acc_m = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(scaled_bsums(mins, y)), acc_m);
        let q8 = y.add(Y_QS);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let mut qs = ld(x.add(16 + 32 * h));
            for t in 0..4 {
                let q = _mm256_and_si256(qs, m2);
                qs = _mm256_srli_epi16(qs, 2);
                let p = _mm256_maddubs_epi16(q, ld(q8.add(128 * h + 32 * t)));
                let p = _mm256_madd_epi16(pair_scales(sc, 4 * h + t), p);
                sumi = _mm256_add_epi32(sumi, p);
            }
        }
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(_mm256_add_ps(acc, acc_m))
}

// ---------------------------------------------------------------------------------------------
// Float rows against f32 activations. `nb` is the element count here.

/// `Σ w·x` over `n` elements: `$load(w, i)` gives weights `i..i + 8` as f32, `$scalar(w, i)`
/// weight `i`; four accumulators hide the FMA latency.
macro_rules! float_dot {
    ($n:expr, $w:expr, $x:expr, $load:expr, $scalar:expr) => {{
        let (n, w, x) = ($n, $w, $x as *const f32);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let j = i + 8 * k;
                *a = _mm256_fmadd_ps($load(w, j), _mm256_loadu_ps(x.add(j)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps($load(w, i), _mm256_loadu_ps(x.add(i)), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum_ps(v);
        while i < n {
            s += $scalar(w, i) * *x.add(i);
            i += 1;
        }
        s
    }};
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f32x8(w: *const u8, j: usize) -> __m256 {
    _mm256_loadu_ps(w.add(4 * j) as *const f32)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f32(w: *const u8, j: usize) -> f32 {
    f32_at(w.add(4 * j))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f16x8(w: *const u8, j: usize) -> __m256 {
    _mm256_cvtph_ps(ld128(w.add(2 * j)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f16(w: *const u8, j: usize) -> f32 {
    f16_at(w.add(2 * j))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_bf16x8(w: *const u8, j: usize) -> __m256 {
    let v = _mm256_cvtepu16_epi32(ld128(w.add(2 * j)));
    _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_bf16(w: *const u8, j: usize) -> f32 {
    f32::from_bits((core::ptr::read_unaligned(w.add(2 * j) as *const u16) as u32) << 16)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_avx2(n: usize, w: *const u8, a: *const u8) -> f32 {
    float_dot!(n, w, a, ld_f32x8, ld_f32)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_avx2(n: usize, w: *const u8, a: *const u8) -> f32 {
    float_dot!(n, w, a, ld_f16x8, ld_f16)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_avx2(n: usize, w: *const u8, a: *const u8) -> f32 {
    float_dot!(n, w, a, ld_bf16x8, ld_bf16)
}

// ---------------------------------------------------------------------------------------------
// FP8 E4M3FN.

/// 16 E4M3 bytes as two vectors of 8 f32, each `2^-8` times the true value: the sign, exponent
/// and mantissa bits are moved into an IEEE half (exponent bias 15 instead of 7), which F16C
/// widens exactly, subnormals included.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn e4m3x16(p: *const u8) -> (__m256, __m256) {
    let v = _mm256_cvtepu8_epi16(ld128(p));
    let sign = _mm256_and_si256(_mm256_slli_epi16(v, 8), _mm256_set1_epi16(i16::MIN));
    let mag = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16(0x3f80));
    let h = _mm256_or_si256(sign, mag);
    (
        _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
        _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)),
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_avx2(w: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    const UNBIAS: f32 = 256.0; // 2^(15 - 7)
    let lut = super::fp8::lut();
    let mut total = 0f32;
    for (blk, (wc, s)) in w.chunks(128).zip(scales).enumerate() {
        let xc = x.as_ptr().add(blk * 128);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= wc.len() {
            let (lo, hi) = e4m3x16(wc.as_ptr().add(i));
            acc0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xc.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xc.add(i + 8)), acc1);
            i += 16;
        }
        let mut sum = hsum_ps(_mm256_add_ps(acc0, acc1)) * UNBIAS;
        while i < wc.len() {
            sum += lut[wc[i] as usize] * *xc.add(i);
            i += 1;
        }
        total += sum * s;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{random_activation, random_f32, random_weights};
    use crate::quant::{act, dequant, dot, fp8};

    const KERNEL_TYPES: &[QuantType] = &[
        QuantType::Q4_K,
        QuantType::Q6_K,
        QuantType::Q8_0,
        QuantType::F32,
        QuantType::BF16,
        QuantType::F16,
        QuantType::Q5_K,
        QuantType::Q5_0,
        QuantType::Q3_K,
        QuantType::Q2_K,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_1,
    ];

    /// Row lengths: 1..=8 blocks, then the 671B's 2048, 7168 and 16384; for float types also
    /// lengths that leave a scalar tail.
    fn lengths(ty: QuantType) -> Vec<usize> {
        let be = ty.block_elems().max(32);
        let mut v: Vec<usize> = (1..=8).map(|k| k * be).collect();
        v.extend([2048, 7168, 16384]);
        if ty.block_elems() == 1 {
            v.extend([1, 7, 9, 31, 33, 100]);
        }
        v
    }

    /// `Σ |w_i·a_i|`: the scale the rounding error of any summation order is bounded by.
    fn magnitude(ty: QuantType, n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut wf = vec![0f32; n];
        let mut af = vec![0f32; n];
        dequant::dequantize_row(ty, w, &mut wf).unwrap();
        dequant::dequantize_row(ty.vec_dot_type(), a, &mut af).unwrap();
        wf.iter().zip(&af).map(|(x, y)| (x * y).abs()).sum()
    }

    /// The integer parts are exact, so the kernels differ from the scalar reference only by
    /// f32 summation order: relative 1e-5 of `Σ |w·a|` (observed: ~1e-8).
    fn check_against_reference(ty: QuantType, n: usize, w: &[u8], a: &[u8]) {
        let fast = kernel(ty).expect("kernel")(n, w, a);
        let want = dot::vec_dot(ty, n, w, a);
        let tol = 1e-5 * magnitude(ty, n, w, a) + 1e-30;
        assert!(
            (fast - want).abs() <= tol,
            "{ty} n={n}: avx2 {fast} vs scalar {want} (tolerance {tol})"
        );
    }

    #[test]
    fn every_kernel_matches_the_scalar_reference() {
        if !full() {
            eprintln!("no AVX2/FMA/F16C: nothing to test");
            return;
        }
        for &ty in KERNEL_TYPES {
            for (k, n) in lengths(ty).into_iter().enumerate() {
                let seed = 100 * k as u64 + ty.block_bytes() as u64;
                let w = random_weights(ty, n, seed);
                // Activations as the engine makes them (the quantiser) and synthetic ones
                // covering the whole ±127 range.
                let x = random_f32(n, seed + 1);
                let mut aq = vec![0u8; ty.vec_dot_type().row_bytes(n).unwrap()];
                act::quantize_row(ty.vec_dot_type(), &x, &mut aq).unwrap();
                check_against_reference(ty, n, &w, &aq);
                let ar = random_activation(ty.vec_dot_type(), n, seed + 2);
                check_against_reference(ty, n, &w, &ar);
            }
        }
    }

    #[test]
    fn kernels_read_rows_at_any_alignment() {
        if !full() {
            return;
        }
        for &ty in KERNEL_TYPES {
            let n = 2 * ty.block_elems().max(128);
            let w = random_weights(ty, n, 9);
            let a = random_activation(ty.vec_dot_type(), n, 10);
            let want = kernel(ty).unwrap()(n, &w, &a);
            for off in 1..8 {
                let mut ws = vec![0u8; off];
                ws.extend_from_slice(&w);
                let mut as_ = vec![0u8; off + 3];
                as_.extend_from_slice(&a);
                let got = kernel(ty).unwrap()(n, &ws[off..], &as_[off + 3..]);
                assert_eq!(got.to_bits(), want.to_bits(), "{ty} offset {off}");
            }
        }
    }

    /// The multi-token kernels give each token and row exactly the one-token kernel's bits,
    /// where the tile says, and write nothing else.
    #[test]
    fn multi_token_kernels_equal_the_one_token_kernel() {
        if !full() {
            return;
        }
        for ty in [
            QuantType::Q4_K,
            QuantType::Q5_K,
            QuantType::Q6_K,
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q5_0,
        ] {
            let (multi, _) = kernel_multi(ty).expect("multi kernel");
            let one = kernel(ty).unwrap();
            for (k, n) in [256usize, 512, 768, 2048].into_iter().enumerate() {
                let rows = 1 + k;
                let w = random_weights(ty, rows * n, 7 + k as u64);
                let wb = ty.row_bytes(n).unwrap();
                let at = ty.vec_dot_type();
                let rb = at.row_bytes(n).unwrap();
                // Rows with a gap between them: the stride need not be the row size.
                let stride = rb + 3;
                let mut a = vec![0u8; MULTI * stride];
                for t in 0..MULTI {
                    let row = random_activation(at, n, 50 + t as u64);
                    a[t * stride..t * stride + rb].copy_from_slice(&row);
                }
                for count in 1..=MULTI {
                    let os = rows + 2;
                    let mut out = vec![f32::NAN; (count - 1) * os + rows];
                    let tile = Tile {
                        cols: n,
                        w: &w,
                        row_bytes: wb,
                        a: &a,
                        stride,
                        tokens: count,
                        out_stride: os,
                    };
                    multi(&tile, &mut out);
                    for (i, &o) in out.iter().enumerate() {
                        let (t, r) = (i / os, i % os);
                        if r >= rows {
                            assert!(o.is_nan(), "{ty} wrote between token rows");
                            continue;
                        }
                        let want = one(n, &w[r * wb..], &a[t * stride..t * stride + rb]);
                        assert_eq!(
                            o.to_bits(),
                            want.to_bits(),
                            "{ty} n={n} row {r} token {t} of {count}"
                        );
                    }
                }
            }
        }
    }

    /// `x` quantised to a Q16_K row.
    fn q16(x: &[f32]) -> Vec<u8> {
        let mut y = vec![0u8; QuantType::Q16_K.row_bytes(x.len()).unwrap()];
        act::quantize_row(QuantType::Q16_K, x, &mut y).unwrap();
        y
    }

    /// `Σ w·a` in f64 over the dequantised weights and the Q16_K values, with `Σ |w·a|`.
    fn q16_reference(ty: QuantType, n: usize, w: &[u8], a: &[u8]) -> (f64, f64) {
        let mut wf = vec![0f32; n];
        dequant::dequantize_row(ty, w, &mut wf).unwrap();
        let (mut dot, mut mag) = (0f64, 0f64);
        for (wb, ab) in wf.chunks(QK_K).zip(a.chunks(Z_BYTES)) {
            let (d, q) = act::q16_k_values(ab);
            for (&wv, &qv) in wb.iter().zip(&q) {
                let p = wv as f64 * d as f64 * qv as f64;
                dot += p;
                mag += p.abs();
            }
        }
        (dot, mag)
    }

    /// Runs `ty`'s Q16_K kernel on `count` tokens (rows `stride` apart in `a`) over `rows`
    /// weight rows: `out[t][r]`.
    fn run_q16(
        ty: QuantType,
        n: usize,
        w: &[u8],
        a: &[u8],
        stride: usize,
        count: usize,
    ) -> Vec<Vec<f32>> {
        let (multi, _) = kernel_q16(ty).expect("Q16_K kernel");
        let wb = ty.row_bytes(n).unwrap();
        let rows = w.len() / wb;
        let mut out = vec![f32::NAN; count * rows];
        let tile = Tile {
            cols: n,
            w,
            row_bytes: wb,
            a,
            stride,
            tokens: count,
            out_stride: rows,
        };
        multi(&tile, &mut out);
        out.chunks(rows).map(|c| c.to_vec()).collect()
    }

    /// The Q16_K kernels: within f32 rounding of the f64 product of the same values (their
    /// integer parts are exact), and each token's result bit for bit the same whatever the
    /// number of tokens in the call.
    #[test]
    fn q16_kernels_match_the_reference_for_any_token_count() {
        if !full() {
            return;
        }
        for ty in [QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K] {
            for (k, n) in [256usize, 512, 2048, 7168].into_iter().enumerate() {
                let rows = 3;
                let w = random_weights(ty, rows * n, 17 + k as u64);
                let wb = ty.row_bytes(n).unwrap();
                let rb = QuantType::Q16_K.row_bytes(n).unwrap();
                let stride = rb + 5;
                let mut a = vec![0u8; MULTI * stride];
                for t in 0..MULTI {
                    // Blocks of different magnitudes, one all zero.
                    let x: Vec<f32> = random_f32(n, 60 + t as u64)
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            if (i / QK_K + t) % 5 == 4 {
                                0.0
                            } else {
                                v * (1 + i / QK_K) as f32
                            }
                        })
                        .collect();
                    a[t * stride..t * stride + rb].copy_from_slice(&q16(&x));
                }
                let alone: Vec<Vec<f32>> = (0..MULTI)
                    .map(|t| run_q16(ty, n, &w, &a[t * stride..], stride, 1).remove(0))
                    .collect();
                for t in 0..MULTI {
                    for r in 0..rows {
                        let (want, mag) = q16_reference(
                            ty,
                            n,
                            &w[r * wb..(r + 1) * wb],
                            &a[t * stride..t * stride + rb],
                        );
                        let got = alone[t][r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * mag + 1e-30,
                            "{ty} n={n} row {r} token {t}: {got} vs {want}"
                        );
                    }
                }
                for count in 2..=MULTI {
                    let out = run_q16(ty, n, &w, &a, stride, count);
                    for (t, o) in out.iter().enumerate() {
                        assert_eq!(
                            o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            alone[t].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{ty} n={n} token {t} of {count}"
                        );
                    }
                }
            }
        }
    }

    /// The largest products the formats allow do not overflow the kernels' i32 sums: every
    /// weight value and scale at its extreme, every activation at ±32512 with the weights'
    /// sign, against the same sum in i64.
    #[test]
    fn q16_kernels_do_not_overflow_at_the_extremes() {
        if !full() {
            return;
        }
        let one = half::f16::from_f32(1.0).to_le_bytes();
        let zero = [0u8; 2];
        // Q4_K/Q5_K: d = 1, dmin = 0, every 6-bit scale 63, every value at its maximum.
        let mut q4 = vec![0xffu8; 144];
        q4[0..2].copy_from_slice(&one);
        q4[2..4].copy_from_slice(&zero);
        let mut q5 = vec![0xffu8; 176];
        q5[0..2].copy_from_slice(&one);
        q5[2..4].copy_from_slice(&zero);
        // Q6_K: every value 0 (-32 once offset), every scale -128, d = 1.
        let mut q6 = vec![0u8; 210];
        q6[192..208].fill(0x80);
        q6[208..210].copy_from_slice(&one);
        for (ty, w) in [
            (QuantType::Q4_K, q4),
            (QuantType::Q5_K, q5),
            (QuantType::Q6_K, q6),
        ] {
            let mut wf = vec![0f32; QK_K];
            dequant::dequantize_row(ty, &w, &mut wf).unwrap();
            let x: Vec<f32> = wf.iter().map(|v| v.signum()).collect();
            let a = q16(&x);
            let (d, q) = act::q16_k_values(&a);
            assert!(
                q.iter().all(|v| v.abs() == 32512),
                "{ty}: activations at the limit"
            );
            let exact: i64 = wf
                .iter()
                .zip(&q)
                .map(|(&wv, &qv)| wv as i64 * qv as i64)
                .sum();
            let want = exact as f64 * d as f64;
            let got = run_q16(ty, QK_K, &w, &a, a.len(), 1)[0][0] as f64;
            assert!(
                want.abs() > 1e5,
                "{ty}: the test reaches large sums ({want})"
            );
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{ty}: {got} vs {want}"
            );
        }
    }

    /// The lone and the grouped horizontal sums add in the same order.
    #[test]
    fn horizontal_sums_do_not_depend_on_the_group() {
        if !full() {
            return;
        }
        let vals = crate::bench::random_f32(8 * 8, 3);
        // SAFETY: features checked above; loads of 8 floats from slices of 8.
        unsafe {
            let mut v = [_mm256_setzero_ps(); 8];
            for (t, v) in v.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(vals[8 * t..].as_ptr());
            }
            let all = hsums(v);
            for t in 0..8 {
                let x = &vals[8 * t..8 * t + 8];
                let want = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
                assert_eq!(all[t].to_bits(), want.to_bits(), "token {t} of 8");
                assert_eq!(
                    hsums([v[t]])[0].to_bits(),
                    want.to_bits(),
                    "token {t} alone"
                );
            }
            let three = hsums([v[0], v[1], v[2]]);
            assert_eq!(
                three.map(f32::to_bits),
                [all[0], all[1], all[2]].map(f32::to_bits)
            );
        }
    }

    #[test]
    fn types_without_a_kernel_fall_back() {
        for ty in [QuantType::IQ2_XXS, QuantType::F8E4M3, QuantType::Q8_K] {
            assert!(vec_dot(ty, 256, &[], &[]).is_none());
        }
    }

    #[test]
    #[should_panic]
    fn short_rows_panic_instead_of_reading_past_the_end() {
        if !full() {
            panic!("no AVX2: nothing to test");
        }
        let w = random_weights(QuantType::Q4_K, 512, 1);
        let a = random_activation(QuantType::Q8_K, 256, 1);
        kernel(QuantType::Q4_K).unwrap()(512, &w, &a);
    }

    #[test]
    fn fp8_matches_the_scalar_reference() {
        if !full() {
            return;
        }
        for n in [16usize, 128, 200, 7168] {
            let w: Vec<u8> = (0..n)
                .map(|i| crate::bench::splitmix(i as u64) as u8)
                // NaN encodings do not occur in checkpoints.
                .map(|b| if b & 0x7f == 0x7f { b ^ 1 } else { b })
                .collect();
            let scales: Vec<f32> = (0..n.div_ceil(128)).map(|k| 0.5 + k as f32).collect();
            let x = random_f32(n, 3);
            let want = fp8::dot_row(&w, &scales, &x);
            let got = fp8_dot_row(&w, &scales, &x).unwrap();
            let mag: f32 = w
                .iter()
                .zip(&x)
                .enumerate()
                .map(|(i, (&b, xv))| (fp8::e4m3_to_f32(b) * scales[i / 128] * xv).abs())
                .sum();
            assert!((got - want).abs() <= 1e-5 * mag, "n={n}: {got} vs {want}");
        }
    }

    #[test]
    fn fp8_subnormals_and_signs_decode_exactly() {
        if !full() {
            return;
        }
        let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
        let n = bytes.len() / 16 * 16;
        for c in bytes[..n].chunks(16) {
            // SAFETY: features checked above; 16 bytes available.
            let (lo, hi) = unsafe { e4m3x16(c.as_ptr()) };
            let mut v = [0f32; 16];
            // SAFETY: 16 f32 fit in `v`.
            unsafe {
                _mm256_storeu_ps(v.as_mut_ptr(), lo);
                _mm256_storeu_ps(v.as_mut_ptr().add(8), hi);
            }
            for (k, &b) in c.iter().enumerate() {
                assert_eq!(v[k] * 256.0, fp8::e4m3_to_f32(b), "byte {b:#x}");
            }
        }
    }
}
