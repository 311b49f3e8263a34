// Q5_1: block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] } (24 bytes); value q * d + m.
// A unit is one block.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let bb = rw * 4u + u * 24u;
    let d = w_f16(bb);
    let m = w_f16(bb + 2u);
    let qh = w_word(bb + 4u);
    let c0 = u * 32u;
    for (var k = 0u; k < 4u; k++) {
        let q = w_word(bb + 8u + 4u * k);
        for (var i = 0u; i < 4u; i++) {
            let b = byte_of(q, i);
            let j = 4u * k + i;
            let h0 = ((qh >> j) << 4u) & 0x10u;
            let h1 = (qh >> (j + 12u)) & 0x10u;
            fma_x(acc, a0, nt, xb + c0 + j, f32((b & 15u) | h0) * d + m);
            fma_x(acc, a0, nt, xb + c0 + j + 16u, f32((b >> 4u) | h1) * d + m);
        }
    }
}
