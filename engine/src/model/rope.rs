//! Rotary position embedding with YaRN, computed from the configuration (no magic numbers).
//!
//! Angles are `pos * inv_freq[i]` in f32 (as the reference implementations do); `cos`/`sin` are
//! multiplied by YaRN's attention factor, which is 1 for DeepSeek-V3 (`mscale == mscale_all_dim`)
//! — its magnitude correction lives in the softmax scale instead.

use crate::config::{yarn_mscale, Rope};

/// Per-channel-pair inverse frequencies and the cos/sin magnitude factor.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    attn_factor: f32,
    interleaved: bool,
}

impl RopeTable {
    /// Tables for `dim` rotary channels.
    pub fn new(rope: &Rope, dim: usize) -> Self {
        let half = dim / 2;
        let base = rope.theta;
        let extrap: Vec<f64> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let (inv_freq, attn_factor) = match rope.yarn {
            None => (extrap.iter().map(|&f| f as f32).collect(), 1.0),
            Some(y) => {
                let corr = |rot: f64| {
                    dim as f64 * (y.original_max_position / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let low = corr(y.beta_fast).floor().max(0.0);
                let high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let inv: Vec<f32> = extrap
                    .iter()
                    .enumerate()
                    .map(|(i, &e)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        // `extrap_factor` = 1 - ramp: channels below `low` keep their frequency.
                        let ef = 1.0 - ramp;
                        let interp = e / y.factor;
                        (interp * (1.0 - ef) + e * ef) as f32
                    })
                    .collect();
                let af = if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                    yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
                } else {
                    yarn_mscale(y.factor, 1.0)
                };
                (inv, af as f32)
            }
        };
        RopeTable {
            inv_freq,
            attn_factor,
            interleaved: rope.interleaved,
        }
    }

    /// Whether channel pairs are `(2i, 2i + 1)` (true) or `(i, i + dim/2)` (false).
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// `[cos, sin]` of every channel pair for positions `0..positions`, exactly the values
    /// [`RopeTable::apply`] multiplies by (`positions x dim/2 x 2`, attention factor included):
    /// the GPU applies the rotation from this table.
    pub fn cos_sin_table(&self, positions: usize) -> Vec<f32> {
        let mut t = Vec::with_capacity(positions * self.inv_freq.len() * 2);
        for pos in 0..positions {
            let p = pos as f32;
            for &f in &self.inv_freq {
                let (s, c) = ((p * f) as f64).sin_cos();
                t.push(c as f32 * self.attn_factor);
                t.push(s as f32 * self.attn_factor);
            }
        }
        t
    }

    /// Rotates `x` in place for position `pos`: one head's `dim` rotary channels, or several
    /// heads' back to back (each angle's sine and cosine computed once for all of them).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let dim = 2 * half;
        let p = pos as f32;
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = p * f;
            let (s, c) = (angle as f64).sin_cos();
            let (c, s) = (c as f32 * self.attn_factor, s as f32 * self.attn_factor);
            let (a, b) = if self.interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            for x in x.chunks_exact_mut(dim) {
                let (x0, x1) = (x[a], x[b]);
                x[a] = x0 * c - x1 * s;
                x[b] = x0 * s + x1 * c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Yarn;

    #[test]
    fn yarn_ramp_matches_deepseek_v3_constants() {
        // 64 rotary dims, factor 40, original 4096, betas 32/1: low = 10, high = 23.
        let rope = Rope {
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
            }),
            interleaved: true,
        };
        let t = RopeTable::new(&rope, 64);
        let base = |i: usize| 1.0 / 10000f64.powf(2.0 * i as f64 / 64.0);
        for i in 0..=10 {
            assert!((t.inv_freq[i] as f64 - base(i)).abs() < 1e-7 * base(i).max(1e-3));
        }
        for i in 23..32 {
            assert!((t.inv_freq[i] as f64 - base(i) / 40.0).abs() < 1e-6 * base(i));
        }
        assert_eq!(t.attn_factor, 1.0);
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let rope = Rope {
            theta: 10000.0,
            yarn: None,
            interleaved: true,
        };
        let t = RopeTable::new(&rope, 8);
        let x0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let mut x = x0;
        t.apply(&mut x, 0);
        assert_eq!(x, x0);
        t.apply(&mut x, 17);
        let n0: f32 = x0.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }
}
