//! FP8 E4M3FN (the official DeepSeek-V3 checkpoint's weight format) with 128x128 block scales:
//! `w[r, c] = e4m3(byte) * scale[r / 128, c / 128]` (the `weight_scale_inv` grid multiplies).

use std::sync::OnceLock;

use crate::tensor::FP8_BLOCK;

/// Decodes one E4M3FN byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
/// `S.1111.111` is NaN; exponent 0 is subnormal (`m/8 * 2^-6`).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0x0f) as i32;
    let m = (b & 0x07) as f32;
    if e == 15 && (b & 0x07) == 7 {
        return f32::NAN;
    }
    if e == 0 {
        sign * (m / 8.0) * 2f32.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// The 256-entry decode table.
pub fn lut() -> &'static [f32; 256] {
    static LUT: OnceLock<[f32; 256]> = OnceLock::new();
    LUT.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// Dequantises one row given the scales of its 128-row block (one per 128 columns).
pub fn dequantize_row(w: &[u8], scales: &[f32], dst: &mut [f32]) {
    let lut = lut();
    for ((wc, dc), s) in w
        .chunks(FP8_BLOCK)
        .zip(dst.chunks_mut(FP8_BLOCK))
        .zip(scales)
    {
        for (d, &b) in dc.iter_mut().zip(wc) {
            *d = lut[b as usize] * s;
        }
    }
}

/// Dot product of one FP8 row with f32 activations.
pub fn dot_row(w: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let lut = lut();
    let mut total = 0f32;
    for ((wc, xc), s) in w.chunks(FP8_BLOCK).zip(x.chunks(FP8_BLOCK)).zip(scales) {
        let mut acc = [0f32; 8];
        let mut wi = wc.chunks_exact(8);
        let mut xi = xc.chunks_exact(8);
        for (w8, x8) in (&mut wi).zip(&mut xi) {
            for k in 0..8 {
                acc[k] += lut[w8[k] as usize] * x8[k];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (&b, &xv) in wi.remainder().iter().zip(xi.remainder()) {
            sum += lut[b as usize] * xv;
        }
        total += sum * s;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // e=7, m=0
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // max finite
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert!(e4m3_to_f32(0xff).is_nan());
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
    }
}
