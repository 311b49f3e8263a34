//! The latent KV cache: per layer and position, the normalised latent `c` (kv_lora_rank values)
//! followed by the rotated shared key `k_pe` (qk_rope values) — 576 values per token per layer
//! for the 671B model, instead of 40,960 for decompressed keys and values.

use half::{bf16, f16};

/// Storage precision of cached rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheType {
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for CacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(CacheType::F32),
            "f16" => Ok(CacheType::F16),
            "bf16" => Ok(CacheType::BF16),
            other => Err(format!("unknown cache type `{other}` (f32, f16, bf16)")),
        }
    }
}

enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A sequence's cache. Grows in place up to `capacity` positions, never beyond.
pub struct KvCache {
    row: usize,
    capacity: usize,
    len: usize,
    layers: Vec<Rows>,
}

/// Asking for more positions than the cache was created for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("context full: {needed} positions needed, the cache holds {capacity}")]
pub struct ContextFull {
    pub needed: usize,
    pub capacity: usize,
}

impl KvCache {
    /// An empty cache for `n_layers` layers of `row`-wide entries, at most `capacity` positions.
    pub fn new(ty: CacheType, n_layers: usize, row: usize, capacity: usize) -> Self {
        let layers = (0..n_layers)
            .map(|_| match ty {
                CacheType::F32 => Rows::F32(Vec::new()),
                CacheType::F16 => Rows::F16(Vec::new()),
                CacheType::BF16 => Rows::BF16(Vec::new()),
            })
            .collect();
        KvCache {
            row,
            capacity,
            len: 0,
            layers,
        }
    }

    /// Positions stored (identical for every layer once a forward pass completes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything from position `len` on (for rollback and reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Checks that `n` more positions fit.
    pub fn reserve(&self, n: usize) -> Result<(), ContextFull> {
        let needed = self.len + n;
        if needed > self.capacity {
            return Err(ContextFull {
                needed,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Writes row `pos` of `layer` (positions past the stored length extend the layer).
    pub fn write(&mut self, layer: usize, pos: usize, values: &[f32]) {
        debug_assert_eq!(values.len(), self.row);
        debug_assert!(pos < self.capacity);
        let row = self.row;
        let need = (pos + 1) * row;
        match &mut self.layers[layer] {
            Rows::F32(v) => {
                if v.len() < need {
                    v.resize(need, 0.0);
                }
                v[pos * row..need].copy_from_slice(values);
            }
            Rows::F16(v) => {
                if v.len() < need {
                    v.resize(need, f16::ZERO);
                }
                for (d, &s) in v[pos * row..need].iter_mut().zip(values) {
                    *d = f16::from_f32(s);
                }
            }
            Rows::BF16(v) => {
                if v.len() < need {
                    v.resize(need, bf16::ZERO);
                }
                for (d, &s) in v[pos * row..need].iter_mut().zip(values) {
                    *d = bf16::from_f32(s);
                }
            }
        }
    }

    /// Marks positions `..len` as complete (after every layer has written them).
    pub fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    /// Reads row `pos` of `layer` into `out` (f32).
    #[inline]
    pub fn read(&self, layer: usize, pos: usize, out: &mut [f32]) {
        let r = pos * self.row..(pos + 1) * self.row;
        match &self.layers[layer] {
            Rows::F32(v) => out.copy_from_slice(&v[r]),
            Rows::F16(v) => {
                for (d, s) in out.iter_mut().zip(&v[r]) {
                    *d = s.to_f32();
                }
            }
            Rows::BF16(v) => {
                for (d, s) in out.iter_mut().zip(&v[r]) {
                    *d = s.to_f32();
                }
            }
        }
    }

    /// Rows `0..n` of `layer` as f32 slices when stored in f32 (the fast path), else `None`.
    #[inline]
    pub fn f32_rows(&self, layer: usize, n: usize) -> Option<&[f32]> {
        match &self.layers[layer] {
            Rows::F32(v) => Some(&v[..n * self.row]),
            _ => None,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                Rows::F32(v) => v.len() * 4,
                Rows::F16(v) => v.len() * 2,
                Rows::BF16(v) => v.len() * 2,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_capacity() {
        for ty in [CacheType::F32, CacheType::F16, CacheType::BF16] {
            let mut c = KvCache::new(ty, 2, 4, 3);
            c.write(1, 0, &[1.0, 2.0, 3.0, 0.5]);
            c.write(1, 2, &[4.0, 5.0, 6.0, 7.0]);
            let mut o = [0f32; 4];
            c.read(1, 2, &mut o);
            assert_eq!(o, [4.0, 5.0, 6.0, 7.0]);
            c.read(1, 0, &mut o);
            assert_eq!(o, [1.0, 2.0, 3.0, 0.5]);
            c.set_len(3);
            assert_eq!(
                c.reserve(1),
                Err(ContextFull {
                    needed: 4,
                    capacity: 3
                })
            );
        }
    }
}
