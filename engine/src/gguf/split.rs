//! Split models: `<prefix>-%05d-of-%05d.gguf`, found from the first file's name and checked
//! against each file's `split.no` / `split.count` (as written by llama.cpp's `gguf-split`).

use std::path::{Path, PathBuf};

use super::parse::Parsed;
use super::{GgufError, GgufErrorKind};

pub(super) const KEY_NO: &str = "split.no";
pub(super) const KEY_COUNT: &str = "split.count";
pub(super) const KEY_TENSORS: &str = "split.tensors.count";

/// The name of split `no` (1-based) of `count`: `{prefix}-{no:05}-of-{count:05}.gguf`.
pub fn split_file_name(prefix: &str, no: u32, count: u32) -> String {
    format!("{prefix}-{no:05}-of-{count:05}.gguf")
}

/// Splits `name` into `(prefix, no, count)` if it follows the split naming pattern.
fn parse_split_name(name: &str) -> Option<(&str, u32, u32)> {
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let number = |s: &str| {
        if s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u32>().ok()
        } else {
            None
        }
    };
    Some((prefix, number(no)?, number(count)?))
}

fn split_meta(parsed: &Parsed, key: &'static str) -> Result<Option<u64>, GgufErrorKind> {
    match parsed.metadata.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= u16::MAX.into() => Ok(Some(n)),
            _ => Err(GgufErrorKind::BadMeta {
                key: key.into(),
                what: format!("{v:?} is not an integer in 0..=65535"),
            }),
        },
    }
}

/// How many files the model opened from `path` has (1 when unsplit). Fails when `path` is a
/// split other than the first.
pub(super) fn split_count(path: &Path, first: &Parsed) -> Result<u32, GgufError> {
    let err = |kind| GgufError::new(path, kind);
    let Some(count) = split_meta(first, KEY_COUNT).map_err(err)? else {
        return Ok(1);
    };
    if count == 0 {
        return Err(err(GgufErrorKind::BadMeta {
            key: KEY_COUNT.into(),
            what: "is 0".into(),
        }));
    }
    let no = split_meta(first, KEY_NO).map_err(err)?.unwrap_or(0);
    if count > 1 && no != 0 {
        return Err(err(GgufErrorKind::Split {
            what: format!(
                "this is split {} of {count}; open the first split instead",
                no + 1
            ),
        }));
    }
    Ok(count as u32)
}

/// Paths of splits 2..=count next to the first split, with their 1-based numbers.
pub(super) fn sibling_paths(first: &Path, count: u32) -> Result<Vec<(u32, PathBuf)>, GgufError> {
    let err = |what: String| GgufError::new(first, GgufErrorKind::Split { what });
    let name = first.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some((prefix, no, of)) = parse_split_name(name) else {
        return Err(err(format!(
            "split.count is {count} but the file name does not follow \
             <prefix>-00001-of-{count:05}.gguf"
        )));
    };
    if no != 1 {
        return Err(err(format!("the file name says split {no}; open split 1")));
    }
    if of != count {
        return Err(err(format!(
            "the file name says {of} splits but split.count is {count}"
        )));
    }
    Ok((2..=count)
        .map(|no| (no, first.with_file_name(split_file_name(prefix, no, count))))
        .collect())
}

/// Checks that the file found as split `no` (1-based) of `count` says so itself.
pub(super) fn check_sibling(
    path: &Path,
    parsed: &Parsed,
    no: u32,
    count: u32,
) -> Result<(), GgufError> {
    let err = |kind| GgufError::new(path, kind);
    let found_no = split_meta(parsed, KEY_NO).map_err(err)?;
    let found_count = split_meta(parsed, KEY_COUNT).map_err(err)?;
    for (key, found, expected) in [
        (KEY_NO, found_no, u64::from(no - 1)),
        (KEY_COUNT, found_count, u64::from(count)),
    ] {
        if found != Some(expected) {
            return Err(err(GgufErrorKind::SplitMismatch {
                key,
                found,
                expected,
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(split_file_name("m", 2, 3), "m-00002-of-00003.gguf");
        assert_eq!(
            parse_split_name("DeepSeek-R1-UD-IQ1_S-00001-of-00003.gguf"),
            Some(("DeepSeek-R1-UD-IQ1_S", 1, 3))
        );
        assert_eq!(parse_split_name("model.gguf"), None);
        assert_eq!(parse_split_name("m-1-of-3.gguf"), None);
        assert_eq!(parse_split_name("m-0000x-of-00003.gguf"), None);
    }
}
