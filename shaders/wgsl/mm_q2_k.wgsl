// Q2_K: block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin } (84 bytes).
// A unit is a quarter of a block: half (0..2) and part (0..2) select 16 bytes of qs, whose four
// 2-bit fields (shift 2s) are columns 128 half + 32 s + 16 part + l under scale byte
// 8 half + 2 s + part; value d * (sc & 15) * q - dmin * (sc >> 4).
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let blk = u >> 2u;
    let half = (u >> 1u) & 1u;
    let part = u & 1u;
    let bb = rw * 4u + blk * 84u;
    let d = w_f16(bb + 80u);
    let dmin = w_f16(bb + 82u);
    var dl: array<f32, 4>;
    var ml: array<f32, 4>;
    for (var s = 0u; s < 4u; s++) {
        let sc = w_u8(bb + 8u * half + 2u * s + part);
        dl[s] = d * f32(sc & 15u);
        ml[s] = dmin * f32(sc >> 4u);
    }
    let c0 = blk * 256u + 128u * half + 16u * part;
    for (var k = 0u; k < 4u; k++) {
        let q = w_word(bb + 16u + 32u * half + 16u * part + 4u * k);
        for (var i = 0u; i < 4u; i++) {
            let b = byte_of(q, i);
            let l = 4u * k + i;
            for (var s = 0u; s < 4u; s++) {
                fma_x(acc, a0, nt, xb + c0 + 32u * s + l, dl[s] * f32((b >> (2u * s)) & 3u) - ml[s]);
            }
        }
    }
}
