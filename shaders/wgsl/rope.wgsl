// Rotary embedding from a host-computed table (the CPU's exact cos/sin, attention factor
// included): CS[(pos * half + i) * 2 + {0, 1}] = {cos, sin} of channel pair i at position pos.
// Pairs are (2i, 2i + 1) when interleaved, else (i, i + half), as `model::rope` pairs them.
// Token t is at position T[2t + 1] (T: the attention's token table, see attention.wgsl).
// Grid: x over heads * half (64 per workgroup), y over tokens.

struct Params {
    n: u32,
    heads: u32,
    off: u32,      // f32 index of token 0, head 0, rotary channel 0 in X
    tstride: u32,  // f32 elements between tokens
    hstride: u32,  // f32 elements between heads
    pad0: u32,
    half: u32,
    interleaved: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> CS: array<f32>;
@group(0) @binding(2) var<storage, read_write> X: array<f32>;
@group(0) @binding(3) var<storage, read> T: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let t = g.y;
    if (g.x >= P.heads * P.half || t >= P.n) {
        return;
    }
    let h = g.x / P.half;
    let i = g.x % P.half;
    let base = P.off + t * P.tstride + h * P.hstride;
    var a = base + i;
    var b = base + i + P.half;
    if (P.interleaved != 0u) {
        a = base + 2u * i;
        b = a + 1u;
    }
    let ci = (T[2u * t + 1u] * P.half + i) * 2u;
    let c = CS[ci];
    let s = CS[ci + 1u];
    let x0 = X[a];
    let x1 = X[b];
    X[a] = x0 * c - x1 * s;
    X[b] = x0 * s + x1 * c;
}
