// FP8 E4M3FN rows with the 128x128 block-scale grid in S (row-major, scale_cols per block row):
// w[r, c] = e4m3(byte) * S[(r / 128) * scale_cols + c / 128]. A unit is 16 elements (4 words),
// all inside one 128-column scale block.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let c0 = u * 16u;
    let s = S[(grow / 128u) * P.scale_cols + c0 / 128u];
    for (var k = 0u; k < 4u; k++) {
        let w = W[rw + u * 4u + k];
        for (var i = 0u; i < 4u; i++) {
            let c = c0 + 4u * k + i;
            if (c < P.cols) {
                fma_x(acc, a0, nt, xb + c, e4m3_to_f32(byte_of(w, i)) * s);
            }
        }
    }
}
