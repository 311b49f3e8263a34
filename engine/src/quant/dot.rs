//! Portable (scalar) dot products of packed weight rows with quantised activations.

use super::QuantType;

pub fn vec_dot(ty: QuantType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    match ty {
        QuantType::F32 => {
            let mut s = 0f32;
            for i in 0..n {
                let wv = f32::from_le_bytes(w[4 * i..4 * i + 4].try_into().unwrap());
                let av = f32::from_le_bytes(a[4 * i..4 * i + 4].try_into().unwrap());
                s += wv * av;
            }
            s
        }
        _ => unimplemented!("vec_dot for {ty}"),
    }
}
