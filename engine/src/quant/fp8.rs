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
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    /// All 256 codes against `ml_dtypes.float8_e4m3fn` (the definition torch and the official
    /// checkpoint use), bit for bit including the sign of zero; only NaN payloads may differ.
    #[test]
    fn e4m3_matches_ml_dtypes_for_every_code() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/quant/fp8_e4m3fn.f32");
        let table = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(table.len(), 256 * 4);
        for (code, c) in table.chunks_exact(4).enumerate() {
            let want = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            for got in [e4m3_to_f32(code as u8), lut()[code]] {
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "code {code:#04x}: {got:e} vs ml_dtypes {want:e}"
                );
            }
            assert_eq!(want.is_nan(), code & 0x7f == 0x7f, "NaN codes");
        }
    }

    /// Deterministic bytes over the finite codes (NaN codes would make every sum NaN).
    fn fp8_row(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let b = (s >> 24) as u8;
                if b & 0x7f == 0x7f {
                    b ^ 0x01
                } else {
                    b
                }
            })
            .collect()
    }

    /// Rows whose length is not a multiple of 128 (the 576-wide kv_a projection has this shape
    /// in the transposed direction; partial blocks use the last scale for what is left).
    #[test]
    fn partial_blocks_use_their_own_scale() {
        for &cols in &[1usize, 72, 128, 200, 300, 576] {
            let nb = cols.div_ceil(FP8_BLOCK);
            let w = fp8_row(cols, cols as u32);
            let scales: Vec<f32> = (0..nb).map(|i| 0.25 + i as f32 * 1.5).collect();
            let x: Vec<f32> = (0..cols)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.125)
                .collect();

            let mut got = vec![f32::NAN; cols];
            dequantize_row(&w, &scales, &mut got);
            let mut want_dot = 0f64;
            for c in 0..cols {
                let want = e4m3_to_f32(w[c]) * scales[c / FP8_BLOCK];
                assert_eq!(got[c].to_bits(), want.to_bits(), "cols {cols}, column {c}");
                want_dot += want as f64 * x[c] as f64;
            }
            let abs: f64 = got
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let dot = dot_row(&w, &scales, &x) as f64;
            assert!(
                (dot - want_dot).abs() <= 1e-6 * abs + 1e-30,
                "cols {cols}: dot_row {dot} vs {want_dot}"
            );
        }
    }

    /// A row is scaled block by block: changing one block's scale changes only its columns.
    #[test]
    fn scales_apply_per_128_columns() {
        let cols = 300;
        let w = fp8_row(cols, 9);
        let mut a = vec![0f32; cols];
        let mut b = vec![0f32; cols];
        dequantize_row(&w, &[1.0, 1.0, 1.0], &mut a);
        dequantize_row(&w, &[1.0, 2.0, 1.0], &mut b);
        for c in 0..cols {
            let k = if (128..256).contains(&c) { 2.0 } else { 1.0 };
            assert_eq!(b[c], a[c] * k, "column {c}");
        }
    }
}
