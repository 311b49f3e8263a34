//! AVX2/FMA dot-product kernels, selected at run time.

use super::QuantType;

/// Whether this CPU has AVX2 and FMA (checked once, cached by std).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `Some(dot)` when an AVX2 kernel exists for `ty`, `None` to fall back to the portable one.
pub fn vec_dot(_ty: QuantType, _n: usize, _w: &[u8], _a: &[u8]) -> Option<f32> {
    None
}
