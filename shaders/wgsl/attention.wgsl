// Absorbed multi-head latent attention over the latent cache, for n tokens of one or more
// sequences. Token t belongs to the sequence whose cache rows start at row T[2t] and sits at
// position pos_t = T[2t + 1] of it (causal: it attends to its sequence's positions 0..=pos_t).
//
// Cache row p of a sequence (row T[2t] + p of the layer's buffer): elements p * crow .. p * crow + row (read with `cache_at`) are the
// normalised latent c_p (lora values), followed by the rotated shared key k_pe_p (rd values).
// The cache is an array of u32 words, PER_WORD elements each (rows padded to whole words,
// crow = words_per_row * PER_WORD); one of the `cache_*.wgsl` files defines PER_WORD, `cache_at`
// and `to_word` (f32: one element per word; f16/bf16: two, low half first). Per token t and head h (index th = t * heads + h):
//   `scores`: S[th * sstride + p] = scale * (QA[th * lora ..] . c_p + q_pe . k_pe_p), with
//             q_pe = Q[th * qk + nope ..][..rd] (already rotated) and QA = W_UK^T q_nope;
//   `latent`: L[th * lora + j] = sum_p S[th * sstride + p] * c_p[j] (after the softmax).
//   `write`:  cache row T[2t] + pos_t = KV[t * row ..][..row] (the new [c, k_pe] rows), rounded to
//             the cache's type.
// Grids: `scores` x over positions, `latent` x over latent channels, `write` x over a row's words;
// y over heads (`write`: tokens), z over tokens.

struct Params {
    n: u32,
    heads: u32,
    pad1: u32,
    lora: u32,
    rd: u32,
    row: u32,
    qk: u32,
    nope: u32,
    scale: f32,
    sstride: u32,
    crow: u32,   // cache elements per position (row padded to whole words)
    pad0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> QA: array<f32>;
@group(0) @binding(2) var<storage, read> Q: array<f32>;
@group(0) @binding(3) var<storage, read> C: array<u32>;
@group(0) @binding(4) var<storage, read_write> S: array<f32>;
@group(0) @binding(5) var<storage, read> SR: array<f32>;
@group(0) @binding(6) var<storage, read_write> L: array<f32>;
@group(0) @binding(7) var<storage, read_write> CW: array<u32>;
@group(0) @binding(8) var<storage, read> KV: array<f32>;
@group(0) @binding(9) var<storage, read> T: array<u32>;

@compute @workgroup_size(64)
fn scores(@builtin(global_invocation_id) g: vec3<u32>) {
    let p = g.x;
    let h = g.y;
    let t = g.z;
    if (t >= P.n || p > T[2u * t + 1u]) {
        return;
    }
    let th = t * P.heads + h;
    let qa = th * P.lora;
    let cb = (T[2u * t] + p) * P.crow;
    var s1 = 0.0;
    for (var j = 0u; j < P.lora; j++) {
        s1 += QA[qa + j] * cache_at(cb + j);
    }
    let qp = th * P.qk + P.nope;
    var s2 = 0.0;
    for (var j = 0u; j < P.rd; j++) {
        s2 += Q[qp + j] * cache_at(cb + P.lora + j);
    }
    S[th * P.sstride + p] = P.scale * (s1 + s2);
}

@compute @workgroup_size(64)
fn latent(@builtin(global_invocation_id) g: vec3<u32>) {
    let j = g.x;
    let h = g.y;
    let t = g.z;
    if (t >= P.n || j >= P.lora) {
        return;
    }
    let th = t * P.heads + h;
    let sb = th * P.sstride;
    let base = T[2u * t];
    let last = T[2u * t + 1u];
    var acc = 0.0;
    for (var p = 0u; p <= last; p++) {
        acc += SR[sb + p] * cache_at((base + p) * P.crow + j);
    }
    L[th * P.lora + j] = acc;
}

@compute @workgroup_size(64)
fn write(@builtin(global_invocation_id) g: vec3<u32>) {
    let w = g.x;
    let t = g.y;
    let words = P.crow / PER_WORD;
    if (t >= P.n || w >= words) {
        return;
    }
    let j = w * PER_WORD;
    var a = 0.0;
    if (j < P.row) {
        a = KV[t * P.row + j];
    }
    var b = 0.0;
    if (PER_WORD == 2u && j + 1u < P.row) {
        b = KV[t * P.row + j + 1u];
    }
    CW[(T[2u * t] + T[2u * t + 1u]) * words + w] = to_word(a, b);
}
