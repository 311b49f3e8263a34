//! Activation quantisation (Q8_0, Q8_1, Q8_K), byte-identical to ggml's `quantize_row_*_ref`
//! (same scale computation, same rounding, f16 scales rounded to nearest even).
//!
//! Layouts (little-endian, packed): `block_q8_0 {f16 d; i8 qs[32]}` (34 bytes),
//! `block_q8_1 {f16 d; f16 s; i8 qs[32]}` (36 bytes, `s = d * sum(qs)`),
//! `block_q8_K {f32 d; i8 qs[256]; i16 bsums[16]}` (292 bytes).
//!
//! Q16_K is this engine's own: 16-bit activations for the K-quant kernels. Each 256-value
//! block gets `d = amax / 32512` and `q = round(x / d)` (half to even, |q| <= 32512), so each
//! value is within `d / 2` = amax / 65024 of `x`, where int8 activations are within amax / 254.
//! `block_q16_K {f32 d; u8 pad[28]; f32 sums[8]; i16 qs[256]}` (576 bytes, nine cache lines):
//! `sums[j]` is `d` times the sum of the 32 values of group `j` (what the mins of Q4_K/Q5_K
//! multiply), and `qs` holds each group's even-indexed values, then its odd-indexed ones: the
//! order in which the kernels widen a group of packed weights into 16-bit lanes (even bytes
//! with one `maddubs`, odd bytes with another).
//!
//! The caller (`quant::quantize_activation`) has checked the lengths.

use half::f16;

use super::{QuantError, QuantType, QK_K};

pub fn quantize_row(ty: QuantType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if matches!(
        ty,
        QuantType::Q8_0 | QuantType::Q8_1 | QuantType::Q8_K | QuantType::Q16_K
    ) && x86::available()
    {
        // SAFETY: AVX2 checked; the caller has checked that `dst` holds `src`'s blocks.
        unsafe { x86::quantize_row(ty, src, dst) };
        return Ok(());
    }
    quantize_row_scalar(ty, src, dst)
}

/// The reference quantisers, one value at a time.
fn quantize_row_scalar(ty: QuantType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    match ty {
        QuantType::F32 => {
            for (c, v) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        QuantType::Q8_0 => {
            for (x, y) in src.chunks_exact(32).zip(dst.chunks_exact_mut(34)) {
                q8_0_block(x, y);
            }
        }
        QuantType::Q8_1 => {
            for (x, y) in src.chunks_exact(32).zip(dst.chunks_exact_mut(36)) {
                q8_1_block(x, y);
            }
        }
        QuantType::Q8_K => {
            for (x, y) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(292)) {
                q8_k_block(x, y);
            }
        }
        QuantType::Q16_K => {
            for (x, y) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(Q16_BYTES)) {
                q16_k_block(x, y);
            }
        }
        other => return Err(QuantError::Unsupported(other.name())),
    }
    Ok(())
}

/// The largest |v| of `x`, as ggml finds it (its MAX(a, b) is `a > b ? a : b`, kept as such).
#[inline(always)]
fn amax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |m, v| if m > v.abs() { m } else { v.abs() })
}

/// `d = amax / 127` and its inverse (0 for an all-zero block), as `quantize_row_q8_0_ref`.
#[inline(always)]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let d = amax(x) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

fn q8_0_block(x: &[f32], y: &mut [u8]) {
    let (d, id) = q8_scale(x);
    y[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, &v) in y[2..34].iter_mut().zip(x) {
        // `roundf` rounds half away from zero. |v * id| <= 127 by construction; where C's
        // conversion would be undefined (NaN input) Rust's cast saturates instead.
        *q = (v * id).round() as i8 as u8;
    }
}

fn q8_1_block(x: &[f32], y: &mut [u8]) {
    let (d, id) = q8_scale(x);
    y[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let mut sum = 0i32;
    for (q, &v) in y[4..36].iter_mut().zip(x) {
        let qi = (v * id).round() as i8;
        sum += qi as i32;
        *q = qi as u8;
    }
    y[2..4].copy_from_slice(&f16::from_f32(sum as f32 * d).to_le_bytes());
}

/// ggml's `nearest_int`: round half to even (valid for |v| < 2^22, which the callers ensure).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

fn q8_k_block(x: &[f32], y: &mut [u8]) {
    // The element of largest magnitude, with its sign: the scale is negative when it is positive
    // (as in ggml, which maps it to -127).
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax == 0.0 {
        y.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    for (q, &v) in y[4..4 + QK_K].iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8 as u8;
    }
    q8_k_bsums(y);
    y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// A Q8_K block's 16-value sums, from its values.
fn q8_k_bsums(y: &mut [u8]) {
    let (qs, bsums) = y[4..].split_at_mut(QK_K);
    for (j, bs) in bsums.chunks_exact_mut(2).enumerate() {
        let s: i32 = qs[16 * j..16 * j + 16]
            .iter()
            .map(|&q| q as i8 as i32)
            .sum();
        bs.copy_from_slice(&(s as i16).to_le_bytes());
    }
}

/// Largest |q| of a Q16_K value: small enough that the kernels' i32 sums cannot overflow
/// (see `avx2`'s Q16_K kernels).
const Q16_LIMIT: i32 = 32512;
const Q16_MAX: f32 = Q16_LIMIT as f32;
/// Byte offsets in a Q16_K block: the group sums, then the values.
pub(crate) const Q16_SUMS: usize = 32;
pub(crate) const Q16_QS: usize = 64;
pub(crate) const Q16_BYTES: usize = 576;

/// The 16-bit lane of a 32-value group that holds its value `k`: evens first, then odds.
pub(crate) const fn q16_lane(k: usize) -> usize {
    k / 2 + 16 * (k % 2)
}

/// One Q16_K block.
fn q16_k_block(x: &[f32], y: &mut [u8]) {
    y.fill(0);
    let amax = amax(x);
    if amax == 0.0 {
        return;
    }
    let d = amax / Q16_MAX;
    let id = Q16_MAX / amax;
    for (g, xg) in x.chunks_exact(32).enumerate() {
        let mut sum = 0i32;
        for (k, &v) in xg.iter().enumerate() {
            let q = nearest_int(v * id).clamp(-Q16_LIMIT, Q16_LIMIT);
            sum += q;
            let at = Q16_QS + 2 * (32 * g + q16_lane(k));
            y[at..at + 2].copy_from_slice(&(q as i16).to_le_bytes());
        }
        let ds = d * sum as f32;
        y[Q16_SUMS + 4 * g..Q16_SUMS + 4 * g + 4].copy_from_slice(&ds.to_le_bytes());
    }
    y[0..4].copy_from_slice(&d.to_le_bytes());
}

/// A Q16_K block's scale and its 256 values in natural order.
#[cfg(test)]
pub(crate) fn q16_k_values(y: &[u8]) -> (f32, [i32; QK_K]) {
    let d = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
    let q = std::array::from_fn(|i| {
        let at = Q16_QS + 2 * (32 * (i / 32) + q16_lane(i % 32));
        i16::from_le_bytes([y[at], y[at + 1]]) as i32
    });
    (d, q)
}

/// AVX2 versions of the four quantisers, byte-identical to the scalar ones for finite input:
/// the same f32 products, the same rounding (half away from zero for Q8_0/Q8_1, half to even
/// for Q8_K), the same scale arithmetic. Rounding in registers replaces a libm call per value.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use half::f16;

    use super::{QuantType, QK_K};

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
    }

    /// # Safety
    /// AVX2 must be present; `dst` must hold `src.len() / block` blocks of `ty`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(ty: QuantType, src: &[f32], dst: &mut [u8]) {
        match ty {
            QuantType::Q8_0 => {
                for (x, y) in src.chunks_exact(32).zip(dst.chunks_exact_mut(34)) {
                    let (d, _) = q8_32(x, &mut y[2..34]);
                    y[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                }
            }
            QuantType::Q8_1 => {
                for (x, y) in src.chunks_exact(32).zip(dst.chunks_exact_mut(36)) {
                    let (d, sum) = q8_32(x, &mut y[4..36]);
                    y[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    y[2..4].copy_from_slice(&f16::from_f32(sum as f32 * d).to_le_bytes());
                }
            }
            QuantType::Q8_K => {
                for (x, y) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(292)) {
                    q8_k(x, y);
                }
            }
            QuantType::Q16_K => {
                for (x, y) in src
                    .chunks_exact(QK_K)
                    .zip(dst.chunks_exact_mut(super::Q16_BYTES))
                {
                    q16_k(x, y);
                }
            }
            _ => unreachable!("only the integer activation types are vectorised"),
        }
    }

    /// Largest |v| of `x` (a multiple of 8 values).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn amax(x: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for c in x.chunks_exact(8) {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr())));
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_max_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }

    /// Four vectors of 8 i32 (each in -128..=127) as 32 bytes in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pack32(q: [__m256i; 4], dst: *mut u8) {
        let a = _mm256_packs_epi32(q[0], q[1]);
        let b = _mm256_packs_epi32(q[2], q[3]);
        let p = _mm256_packs_epi16(a, b);
        // The packs work per 128-bit lane: put the 4-byte groups back in order.
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(dst as *mut __m256i, p);
    }

    /// One 32-value block as Q8_0/Q8_1 quantise it: `qs` gets the values, the result is `d`
    /// and the sum of the values.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q8_32(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
        assert!(x.len() == 32 && qs.len() == 32);
        let d = amax(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let mut q = [_mm256_setzero_si256(); 4];
        for (k, qk) in q.iter_mut().enumerate() {
            let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8 * k)), idv);
            // roundf: truncate, then step away from zero when the dropped part is >= 0.5
            // (v - trunc(v) is exact).
            let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
            let step = _mm256_or_ps(_mm256_and_ps(v, sign), one);
            let up = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), step);
            *qk = _mm256_cvtps_epi32(_mm256_add_ps(t, up));
        }
        pack32(q, qs.as_mut_ptr());
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        (d, _mm_cvtsi128_si32(s))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q8_k(x: &[f32], y: &mut [u8]) {
        assert!(x.len() == QK_K && y.len() == 292);
        let amax = amax(x);
        if amax == 0.0 {
            y.fill(0);
            return;
        }
        // The first value of largest magnitude, with its sign (as the scalar loop finds it).
        let max = *x.iter().find(|v| v.abs() == amax).unwrap_or(&amax);
        let iscale = -127.0 / max;
        let isv = _mm256_set1_ps(iscale);
        let lim = _mm256_set1_epi32(127);
        let qs = y.as_mut_ptr().add(4);
        let bsums = y.as_mut_ptr().add(4 + QK_K);
        // 64 values per pass: 4 groups of 16 (one bsum each).
        for p in 0..4 {
            let mut q = [_mm256_setzero_si256(); 8];
            for (k, qk) in q.iter_mut().enumerate() {
                let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(64 * p + 8 * k)), isv);
                let r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                *qk = _mm256_min_epi32(_mm256_cvtps_epi32(r), lim);
            }
            pack32([q[0], q[1], q[2], q[3]], qs.add(64 * p));
            pack32([q[4], q[5], q[6], q[7]], qs.add(64 * p + 32));
            bsums64(&q, bsums.add(8 * p));
        }
        y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }

    /// The 16-value sums of 64 values held as 8 vectors of 8 i32, as 4 i16 at `dst`: group
    /// sums `g_j = q[2j] + q[2j+1]`, then a horizontal add tree.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bsums64(q: &[__m256i; 8], dst: *mut u8) {
        let g = [
            _mm256_add_epi32(q[0], q[1]),
            _mm256_add_epi32(q[2], q[3]),
            _mm256_add_epi32(q[4], q[5]),
            _mm256_add_epi32(q[6], q[7]),
        ];
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(g[0], g[1]), _mm256_hadd_epi32(g[2], g[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_storel_epi64(dst as *mut __m128i, _mm_packs_epi32(s, s));
    }

    /// One Q16_K block (`super::q16_k_block`'s arithmetic, in registers).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn q16_k(x: &[f32], y: &mut [u8]) {
        assert!(x.len() == QK_K && y.len() == super::Q16_BYTES);
        y[..super::Q16_SUMS].fill(0);
        let amax = amax(x);
        if amax == 0.0 {
            y.fill(0);
            return;
        }
        let d = amax / super::Q16_MAX;
        let idv = _mm256_set1_ps(super::Q16_MAX / amax);
        let (lim, nlim) = (
            _mm256_set1_epi32(super::Q16_LIMIT),
            _mm256_set1_epi32(-super::Q16_LIMIT),
        );
        // Within 8 values: the evens to lanes 0..4, the odds to 4..8.
        let split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        let qs = y.as_mut_ptr().add(super::Q16_QS);
        let mut sums = [_mm256_setzero_si256(); 8];
        for (g, sum) in sums.iter_mut().enumerate() {
            let mut v = [_mm256_setzero_si256(); 4];
            for (k, vk) in v.iter_mut().enumerate() {
                let f = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(32 * g + 8 * k)), idv);
                let r = _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                let q = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(r), lim), nlim);
                *vk = _mm256_permutevar8x32_epi32(q, split);
            }
            *sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
            // Values 0..16 and 16..32 as (evens, odds) of 8 i32 each.
            let (e0, o0) = (
                _mm256_permute2x128_si256(v[0], v[1], 0x20),
                _mm256_permute2x128_si256(v[0], v[1], 0x31),
            );
            let (e1, o1) = (
                _mm256_permute2x128_si256(v[2], v[3], 0x20),
                _mm256_permute2x128_si256(v[2], v[3], 0x31),
            );
            // `packs` works per 128-bit lane: put its 8-byte groups back in order.
            let evens = _mm256_permute4x64_epi64(_mm256_packs_epi32(e0, e1), 0b11_01_10_00);
            let odds = _mm256_permute4x64_epi64(_mm256_packs_epi32(o0, o1), 0b11_01_10_00);
            _mm256_storeu_si256(qs.add(64 * g) as *mut __m256i, evens);
            _mm256_storeu_si256(qs.add(64 * g + 32) as *mut __m256i, odds);
        }
        // The 8 group sums: horizontal adds of the 8 vectors of partial sums.
        let h = |a: usize| {
            let p = _mm256_hadd_epi32(
                _mm256_hadd_epi32(sums[a], sums[a + 1]),
                _mm256_hadd_epi32(sums[a + 2], sums[a + 3]),
            );
            _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1))
        };
        let all = _mm256_cvtepi32_ps(_mm256_setr_m128i(h(0), h(4)));
        let ds = _mm256_mul_ps(_mm256_set1_ps(d), all);
        _mm256_storeu_ps(y.as_mut_ptr().add(super::Q16_SUMS) as *mut f32, ds);
        y[0..4].copy_from_slice(&d.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::test_util::{deq, quant, Rng};

    fn vector(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/quant")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Q8_0 against `gguf`'s quantizer; Q8_1 and Q8_K against numpy transcriptions of ggml's
    /// reference code (see `gen_vectors.py`). The inputs include zero blocks, outliers and exact
    /// ties (Q8_0/Q8_1 round half away from zero, Q8_K half to even).
    #[test]
    fn quantize_matches_reference_bytes() {
        for ty in [QuantType::Q8_0, QuantType::Q8_1, QuantType::Q8_K] {
            let x: Vec<f32> = vector(&format!("act_{}.in", ty.name()))
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let want = vector(&format!("act_{}.out", ty.name()));
            let got = quant(ty, &x);
            assert_eq!(got.len(), want.len(), "{ty} size");
            let bb = ty.block_bytes();
            for (b, (g, w)) in got.chunks(bb).zip(want.chunks(bb)).enumerate() {
                assert_eq!(g, w, "{ty} block {b}");
            }
        }
    }

    #[test]
    fn q8_k_block_is_292_bytes_and_f32_is_a_copy() {
        assert_eq!(QuantType::Q8_K.row_bytes(256), Ok(292));
        let x = [1.5f32, -0.0, f32::MIN_POSITIVE, 3e38];
        let got = quant(QuantType::F32, &x);
        assert_eq!(
            got,
            x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()
        );
    }

    /// Round-trip properties on random rows: every value comes back within half a step (plus
    /// the f16 rounding of the scale for Q8_0/Q8_1), the largest one maps to +-127, Q8_1's `s`
    /// is `d * sum(qs)` and Q8_K's `bsums` are the sums of its 16-value groups.
    #[test]
    fn quantize_round_trip_properties() {
        let mut rng = Rng(0x5eed_0003);
        for ty in [QuantType::Q8_0, QuantType::Q8_1, QuantType::Q8_K] {
            let be = ty.block_elems();
            for _ in 0..50 {
                let scale = 10f32.powf(rng.unit() * 8.0 - 4.0);
                let x: Vec<f32> = (0..4 * be).map(|_| rng.normal() * scale).collect();
                let q = quant(ty, &x);
                let y = deq(ty, &q, x.len());
                for (blk, (xb, yb)) in q
                    .chunks(ty.block_bytes())
                    .zip(x.chunks(be).zip(y.chunks(be)))
                {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = amax / 127.0;
                    // Half a step of the f32 scale the values were rounded with, plus (Q8_0,
                    // Q8_1) what storing the scale as f16 moved 127 steps by; tiny scales are
                    // f16 subnormals, so that part is measured, not assumed relative.
                    let stored = match ty {
                        QuantType::Q8_K => f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
                        _ => f16::from_le_bytes([blk[0], blk[1]]).to_f32(),
                    };
                    let bound = 0.5001 * step + 127.0 * (stored.abs() - step).abs();
                    for (a, b) in xb.iter().zip(yb) {
                        assert!((a - b).abs() <= bound, "{ty}: {a} -> {b}, step {step}");
                    }
                    let qs: &[u8] = match ty {
                        QuantType::Q8_0 => &blk[2..34],
                        QuantType::Q8_1 => &blk[4..36],
                        _ => &blk[4..260],
                    };
                    let qmax = qs.iter().map(|&v| (v as i8 as i32).abs()).max().unwrap();
                    assert_eq!(qmax, 127, "{ty}: the largest value uses the full range");
                    if ty == QuantType::Q8_1 {
                        let d = f16::from_le_bytes([blk[0], blk[1]]);
                        let s = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                        let sum: i32 = qs.iter().map(|&v| v as i8 as i32).sum();
                        // s is rounded from the unrounded f32 d, so compare through f16.
                        let d32 = amax / 127.0;
                        assert_eq!(f16::from_f32(d32), d);
                        assert_eq!(s, f16::from_f32(sum as f32 * d32).to_f32());
                    }
                    if ty == QuantType::Q8_K {
                        for j in 0..16 {
                            let want: i32 = qs[16 * j..16 * j + 16]
                                .iter()
                                .map(|&v| v as i8 as i32)
                                .sum();
                            let got = i16::from_le_bytes([blk[260 + 2 * j], blk[261 + 2 * j]]);
                            assert_eq!(got as i32, want, "Q8_K bsum {j}");
                        }
                    }
                }
            }
        }
    }

    /// The vectorised quantisers give the scalar ones' bytes, on random rows of many scales and
    /// on rows built to hit exact rounding ties (the largest value is 127, so the scale is 1).
    #[test]
    fn vectorised_quantisers_match_the_scalar_ones() {
        let mut rng = Rng(0x5eed_0004);
        for ty in [
            QuantType::Q8_0,
            QuantType::Q8_1,
            QuantType::Q8_K,
            QuantType::Q16_K,
        ] {
            let be = ty.block_elems();
            let mut rows: Vec<Vec<f32>> = (0..40)
                .map(|i| {
                    let scale = 10f32.powf(rng.unit() * 12.0 - 6.0);
                    (0..3 * be)
                        .map(|k| {
                            if (k + i) % 17 == 0 {
                                0.0
                            } else {
                                rng.normal() * scale
                            }
                        })
                        .collect()
                })
                .collect();
            for sign in [1f32, -1.0] {
                rows.push(
                    (0..be)
                        .map(|k| match k {
                            0 => 127.0 * sign,
                            _ => (k as f32 - be as f32 / 2.0) / 2.0 + 0.5 * (k % 2) as f32,
                        })
                        .collect(),
                );
            }
            for sign in [1f32, -1.0] {
                // Q16_K's ties: the scale is 1, values at k + 0.5 on both sides of the
                // high/low split (127.5, 128.5, -128.5, ...).
                rows.push(
                    (0..be)
                        .map(|k| match k {
                            0 => Q16_MAX * sign,
                            _ => sign * ((k as f32 - 100.0) * 2.0 + 0.5),
                        })
                        .collect(),
                );
            }
            rows.push(vec![0.0; be]);
            for x in &rows {
                let bytes = ty.row_bytes(x.len()).unwrap();
                let (mut fast, mut slow) = (vec![0u8; bytes], vec![0u8; bytes]);
                quantize_row(ty, x, &mut fast).unwrap();
                quantize_row_scalar(ty, x, &mut slow).unwrap();
                assert_eq!(fast, slow, "{ty}");
            }
        }
    }

    /// Q16_K: every value is within half a step (`d / 2`, `d = amax / 32512`) of its input,
    /// the largest uses the full range, each group's sum is `d` times its values' sum, and the
    /// padding is zero.
    #[test]
    fn q16_k_values_are_within_half_a_step() {
        let mut rng = Rng(0x5eed_0016);
        for i in 0..30 {
            let scale = 10f32.powf(rng.unit() * 12.0 - 6.0);
            let x: Vec<f32> = (0..2 * QK_K)
                .map(|k| {
                    if (k + i) % 13 == 0 {
                        0.0
                    } else {
                        rng.normal() * scale
                    }
                })
                .collect();
            let mut y = vec![0xAAu8; QuantType::Q16_K.row_bytes(x.len()).unwrap()];
            quantize_row(QuantType::Q16_K, &x, &mut y).unwrap();
            for (blk, xb) in y.chunks_exact(Q16_BYTES).zip(x.chunks_exact(QK_K)) {
                let (d, q) = q16_k_values(blk);
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(d, amax / Q16_MAX);
                assert_eq!(q.iter().map(|v| v.abs()).max(), Some(Q16_LIMIT));
                for (k, (&qk, &xk)) in q.iter().zip(xb).enumerate() {
                    // Half a step, and the rounding of `x / d` in f32.
                    let (v, x) = (d as f64 * qk as f64, xk as f64);
                    assert!(
                        (v - x).abs() <= d as f64 * 0.5 + x.abs() * 2f64.powi(-22),
                        "value {k}: {v} for {xk} (step {d})"
                    );
                }
                for g in 0..8 {
                    let at = Q16_SUMS + 4 * g;
                    let ds = f32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
                    let sum = q[32 * g..32 * g + 32].iter().sum::<i32>();
                    assert_eq!(ds, d * sum as f32, "group {g}");
                }
                assert!(blk[4..Q16_SUMS].iter().all(|&b| b == 0), "padding");
            }
        }
    }

    /// The group layout: value `k` of a group in lane `k / 2` (even `k`) or `16 + k / 2`.
    #[test]
    fn q16_k_groups_hold_evens_then_odds() {
        let x: Vec<f32> = (0..QK_K).map(|i| i as f32 - 100.0).collect();
        let y = quant(QuantType::Q16_K, &x);
        let (d, _) = q16_k_values(&y);
        let lane = |g: usize, l: usize| {
            let at = Q16_QS + 2 * (32 * g + l);
            i16::from_le_bytes([y[at], y[at + 1]]) as f32 * d
        };
        for g in 0..8 {
            for l in 0..16 {
                let (even, odd) = (32 * g + 2 * l, 32 * g + 2 * l + 1);
                assert!((lane(g, l) - x[even]).abs() <= d, "group {g} lane {l}");
                assert!(
                    (lane(g, 16 + l) - x[odd]).abs() <= d,
                    "group {g} lane {}",
                    16 + l
                );
            }
        }
    }

    #[test]
    fn quantize_unsupported_type_is_an_error() {
        let mut out = [0u8; 18];
        assert_eq!(
            quantize_row(QuantType::Q4_0, &[0f32; 32], &mut out),
            Err(QuantError::Unsupported("Q4_0"))
        );
    }
}
