// Numerically stable softmax of rows in place, one workgroup of 64 lanes per row. Row r starts
// at off + r * stride and holds N[(r / per) * nstride + noff] + nadd values (attention: `per` =
// heads rows per token, N the token table with each token's position at 2t + 1, nadd = 1);
// values past a row's length are left alone.

struct Params {
    rows: u32,
    stride: u32,
    per: u32,
    off: u32,
    nstride: u32,
    noff: u32,
    nadd: u32,
    pad0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> X: array<f32>;
@group(0) @binding(2) var<storage, read> N: array<u32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x;
    let b = P.off + r * P.stride;
    let len = N[(r / P.per) * P.nstride + P.noff] + P.nadd;
    var m = -3.4028235e38;
    for (var i = lid; i < len; i += 64u) {
        m = max(m, X[b + i]);
    }
    red[lid] = m;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var sum = 0.0;
    for (var i = lid; i < len; i += 64u) {
        let e = exp(X[b + i] - mx);
        X[b + i] = e;
        sum += e;
    }
    red[lid] = sum;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red[0];
    for (var i = lid; i < len; i += 64u) {
        X[b + i] *= inv;
    }
}
