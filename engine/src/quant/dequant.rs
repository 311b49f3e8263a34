//! Dequantisation of every supported block format: reference implementations that are
//! bit-for-bit identical to ggml's `dequantize_row_*` (same block layouts, same float operations
//! in the same order, f16 scales converted exactly).
//!
//! The caller (`quant::dequantize_row`) has already checked that `src` holds exactly the blocks
//! of `dst.len()` elements, so every function here walks whole blocks with `chunks_exact`.

use half::f16;

use super::{QuantError, QuantType, QK_K};

/// Dequantises one row. Lengths are checked by the caller.
pub fn dequantize_row(ty: QuantType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    use QuantType::*;
    match ty {
        F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Q4_0 => blocks(src, dst, 18, 32, q4_0),
        Q4_1 => blocks(src, dst, 20, 32, q4_1),
        Q5_0 => blocks(src, dst, 22, 32, q5_0),
        Q5_1 => blocks(src, dst, 24, 32, q5_1),
        Q8_0 => blocks(src, dst, 34, 32, q8_0),
        Q8_1 => blocks(src, dst, 36, 32, q8_1),
        Q2_K => blocks(src, dst, 84, QK_K, q2_k),
        Q3_K => blocks(src, dst, 110, QK_K, q3_k),
        Q4_K => blocks(src, dst, 144, QK_K, q4_k),
        Q5_K => blocks(src, dst, 176, QK_K, q5_k),
        Q6_K => blocks(src, dst, 210, QK_K, q6_k),
        Q8_K => blocks(src, dst, 292, QK_K, q8_k),
        other => return Err(QuantError::Unsupported(other.name())),
    }
    Ok(())
}

/// Runs `f` over each (block bytes, block outputs) pair.
#[inline(always)]
fn blocks(src: &[u8], dst: &mut [f32], bb: usize, be: usize, f: fn(&[u8], &mut [f32])) {
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        f(b, y);
    }
}

/// The little-endian f16 at byte `off`, as f32 (exact).
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// The little-endian u32 at byte `off`.
#[inline(always)]
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block (`get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (already minus 32), from its 12 packed bytes.
#[inline(always)]
pub(crate) fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|j| {
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        (lo | (hi << 4)) as i8 - 32
    })
}

/// `block_q4_0 { f16 d; u8 qs[16] }`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16] }`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0F) as i32;
        let x1 = (qs[j] >> 4) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }`: bit j of `qh` is the 5th bit of value j.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32_at(b, 2);
    let qs = &b[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as i32 - 16;
        let x1 = ((qs[j] >> 4) | xh1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// `block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }`.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32_at(b, 4);
    let qs = &b[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        let x0 = ((qs[j] & 0x0F) | xh0) as i32;
        let x1 = ((qs[j] >> 4) | xh1) as i32;
        y[j] = x0 as f32 * d + m;
        y[j + 16] = x1 as f32 * d + m;
    }
}

/// `block_q8_0 { f16 d; i8 qs[32] }`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// `block_q8_1 { f16 d; f16 s; i8 qs[32] }` (ggml has no dequantizer for it; this is `d * q`,
/// used to check activation quantisation).
fn q8_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[4..36]) {
        *o = (q as i8) as f32 * d;
    }
}

/// `block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin }`.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let min = f16_at(b, 82);
    let mut out = 0;
    let mut is = 0;
    for half in 0..2 {
        let q = &b[16 + 32 * half..16 + 32 * half + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = min * (sc >> 4) as f32;
                for &ql in &q[16 * part..16 * part + 16] {
                    y[out] = dl * ((ql >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// `block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d }`.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let hm = &b[0..32];
    let scales = q3_k_scales(&b[96..108]);
    let d_all = f16_at(b, 108);
    let mut out = 0;
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &b[32 + 32 * half..32 + 32 * half + 32];
        for shift in [0u32, 2, 4, 6] {
            for part in 0..2 {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for l in 16 * part..16 * part + 16 {
                    let lo = ((q[l] >> shift) & 3) as i32;
                    let v = lo - if hm[l] & m != 0 { 0 } else { 4 };
                    y[out] = dl * v as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    for c in 0..4 {
        let q = &b[16 + 32 * c..16 + 32 * c + 32];
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = y[64 * c..64 * c + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0xF) as f32 - m1;
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }`.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let min = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    for c in 0..4 {
        let ql = &b[48 + 32 * c..48 + 32 * c + 32];
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = y[64 * c..64 * c + 64].split_at_mut(32);
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            lo[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            hi[l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// `block_q8_K { f32 d; i8 qs[256]; i16 bsums[16] }`.
fn q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *o = d * (q as i8) as f32;
    }
}

/// Seeded random rows of every format, shared by the quant tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// SplitMix64: a tiny seeded generator (the tests must be reproducible and need no crate).
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        pub fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
        }

        /// Roughly normal (sum of uniforms), mean 0, std 1.
        pub fn normal(&mut self) -> f32 {
            (0..12).map(|_| self.unit()).sum::<f32>() - 6.0
        }

        pub fn fill(&mut self, b: &mut [u8]) {
            for c in b.chunks_mut(8) {
                let v = self.next_u64().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }

        /// A finite, moderate f16 scale of either sign: magnitude in [2^-9, 2^-3).
        pub fn scale_f16(&mut self) -> [u8; 2] {
            let mag = 2f32.powf(-9.0 + 6.0 * self.unit());
            let v = if self.next_u64() & 1 == 1 { -mag } else { mag };
            f16::from_f32(v).to_le_bytes()
        }
    }

    /// Byte offsets of the f16 scale fields inside one block of `ty`.
    pub fn f16_fields(ty: QuantType) -> &'static [usize] {
        use QuantType::*;
        match ty {
            Q4_0 | Q5_0 | Q8_0 => &[0],
            Q4_1 | Q5_1 | Q8_1 | Q4_K | Q5_K => &[0, 2],
            Q2_K => &[80, 82],
            Q3_K => &[108],
            Q6_K => &[208],
            _ => &[],
        }
    }

    /// A row of `n` elements of `ty`: random bits everywhere except the scale fields, which
    /// are finite and moderate (and float elements, which are finite normal values).
    pub fn random_row(ty: QuantType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut row = vec![0u8; ty.row_bytes(n).unwrap()];
        match ty {
            QuantType::F32 => {
                for c in row.chunks_exact_mut(4) {
                    c.copy_from_slice(&rng.normal().to_le_bytes());
                }
            }
            QuantType::F16 => {
                for c in row.chunks_exact_mut(2) {
                    c.copy_from_slice(&f16::from_f32(rng.normal()).to_le_bytes());
                }
            }
            QuantType::BF16 => {
                for c in row.chunks_exact_mut(2) {
                    c.copy_from_slice(&half::bf16::from_f32(rng.normal()).to_le_bytes());
                }
            }
            QuantType::Q8_K => {
                rng.fill(&mut row);
                for b in row.chunks_exact_mut(292) {
                    let d = (rng.unit() + 0.5) * 0.01;
                    b[0..4].copy_from_slice(&d.to_le_bytes());
                }
            }
            _ => {
                rng.fill(&mut row);
                for b in row.chunks_exact_mut(ty.block_bytes()) {
                    for &off in f16_fields(ty) {
                        b[off..off + 2].copy_from_slice(&rng.scale_f16());
                    }
                }
            }
        }
        row
    }

    /// Dequantises a whole row through the public entry point.
    pub fn deq(ty: QuantType, row: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        crate::quant::dequantize_row(ty, row, &mut out).unwrap();
        out
    }

    /// Quantises an activation row through the public entry point.
    pub fn quant(ty: QuantType, x: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
        crate::quant::quantize_activation(ty, x, &mut out).unwrap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of the test vectors made by `tests/data/quant/gen_vectors.py`.
    fn vector(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/quant")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Random blocks, and real blocks from llama.cpp's quantizer, dequantised by the `gguf`
    /// package (ggml's operation order) must come out bit for bit the same here.
    #[test]
    fn dequantize_matches_gguf_bit_for_bit() {
        use QuantType::*;
        let random = [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
        ];
        let real = [Q4_K, Q5_0, Q6_K, Q8_0];
        let cases = random.iter().map(|t| ("deq", *t));
        for (prefix, ty) in cases.chain(real.iter().map(|t| ("real", *t))) {
            let blocks = vector(&format!("{prefix}_{}.blocks", ty.name()));
            let want = f32s(&vector(&format!("{prefix}_{}.f32", ty.name())));
            assert_eq!(
                ty.row_bytes(want.len()),
                Ok(blocks.len()),
                "{ty} vector sizes"
            );
            let mut got = vec![0f32; want.len()];
            crate::quant::dequantize_row(ty, &blocks, &mut got).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{prefix} {ty} element {i} (block {}): got {g:e} ({:#010x}), gguf {w:e} ({:#010x})",
                    i / ty.block_elems(),
                    g.to_bits(),
                    w.to_bits()
                );
            }
        }
    }

    /// The same rows cut into single blocks give the same values (no state across blocks).
    #[test]
    fn dequantize_is_blockwise() {
        use QuantType::*;
        for ty in [Q4_0, Q5_1, Q3_K, Q6_K] {
            let blocks = vector(&format!("deq_{}.blocks", ty.name()));
            let want = f32s(&vector(&format!("deq_{}.f32", ty.name())));
            let be = ty.block_elems();
            for (b, w) in blocks.chunks(ty.block_bytes()).zip(want.chunks(be)) {
                let mut got = vec![0f32; be];
                dequantize_row(ty, b, &mut got).unwrap();
                assert!(got.iter().zip(w).all(|(g, w)| g.to_bits() == w.to_bits()));
            }
        }
    }

    #[test]
    fn dequantize_unsupported_type_is_an_error() {
        let mut out = [0f32; 256];
        assert_eq!(
            dequantize_row(QuantType::IQ2_XXS, &[0u8; 66], &mut out),
            Err(QuantError::Unsupported("IQ2_XXS"))
        );
        assert_eq!(
            dequantize_row(QuantType::F8E4M3, &[0u8; 256], &mut out),
            Err(QuantError::Unsupported("F8_E4M3"))
        );
    }

    #[test]
    fn q3_k_scale_unpacking_matches_the_bit_layout() {
        // Scale j has its low nibble in byte j (j < 8) or the high nibble of byte j - 8, and
        // its top two bits in byte 8 + j % 4 at bit 2 * (j / 4). Set each 6-bit value to j.
        let mut s = [0u8; 12];
        for j in 0..16u8 {
            let v = j + 16 * (j % 4); // exercise both high bits
            if j < 8 {
                s[j as usize] |= v & 0xF;
            } else {
                s[j as usize - 8] |= (v & 0xF) << 4;
            }
            s[8 + (j as usize % 4)] |= (v >> 4) << (2 * (j / 4));
        }
        let got = q3_k_scales(&s);
        for (j, &g) in got.iter().enumerate() {
            assert_eq!(g as i32, (j + 16 * (j % 4)) as i32 - 32, "scale {j}");
        }
    }
}
