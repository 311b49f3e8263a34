//! Reading and writing NumPy `.npy` files (the oracle's and `--logits-out`'s format):
//! little-endian `<f4` and `<i8` arrays in C order, format versions 1 and 2.

use std::io::Write;
use std::path::Path;

/// A malformed or unsupported `.npy` file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: String, what: String },
}

/// An array read from a `.npy` file.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

/// Element types this module reads and writes.
pub trait NpyElem: Copy {
    const DESCR: &'static str;
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
    fn to_le(self, out: &mut Vec<u8>);
}

impl NpyElem for f32 {
    const DESCR: &'static str = "<f4";
    const SIZE: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn to_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl NpyElem for i64 {
    const DESCR: &'static str = "<i8";
    const SIZE: usize = 8;
    fn from_le(b: &[u8]) -> Self {
        i64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
    }
    fn to_le(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

/// Reads an array of `T` from `path`.
pub fn read<T: NpyElem>(path: &Path) -> Result<NpyArray<T>, NpyError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io {
        path: p.clone(),
        source,
    })?;
    parse(&bytes).map_err(|what| NpyError::Format { path: p, what })
}

/// Parses the bytes of a `.npy` file.
pub fn parse<T: NpyElem>(bytes: &[u8]) -> Result<NpyArray<T>, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (hlen, hstart): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(hstart..hstart.saturating_add(hlen))
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let descr = field(header, "descr").ok_or("no descr")?;
    if descr.trim_matches(|c| c == '\'' || c == '"') != T::DESCR {
        return Err(format!("dtype {descr}, expected {}", T::DESCR));
    }
    if field(header, "fortran_order").map(str::trim) != Some("False") {
        return Err("only C-order arrays are supported".into());
    }
    let shape_src = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let shape: Vec<usize> = shape_src
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape element `{s}`"))
        })
        .collect::<Result<_, _>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    let body = &bytes[hstart + hlen..];
    if body.len() != numel * T::SIZE {
        return Err(format!("{} data bytes for shape {shape:?}", body.len()));
    }
    let data = body.chunks_exact(T::SIZE).map(T::from_le).collect();
    Ok(NpyArray { shape, data })
}

fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let rest = header.split(&format!("'{key}':")).nth(1)?;
    Some(rest.split(',').next()?.trim())
}

/// Writes `data` with `shape` to `path` (format version 1.0).
pub fn write<T: NpyElem>(path: &Path, shape: &[usize], data: &[T]) -> Result<(), NpyError> {
    let p = path.display().to_string();
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}",
        T::DESCR
    );
    // Pad so that magic + version + length + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * T::SIZE);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &v in data {
        v.to_le(&mut out);
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&out))
        .map_err(|source| NpyError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_i64() {
        let dir = std::env::temp_dir().join(format!("npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.npy");
        write(&f, &[2, 3], &[1.0f32, 2.0, 3.0, 4.0, 5.0, -6.5]).unwrap();
        let a: NpyArray<f32> = read(&f).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data[5], -6.5);
        let g = dir.join("b.npy");
        write(&g, &[3], &[7i64, -1, 0]).unwrap();
        let b: NpyArray<i64> = read(&g).unwrap();
        assert_eq!((b.shape, b.data), (vec![3], vec![7, -1, 0]));
        assert!(read::<i64>(&f).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse::<f32>(b"\x93NUMPY\x01\x00\xff\xff{").is_err());
        assert!(parse::<f32>(b"hello world").is_err());
    }
}
