// Q5_K: block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] } (176 bytes).
// A unit is a quarter of a block (64 elements): like Q4_K plus a fifth bit from qh (bit 2c for
// the low nibbles, 2c + 1 for the high nibbles).
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let blk = u >> 2u;
    let c = u & 3u;
    let bb = rw * 4u + blk * 176u;
    let d = w_f16(bb);
    let dmin = w_f16(bb + 2u);
    let sm1 = k_scale_min(bb + 4u, 2u * c);
    let sm2 = k_scale_min(bb + 4u, 2u * c + 1u);
    let d1 = d * f32(sm1.x);
    let m1 = dmin * f32(sm1.y);
    let d2 = d * f32(sm2.x);
    let m2 = dmin * f32(sm2.y);
    let u1 = 1u << (2u * c);
    let u2 = 2u << (2u * c);
    let c0 = blk * 256u + 64u * c;
    for (var k = 0u; k < 8u; k++) {
        let q = w_word(bb + 48u + 32u * c + 4u * k);
        let h = w_word(bb + 16u + 4u * k);
        for (var i = 0u; i < 4u; i++) {
            let b = byte_of(q, i);
            let hb = byte_of(h, i);
            let l = 4u * k + i;
            let h1 = select(0u, 16u, (hb & u1) != 0u);
            let h2 = select(0u, 16u, (hb & u2) != 0u);
            fma_x(acc, a0, nt, xb + c0 + l, d1 * f32((b & 15u) + h1) - m1);
            fma_x(acc, a0, nt, xb + c0 + 32u + l, d2 * f32((b >> 4u) + h2) - m2);
        }
    }
}
