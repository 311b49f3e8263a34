// acc[a0 + t] += w.x * x_t[c0] + w.y * x_t[c1] with the products in an f16 pair (the module
// starts with `enable f16;`): w and x rounded to f16, one vec2<f16> product, the two products
// added to the f32 accumulator. Each term carries up to three f16 roundings (about 1.5e-3
// relative); activations and products must stay below 65504 in magnitude.
fn fma_x2(acc: ptr<function, array<f32, ACC>>, a0: u32, nt: u32, i0: u32, i1: u32, w: vec2<f32>) {
    let wh = vec2<f16>(w);
    for (var t = 0u; t < NT; t++) {
        if (t < nt) {
            let o = t * P.x_stride;
            let p = wh * vec2<f16>(vec2<f32>(X[i0 + o], X[i1 + o]));
            (*acc)[a0 + t] += f32(p.x) + f32(p.y);
        }
    }
}
