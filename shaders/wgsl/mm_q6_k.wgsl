// Q6_K: block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d } (210 bytes).
// A unit is a quarter of a block: half n (0..2) and l in 16h..16h + 16 (h = 0, 1), which gives
// 64 elements (columns 128n + l + {0, 32, 64, 96}) under the four scales 8n + h + {0, 2, 4, 6}.
fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let blk = u >> 2u;
    let n = (u >> 1u) & 1u;
    let h = u & 1u;
    let bb = rw * 4u + blk * 210u;
    let d = w_f16(bb + 208u);
    let sb = bb + 192u + 8u * n + h;
    let ds0 = d * f32(sbyte_of(w_u8(sb), 0u));
    let ds1 = d * f32(sbyte_of(w_u8(sb + 2u), 0u));
    let ds2 = d * f32(sbyte_of(w_u8(sb + 4u), 0u));
    let ds3 = d * f32(sbyte_of(w_u8(sb + 6u), 0u));
    let c0 = blk * 256u + 128u * n;
    for (var k = 0u; k < 4u; k++) {
        let l0 = 16u * h + 4u * k;
        let qa = w_word(bb + 64u * n + l0);
        let qb = w_word(bb + 64u * n + 32u + l0);
        let qh = w_word(bb + 128u + 32u * n + l0);
        for (var i = 0u; i < 4u; i++) {
            let a = byte_of(qa, i);
            let b = byte_of(qb, i);
            let hh = byte_of(qh, i);
            let l = l0 + i;
            let q1 = i32((a & 15u) | ((hh & 3u) << 4u)) - 32;
            let q2 = i32((b & 15u) | (((hh >> 2u) & 3u) << 4u)) - 32;
            let q3 = i32((a >> 4u) | (((hh >> 4u) & 3u) << 4u)) - 32;
            let q4 = i32((b >> 4u) | (((hh >> 6u) & 3u) << 4u)) - 32;
            let c = xb + c0 + l;
            fma_x2(acc, a0, nt, c, c + 32u, vec2<f32>(ds0 * f32(q1), ds1 * f32(q2)));
            fma_x2(acc, a0, nt, c + 64u, c + 96u, vec2<f32>(ds2 * f32(q3), ds3 * f32(q4)));
        }
    }
}
