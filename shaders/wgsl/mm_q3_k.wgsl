// Q3_K: block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d } (110 bytes).
// A unit is a quarter of a block: half (0..2) and part (0..2) select 16 bytes of qs and of
// hmask; 2-bit field s of qs byte l is column 128 half + 32 s + 16 part + l, minus 4 when bit
// 4 half + s of hmask[16 part + l] is clear, times d * (6-bit scale 8 half + 2 s + part - 32).
fn q3_scale(sb: u32, j: u32) -> i32 {
    var lo: u32;
    if (j < 8u) {
        lo = w_u8(sb + j) & 15u;
    } else {
        lo = w_u8(sb + j - 8u) >> 4u;
    }
    let hi = (w_u8(sb + 8u + (j & 3u)) >> (2u * (j >> 2u))) & 3u;
    return i32(lo | (hi << 4u)) - 32;
}

fn unit_dot(rw: u32, grow: u32, u: u32, xb: u32, nt: u32, a0: u32, acc: ptr<function, array<f32, ACC>>) {
    let blk = u >> 2u;
    let half = (u >> 1u) & 1u;
    let part = u & 1u;
    let bb = rw * 4u + blk * 110u;
    let d_all = w_f16(bb + 108u);
    var dl: array<f32, 4>;
    for (var s = 0u; s < 4u; s++) {
        dl[s] = d_all * f32(q3_scale(bb + 96u, 8u * half + 2u * s + part));
    }
    let c0 = blk * 256u + 128u * half + 16u * part;
    for (var k = 0u; k < 4u; k++) {
        let q = w_word(bb + 32u + 32u * half + 16u * part + 4u * k);
        let hm = w_word(bb + 16u * part + 4u * k);
        for (var i = 0u; i < 4u; i++) {
            let b = byte_of(q, i);
            let hb = byte_of(hm, i);
            let l = 4u * k + i;
            for (var s = 0u; s < 4u; s++) {
                let m = 1u << (4u * half + s);
                let v = i32((b >> (2u * s)) & 3u) - select(4, 0, (hb & m) != 0u);
                fma_x(acc, a0, nt, xb + c0 + 32u * s + l, dl[s] * f32(v));
            }
        }
    }
}
