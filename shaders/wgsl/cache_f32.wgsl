// An f32 latent cache: one element per word.
const PER_WORD: u32 = 1u;

fn cache_at(i: u32) -> f32 {
    return bitcast<f32>(C[i]);
}

fn to_word(a: f32, b: f32) -> u32 {
    return bitcast<u32>(a);
}
