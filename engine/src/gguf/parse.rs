//! Parsing of one GGUF file's header and tensor table, checked against the bytes present.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::{
    GgufError, GgufErrorKind, GgufTensorInfo, MetaValue, DEFAULT_ALIGNMENT, GGUF_MAGIC,
    MAX_ARRAY_DEPTH, MAX_DIMS,
};
use crate::quant::QuantType;

/// Smallest possible encoding of one metadata key/value: empty key (u64 length), value type
/// (u32), one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible tensor info: empty name, `n_dims` = 0, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;
/// Largest `general.alignment` accepted (ggml uses 32; anything this big is a corrupt field).
const MAX_ALIGNMENT: u64 = 1 << 30;

/// What one file holds; tensor offsets are absolute within that file and `split` is 0.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

pub(super) fn parse(path: &Path, buf: &[u8]) -> Result<Parsed, GgufError> {
    parse_inner(path, buf).map_err(|kind| GgufError::new(path, kind))
}

/// A bounds-checked little-endian cursor. `what` names the item being read, for errors.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: String,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufErrorKind> {
        if n > self.remaining() {
            return Err(GgufErrorKind::Truncated {
                what: self.what.clone(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        // n <= remaining <= usize::MAX, so the casts are exact.
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufErrorKind> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, GgufErrorKind> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, GgufErrorKind> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufErrorKind> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Fails unless `count` items of at least `min_bytes` each fit in what is left.
    fn check_count(&self, what: &str, count: u64, min_bytes: u64) -> Result<(), GgufErrorKind> {
        match count.checked_mul(min_bytes) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(GgufErrorKind::CountTooLarge {
                what: what.to_owned(),
                count,
                offset: self.pos as u64,
                available: self.remaining(),
            }),
        }
    }

    fn string(&mut self) -> Result<String, GgufErrorKind> {
        let len = self.u64()?;
        let start = self.pos as u64;
        let bytes = self.take(len)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufErrorKind::NotUtf8 {
                what: self.what.clone(),
                offset: start,
            }),
        }
    }

    fn value(&mut self, type_id: u32, depth: u32, key: &str) -> Result<MetaValue, GgufErrorKind> {
        Ok(match type_id {
            0 => MetaValue::U8(self.u8()?),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            // ggml writes 0/1 and reads any non-zero byte as true.
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufErrorKind::TooDeep { key: key.into() });
                }
                let item_type = self.u32()?;
                let n = self.u64()?;
                let min =
                    min_value_bytes(item_type).ok_or_else(|| GgufErrorKind::UnknownValueType {
                        key: key.into(),
                        type_id: item_type,
                    })?;
                self.check_count(&format!("metadata `{key}` array length"), n, min)?;
                // n * min <= remaining bounds n by the file size; a MetaValue is much larger
                // than a byte, so reserve only a little up front and grow as items parse.
                let mut items = Vec::with_capacity(n.min(1 << 16) as usize);
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1, key)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            _ => {
                return Err(GgufErrorKind::UnknownValueType {
                    key: key.into(),
                    type_id,
                })
            }
        })
    }
}

/// Encoded size of the smallest value of a type; `None` for an unknown type.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}

/// A tensor info as stored, before validation.
struct RawInfo {
    name: String,
    n_dims: usize,
    ne: [u64; MAX_DIMS],
    type_id: u32,
    offset: u64,
}

fn parse_inner(path: &Path, buf: &[u8]) -> Result<Parsed, GgufErrorKind> {
    let mut r = Reader {
        buf,
        pos: 0,
        what: "magic".into(),
    };
    let magic = r.u32()?;
    if magic != GGUF_MAGIC {
        return Err(GgufErrorKind::BadMagic { found: magic });
    }
    r.what = "header".into();
    let version = r.u32()?;
    if version != 2 && version != 3 {
        let swapped = version.swap_bytes();
        return Err(GgufErrorKind::UnsupportedVersion {
            version,
            big_endian: (1..=3).contains(&swapped),
        });
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    r.check_count("metadata key/value count", n_kv, MIN_KV_BYTES)?;
    r.check_count("tensor count", n_tensors, MIN_TENSOR_INFO_BYTES)?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        r.what = format!("metadata key #{i}");
        let key = r.string()?;
        r.what = format!("metadata `{key}`");
        let type_id = r.u32()?;
        let value = r.value(type_id, 0, &key)?;
        if metadata.contains_key(&key) {
            return Err(GgufErrorKind::DuplicateKey { key });
        }
        metadata.insert(key, value);
    }
    let alignment = alignment(&metadata)?;

    r.what = "tensor infos".into();
    r.check_count("tensor count", n_tensors, MIN_TENSOR_INFO_BYTES)?;
    let mut raw = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        r.what = format!("tensor info #{i}");
        let name = r.string()?;
        r.what = format!("tensor `{name}` info");
        let n_dims = r.u32()? as usize;
        if n_dims > MAX_DIMS {
            return Err(GgufErrorKind::BadTensor {
                name,
                what: format!("{n_dims} dimensions, at most {MAX_DIMS} are allowed"),
            });
        }
        let mut ne = [1u64; MAX_DIMS];
        for d in ne.iter_mut().take(n_dims) {
            *d = r.u64()?;
        }
        let type_id = r.u32()?;
        let offset = r.u64()?;
        raw.push(RawInfo {
            name,
            n_dims,
            ne,
            type_id,
            offset,
        });
    }

    let header_end = r.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .expect("header_end and alignment are far below u64::MAX");
    let file_len = buf.len() as u64;
    let mut seen = HashSet::with_capacity(raw.len());
    let mut tensors = Vec::with_capacity(raw.len());
    for info in raw {
        if !seen.insert(info.name.clone()) {
            return Err(GgufErrorKind::DuplicateTensor {
                name: info.name,
                other: path.to_owned(),
            });
        }
        tensors.push(check_tensor(info, alignment, data_offset, file_len)?);
    }
    Ok(Parsed {
        version,
        alignment,
        metadata,
        tensors,
    })
}

fn alignment(metadata: &BTreeMap<String, MetaValue>) -> Result<u64, GgufErrorKind> {
    const KEY: &str = "general.alignment";
    let Some(v) = metadata.get(KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match v.as_u64() {
        Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => Ok(a),
        _ => Err(GgufErrorKind::BadMeta {
            key: KEY.into(),
            what: format!("{v:?} is not a power of two up to {MAX_ALIGNMENT}"),
        }),
    }
}

fn check_tensor(
    info: RawInfo,
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<GgufTensorInfo, GgufErrorKind> {
    let RawInfo {
        name,
        n_dims,
        ne,
        type_id,
        offset,
    } = info;
    let bad = |name: String, what: String| GgufErrorKind::BadTensor { name, what };
    let Some(ty) = QuantType::from_ggml_id(type_id) else {
        return Err(GgufErrorKind::UnknownType { name, id: type_id });
    };
    let ne = &ne[..n_dims];
    if let Some(d) = ne.iter().position(|&n| n == 0) {
        return Err(bad(name, format!("dimension {d} of ne {ne:?} is 0")));
    }
    let numel = ne
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n))
        .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok());
    let Some(numel) = numel else {
        return Err(bad(name, format!("element count of ne {ne:?} overflows")));
    };
    let row = ne.first().copied().unwrap_or(1);
    if row % ty.block_elems() as u64 != 0 {
        return Err(bad(
            name,
            format!(
                "innermost dimension {row} is not a multiple of the {ty} block size {}",
                ty.block_elems()
            ),
        ));
    }
    let Some(size) = ty.bytes_for(numel) else {
        return Err(bad(
            name,
            format!("byte size of {numel} {ty} elements overflows"),
        ));
    };
    if offset % alignment != 0 {
        return Err(bad(
            name,
            format!("data offset {offset} is not a multiple of the alignment {alignment}"),
        ));
    }
    let range = data_offset
        .checked_add(offset)
        .and_then(|start| Some((start, start.checked_add(size)?)));
    match range {
        Some((start, end)) if end <= file_len => Ok(GgufTensorInfo {
            name,
            ty,
            // Each ne fits usize because their product does.
            shape: ne.iter().rev().map(|&n| n as usize).collect(),
            split: 0,
            offset: start,
            size,
        }),
        _ => Err(bad(
            name,
            format!(
                "data ({size} bytes at data offset {offset}, data section at {data_offset}) \
                 runs past the end of the file ({file_len} bytes)"
            ),
        )),
    }
}
