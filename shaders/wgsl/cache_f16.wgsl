// An f16 latent cache: two halves per word (element 2k in the low half), rounded as the CPU's
// `KvCache` rounds (`f32_to_f16_bits`); reading a half back is exact.
const PER_WORD: u32 = 2u;

fn cache_at(i: u32) -> f32 {
    return unpack2x16float(C[i >> 1u])[i & 1u];
}

fn to_word(a: f32, b: f32) -> u32 {
    return f32_to_f16_bits(a) | (f32_to_f16_bits(b) << 16u);
}
