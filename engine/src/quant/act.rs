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
    // C's MAX(a, b) is `a > b ? a : b`; with NaN-free input this is f32::max.
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
        // `roundf`: half away from zero; the float-to-i8 cast saturates like the C conversion
        // does for every in-range value (|v * id| <= 127 up to rounding).
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
