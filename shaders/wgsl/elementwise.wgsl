// Element-wise operations over the first `count` values. Grid: 64 lanes per workgroup, x then
// y (wg_x workgroups along x).
//   `swiglu`: G[i] = silu(G[i]) * U[i] (SwiGLU's inner product, written into G);
//   `add`:    D[i] += A[i] (residual adds).

struct Params {
    count: u32,
    wg_x: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> G: array<f32>;
@group(0) @binding(2) var<storage, read> U: array<f32>;
@group(0) @binding(3) var<storage, read_write> D: array<f32>;
@group(0) @binding(4) var<storage, read> A: array<f32>;

fn index(wid: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * P.wg_x) * 64u + lid;
}

@compute @workgroup_size(64)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, lid);
    if (i < P.count) {
        let g = G[i];
        G[i] = g / (1.0 + exp(-g)) * U[i];
    }
}

@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, lid);
    if (i < P.count) {
        D[i] += A[i];
    }
}
