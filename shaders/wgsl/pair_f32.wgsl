// acc[a0 + t] += w.x * x_t[c0] + w.y * x_t[c1] in f32 (i0, i1: indices of x_0[c0], x_0[c1] in
// X), in the same order as two `fma_x` calls.
fn fma_x2(acc: ptr<function, array<f32, ACC>>, a0: u32, nt: u32, i0: u32, i1: u32, w: vec2<f32>) {
    for (var t = 0u; t < NT; t++) {
        if (t < nt) {
            let o = t * P.x_stride;
            (*acc)[a0 + t] += w.x * X[i0 + o];
            (*acc)[a0 + t] += w.y * X[i1 + o];
        }
    }
}
