// Q4_0: block_q4_0 { f16 d; u8 qs[16] } (18 bytes); element j is the low nibble of qs[j],
// element j + 16 the high nibble; value (q - 8) * d. A unit is one block.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let bb = rw * 4u + u * 18u;
    let d = w_f16(bb);
    let c0 = u * 32u;
    for (var k = 0u; k < 4u; k++) {
        let q = w_word(bb + 2u + 4u * k);
        for (var i = 0u; i < 4u; i++) {
            let b = byte_of(q, i);
            let j = 4u * k + i;
            fma_x(acc, a0, nt, xb + c0 + j, f32(i32(b & 15u) - 8) * d);
            fma_x(acc, a0, nt, xb + c0 + j + 16u, f32(i32(b >> 4u) - 8) * d);
        }
    }
}
