// F16 rows: a unit is 4 consecutive elements (2 words).
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let c0 = u * 4u;
    for (var k = 0u; k < 2u; k++) {
        let c = c0 + 2u * k;
        if (c < P.cols) {
            let v = unpack2x16float(W[rw + (c >> 1u)]);
            if (c + 1u < P.cols) {
                fma_x2(acc, a0, nt, xb + c, xb + c + 1u, v);
            } else {
                fma_x(acc, a0, nt, xb + c, v.x);
            }
        }
    }
}
