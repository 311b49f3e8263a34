//! Cheap, shareable views of immutable byte buffers (memory-mapped files or owned vectors).

use std::ops::{Deref, Range};
use std::sync::Arc;

/// An immutable, reference-counted byte range. Cloning is O(1); slicing never copies.
/// Weights stay memory-mapped: a `Bytes` over an mmap keeps the mapping alive.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn Deref<Target = [u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Bytes {
    /// Wraps a whole owned buffer.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes {
            owner: Arc::new(v),
            range: 0..len,
        }
    }

    /// Wraps a whole shared owner (for example an `Arc<Mmap>`'s content).
    pub fn from_owner(owner: Arc<dyn Deref<Target = [u8]> + Send + Sync>) -> Self {
        let len = owner.len();
        Bytes {
            owner,
            range: 0..len,
        }
    }

    /// Sub-range relative to this view; `None` if it does not lie inside.
    pub fn slice(&self, r: Range<usize>) -> Option<Bytes> {
        if r.start > r.end || r.end > self.len() {
            return None;
        }
        Some(Bytes {
            owner: self.owner.clone(),
            range: self.range.start + r.start..self.range.start + r.end,
        })
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.owner[self.range.clone()]
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}
