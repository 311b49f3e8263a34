// Numerically stable softmax of rows in place, one workgroup of 64 lanes per row. Row r starts
// at off + r * stride and holds len0 + r / per values (attention rows grow by one per token:
// per = heads); values past a row's length are left alone.

struct Params {
    rows: u32,
    stride: u32,
    len0: u32,
    per: u32,
    off: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read_write> X: array<f32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x;
    let b = P.off + r * P.stride;
    let len = P.len0 + r / P.per;
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
