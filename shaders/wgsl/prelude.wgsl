// Shared helpers, prepended to every module the engine builds. Pure functions only (no bindings).

// Byte k (0..3) of a little-endian u32 word.
fn byte_of(w: u32, k: u32) -> u32 {
    return (w >> (8u * k)) & 0xffu;
}

// Byte k of a word as a signed value (two's complement i8).
fn sbyte_of(w: u32, k: u32) -> i32 {
    return bitcast<i32>(w << (24u - 8u * k)) >> 24u;
}

// An IEEE half (low 16 bits of h) as f32. Exact: every f16 value is an f32 value.
fn f16_bits_to_f32(h: u32) -> f32 {
    return unpack2x16float(h & 0xffffu).x;
}

// A bfloat16 (low 16 bits of h) as f32: its bits are the high half of the f32.
fn bf16_bits_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// FP8 E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN; exponent 0 is
// subnormal (m/8 * 2^-6). Built from bits, so exact (no exp2 approximation).
fn e4m3_to_f32(b: u32) -> f32 {
    let sign = (b & 0x80u) << 24u;
    let e = (b >> 3u) & 15u;
    let m = b & 7u;
    if ((b & 0x7fu) == 0x7fu) {
        return bitcast<f32>(0x7fc00000u | sign);
    }
    if (e == 0u) {
        return bitcast<f32>(bitcast<u32>(f32(m) * 0.001953125) | sign);
    }
    return bitcast<f32>(sign | ((e + 120u) << 23u) | (m << 20u));
}

// An f32 as IEEE half bits, rounded to nearest even (overflow to infinity, underflow through
// subnormals to signed zero, NaN stays NaN): bit for bit what the `half` crate's
// `f16::from_f32` gives. Integer arithmetic only, so no driver rounding mode is involved.
fn f32_to_f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = (b >> 23u) & 0xffu;
    let m = b & 0x7fffffu;
    if (e == 0xffu) {
        return sign | 0x7c00u | select(0u, 0x200u | (m >> 13u), m != 0u);
    }
    let he = i32(e) - 112;
    if (he >= 31) {
        return sign | 0x7c00u;
    }
    if (he <= 0) {
        if (he < -10) {
            return sign;
        }
        let mm = m | 0x800000u;
        let rb = 1u << u32(13 - he);
        var hm = mm >> u32(14 - he);
        if ((mm & rb) != 0u && (mm & (3u * rb - 1u)) != 0u) {
            hm += 1u;
        }
        return sign | hm;
    }
    var h = sign | (u32(he) << 10u) | (m >> 13u);
    if ((m & 0x1000u) != 0u && (m & 0x2fffu) != 0u) {
        h += 1u;
    }
    return h;
}

// An f32 as bfloat16 bits, rounded to nearest even; NaN stays NaN (the `half` crate's
// `bf16::from_f32`).
fn f32_to_bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    var h = b >> 16u;
    if ((b & 0x8000u) != 0u && (b & 0x17fffu) != 0u) {
        h += 1u;
    }
    return h & 0xffffu;
}
