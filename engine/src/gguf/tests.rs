//! Reader/writer round trips, hostile inputs, split models, and the converter's real output.

use std::path::{Path, PathBuf};

use super::*;

fn bytes(v: Vec<u8>) -> Bytes {
    Bytes::from_vec(v)
}

/// Deterministic filler so that data mix-ups between tensors show.
fn filler(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn tensor_bytes(ty: QuantType, shape: &[usize], seed: u8) -> Bytes {
    let numel: usize = shape.iter().product();
    bytes(filler(ty.bytes_for(numel as u64).unwrap() as usize, seed))
}

fn all_meta_types() -> Vec<(&'static str, MetaValue)> {
    use MetaValue::*;
    vec![
        ("t.u8", U8(200)),
        ("t.i8", I8(-100)),
        ("t.u16", U16(60000)),
        ("t.i16", I16(-30000)),
        ("t.u32", U32(4_000_000_000)),
        ("t.i32", I32(-2_000_000_000)),
        ("t.f32", F32(1.5e-6)),
        ("t.bool", Bool(true)),
        ("t.string", String("héllo ▁ world".into())),
        ("t.u64", U64(u64::MAX)),
        ("t.i64", I64(i64::MIN)),
        ("t.f64", F64(-0.1)),
        (
            "t.arr.str",
            Array(vec![String("a".into()), String("".into())]),
        ),
        ("t.arr.i32", Array(vec![I32(1), I32(-2), I32(3)])),
        ("t.arr.empty", Array(vec![])),
        (
            "t.arr.nested",
            Array(vec![Array(vec![F32(1.0)]), Array(vec![U8(1), U8(2)])]),
        ),
    ]
}

/// A small model using every metadata type and several tensor types, including one the
/// kernels do not support (IQ1_S).
fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::from("deepseek2"))
        .unwrap();
    for (k, v) in all_meta_types() {
        w.add_meta(k, v).unwrap();
    }
    let tensors: [(&str, QuantType, &[usize]); 6] = [
        ("f32", QuantType::F32, &[3, 5]),
        ("f16", QuantType::F16, &[7]),
        ("bf16", QuantType::BF16, &[2, 2, 2]),
        ("q8_0", QuantType::Q8_0, &[4, 3, 2, 64]),
        ("q4_k", QuantType::Q4_K, &[2, 256]),
        ("iq1_s", QuantType::IQ1_S, &[1, 512]),
    ];
    for (i, (name, ty, shape)) in tensors.into_iter().enumerate() {
        w.add_tensor(name, ty, shape, tensor_bytes(ty, shape, i as u8))
            .unwrap();
    }
    w
}

fn to_vec(w: &GgufWriter) -> Vec<u8> {
    let mut v = Vec::new();
    let n = w.write_to(&mut v).unwrap();
    assert_eq!(n, v.len() as u64);
    v
}

fn check_sample(g: &GgufFile) {
    assert_eq!(g.version(), 3);
    assert_eq!(
        g.meta("general.architecture").unwrap().as_str(),
        Some("deepseek2")
    );
    for (k, v) in all_meta_types() {
        assert_eq!(g.meta(k), Some(&v), "{k}");
    }
    assert_eq!(g.metadata().len(), all_meta_types().len() + 1);
    let names = g.names();
    assert_eq!(names, ["f32", "f16", "bf16", "q8_0", "q4_k", "iq1_s"]);
    let t = g.tensor("q8_0").unwrap();
    assert_eq!(t.ty, QuantType::Q8_0);
    assert_eq!(t.shape, [4, 3, 2, 64]);
    assert_eq!(
        &t.data[..],
        &tensor_bytes(QuantType::Q8_0, &[4, 3, 2, 64], 3)[..]
    );
    let t = g.tensor("iq1_s").unwrap();
    assert_eq!(t.ty, QuantType::IQ1_S);
    assert_eq!(t.data.len(), 2 * 50);
    assert_eq!(
        &t.data[..],
        &tensor_bytes(QuantType::IQ1_S, &[1, 512], 5)[..]
    );
    for info in g.tensor_infos() {
        assert_eq!(info.offset % 32, 0, "{}", info.name);
        let t = g.tensor(&info.name).unwrap();
        assert_eq!(t.data.len() as u64, info.size);
        assert_eq!(t.shape, info.shape);
    }
    assert!(g.contains("bf16") && !g.contains("nope"));
    assert!(matches!(g.tensor("nope"), Err(SourceError::Missing { .. })));
}

#[test]
fn round_trip_through_file_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.gguf");
    let w = sample_writer();
    w.write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.path(), path);
    check_sample(&g);
    check_sample(&GgufFile::from_bytes("mem.gguf", bytes(to_vec(&w))).unwrap());
}

#[test]
fn meta_accessors() {
    use MetaValue::*;
    assert_eq!(I8(-1).as_u64(), None);
    assert_eq!(I32(7).as_u64(), Some(7));
    assert_eq!(U64(u64::MAX).as_i64(), None);
    assert_eq!(U16(9).as_i64(), Some(9));
    assert_eq!(U8(2).as_f64(), Some(2.0));
    assert_eq!(F32(0.5).as_f64(), Some(0.5));
    assert_eq!(F32(0.5).as_u64(), None);
    assert_eq!(String("x".into()).as_str(), Some("x"));
    assert_eq!(Bool(false).as_bool(), Some(false));
    assert_eq!(U8(0).as_bool(), None);
    assert_eq!(Array(vec![U8(1)]).as_array(), Some(&[U8(1)][..]));
}

#[test]
fn custom_alignment_round_trips() {
    let mut w = sample_writer();
    w.set_alignment(64).unwrap();
    let g = GgufFile::from_bytes("a64.gguf", bytes(to_vec(&w))).unwrap();
    assert_eq!(g.alignment(), 64);
    assert!(g.tensor_infos().iter().all(|t| t.offset % 64 == 0));
    assert_eq!(g.tensor("f16").unwrap().data.len(), 14);
    assert!(w.set_alignment(48).is_err());
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    let f32s = |n: usize| bytes(vec![0; n * 4]);
    assert!(w.add_tensor("a", QuantType::F32, &[2, 3], f32s(5)).is_err());
    assert!(w.add_tensor("a", QuantType::F32, &[], f32s(1)).is_err());
    assert!(w.add_tensor("a", QuantType::F32, &[1; 5], f32s(1)).is_err());
    assert!(w.add_tensor("a", QuantType::F32, &[0, 3], f32s(0)).is_err());
    assert!(w
        .add_tensor("a", QuantType::Q8_0, &[2, 16], bytes(vec![0; 34]))
        .is_err());
    assert!(w
        .add_tensor("a", QuantType::F8E4M3, &[4], bytes(vec![0; 4]))
        .is_err());
    w.add_tensor("a", QuantType::F32, &[2, 3], f32s(6)).unwrap();
    assert!(matches!(
        w.add_tensor("a", QuantType::F32, &[1], f32s(1)),
        Err(GgufWriteError::DuplicateTensor { .. })
    ));
    let mixed = MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]);
    assert!(w.add_meta("k", mixed).is_err());
    let mut deep = MetaValue::U8(0);
    for _ in 0..=MAX_ARRAY_DEPTH {
        deep = MetaValue::Array(vec![deep]);
    }
    assert!(w.add_meta("k", deep).is_err());
}

#[test]
fn every_truncation_is_an_error() {
    let full = to_vec(&sample_writer());
    let g = GgufFile::from_bytes("full.gguf", bytes(full.clone())).unwrap();
    // Bytes after the last tensor's data are padding; cutting them leaves a valid file.
    let end = g
        .tensor_infos()
        .iter()
        .map(|t| t.offset + t.size)
        .max()
        .unwrap() as usize;
    for len in 0..end {
        let r = GgufFile::from_bytes("cut.gguf", bytes(full[..len].to_vec()));
        let e = r.expect_err(&format!("prefix of {len} bytes parsed"));
        assert!(e.to_string().starts_with("cut.gguf: "), "{e}");
    }
    GgufFile::from_bytes("cut.gguf", bytes(full[..end].to_vec())).unwrap();
}

// Hand-built files, for what the writer refuses to produce.

fn put_str(v: &mut Vec<u8>, s: &[u8]) {
    v.extend_from_slice(&(s.len() as u64).to_le_bytes());
    v.extend_from_slice(s);
}

fn kv_u32(key: &str, x: u32) -> Vec<u8> {
    let mut v = Vec::new();
    put_str(&mut v, key.as_bytes());
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&x.to_le_bytes());
    v
}

fn tinfo(name: &str, ne: &[u64], type_id: u32, offset: u64) -> Vec<u8> {
    let mut v = Vec::new();
    put_str(&mut v, name.as_bytes());
    v.extend_from_slice(&(ne.len() as u32).to_le_bytes());
    for d in ne {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&type_id.to_le_bytes());
    v.extend_from_slice(&offset.to_le_bytes());
    v
}

/// Header with the given counts, then `body` (kvs and tensor infos), padded to 32, then
/// `data_len` zero bytes.
fn raw(n_tensors: u64, n_kv: u64, body: &[Vec<u8>], data_len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"GGUF");
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    for b in body {
        v.extend_from_slice(b);
    }
    v.resize(v.len().next_multiple_of(32) + data_len, 0);
    v
}

fn parse_err(v: Vec<u8>) -> GgufErrorKind {
    let e = GgufFile::from_bytes("bad.gguf", bytes(v)).expect_err("must fail");
    assert_eq!(e.file, Path::new("bad.gguf"));
    println!("{e}");
    e.kind
}

#[test]
fn hand_built_file_parses() {
    let v = raw(1, 1, &[kv_u32("k", 7), tinfo("w", &[8, 2], 0, 0)], 64);
    let g = GgufFile::from_bytes("ok.gguf", bytes(v)).unwrap();
    assert_eq!(g.meta("k"), Some(&MetaValue::U32(7)));
    let t = g.tensor("w").unwrap();
    assert_eq!((t.shape.as_slice(), t.data.len()), (&[2usize, 8][..], 64));
}

#[test]
fn bad_magic_and_version() {
    let mut v = raw(0, 0, &[], 0);
    v[0] = b'X';
    assert!(matches!(parse_err(v), GgufErrorKind::BadMagic { .. }));
    let mut v = raw(0, 0, &[], 0);
    v[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        parse_err(v),
        GgufErrorKind::UnsupportedVersion {
            version: 1,
            big_endian: false
        }
    ));
    let mut v = raw(0, 0, &[], 0);
    v[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(
        parse_err(v),
        GgufErrorKind::UnsupportedVersion {
            big_endian: true,
            ..
        }
    ));
    let mut v = raw(0, 0, &[], 0);
    v[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(GgufFile::from_bytes("v2", bytes(v)).unwrap().version(), 2);
}

#[test]
fn unknown_ggml_type_names_tensor_and_id() {
    let k = parse_err(raw(1, 0, &[tinfo("blk.0.w", &[32], 31, 0)], 128));
    match &k {
        GgufErrorKind::UnknownType { name, id } => {
            assert_eq!((name.as_str(), *id), ("blk.0.w", 31))
        }
        k => panic!("{k}"),
    }
    assert!(k.to_string().contains("blk.0.w") && k.to_string().contains("31"));
}

#[test]
fn bad_tensor_infos() {
    let bad = |info: Vec<u8>, data: usize| match parse_err(raw(1, 0, &[info], data)) {
        GgufErrorKind::BadTensor { name, what } => {
            assert_eq!(name, "t");
            what
        }
        k => panic!("unexpected {k}"),
    };
    // Data past the end (by one byte), and an offset past the end.
    assert!(bad(tinfo("t", &[32], 0, 0), 127).contains("past the end"));
    assert!(bad(tinfo("t", &[1], 0, u64::MAX - 31), 32).contains("past the end"));
    assert!(bad(tinfo("t", &[1], 0, 4), 32).contains("alignment"));
    assert!(bad(tinfo("t", &[1, 1, 1, 1, 1], 0, 0), 32).contains("dimensions"));
    assert!(bad(tinfo("t", &[4, 0], 0, 0), 32).contains("is 0"));
    assert!(bad(tinfo("t", &[1 << 32, 1 << 32], 0, 0), 32).contains("overflows"));
    assert!(bad(tinfo("t", &[1 << 62, 2], 0, 0), 32).contains("overflows"));
    // Element count fits, byte size does not (F64: 8 bytes each).
    assert!(bad(tinfo("t", &[1 << 62], 28, 0), 32).contains("overflows"));
    // Q8_0 rows must be whole 32-element blocks.
    assert!(bad(tinfo("t", &[33, 1], 8, 0), 64).contains("block size"));
    // Zero dimensions is a scalar.
    let g = GgufFile::from_bytes("s", bytes(raw(1, 0, &[tinfo("t", &[], 0, 0)], 4))).unwrap();
    assert_eq!(g.tensor("t").unwrap().shape, Vec::<usize>::new());
}

#[test]
fn huge_counts_in_a_tiny_file() {
    let count_err = |k: GgufErrorKind| {
        assert!(
            matches!(
                k,
                GgufErrorKind::CountTooLarge { .. } | GgufErrorKind::Truncated { .. }
            ),
            "{k}"
        )
    };
    count_err(parse_err(raw(u64::MAX, 0, &[], 0)));
    count_err(parse_err(raw(0, u64::MAX, &[], 0)));
    count_err(parse_err(raw(1 << 40, 1 << 40, &[], 0)));
    // A string length of 2^63.
    let mut key = Vec::new();
    key.extend_from_slice(&(1u64 << 63).to_le_bytes());
    key.extend_from_slice(b"abc");
    count_err(parse_err(raw(0, 1, &[key], 0)));
    // A string value, and arrays of u8 / strings / arrays, each claiming 2^60 items.
    for (item_type, n) in [(8u32, u64::MAX), (0, 1 << 60), (8, 1 << 60), (9, 1 << 60)] {
        let mut kv = Vec::new();
        put_str(&mut kv, b"k");
        if item_type == 8 && n == u64::MAX {
            kv.extend_from_slice(&8u32.to_le_bytes());
            kv.extend_from_slice(&n.to_le_bytes());
        } else {
            kv.extend_from_slice(&9u32.to_le_bytes());
            kv.extend_from_slice(&item_type.to_le_bytes());
            kv.extend_from_slice(&n.to_le_bytes());
        }
        count_err(parse_err(raw(0, 1, &[kv], 16)));
    }
    // A tensor name of 2^40 bytes.
    let mut t = Vec::new();
    t.extend_from_slice(&(1u64 << 40).to_le_bytes());
    count_err(parse_err(raw(1, 0, &[t], 64)));
}

#[test]
fn bad_metadata() {
    let mut v = Vec::new();
    put_str(&mut v, b"k");
    v.extend_from_slice(&13u32.to_le_bytes());
    assert!(matches!(
        parse_err(raw(0, 1, &[v], 8)),
        GgufErrorKind::UnknownValueType { type_id: 13, .. }
    ));
    let mut v = Vec::new();
    put_str(&mut v, &[b'k', 0xff]);
    v.extend_from_slice(&4u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        parse_err(raw(0, 1, &[v], 0)),
        GgufErrorKind::NotUtf8 { .. }
    ));
    let dup = [kv_u32("k", 1), kv_u32("k", 2)];
    assert!(matches!(
        parse_err(raw(0, 2, &dup, 0)),
        GgufErrorKind::DuplicateKey { .. }
    ));
    assert!(matches!(
        parse_err(raw(0, 1, &[kv_u32("general.alignment", 48)], 0)),
        GgufErrorKind::BadMeta { .. }
    ));
    assert!(matches!(
        parse_err(raw(0, 1, &[kv_u32("general.alignment", 0)], 0)),
        GgufErrorKind::BadMeta { .. }
    ));
    // Arrays nested 5 deep.
    let mut v = Vec::new();
    put_str(&mut v, b"deep");
    v.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..MAX_ARRAY_DEPTH {
        v.extend_from_slice(&9u32.to_le_bytes());
        v.extend_from_slice(&1u64.to_le_bytes());
    }
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.push(1);
    assert!(matches!(
        parse_err(raw(0, 1, &[v], 0)),
        GgufErrorKind::TooDeep { .. }
    ));
    let twice = [tinfo("t", &[8], 0, 0), tinfo("t", &[8], 0, 32)];
    assert!(matches!(
        parse_err(raw(2, 0, &twice, 64)),
        GgufErrorKind::DuplicateTensor { .. }
    ));
}

/// Writes `sample_writer()` as 3 splits in a fresh directory.
fn write_split_sample() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = sample_writer()
        .write_splits(&dir.path().join("model"), 3)
        .unwrap();
    (dir, paths)
}

#[test]
fn three_way_split() {
    let (dir, paths) = write_split_sample();
    assert_eq!(paths[2], dir.path().join("model-00003-of-00003.gguf"));
    let g = GgufFile::open(&paths[0]).unwrap();
    assert_eq!(g.split_paths(), paths);
    assert_eq!(g.meta("split.count"), Some(&MetaValue::U16(3)));
    assert_eq!(g.meta("split.tensors.count"), Some(&MetaValue::I32(6)));
    let splits: Vec<usize> = g.tensor_infos().iter().map(|t| t.split).collect();
    assert_eq!(splits, [0, 0, 1, 1, 2, 2]);
    assert!(g.describe().contains("3 splits"));
    // Everything but the split keys reads as in the single file.
    for (k, v) in all_meta_types() {
        assert_eq!(g.meta(k), Some(&v), "{k}");
    }
    let single = GgufFile::from_bytes("one", bytes(to_vec(&sample_writer()))).unwrap();
    for name in single.names() {
        let (a, b) = (single.tensor(&name).unwrap(), g.tensor(&name).unwrap());
        assert_eq!((a.ty, &a.shape, &a.data[..]), (b.ty, &b.shape, &b.data[..]));
    }
    // The other splits carry only the split keys.
    let second = GgufFile::open(&paths[1]).expect_err("not the first split");
    assert!(
        matches!(second.kind, GgufErrorKind::Split { .. }),
        "{second}"
    );
}

#[test]
fn missing_split() {
    let (_dir, paths) = write_split_sample();
    std::fs::remove_file(&paths[1]).unwrap();
    let e = GgufFile::open(&paths[0]).unwrap_err();
    assert_eq!(e.file, paths[0]);
    match &e.kind {
        GgufErrorKind::MissingSplit { no, count, path } => {
            assert_eq!((*no, *count, path), (2, 3, &paths[1]))
        }
        k => panic!("{k}"),
    }
    assert!(e.to_string().contains("model-00002-of-00003.gguf"), "{e}");
}

#[test]
fn split_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("m");
    let one = |no: u16, count: u16, total: i32, tensor: &str| {
        let mut w = GgufWriter::new();
        w.add_meta("split.no", MetaValue::U16(no)).unwrap();
        w.add_meta("split.count", MetaValue::U16(count)).unwrap();
        w.add_meta("split.tensors.count", MetaValue::I32(total))
            .unwrap();
        w.add_tensor(tensor, QuantType::F32, &[8], bytes(vec![0; 32]))
            .unwrap();
        let path = prefix.with_file_name(split_file_name("m", u32::from(no) + 1, 2));
        w.write(&path).unwrap();
        path
    };
    let first = one(0, 2, 2, "a");
    one(1, 3, 2, "b");
    let e = GgufFile::open(&first).unwrap_err();
    assert!(
        matches!(
            e.kind,
            GgufErrorKind::SplitMismatch {
                key: "split.count",
                found: Some(3),
                expected: 2
            }
        ),
        "{e}"
    );
    let second = one(1, 2, 2, "a");
    let e = GgufFile::open(&first).unwrap_err();
    assert_eq!(e.file, second);
    assert!(
        matches!(e.kind, GgufErrorKind::DuplicateTensor { ref other, .. } if *other == first),
        "{e}"
    );
    one(1, 2, 2, "b");
    GgufFile::open(&first).unwrap();
    let first = one(0, 2, 5, "a");
    let e = GgufFile::open(&first).unwrap_err();
    assert!(matches!(e.kind, GgufErrorKind::Split { .. }), "{e}");
    // A split model whose file name does not say which split it is.
    let renamed = dir.path().join("renamed.gguf");
    std::fs::copy(&first, &renamed).unwrap();
    let e = GgufFile::open(&renamed).unwrap_err();
    assert!(matches!(e.kind, GgufErrorKind::Split { .. }), "{e}");
}

#[test]
fn missing_file_is_io_error() {
    let e = GgufFile::open(Path::new("/nonexistent/x.gguf")).unwrap_err();
    assert!(matches!(e.kind, GgufErrorKind::Io(_)));
    assert!(e.to_string().starts_with("/nonexistent/x.gguf: "));
}

/// The shared oracle directory, from the main checkout or from a worktree beside it.
fn oracle(rel: &str) -> Option<PathBuf> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/oracle"),
        PathBuf::from("/work/shared/oracle"),
    ];
    let p = candidates.iter().map(|d| d.join(rel)).find(|p| p.exists());
    if p.is_none() {
        println!("skipped: oracle file {rel} not found");
    }
    p
}

#[test]
fn oracle_q8_0() {
    let Some(path) = oracle("models/qlora/gguf/q8_0.gguf") else {
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(
        g.meta("general.architecture").and_then(MetaValue::as_str),
        Some("deepseek2")
    );
    let t = g.tensor("blk.1.ffn_gate_exps.weight").unwrap();
    assert_eq!(t.shape, [16, 128, 256]);
    assert!(g.contains("blk.0.attn_k_b.weight"));
    let tokens = g
        .meta("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(tokens.len(), 1024);
    assert!(tokens.iter().all(|t| t.as_str().is_some()));
}

/// Compares the reader's listing with the one `testdata/list_gguf.py` made with gguf-py.
fn compare_listing(rel: &str, listing: &str) {
    let Some(path) = oracle(rel) else {
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    let want: serde_json::Value = serde_json::from_str(listing).unwrap();
    assert_eq!(g.alignment(), want["alignment"].as_u64().unwrap());
    assert_eq!(
        g.metadata().len() as u64,
        want["n_metadata"].as_u64().unwrap()
    );
    let want = want["tensors"].as_array().unwrap();
    assert_eq!(g.tensor_infos().len(), want.len());
    for (got, want) in g.tensor_infos().iter().zip(want) {
        let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(got.name, want["name"].as_str().unwrap());
        assert_eq!(
            got.ty.name(),
            want["type"].as_str().unwrap(),
            "{}",
            got.name
        );
        assert_eq!(got.shape, shape, "{}", got.name);
        assert_eq!(got.offset, want["offset"].as_u64().unwrap(), "{}", got.name);
        assert_eq!(got.size, want["n_bytes"].as_u64().unwrap(), "{}", got.name);
    }
}

#[test]
fn oracle_listing_matches_gguf_py() {
    compare_listing(
        "models/qlora/gguf/q8_0.gguf",
        include_str!("testdata/qlora_q8_0.json"),
    );
    compare_listing(
        "models/qlora/gguf/q4_k_m.gguf",
        include_str!("testdata/qlora_q4_k_m.json"),
    );
}
