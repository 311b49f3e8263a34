// F32 rows: a unit is 4 consecutive elements.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let c0 = u * 4u;
    for (var i = 0u; i < 4u; i++) {
        let c = c0 + i;
        if (c < P.cols) {
            fma_x(acc, a0, nt, xb + c, bitcast<f32>(W[rw + c]));
        }
    }
}
