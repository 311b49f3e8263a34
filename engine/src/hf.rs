//! Hugging Face model directories: `config.json` plus safetensors weights, either one
//! `model.safetensors` or a `model.safetensors.index.json` whose `weight_map` names the shard
//! of every tensor.
//!
//! Each file is memory-mapped and its header parsed by hand (u64 LE length, JSON, data with
//! offsets relative to the end of the header), so that every problem is reported with the file
//! and tensor it concerns, and so that tensors of dtypes this engine cannot use are still
//! listed. Lengths and offsets are checked against the file before anything is sized by them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::quant::QuantType;
use crate::source::{RawTensor, SourceError, TensorSource};
use crate::Bytes;

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The sharded weights index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest safetensors header accepted (the `safetensors` crate's limit too).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Why a model directory was rejected. Always wrapped in an [`HfError`] naming the file.
#[derive(Debug, thiserror::Error)]
pub enum HfErrorKind {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not found")]
    Missing,
    #[error("neither {SINGLE_FILE} nor {INDEX_FILE} found")]
    NoWeights,
    #[error("bad JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad index: {what}")]
    BadIndex { what: String },
    #[error("shard `{shard}` named for tensor `{tensor}` not found")]
    MissingShard { shard: String, tensor: String },
    #[error("tensor `{tensor}` is listed in {INDEX_FILE} but absent from this shard")]
    NotInShard { tensor: String },
    #[error("{len} bytes is too short for a safetensors header")]
    TooShort { len: u64 },
    #[error("header of {header_len} bytes exceeds the {MAX_HEADER_BYTES} byte limit")]
    HeaderTooLarge { header_len: u64 },
    #[error("header of {header_len} bytes runs past the end of the file ({file_len} bytes)")]
    HeaderPastEnd { header_len: u64, file_len: u64 },
    #[error("bad safetensors header: {what}")]
    BadHeader { what: String },
    #[error("tensor `{name}`: {what}")]
    BadTensor { name: String, what: String },
}

/// A rejected model directory: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", file.display())]
pub struct HfError {
    pub file: PathBuf,
    pub kind: HfErrorKind,
}

fn err(file: &Path, kind: impl Into<HfErrorKind>) -> HfError {
    HfError {
        file: file.to_owned(),
        kind: kind.into(),
    }
}

/// The engine type of a safetensors dtype string, for the dtypes the engine computes with.
pub fn dtype_quant_type(dtype: &str) -> Option<QuantType> {
    Some(match dtype {
        "F32" => QuantType::F32,
        "F16" => QuantType::F16,
        "BF16" => QuantType::BF16,
        "F8_E4M3" => QuantType::F8E4M3,
        _ => return None,
    })
}

/// Bytes per element of the dtypes the safetensors format defines (sub-byte ones excluded).
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

/// One tensor of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTensorInfo {
    pub name: String,
    /// The dtype string as stored (`"F8_E4M3"`, `"BF16"`, ...).
    pub dtype: String,
    /// Outermost-first, as stored.
    pub shape: Vec<usize>,
    /// Index into [`HfModel::shard_paths`].
    pub shard: usize,
    /// Absolute byte offset of the data within the shard file.
    pub offset: u64,
    pub size: u64,
}

impl HfTensorInfo {
    /// The engine type, when the dtype is one the engine computes with.
    pub fn quant_type(&self) -> Option<QuantType> {
        dtype_quant_type(&self.dtype)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    data: Bytes,
}

/// A Hugging Face model directory with its weights mapped.
pub struct HfModel {
    dir: PathBuf,
    config: serde_json::Value,
    shards: Vec<Shard>,
    /// Sorted by name.
    tensors: Vec<HfTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl HfModel {
    /// Opens `dir`: reads `config.json`, then maps `model.safetensors`, or the index and every
    /// shard it names, checking every header. With an index, the index decides which tensors
    /// exist: a shard's tensors that the index does not list are ignored.
    pub fn open(dir: &Path) -> Result<HfModel, HfError> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut shards = Vec::new();
        let mut tensors = Vec::new();
        if single.is_file() {
            let data = map_file(&single)?;
            let header = parse_header(&single, &data)?;
            tensors.extend(header.into_values());
            shards.push(Shard { path: single, data });
        } else if index.is_file() {
            let weight_map = read_index(&index)?;
            // Group the index by shard, shards in the order of their first tensor.
            let mut by_shard: Vec<(String, Vec<String>)> = Vec::new();
            for (tensor, shard) in weight_map {
                match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                    Some((_, names)) => names.push(tensor),
                    None => by_shard.push((shard, vec![tensor])),
                }
            }
            for (i, (shard, names)) in by_shard.into_iter().enumerate() {
                let path = dir.join(&shard);
                if !path.is_file() {
                    return Err(err(
                        &index,
                        HfErrorKind::MissingShard {
                            shard,
                            tensor: names[0].clone(),
                        },
                    ));
                }
                let data = map_file(&path)?;
                let mut header = parse_header(&path, &data)?;
                for name in names {
                    let Some(mut info) = header.remove(&name) else {
                        return Err(err(&path, HfErrorKind::NotInShard { tensor: name }));
                    };
                    info.shard = i;
                    tensors.push(info);
                }
                shards.push(Shard { path, data });
            }
        } else {
            return Err(err(dir, HfErrorKind::NoWeights));
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(HfModel {
            dir: dir.to_owned(),
            config,
            shards,
            tensors,
            by_name,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// The weight files, in the order [`HfTensorInfo::shard`] indexes.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Every tensor, sorted by name.
    pub fn tensor_infos(&self) -> &[HfTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&HfTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a listed tensor, whatever its dtype (a view of the mapping, no copy).
    pub fn tensor_data(&self, info: &HfTensorInfo) -> Option<Bytes> {
        let start = usize::try_from(info.offset).ok()?;
        let end = start.checked_add(usize::try_from(info.size).ok()?)?;
        self.shards.get(info.shard)?.data.slice(start..end)
    }
}

impl TensorSource for HfModel {
    fn tensor(&self, name: &str) -> Result<RawTensor, SourceError> {
        let bad = |what: String| SourceError::Bad {
            file: self.describe(),
            name: name.to_owned(),
            what,
        };
        let info = self.tensor_info(name).ok_or_else(|| SourceError::Missing {
            file: self.describe(),
            name: name.to_owned(),
        })?;
        let ty = info.quant_type().ok_or_else(|| {
            bad(format!(
                "dtype {} is not supported (F32, F16, BF16 and F8_E4M3 are)",
                info.dtype
            ))
        })?;
        let data = self
            .tensor_data(info)
            .ok_or_else(|| bad("data range outside the file".into()))?;
        // Checked when the header was parsed; cheap enough to keep as a guard.
        let expected = ty.bytes_for(info.numel() as u64);
        if expected != Some(data.len() as u64) {
            return Err(bad(format!(
                "{} bytes of data for {} {:?}",
                data.len(),
                info.dtype,
                info.shape
            )));
        }
        Ok(RawTensor {
            name: info.name.clone(),
            ty,
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
        self.dir.display().to_string()
    }
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, HfError> {
    let text = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => err(path, HfErrorKind::Missing),
        _ => err(path, e),
    })?;
    serde_json::from_slice(&text).map_err(|e| err(path, e))
}

/// The index's `weight_map`, tensor name -> shard file name (a plain file in the directory).
fn read_index(path: &Path) -> Result<BTreeMap<String, String>, HfError> {
    let bad = |what: String| err(path, HfErrorKind::BadIndex { what });
    let index = read_json(path)?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("no `weight_map` object".into()));
    };
    let mut out = BTreeMap::new();
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(bad(format!("shard of `{tensor}` is not a string")));
        };
        let mut parts = Path::new(shard).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(bad(format!(
                "shard `{shard}` of `{tensor}` is not a file name in the model directory"
            )));
        }
        out.insert(tensor.clone(), shard.to_owned());
    }
    Ok(out)
}

fn map_file(path: &Path) -> Result<Bytes, HfError> {
    let file = File::open(path).map_err(|e| err(path, e))?;
    // SAFETY: read-only mapping; the file must not be truncated while the model is open.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(path, e))?;
    Ok(Bytes::from_owner(Arc::new(map)))
}

/// A header entry as stored.
#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses and checks one safetensors file's header; tensors get `shard` 0.
fn parse_header(path: &Path, buf: &[u8]) -> Result<BTreeMap<String, HfTensorInfo>, HfError> {
    let file_len = buf.len() as u64;
    let Some(len_bytes) = buf.get(..8) else {
        return Err(err(path, HfErrorKind::TooShort { len: file_len }));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(err(path, HfErrorKind::HeaderTooLarge { header_len }));
    }
    if header_len > file_len - 8 {
        return Err(err(
            path,
            HfErrorKind::HeaderPastEnd {
                header_len,
                file_len,
            },
        ));
    }
    // Both bounded by the file length, so the casts are exact.
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&buf[8..data_start as usize]).map_err(|e| {
            err(
                path,
                HfErrorKind::BadHeader {
                    what: e.to_string(),
                },
            )
        })?;
    let mut out = BTreeMap::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |name: &str, what: String| {
            err(
                path,
                HfErrorKind::BadTensor {
                    name: name.to_owned(),
                    what,
                },
            )
        };
        let e: Entry = serde_json::from_value(value).map_err(|e| bad(&name, e.to_string()))?;
        let [begin, end] = e.data_offsets;
        if begin > end || end > data_len {
            return Err(bad(
                &name,
                format!("data offsets [{begin}, {end}) outside the {data_len} data bytes"),
            ));
        }
        let numel = e
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok());
        let Some(numel) = numel else {
            return Err(bad(
                &name,
                format!("element count of {:?} overflows", e.shape),
            ));
        };
        if let Some(size) = dtype_size(&e.dtype) {
            if numel.checked_mul(size) != Some(end - begin) {
                return Err(bad(
                    &name,
                    format!(
                        "{} data bytes, but {} {:?} needs {numel} x {size}",
                        end - begin,
                        e.dtype,
                        e.shape
                    ),
                ));
            }
        }
        let info = HfTensorInfo {
            name: name.clone(),
            dtype: e.dtype,
            shape: e
                .shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<Result<_, _>>()
                .map_err(|_| bad(&name, format!("dims {:?} too large", e.shape)))?,
            shard: 0,
            offset: data_start + begin,
            size: end - begin,
        };
        out.insert(name, info);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors image from `(name, dtype, shape, data)`, data laid out in order.
    fn safetensors(tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        // The format pads the header with spaces to 8 bytes.
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend_from_slice(&data);
        out
    }

    fn seq(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_add(seed)).collect()
    }

    fn sample_tensors() -> Vec<(&'static str, &'static str, &'static [usize], Vec<u8>)> {
        vec![
            ("w.f32", "F32", &[2, 3], seq(24, 1)),
            ("w.bf16", "BF16", &[4], seq(8, 2)),
            ("w.fp8", "F8_E4M3", &[2, 2], seq(4, 3)),
            ("w.fp8_scale_inv", "F32", &[1, 1], seq(4, 4)),
            ("w.f16", "F16", &[1], seq(2, 5)),
            ("pos.i64", "I64", &[2], seq(16, 6)),
        ]
    }

    fn model_dir(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        dir
    }

    const CONFIG: &[u8] = br#"{"model_type": "deepseek_v3", "hidden_size": 8}"#;

    fn open_err(dir: &tempfile::TempDir) -> HfError {
        let e = HfModel::open(dir.path()).expect_err("must fail");
        println!("{e}");
        e
    }

    #[test]
    fn single_file() {
        let st = safetensors(&sample_tensors());
        // The test writer agrees with the reference crate.
        let parsed = safetensors::SafeTensors::deserialize(&st).unwrap();
        assert_eq!(parsed.len(), sample_tensors().len());
        let dir = model_dir(&[("config.json", CONFIG), (SINGLE_FILE, &st)]);
        let m = HfModel::open(dir.path()).unwrap();
        assert_eq!(m.config()["hidden_size"], 8);
        assert_eq!(m.shard_paths(), [dir.path().join(SINGLE_FILE)]);
        for (name, dtype, shape, bytes) in sample_tensors() {
            let info = m.tensor_info(name).unwrap();
            assert_eq!((info.dtype.as_str(), info.shape.as_slice()), (dtype, shape));
            assert_eq!(&m.tensor_data(info).unwrap()[..], &bytes[..]);
            assert_eq!(parsed.tensor(name).unwrap().data(), &bytes[..]);
        }
        let t = m.tensor("w.fp8").unwrap();
        assert_eq!(
            (t.ty, t.shape.as_slice()),
            (QuantType::F8E4M3, &[2usize, 2][..])
        );
        assert_eq!(&t.data[..], &seq(4, 3)[..]);
        assert_eq!(m.tensor("w.bf16").unwrap().ty, QuantType::BF16);
        assert_eq!(m.tensor("w.f16").unwrap().ty, QuantType::F16);
        assert_eq!(m.tensor("w.f32").unwrap().ty, QuantType::F32);
        // Listed, but not usable.
        assert!(m.contains("pos.i64"));
        match m.tensor("pos.i64") {
            Err(SourceError::Bad { name, what, .. }) => {
                assert_eq!(name, "pos.i64");
                assert!(what.contains("I64"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(m.tensor("x"), Err(SourceError::Missing { .. })));
        assert_eq!(m.names().len(), 6);
    }

    fn sharded_files() -> (Vec<u8>, Vec<u8>, serde_json::Value) {
        let all = sample_tensors();
        let (a, b) = all.split_at(3);
        let mut map = serde_json::Map::new();
        for (t, shard) in a
            .iter()
            .map(|t| (t, "model-00001-of-00002.safetensors"))
            .chain(b.iter().map(|t| (t, "model-00002-of-00002.safetensors")))
        {
            map.insert(t.0.into(), shard.into());
        }
        let index = serde_json::json!({"metadata": {"total_size": 62}, "weight_map": map});
        (safetensors(a), safetensors(b), index)
    }

    #[test]
    fn sharded() {
        let (a, b, index) = sharded_files();
        let index = serde_json::to_vec(&index).unwrap();
        let dir = model_dir(&[
            ("config.json", CONFIG),
            (INDEX_FILE, &index),
            ("model-00001-of-00002.safetensors", &a),
            ("model-00002-of-00002.safetensors", &b),
        ]);
        let m = HfModel::open(dir.path()).unwrap();
        assert_eq!(m.shard_paths().len(), 2);
        assert_eq!(m.tensor_infos().len(), 6);
        for (name, _, shape, bytes) in sample_tensors() {
            let info = m.tensor_info(name).unwrap();
            assert_eq!(info.shape, shape);
            assert_eq!(&m.tensor_data(info).unwrap()[..], &bytes[..], "{name}");
        }
        assert!(m.shard_paths()[m.tensor_info("pos.i64").unwrap().shard]
            .ends_with("model-00002-of-00002.safetensors"));
    }

    #[test]
    fn bad_directories() {
        let (a, b, index) = sharded_files();
        let st = safetensors(&sample_tensors());
        let e = open_err(&model_dir(&[(SINGLE_FILE, &st)]));
        assert!(matches!(e.kind, HfErrorKind::Missing) && e.file.ends_with("config.json"));
        let e = open_err(&model_dir(&[("config.json", b"{nope"), (SINGLE_FILE, &st)]));
        assert!(matches!(e.kind, HfErrorKind::Json(_)), "{e}");
        let e = open_err(&model_dir(&[("config.json", CONFIG)]));
        assert!(matches!(e.kind, HfErrorKind::NoWeights), "{e}");

        let index_bytes = serde_json::to_vec(&index).unwrap();
        let e = open_err(&model_dir(&[
            ("config.json", CONFIG),
            (INDEX_FILE, &index_bytes),
            ("model-00001-of-00002.safetensors", &a),
        ]));
        match &e.kind {
            HfErrorKind::MissingShard { shard, .. } => {
                assert_eq!(shard, "model-00002-of-00002.safetensors")
            }
            k => panic!("{k}"),
        }
        assert!(e.file.ends_with(INDEX_FILE));

        // The index puts a tensor in the wrong shard.
        let mut wrong = index.clone();
        wrong["weight_map"]["w.f32"] = "model-00002-of-00002.safetensors".into();
        let e = open_err(&model_dir(&[
            ("config.json", CONFIG),
            (INDEX_FILE, &serde_json::to_vec(&wrong).unwrap()),
            ("model-00001-of-00002.safetensors", &a),
            ("model-00002-of-00002.safetensors", &b),
        ]));
        assert!(
            matches!(&e.kind, HfErrorKind::NotInShard { tensor } if tensor == "w.f32"),
            "{e}"
        );
        assert!(e.file.ends_with("model-00002-of-00002.safetensors"));

        for bad_index in [
            serde_json::json!({"metadata": {}}),
            serde_json::json!({"weight_map": {"w": 3}}),
            serde_json::json!({"weight_map": {"w": "../x.safetensors"}}),
            serde_json::json!({"weight_map": {"w": "/etc/passwd"}}),
        ] {
            let e = open_err(&model_dir(&[
                ("config.json", CONFIG),
                (INDEX_FILE, &serde_json::to_vec(&bad_index).unwrap()),
            ]));
            assert!(matches!(e.kind, HfErrorKind::BadIndex { .. }), "{e}");
        }
    }

    fn header_err(st: &[u8]) -> HfErrorKind {
        let e = parse_header(Path::new("x.safetensors"), st).expect_err("must fail");
        println!("{e}");
        e.kind
    }

    fn with_header(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn corrupt_headers() {
        assert!(matches!(
            header_err(&[1, 2, 3]),
            HfErrorKind::TooShort { .. }
        ));
        let mut v = u64::MAX.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(matches!(header_err(&v), HfErrorKind::HeaderTooLarge { .. }));
        let mut v = 100u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(matches!(header_err(&v), HfErrorKind::HeaderPastEnd { .. }));
        assert!(matches!(
            header_err(&with_header("{\"a\": ", 0)),
            HfErrorKind::BadHeader { .. }
        ));
        assert!(matches!(
            header_err(&with_header("[1, 2]", 0)),
            HfErrorKind::BadHeader { .. }
        ));
        let tensor_err = |json: &str, data: usize| match header_err(&with_header(json, data)) {
            HfErrorKind::BadTensor { name, what } => {
                assert_eq!(name, "t");
                what
            }
            k => panic!("{k}"),
        };
        let e = tensor_err(r#"{"t": {"dtype": "F32", "shape": [2]}}"#, 8);
        assert!(e.contains("data_offsets"), "{e}");
        let e = tensor_err(
            r#"{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
            7,
        );
        assert!(e.contains("outside"), "{e}");
        let e = tensor_err(
            r#"{"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#,
            8,
        );
        assert!(e.contains("outside"), "{e}");
        let e = tensor_err(
            r#"{"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
            8,
        );
        assert!(e.contains("needs"), "{e}");
        let e = tensor_err(
            r#"{"t": {"dtype": "U8", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}"#,
            0,
        );
        assert!(e.contains("overflows"), "{e}");
        let e = tensor_err(
            r#"{"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}"#,
            0,
        );
        assert!(!e.is_empty());
        // Unknown dtypes are listed; their size cannot be checked until they are used.
        let json = r#"{"t": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}"#;
        let h = parse_header(Path::new("x"), &with_header(json, 1)).unwrap();
        assert_eq!((h["t"].offset, h["t"].size), (8 + json.len() as u64, 1));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let st = safetensors(&sample_tensors());
        for len in 0..st.len() {
            assert!(parse_header(Path::new("x"), &st[..len]).is_err(), "{len}");
        }
        assert_eq!(parse_header(Path::new("x"), &st).unwrap().len(), 6);
    }

    fn oracle(rel: &str) -> Option<PathBuf> {
        let candidates = [
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/oracle"),
            PathBuf::from("/work/shared/oracle"),
        ];
        let p = candidates.iter().map(|d| d.join(rel)).find(|p| p.exists());
        if p.is_none() {
            println!("skipped: oracle directory {rel} not found");
        }
        p
    }

    /// Our listing of every shard agrees with the `safetensors` crate's.
    fn cross_check(m: &HfModel) {
        for (i, path) in m.shard_paths().into_iter().enumerate() {
            let buf = std::fs::read(path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
            let ours: Vec<&HfTensorInfo> =
                m.tensor_infos().iter().filter(|t| t.shard == i).collect();
            assert_eq!(ours.len(), st.len(), "{}", path.display());
            for info in ours {
                let view = st.tensor(&info.name).unwrap();
                assert_eq!(view.shape(), info.shape.as_slice());
                assert_eq!(format!("{:?}", view.dtype()), info.dtype);
                assert_eq!(view.data(), &m.tensor_data(info).unwrap()[..]);
            }
        }
    }

    #[test]
    fn oracle_fp8() {
        let Some(dir) = oracle("models/fp8/hf") else {
            return;
        };
        let m = HfModel::open(&dir).unwrap();
        assert_eq!(m.shard_paths().len(), 2);
        assert_eq!(m.config()["model_type"], "deepseek_v3");
        let w = m
            .tensor("model.layers.0.self_attn.q_a_proj.weight")
            .unwrap();
        assert_eq!(w.ty, QuantType::F8E4M3);
        let s = m
            .tensor("model.layers.0.self_attn.q_a_proj.weight_scale_inv")
            .unwrap();
        assert_eq!(s.ty, QuantType::F32);
        // One scale per 128 x 128 block, edge blocks included.
        let blocks: Vec<usize> = w.shape.iter().map(|d| d.div_ceil(128)).collect();
        assert_eq!(s.shape, blocks);
        cross_check(&m);
    }

    #[test]
    fn oracle_bf16() {
        let Some(dir) = oracle("models/qlora/hf-bf16") else {
            return;
        };
        let m = HfModel::open(&dir).unwrap();
        assert_eq!(m.shard_paths().len(), 1);
        let t = m.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(t.ty, QuantType::BF16);
        assert_eq!(t.numel() * 2, t.data.len());
        assert!(m
            .tensor_infos()
            .iter()
            .all(|t| t.dtype == "BF16" || t.dtype == "F32"));
        cross_check(&m);
    }
}
