// Routed-expert evaluation for a batch of tokens with per-token (expert, weight) lists. Each
// expert owns a region of `max_tokens` rows in the gathered input XG and in its products; the
// host lists the active rows.
//   `gather`:      XG[IDX[2i] * h + c] = X[IDX[2i + 1] * h + c] for the `count` (row, token)
//                  pairs (grid: x over c, y over i);
//   `swiglu_rows`: G[r * inter + c] = silu(G[..]) * U[..] for the listed rows r = IDX[2i];
//   `scatter`:     O[t * h + c] += sum_j WT[t * slots + j] * Y[SL[t * slots + j] * h + c] over
//                  the token's slots in order (0xffffffff: unused), grid x over c, y over t.

struct Params {
    count: u32,  // active rows (gather, swiglu_rows) or tokens (scatter)
    width: u32,  // h (gather, scatter) or inter (swiglu_rows)
    slots: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> IDX: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read_write> XG: array<f32>;
@group(0) @binding(4) var<storage, read_write> G: array<f32>;
@group(0) @binding(5) var<storage, read> U: array<f32>;
@group(0) @binding(6) var<storage, read> SL: array<u32>;
@group(0) @binding(7) var<storage, read> WT: array<f32>;
@group(0) @binding(8) var<storage, read> Y: array<f32>;
@group(0) @binding(9) var<storage, read_write> O: array<f32>;

@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) g: vec3<u32>) {
    let c = g.x;
    let i = g.y;
    if (c >= P.width || i >= P.count) {
        return;
    }
    XG[IDX[2u * i] * P.width + c] = X[IDX[2u * i + 1u] * P.width + c];
}

@compute @workgroup_size(64)
fn swiglu_rows(@builtin(global_invocation_id) g: vec3<u32>) {
    let c = g.x;
    let i = g.y;
    if (c >= P.width || i >= P.count) {
        return;
    }
    let k = IDX[2u * i] * P.width + c;
    let v = G[k];
    G[k] = v / (1.0 + exp(-v)) * U[k];
}

@compute @workgroup_size(64)
fn scatter(@builtin(global_invocation_id) g: vec3<u32>) {
    let c = g.x;
    let t = g.y;
    if (c >= P.width || t >= P.count) {
        return;
    }
    let o = t * P.width + c;
    var acc = O[o];
    for (var j = 0u; j < P.slots; j++) {
        let r = SL[t * P.slots + j];
        if (r != 0xffffffffu) {
            acc += WT[t * P.slots + j] * Y[r * P.width + c];
        }
    }
    O[o] = acc;
}
