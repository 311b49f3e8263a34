//! Portable (scalar) dot products of one packed weight row with an activation row already in
//! the weight type's `vec_dot_type` format. This is the fallback on CPUs without AVX2 and the
//! reference the SIMD kernels are tested against.
//!
//! The quantised kernels follow ggml's `ggml_vec_dot_*_generic` (integer sums per block or
//! sub-block, then scaled, with the same float operations in the same order), so they agree
//! with ggml's portable path. Float weights (F32/F16/BF16) are converted exactly and accumulated
//! in f32 over 8 lanes. Nothing here allocates; block scratch lives on the stack.

use super::dequant::{f16_at, q3_k_scales, scale_min_k4, u32_at};
use super::{QuantType, QK_K};

/// `w · a` for one row of `n` weights. `w` holds `ty.row_bytes(n)` bytes and `a` holds
/// `ty.vec_dot_type().row_bytes(n)` bytes (the caller's contract, checked in debug builds).
/// Types without a kernel here (IQ formats, F8E4M3, whose block scales live outside the row)
/// give NaN rather than a plausible number.
pub fn vec_dot(ty: QuantType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_assert_eq!(Ok(w.len()), ty.row_bytes(n), "{ty} weight row");
    debug_assert_eq!(
        Ok(a.len()),
        ty.vec_dot_type().row_bytes(n),
        "{ty} activation row"
    );
    use QuantType::*;
    match ty {
        F32 => dot_float(w, a, 4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        F16 => dot_float(w, a, 2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        BF16 => dot_float(w, a, 2, |c| {
            half::bf16::from_le_bytes([c[0], c[1]]).to_f32()
        }),
        Q4_0 => q4_0_q8_0(w, a),
        Q4_1 => q4_1_q8_1(w, a),
        Q5_0 => q5_0_q8_0(w, a),
        Q5_1 => q5_1_q8_1(w, a),
        Q8_0 => q8_0_q8_0(w, a),
        Q2_K => q2_k_q8_k(w, a),
        Q3_K => q3_k_q8_k(w, a),
        Q4_K => q4_k_q8_k(w, a),
        Q5_K => q5_k_q8_k(w, a),
        Q6_K => q6_k_q8_k(w, a),
        _ => f32::NAN,
    }
}

/// Float weights of `wb` bytes each against f32 activations, 8 independent accumulators.
#[inline(always)]
fn dot_float(w: &[u8], a: &[u8], wb: usize, conv: impl Fn(&[u8]) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut wi = w.chunks_exact(8 * wb);
    let mut ai = a.chunks_exact(32);
    for (w8, a8) in (&mut wi).zip(&mut ai) {
        for k in 0..8 {
            let av = f32::from_le_bytes([a8[4 * k], a8[4 * k + 1], a8[4 * k + 2], a8[4 * k + 3]]);
            acc[k] += conv(&w8[wb * k..wb * k + wb]) * av;
        }
    }
    let mut tail = 0f32;
    for (wc, ac) in wi
        .remainder()
        .chunks_exact(wb)
        .zip(ai.remainder().chunks_exact(4))
    {
        tail += conv(wc) * f32::from_le_bytes([ac[0], ac[1], ac[2], ac[3]]);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `i8` view of a byte.
#[inline(always)]
fn s8(b: u8) -> i32 {
    b as i8 as i32
}

fn q4_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(18).zip(a.chunks_exact(34)) {
        let (qs, q8) = (&x[2..18], &y[2..34]);
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..16 {
            s0 += ((qs[j] & 0x0F) as i32 - 8) * s8(q8[j]);
            s1 += ((qs[j] >> 4) as i32 - 8) * s8(q8[j + 16]);
        }
        sumf += (s0 + s1) as f32 * f16_at(x, 0) * f16_at(y, 0);
    }
    sumf
}

fn q4_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(20).zip(a.chunks_exact(36)) {
        let (qs, q8) = (&x[4..20], &y[4..36]);
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..16 {
            s0 += (qs[j] & 0x0F) as i32 * s8(q8[j]);
            s1 += (qs[j] >> 4) as i32 * s8(q8[j + 16]);
        }
        sumf += (f16_at(x, 0) * f16_at(y, 0)) * (s0 + s1) as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sumf
}

fn q5_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(22).zip(a.chunks_exact(34)) {
        let qh = u32_at(x, 2);
        let (qs, q8) = (&x[6..22], &y[2..34]);
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            s0 += (((qs[j] & 0x0F) | h0) as i32 - 16) * s8(q8[j]);
            s1 += (((qs[j] >> 4) | h1) as i32 - 16) * s8(q8[j + 16]);
        }
        sumf += (f16_at(x, 0) * f16_at(y, 0)) * (s0 + s1) as f32;
    }
    sumf
}

fn q5_1_q8_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(24).zip(a.chunks_exact(36)) {
        let qh = u32_at(x, 4);
        let (qs, q8) = (&x[8..24], &y[4..36]);
        let (mut s0, mut s1) = (0i32, 0i32);
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as u8;
            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
            s0 += ((qs[j] & 0x0F) | h0) as i32 * s8(q8[j]);
            s1 += ((qs[j] >> 4) | h1) as i32 * s8(q8[j + 16]);
        }
        sumf += (f16_at(x, 0) * f16_at(y, 0)) * (s0 + s1) as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sumf
}

fn q8_0_q8_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(34).zip(a.chunks_exact(34)) {
        let sumi: i32 = x[2..34]
            .iter()
            .zip(&y[2..34])
            .map(|(&p, &q)| s8(p) * s8(q))
            .sum();
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}

/// Q8_K block fields: `(d, qs, bsums)`.
#[inline(always)]
fn q8_k_parts(y: &[u8]) -> (f32, &[u8], &[u8]) {
    (
        f32::from_le_bytes([y[0], y[1], y[2], y[3]]),
        &y[4..4 + QK_K],
        &y[4 + QK_K..4 + QK_K + 32],
    )
}

/// Block sum `j` (0..16) of a Q8_K block.
#[inline(always)]
fn bsum(bsums: &[u8], j: usize) -> i32 {
    i16::from_le_bytes([bsums[2 * j], bsums[2 * j + 1]]) as i32
}

fn q2_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(84).zip(a.chunks_exact(292)) {
        let sc = &x[0..16];
        let (yd, q8, bsums) = q8_k_parts(y);
        let summs: i32 = (0..16).map(|j| bsum(bsums, j) * (sc[j] >> 4) as i32).sum();
        let dall = yd * f16_at(x, 80);
        let dmin = yd * f16_at(x, 82);
        let mut isum = 0i32;
        let mut is = 0;
        let mut o = 0;
        for half in 0..2 {
            let q2 = &x[16 + 32 * half..48 + 32 * half];
            for shift in [0u32, 2, 4, 6] {
                for part in 0..2 {
                    let d = (sc[is] & 0xF) as i32;
                    is += 1;
                    let mut isuml = 0i32;
                    for l in 16 * part..16 * part + 16 {
                        isuml += s8(q8[o + l]) * ((q2[l] >> shift) & 3) as i32;
                    }
                    isum += d * isuml;
                }
                o += 32;
            }
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Adds `scale * a[l] * q8[l]` over one 32-value sub-block into 8 lanes, 8 values at a time
/// (ggml's `aux16`/`aux32` pattern).
#[inline(always)]
fn lanes_add(aux32: &mut [i32; 8], scale: i32, a: &[i8], q8: &[u8]) {
    for (a8, q8) in a.chunks_exact(8).zip(q8.chunks_exact(8)) {
        for l in 0..8 {
            aux32[l] += scale * (q8[l] as i8 as i32 * a8[l] as i32);
        }
    }
}

fn q3_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut aux8 = [0i8; QK_K];
    for (x, y) in w.chunks_exact(110).zip(a.chunks_exact(292)) {
        let hm = &x[0..32];
        let (yd, q8, _) = q8_k_parts(y);
        let mut m = 1u8;
        for half in 0..2 {
            let q3 = &x[32 + 32 * half..64 + 32 * half];
            for shift in [0u32, 2, 4, 6] {
                let o = 128 * half + 32 * (shift as usize / 2);
                for l in 0..32 {
                    let v = ((q3[l] >> shift) & 3) as i8;
                    aux8[o + l] = v - if hm[l] & m != 0 { 0 } else { 4 };
                }
                m <<= 1;
            }
        }
        let scales = q3_k_scales(&x[96..108]);
        let mut aux32 = [0i32; 8];
        for (j, &sc) in scales.iter().enumerate() {
            let r = 16 * j..16 * j + 16;
            lanes_add(&mut aux32, sc as i32, &aux8[r.clone()], &q8[r]);
        }
        let d = f16_at(x, 108) * yd;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    sums.iter().fold(0f32, |s, v| s + v)
}

/// The shared tail of Q4_K and Q5_K: `aux8` holds the 256 unsigned quants of the block.
#[inline(always)]
fn k4_block(x: &[u8], y: &[u8], aux8: &[i8; QK_K], sums: &mut [f32; 8], sumf: &mut f32) {
    let (yd, q8, bsums) = q8_k_parts(y);
    let scales_raw = &x[4..16];
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..8 {
        (scales[j], mins[j]) = scale_min_k4(j, scales_raw);
    }
    let sumi: i32 = (0..16).map(|j| bsum(bsums, j) * mins[j / 2] as i32).sum();
    let mut aux32 = [0i32; 8];
    for (j, &sc) in scales.iter().enumerate() {
        let r = 32 * j..32 * j + 32;
        lanes_add(&mut aux32, sc as i32, &aux8[r.clone()], &q8[r]);
    }
    let d = f16_at(x, 0) * yd;
    for l in 0..8 {
        sums[l] += d * aux32[l] as f32;
    }
    let dmin = f16_at(x, 2) * yd;
    *sumf -= dmin * sumi as f32;
}

fn q4_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    let mut aux8 = [0i8; QK_K];
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)) {
        for c in 0..4 {
            let q4 = &x[16 + 32 * c..48 + 32 * c];
            for l in 0..32 {
                aux8[64 * c + l] = (q4[l] & 0xF) as i8;
                aux8[64 * c + 32 + l] = (q4[l] >> 4) as i8;
            }
        }
        k4_block(x, y, &aux8, &mut sums, &mut sumf);
    }
    sums.iter().fold(sumf, |s, v| s + v)
}

fn q5_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    let mut aux8 = [0i8; QK_K];
    for (x, y) in w.chunks_exact(176).zip(a.chunks_exact(292)) {
        let qh = &x[16..48];
        for c in 0..4 {
            let q4 = &x[48 + 32 * c..80 + 32 * c];
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                let h1 = if qh[l] & m1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & m2 != 0 { 16 } else { 0 };
                aux8[64 * c + l] = ((q4[l] & 0xF) + h1) as i8;
                aux8[64 * c + 32 + l] = ((q4[l] >> 4) + h2) as i8;
            }
        }
        k4_block(x, y, &aux8, &mut sums, &mut sumf);
    }
    sums.iter().fold(sumf, |s, v| s + v)
}

fn q6_k_q8_k(w: &[u8], a: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut aux8 = [0i8; QK_K];
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)) {
        let (yd, q8, _) = q8_k_parts(y);
        for n in 0..2 {
            let ql = &x[64 * n..64 * n + 64];
            let qh = &x[128 + 32 * n..160 + 32 * n];
            let a = &mut aux8[128 * n..128 * n + 128];
            for l in 0..32 {
                a[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                a[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                a[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                a[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        let scales = &x[192..208];
        let mut aux32 = [0i32; 8];
        for (j, &sc) in scales.iter().enumerate() {
            let r = 16 * j..16 * j + 16;
            lanes_add(&mut aux32, s8(sc), &aux8[r.clone()], &q8[r]);
        }
        let d = f16_at(x, 208) * yd;
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    sums.iter().fold(0f32, |s, v| s + v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::test_util::{deq, quant, random_row, Rng};

    const WEIGHT_TYPES: [QuantType; 13] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::BF16,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    fn dot64(a: &[f32], b: &[f32]) -> (f64, f64) {
        let mut s = 0f64;
        let mut abs = 0f64;
        for (&x, &y) in a.iter().zip(b) {
            s += x as f64 * y as f64;
            abs += (x as f64 * y as f64).abs();
        }
        (s, abs)
    }

    /// `vec_dot` computes exactly the sum of dequantised weights times dequantised activations;
    /// only the f32 rounding of scales and partial sums separates it from the f64 sum.
    #[test]
    fn vec_dot_equals_dot_of_dequantised_rows() {
        let mut rng = Rng(0x5eed_0001);
        for ty in WEIGHT_TYPES {
            for &n in &[256usize, 1024, 2816] {
                for _ in 0..4 {
                    let w = random_row(ty, n, &mut rng);
                    let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                    let at = ty.vec_dot_type();
                    let a = quant(at, &x);
                    let got = vec_dot(ty, n, &w, &a) as f64;
                    let (want, abs) = dot64(&deq(ty, &w, n), &deq(at, &a, n));
                    assert!(
                        (got - want).abs() <= 1e-5 * abs + 1e-30,
                        "{ty} n={n}: vec_dot {got} vs dequantised {want} (sum|w*a| {abs})"
                    );
                }
            }
        }
    }

    /// The same on real rows from llama.cpp's quantizer (realistic scales and minimums).
    #[test]
    fn vec_dot_on_real_rows() {
        let mut rng = Rng(0x5eed_0004);
        for ty in [
            QuantType::Q4_K,
            QuantType::Q5_0,
            QuantType::Q6_K,
            QuantType::Q8_0,
        ] {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/data/quant/real_{}.blocks", ty.name()));
            let w = std::fs::read(&p).unwrap();
            let n = w.len() / ty.block_bytes() * ty.block_elems();
            let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let at = ty.vec_dot_type();
            let a = quant(at, &x);
            let got = vec_dot(ty, n, &w, &a) as f64;
            let (want, abs) = dot64(&deq(ty, &w, n), &deq(at, &a, n));
            assert!((got - want).abs() <= 1e-5 * abs, "{ty}: {got} vs {want}");
            let (exact, _) = dot64(&deq(ty, &w, n), &x);
            assert!(
                (got - exact).abs() <= 0.02 * abs,
                "{ty}: {got} vs exact {exact}"
            );
        }
    }

    /// Against the unquantised activations, the only error is activation quantisation: each
    /// activation moves by at most `0.57 * d` of its block (half a step of the f32 scale plus
    /// the f16 rounding of that scale, 127 * 2^-11 * d), plus Q8_1's f16-rounded block sum.
    #[test]
    fn vec_dot_is_close_to_exact_dot() {
        let mut rng = Rng(0x5eed_0002);
        for ty in WEIGHT_TYPES {
            let n = 2048;
            for _ in 0..4 {
                let w = random_row(ty, n, &mut rng);
                let wf = deq(ty, &w, n);
                let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                let at = ty.vec_dot_type();
                let a = quant(at, &x);
                let got = vec_dot(ty, n, &w, &a) as f64;
                let (exact, abs) = dot64(&wf, &x);
                let be = at.block_elems();
                let mut bound = 1e-5 * abs;
                for (wb, xb) in wf.chunks(be).zip(x.chunks(be)) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    bound += wsum * 0.57 * amax / 127.0;
                    if at == QuantType::Q8_1 {
                        // |m * s| * 2^-11, with |s| <= 32 * amax and |m| <= max |w|.
                        let wmax = wb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        bound += wmax * 32.0 * amax * 2f64.powi(-11);
                    }
                }
                let err = (got - exact).abs();
                assert!(
                    err <= bound,
                    "{ty}: vec_dot {got} vs exact {exact}: error {err} over bound {bound}"
                );
                if at == QuantType::F32 {
                    assert!(err <= 1e-5 * abs, "{ty}: float weights must be exact");
                }
            }
        }
    }

    /// Float rows of any length, including ones that do not fill the 8 lanes.
    #[test]
    fn float_vec_dot_handles_any_length() {
        let mut rng = Rng(0x5eed_0005);
        for ty in [QuantType::F32, QuantType::F16, QuantType::BF16] {
            for n in [0usize, 1, 7, 8, 13, 100] {
                let w = random_row(ty, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                let got = vec_dot(ty, n, &w, &quant(QuantType::F32, &x)) as f64;
                let (want, abs) = dot64(&deq(ty, &w, n), &x);
                assert!(
                    (got - want).abs() <= 1e-6 * abs,
                    "{ty} n={n}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn vec_dot_of_unsupported_type_is_nan() {
        assert!(vec_dot(QuantType::IQ2_XXS, 256, &[0u8; 66], &[0u8; 1024]).is_nan());
    }
}
