//! The CPU backend's matrix kernels: threaded matvec (decode) and matmul (prefill) over packed
//! weight rows, calling the quant layer's dot products.

use rayon::prelude::*;

use crate::quant;
use crate::tensor::Matrix;

/// `out[r] = W[r] · x` where `xq` is `x` already in `w.act_type()` format.
pub fn matvec(w: &Matrix, xq: &[u8], out: &mut [f32]) {
    out.par_iter_mut()
        .enumerate()
        .for_each(|(r, o)| *o = dot_row(w, r, xq));
}

/// `out[t * rows + r] = W[r] · x_t` for `n` activation rows packed back to back in `xq`.
pub fn matmul(w: &Matrix, xq: &[u8], n: usize, out: &mut [f32]) {
    let arb = xq.len() / n.max(1);
    out.par_chunks_mut(w.rows).enumerate().for_each(|(t, o)| {
        let x = &xq[t * arb..(t + 1) * arb];
        for (r, v) in o.iter_mut().enumerate() {
            *v = dot_row(w, r, x);
        }
    });
}

#[inline]
fn dot_row(w: &Matrix, r: usize, xq: &[u8]) -> f32 {
    match w.row_scales(r) {
        Some(scales) => quant::fp8::dot_row(w.row(r), scales, bytemuck::cast_slice(xq)),
        None => quant::vec_dot_f32(w.ty, w.row(r), bytemuck::cast_slice(xq)),
    }
}
