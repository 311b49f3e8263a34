//! Writing GGUF v3 files: metadata and tensors collected in memory (tensor data as [`Bytes`],
//! so mapped files are not copied), then streamed out with the alignment padding readers
//! expect. Used to build test files and small embedded models, and to write split models.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::split::{split_file_name, KEY_COUNT, KEY_NO, KEY_TENSORS};
use super::{MetaValue, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::quant::QuantType;
use crate::Bytes;

const KEY_ALIGNMENT: &str = "general.alignment";

/// Why the writer refused a value or could not write.
#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("metadata `{key}`: {what}")]
    BadMeta { key: String, what: String },
    #[error("tensor `{name}`: {what}")]
    BadTensor { name: String, what: String },
    #[error("tensor `{name}` added twice")]
    DuplicateTensor { name: String },
    #[error("cannot write {count} splits: {what}")]
    BadSplit { count: u32, what: String },
}

#[derive(Clone)]
struct PendingTensor {
    name: String,
    type_id: u32,
    /// Outermost-first, as given to `add_tensor`.
    shape: Vec<usize>,
    data: Bytes,
}

/// Builds a GGUF v3 file.
///
/// ```no_run
/// # use engine::gguf::{GgufWriter, MetaValue};
/// # use engine::{quant::QuantType, Bytes};
/// let mut w = GgufWriter::new();
/// w.add_meta("general.architecture", MetaValue::from("deepseek2"))?;
/// // A 2 x 32 F32 matrix: shape is outermost-first, like `RawTensor::shape`.
/// w.add_tensor("blk.0.w", QuantType::F32, &[2, 32], Bytes::from_vec(vec![0; 2 * 32 * 4]))?;
/// w.write(std::path::Path::new("tiny.gguf"))?;
/// # Ok::<(), engine::gguf::GgufWriteError>(())
/// ```
#[derive(Clone)]
pub struct GgufWriter {
    alignment: u64,
    /// In insertion order, keys unique.
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty file with the default alignment (32).
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets a metadata key (replacing an earlier value, keeping its position). Arrays must
    /// hold items of one type and nest at most [`MAX_ARRAY_DEPTH`] deep. Setting
    /// `general.alignment` (a power of two) also changes the data alignment.
    pub fn add_meta(
        &mut self,
        key: impl Into<String>,
        value: MetaValue,
    ) -> Result<&mut Self, GgufWriteError> {
        let key = key.into();
        if let Err(what) = check_value(&value, 0) {
            return Err(GgufWriteError::BadMeta { key, what });
        }
        if key == KEY_ALIGNMENT {
            match value.as_u64() {
                Some(a) if a.is_power_of_two() && a <= u32::MAX.into() => self.alignment = a,
                _ => {
                    return Err(GgufWriteError::BadMeta {
                        key,
                        what: format!("{value:?} is not a power of two"),
                    })
                }
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        Ok(self)
    }

    /// Sets the data alignment (recorded as `general.alignment`, u32).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self, GgufWriteError> {
        self.add_meta(KEY_ALIGNMENT, MetaValue::U32(alignment))
    }

    /// Adds a tensor. `shape` is outermost-first (the file stores it reversed as `ne`), with
    /// 1 to 4 non-zero dimensions whose innermost one is a whole number of `ty` blocks;
    /// `data` must be exactly `ty.bytes_for(numel)` bytes. Tensors are written in the order
    /// they are added.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: QuantType,
        shape: &[usize],
        data: Bytes,
    ) -> Result<&mut Self, GgufWriteError> {
        let name = name.into();
        let bad = |name: String, what: String| Err(GgufWriteError::BadTensor { name, what });
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufWriteError::DuplicateTensor { name });
        }
        let Some(type_id) = ty.ggml_id() else {
            return bad(name, format!("{ty} has no GGML type id"));
        };
        if shape.is_empty() || shape.len() > MAX_DIMS || shape.contains(&0) {
            return bad(name, format!("shape {shape:?} needs 1 to 4 non-zero dims"));
        }
        let inner = *shape.last().expect("shape is not empty");
        // Not `is_multiple_of`: the workspace's rust-version is 1.85.
        let ragged = inner % ty.block_elems();
        if ragged != 0 {
            return bad(
                name,
                format!(
                    "innermost dimension {inner} is not a multiple of the {ty} block size {}",
                    ty.block_elems()
                ),
            );
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n as u64));
        let expected = numel.and_then(|n| ty.bytes_for(n));
        if expected != Some(data.len() as u64) {
            return bad(
                name,
                format!(
                    "{} bytes of data, {ty} {shape:?} needs {expected:?}",
                    data.len()
                ),
            );
        }
        self.tensors.push(PendingTensor {
            name,
            type_id,
            shape: shape.to_vec(),
            data,
        });
        Ok(self)
    }

    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Streams the whole file to `w`; returns the number of bytes written.
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<u64> {
        let mut out = Counting { inner: w, n: 0 };
        let w = &mut out;
        w.write_all(&GGUF_MAGIC.to_le_bytes())?;
        w.write_all(&GGUF_VERSION.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            write_str(w, key)?;
            w.write_all(&value.type_id().to_le_bytes())?;
            write_value(w, value)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for &d in t.shape.iter().rev() {
                w.write_all(&(d as u64).to_le_bytes())?;
            }
            w.write_all(&t.type_id.to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        pad(w, self.alignment)?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            pad(w, self.alignment)?;
        }
        w.flush()?;
        Ok(out.n)
    }

    /// Writes the file at `path` (created or truncated).
    pub fn write(&self, path: &Path) -> Result<(), GgufWriteError> {
        let io_err = |source| GgufWriteError::Io {
            path: path.to_owned(),
            source,
        };
        let mut f = BufWriter::new(File::create(path).map_err(io_err)?);
        self.write_to(&mut f).map_err(io_err)?;
        f.into_inner()
            .map_err(|e| io_err(e.into_error()))?
            .sync_all()
            .map_err(io_err)
    }

    /// Writes the model as `count` split files `{prefix}-00001-of-{count:05}.gguf`, ... the way
    /// `gguf-split` does: tensors in order, cut into `count` runs of nearly equal length; all
    /// metadata in the first file; `split.no` (u16, 0-based), `split.count` (u16) and
    /// `split.tensors.count` (i32) in every file (plus `general.alignment` when set, since
    /// each file's layout depends on it). Returns the paths, first split first.
    pub fn write_splits(&self, prefix: &Path, count: u32) -> Result<Vec<PathBuf>, GgufWriteError> {
        let bad = |what: &str| GgufWriteError::BadSplit {
            count,
            what: what.into(),
        };
        let count16 = u16::try_from(count)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| bad("the count must be in 1..=65535"))?;
        let total =
            i32::try_from(self.tensors.len()).map_err(|_| bad("more than i32::MAX tensors"))?;
        let stem = prefix
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("the prefix has no UTF-8 file name"))?;
        let n = self.tensors.len();
        let mut paths = Vec::with_capacity(count as usize);
        for i in 0..count16 {
            let mut part = if i == 0 {
                let mut w = self.clone();
                w.tensors.clear();
                w
            } else {
                let mut w = GgufWriter::new();
                if let Some((_, a)) = self.metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
                    w.add_meta(KEY_ALIGNMENT, a.clone())?;
                }
                w
            };
            part.add_meta(KEY_NO, MetaValue::U16(i))?;
            part.add_meta(KEY_COUNT, MetaValue::U16(count16))?;
            part.add_meta(KEY_TENSORS, MetaValue::I32(total))?;
            let (lo, hi) = (
                n * i as usize / count as usize,
                n * (i as usize + 1) / count as usize,
            );
            part.tensors.extend_from_slice(&self.tensors[lo..hi]);
            let path = prefix.with_file_name(split_file_name(stem, i as u32 + 1, count));
            part.write(&path)?;
            paths.push(path);
        }
        Ok(paths)
    }
}

/// Counts bytes so padding can be computed while streaming.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pad<W: Write>(w: &mut Counting<'_, W>, alignment: u64) -> io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    let mut left = w.n.next_multiple_of(alignment) - w.n;
    while left > 0 {
        let k = left.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        left -= k as u64;
    }
    Ok(())
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// Writes a value without its leading type id.
fn write_value(w: &mut impl Write, v: &MetaValue) -> io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&[*x]),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[u8::from(*x)]),
        MetaValue::String(s) => write_str(w, s),
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Array(items) => {
            // An empty array still needs an item type; u8 is as good as any.
            let item_type = items.first().map_or(0, MetaValue::type_id);
            w.write_all(&item_type.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
    }
}

/// Arrays must be homogeneous and no deeper than the reader accepts.
fn check_value(v: &MetaValue, depth: u32) -> Result<(), String> {
    let MetaValue::Array(items) = v else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(format!(
            "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
        ));
    }
    let Some(first) = items.first() else {
        return Ok(());
    };
    for item in items {
        if item.type_id() != first.type_id() {
            return Err(format!(
                "array mixes value types {} and {}",
                first.type_id(),
                item.type_id()
            ));
        }
        check_value(item, depth + 1)?;
    }
    Ok(())
}
