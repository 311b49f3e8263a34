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
