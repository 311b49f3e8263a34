//! GGUF v3 reader: metadata, tensor infos, memory-mapped data, split files; and a writer.
//!
//! The reader trusts nothing in the header: every count and length is checked against the
//! bytes that remain before anything is allocated, every size computation is checked for
//! overflow, and every failure is a [`GgufError`] naming the file (and the key or tensor).
//! Tensor data is never copied: [`GgufFile::tensor`](crate::source::TensorSource::tensor)
//! hands out [`Bytes`] views of the mapping.
//!
//! Types the kernels cannot compute (IQ1_S, ...) are still listed and sized exactly from the
//! [`QuantType`] table; whether a model can use them is the caller's decision.

mod parse;
mod split;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::quant::QuantType;
use crate::source::{RawTensor, SourceError, TensorSource};
use crate::Bytes;

pub use split::split_file_name;
pub use writer::{GgufWriteError, GgufWriter};

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// The version the writer produces. Version 2 has the same layout and is read too.
pub const GGUF_VERSION: u32 = 3;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of arrays inside arrays that the reader accepts.
pub const MAX_ARRAY_DEPTH: u32 = 4;

/// A metadata value, one variant per GGUF value type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Items all share one type (the file stores it once); nested arrays are allowed.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The GGUF value-type id (`gguf_type`).
    pub fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any numeric type (integers are converted, 64-bit ones possibly with rounding).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl From<&str> for MetaValue {
    fn from(s: &str) -> Self {
        MetaValue::String(s.to_owned())
    }
}

/// One entry of the merged tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ty: QuantType,
    /// Outermost-first: ggml's `ne` reversed.
    pub shape: Vec<usize>,
    /// Index into [`GgufFile::split_paths`] of the file holding the data.
    pub split: usize,
    /// Absolute byte offset of the data within that file.
    pub offset: u64,
    /// Exact byte size of the data.
    pub size: u64,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Why a GGUF file was rejected. Always wrapped in a [`GgufError`] that names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic {found:#010x}, expected {GGUF_MAGIC:#010x})")]
    BadMagic { found: u32 },
    #[error("unsupported GGUF version {version} (versions 2 and 3 are read){}",
        if *big_endian { "; this looks like a big-endian file" } else { "" })]
    UnsupportedVersion { version: u32, big_endian: bool },
    #[error(
        "truncated: {what} needs {needed} bytes at offset {offset}, the file has {available} left"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("{what}: count {count} cannot fit in the {available} bytes left at offset {offset}")]
    CountTooLarge {
        what: String,
        count: u64,
        offset: u64,
        available: u64,
    },
    #[error("{what}: string at offset {offset} is not valid UTF-8")]
    NotUtf8 { what: String, offset: u64 },
    #[error("metadata `{key}`: unknown value type {type_id}")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")]
    TooDeep { key: String },
    #[error("metadata `{key}` appears twice")]
    DuplicateKey { key: String },
    #[error("metadata `{key}`: {what}")]
    BadMeta { key: String, what: String },
    #[error("tensor `{name}`: unknown ggml type id {id}")]
    UnknownType { name: String, id: u32 },
    #[error("tensor `{name}`: {what}")]
    BadTensor { name: String, what: String },
    #[error("tensor `{name}` appears twice (also in {})", other.display())]
    DuplicateTensor { name: String, other: PathBuf },
    #[error("split model: {what}")]
    Split { what: String },
    #[error("split model: `{key}` is {found:?}, expected {expected}")]
    SplitMismatch {
        key: &'static str,
        found: Option<u64>,
        expected: u64,
    },
    #[error("split {no} of {count} is missing: {} not found", path.display())]
    MissingSplit { no: u32, count: u32, path: PathBuf },
}

/// A rejected GGUF file: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", file.display())]
pub struct GgufError {
    pub file: PathBuf,
    pub kind: GgufErrorKind,
}

impl GgufError {
    pub(crate) fn new(file: &Path, kind: GgufErrorKind) -> Self {
        GgufError {
            file: file.to_owned(),
            kind,
        }
    }
}

/// One parsed GGUF file of a (possibly split) model.
struct SplitFile {
    path: PathBuf,
    data: Bytes,
}

/// A GGUF model: one file, or the files of a split model merged into one tensor table.
pub struct GgufFile {
    /// The file the model was opened from (the first split).
    path: PathBuf,
    version: u32,
    alignment: u64,
    /// Metadata of the first file (splits after the first only carry `split.*` keys).
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    splits: Vec<SplitFile>,
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file. A split model (`split.count` > 1) is opened from its
    /// first file, `<prefix>-00001-of-<count>.gguf`; its siblings are found by name.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let data = map_file(path)?;
        let first = parse::parse(path, &data)?;
        let count = split::split_count(path, &first)?;
        if count <= 1 {
            return Self::assemble(vec![(path.to_owned(), data, first)]);
        }
        let mut files = vec![(path.to_owned(), data, first)];
        for (no, sibling) in split::sibling_paths(path, count)? {
            if !sibling.exists() {
                return Err(GgufError::new(
                    path,
                    GgufErrorKind::MissingSplit {
                        no,
                        count,
                        path: sibling,
                    },
                ));
            }
            let data = map_file(&sibling)?;
            let parsed = parse::parse(&sibling, &data)?;
            split::check_sibling(&sibling, &parsed, no, count)?;
            files.push((sibling, data, parsed));
        }
        Self::assemble(files)
    }

    /// Parses a single, unsplit GGUF image already in memory (for example an embedded model).
    /// `name` is only used in error messages and [`path`](Self::path).
    pub fn from_bytes(name: impl Into<PathBuf>, data: Bytes) -> Result<GgufFile, GgufError> {
        let path = name.into();
        let parsed = parse::parse(&path, &data)?;
        if split::split_count(&path, &parsed)? > 1 {
            return Err(GgufError::new(
                &path,
                GgufErrorKind::Split {
                    what: "a split model must be opened from its files".into(),
                },
            ));
        }
        Self::assemble(vec![(path, data, parsed)])
    }

    fn assemble(files: Vec<(PathBuf, Bytes, parse::Parsed)>) -> Result<GgufFile, GgufError> {
        let first_path = files[0].0.clone();
        let mut tensors = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut splits = Vec::with_capacity(files.len());
        let mut head = None;
        for (i, (path, data, parsed)) in files.into_iter().enumerate() {
            for mut t in parsed.tensors {
                if let Some(&j) = by_name.get(&t.name) {
                    let earlier: &GgufTensorInfo = &tensors[j];
                    let other = splits
                        .get(earlier.split)
                        .map_or(&path, |s: &SplitFile| &s.path)
                        .clone();
                    return Err(GgufError::new(
                        &path,
                        GgufErrorKind::DuplicateTensor {
                            name: t.name,
                            other,
                        },
                    ));
                }
                t.split = i;
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(t);
            }
            if head.is_none() {
                head = Some((parsed.version, parsed.alignment, parsed.metadata));
            }
            splits.push(SplitFile { path, data });
        }
        let (version, alignment, metadata) = head.expect("at least one file");
        if let Some(v) = metadata.get(split::KEY_TENSORS) {
            let expected = v.as_u64();
            if expected != Some(tensors.len() as u64) {
                return Err(GgufError::new(
                    &first_path,
                    GgufErrorKind::Split {
                        what: format!(
                            "split.tensors.count is {v:?} but the files hold {} tensors",
                            tensors.len()
                        ),
                    },
                ));
            }
        }
        Ok(GgufFile {
            path: first_path,
            version,
            alignment,
            metadata,
            tensors,
            by_name,
            splits,
        })
    }

    /// The file the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every file of the model, first split first; [`GgufTensorInfo::split`] indexes this.
    pub fn split_paths(&self) -> Vec<&Path> {
        self.splits.iter().map(|s| s.path.as_path()).collect()
    }

    /// The GGUF version of the first file (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment of the first file (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata of the first file, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// The merged tensor table, in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a listed tensor (a view of the mapping, no copy).
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Option<Bytes> {
        let start = usize::try_from(info.offset).ok()?;
        let end = start.checked_add(usize::try_from(info.size).ok()?)?;
        self.splits.get(info.split)?.data.slice(start..end)
    }
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<RawTensor, SourceError> {
        let info = self.tensor_info(name).ok_or_else(|| SourceError::Missing {
            file: self.describe(),
            name: name.to_owned(),
        })?;
        // The parser already checked that the range lies inside the file.
        let data = self.tensor_data(info).ok_or_else(|| SourceError::Bad {
            file: self.describe(),
            name: name.to_owned(),
            what: "data range outside the file".into(),
        })?;
        Ok(RawTensor {
            name: info.name.clone(),
            ty: info.ty,
            shape: info.shape.clone(),
            data,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    fn describe(&self) -> String {
        if self.splits.len() > 1 {
            format!("{} ({} splits)", self.path.display(), self.splits.len())
        } else {
            self.path.display().to_string()
        }
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("splits", &self.splits.len())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<Bytes, GgufError> {
    let file = File::open(path).map_err(|e| GgufError::new(path, e.into()))?;
    // SAFETY: the mapping is read-only; as with every mmap-based loader, the file must not be
    // truncated or rewritten while the model is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GgufError::new(path, e.into()))?;
    Ok(Bytes::from_owner(Arc::new(map)))
}
