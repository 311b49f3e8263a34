//! Activation quantisation (Q8_0, Q8_1, Q8_K), byte-identical to ggml's `quantize_row_*_ref`
//! (same scale computation, same rounding, f16 scales rounded to nearest even).
//!
//! Layouts (little-endian, packed): `block_q8_0 {f16 d; i8 qs[32]}` (34 bytes),
//! `block_q8_1 {f16 d; f16 s; i8 qs[32]}` (36 bytes, `s = d * sum(qs)`),
//! `block_q8_K {f32 d; i8 qs[256]; i16 bsums[16]}` (292 bytes).
//! The caller (`quant::quantize_activation`) has checked the lengths.

use half::f16;

use super::{QuantError, QuantType, QK_K};

pub fn quantize_row(ty: QuantType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
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
        other => return Err(QuantError::Unsupported(other.name())),
    }
    Ok(())
}

/// `d = amax / 127` and its inverse (0 for an all-zero block), as `quantize_row_q8_0_ref`.
#[inline(always)]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    // ggml's MAX(a, b) is `a > b ? a : b`, kept as such.
    let amax = x
        .iter()
        .fold(0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let d = amax / 127.0;
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
    let (qs, bsums) = y[4..].split_at_mut(QK_K);
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8 as u8;
    }
    for (j, bs) in bsums.chunks_exact_mut(2).enumerate() {
        let s: i32 = qs[16 * j..16 * j + 16]
            .iter()
            .map(|&q| q as i8 as i32)
            .sum();
        bs.copy_from_slice(&(s as i16).to_le_bytes());
    }
    y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
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

    #[test]
    fn quantize_unsupported_type_is_an_error() {
        let mut out = [0u8; 18];
        assert_eq!(
            quantize_row(QuantType::Q4_0, &[0f32; 32], &mut out),
            Err(QuantError::Unsupported("Q4_0"))
        );
    }
}
