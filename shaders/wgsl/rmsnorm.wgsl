// RMSNorm of rows: y = w * x / sqrt(mean(x^2) + eps), one workgroup of 64 lanes per row.
// `main` reads X and writes Y; `inplace` normalises Y itself (bindings 1 and 3 only).

struct Params {
    rows: u32,
    width: u32,
    in_off: u32,     // f32 index of row 0 in X (Y for `inplace`)
    in_stride: u32,  // f32 elements between rows
    out_off: u32,    // f32 index of row 0 in Y
    out_stride: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<f32>;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

var<workgroup> red: array<f32, 64>;

// The workgroup's sum of `v` (every lane gets it).
fn wg_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let xb = P.in_off + wid.x * P.in_stride;
    let yb = P.out_off + wid.x * P.out_stride;
    var s = 0.0;
    for (var i = lid; i < P.width; i += 64u) {
        let v = X[xb + i];
        s += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(s, lid) / f32(P.width) + P.eps);
    for (var i = lid; i < P.width; i += 64u) {
        Y[yb + i] = W[i] * (X[xb + i] * inv);
    }
}

@compute @workgroup_size(64)
fn inplace(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = P.in_off + wid.x * P.in_stride;
    var s = 0.0;
    for (var i = lid; i < P.width; i += 64u) {
        let v = Y[b + i];
        s += v * v;
    }
    let inv = 1.0 / sqrt(wg_sum(s, lid) / f32(P.width) + P.eps);
    for (var i = lid; i < P.width; i += 64u) {
        Y[b + i] = W[i] * (Y[b + i] * inv);
    }
}
