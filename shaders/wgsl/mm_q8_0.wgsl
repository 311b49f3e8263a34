// Q8_0: block_q8_0 { f16 d; i8 qs[32] } (34 bytes); a unit is one block.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let bb = rw * 4u + u * 34u;
    let d = w_f16(bb);
    let c0 = u * 32u;
    for (var k = 0u; k < 8u; k++) {
        let q = w_word(bb + 2u + 4u * k);
        for (var i = 0u; i < 4u; i += 2u) {
            let c = xb + c0 + 4u * k + i;
            let w = vec2<f32>(f32(sbyte_of(q, i)), f32(sbyte_of(q, i + 1u))) * d;
            fma_x2(acc, a0, nt, c, c + 1u, w);
        }
    }
}
