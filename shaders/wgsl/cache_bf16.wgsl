// A bf16 latent cache: two bfloat16 per word (element 2k in the low half), rounded as the
// CPU's `KvCache` rounds (`f32_to_bf16_bits`); reading one back is exact.
const PER_WORD: u32 = 2u;

fn cache_at(i: u32) -> f32 {
    let w = C[i >> 1u];
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));
}

fn to_word(a: f32, b: f32) -> u32 {
    return f32_to_bf16_bits(a) | (f32_to_bf16_bits(b) << 16u);
}
