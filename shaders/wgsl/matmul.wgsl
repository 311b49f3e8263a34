// Matrix products out[t * out_stride + row_base + r] = W[r] . x_t over packed weight rows.
// Grouped products (several matrices stacked by rows, e.g. one per attention head) read each
// group's own slice of the token: row R takes x_t + (R / group_rows) * group_x.
//
// The engine assembles a module as: prelude + variant constants (WG, ROWS, NT) + this file +
// one of `reduce_subgroup.wgsl` / `reduce_shared.wgsl` (which defines `reduce`) + one of
// `pair_f32.wgsl` / `pair_f16.wgsl` (`fma_x2`, two products at once; F16, Q8_0, Q4_K and Q6_K
// use it) + one `mm_<type>.wgsl` file, which defines `unit_dot` (one work unit of one row: a few elements of
// a float row, one block, or a quarter of a K-quant super-block). Three upper-case
// placeholders in `main` (the subgroup builtin arguments, lane and size) are replaced by the
// subgroup builtins, or by nothing, 0u and 1u.
//
// Layout: every row of the page starts on a 4-byte boundary (rows are padded to whole u32
// words at upload; the block bytes themselves are unchanged), so block fields are read at
// arbitrary byte offsets from the u32 array with the w_* helpers below.
//
// A workgroup of WG lanes computes ROWS consecutive rows for up to NT tokens per pass: each
// lane walks the units lane, lane + WG, ... (consecutive lanes read consecutive bytes), keeps
// ROWS * NT f32 accumulators, and dequantises each weight once for all NT tokens. The partial
// sums are reduced with subgroupAdd plus a small shared-memory step (SUBGROUPS) or with a
// shared-memory tree (fallback).

struct Params {
    rows: u32,       // rows of this page
    cols: u32,
    row_words: u32,  // u32 words per (padded) row
    n: u32,          // tokens
    x_off: u32,      // f32 index of x_0[0] in X
    x_stride: u32,   // f32 elements from x_t to x_(t+1)
    out_off: u32,    // f32 index of out_0[0] in O (for the whole matrix, not the page)
    out_stride: u32, // f32 elements from out_t to out_(t+1)
    row_base: u32,   // first row of this page in the whole matrix
    units: u32,      // work units per row
    scale_cols: u32, // FP8: scale blocks per row
    wg_x: u32,       // workgroups along x (the grid may be 2-D)
    group_rows: u32, // rows per group (all rows for a plain product)
    group_x: u32,    // f32 elements between the x slices of consecutive groups
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> W: array<u32>;
@group(0) @binding(2) var<storage, read> X: array<f32>;
@group(0) @binding(3) var<storage, read_write> O: array<f32>;
@group(0) @binding(4) var<storage, read> S: array<f32>;

const ACC: u32 = ROWS * NT;
var<workgroup> red: array<f32, WG * ACC>;

// The 4 bytes at any byte offset of W, little-endian.
fn w_word(byte: u32) -> u32 {
    let i = byte >> 2u;
    let sh = (byte & 3u) * 8u;
    if (sh == 0u) {
        return W[i];
    }
    return (W[i] >> sh) | (W[i + 1u] << (32u - sh));
}

// The u16 at an even byte offset of W.
fn w_u16(byte: u32) -> u32 {
    return (W[byte >> 2u] >> ((byte & 2u) * 8u)) & 0xffffu;
}

// The byte at any offset of W.
fn w_u8(byte: u32) -> u32 {
    return (W[byte >> 2u] >> ((byte & 3u) * 8u)) & 0xffu;
}

// The f16 at an even byte offset of W, as f32.
fn w_f16(byte: u32) -> f32 {
    return f16_bits_to_f32(w_u16(byte));
}

// acc[a0 + t] += w * x_t[c] for the nt tokens of this pass (xi: index of x_0[c] in X).
fn fma_x(acc: ptr<function, array<f32, ACC>>, a0: u32, nt: u32, xi: u32, w: f32) {
    for (var t = 0u; t < NT; t++) {
        if (t < nt) {
            (*acc)[a0 + t] += w * X[xi + t * P.x_stride];
        }
    }
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    SUBGROUP_ARGS
) {
    let g = wid.x + wid.y * P.wg_x;
    let row0 = g * ROWS;
    if (row0 >= P.rows) {
        return;
    }
    for (var t0 = 0u; t0 < P.n; t0 += NT) {
        let nt = min(NT, P.n - t0);
        let xb = P.x_off + t0 * P.x_stride;
        var acc: array<f32, ACC>;
        for (var ri = 0u; ri < ROWS; ri++) {
            let r = row0 + ri;
            if (r < P.rows) {
                let rw = r * P.row_words;
                let xr = xb + ((P.row_base + r) / P.group_rows) * P.group_x;
                for (var u = lid; u < P.units; u += WG) {
                    unit_dot(rw, P.row_base + r, u, xr, nt, ri * NT, &acc);
                }
            }
        }
        // Lane i < ACC gets the workgroup's sum of accumulator i (the host checks ACC <= WG).
        let total = reduce(&acc, lid, SG_LANE, SG_SIZE);
        if (lid < ACC) {
            let ri = lid / NT;
            let t = lid % NT;
            if (t < nt && row0 + ri < P.rows) {
                O[P.out_off + (t0 + t) * P.out_stride + P.row_base + row0 + ri] = total;
            }
        }
        workgroupBarrier();
    }
}

// The 6-bit scale (x) and min (y) of sub-block j (0..8) of a Q4_K/Q5_K block whose 12 scale
// bytes start at byte sb (ggml's get_scale_min_k4).
fn k_scale_min(sb: u32, j: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(w_u8(sb + j) & 63u, w_u8(sb + j + 4u) & 63u);
    }
    return vec2<u32>(
        (w_u8(sb + j + 4u) & 15u) | ((w_u8(sb + j - 4u) >> 6u) << 4u),
        (w_u8(sb + j + 4u) >> 4u) | ((w_u8(sb + j) >> 6u) << 4u),
    );
}
