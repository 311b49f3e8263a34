// Q4_K: block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] } (144 bytes, 256 elements).
// A unit is a quarter of a block: 64 elements from 32 bytes of qs, low nibbles for sub-block
// 2c, high nibbles for 2c + 1; value d * sc * q - dmin * m.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let blk = u >> 2u;
    let c = u & 3u;
    let bb = rw * 4u + blk * 144u;
    let d = w_f16(bb);
    let dmin = w_f16(bb + 2u);
    let sm1 = k_scale_min(bb + 4u, 2u * c);
    let sm2 = k_scale_min(bb + 4u, 2u * c + 1u);
    let d1 = d * f32(sm1.x);
    let m1 = dmin * f32(sm1.y);
    let d2 = d * f32(sm2.x);
    let m2 = dmin * f32(sm2.y);
    let c0 = blk * 256u + 64u * c;
    for (var k = 0u; k < 8u; k++) {
        let q = w_word(bb + 16u + 32u * c + 4u * k);
        for (var i = 0u; i < 4u; i++) {
            let b = byte_of(q, i);
            let l = 4u * k + i;
            let w = vec2<f32>(d1 * f32(b & 15u) - m1, d2 * f32(b >> 4u) - m2);
            fma_x2(acc, a0, nt, xb + c0 + l, xb + c0 + 32u + l, w);
        }
    }
}
