//! Helpers shared by the integration tests: locating test data, running a model against an
//! oracle reference, and comparing logits.
#![allow(dead_code)]

pub mod cluster;
pub mod integer;

use std::path::{Path, PathBuf};

use engine::model::kv_cache::CacheType;
use engine::model::weights::ExpertFilter;
use engine::model::{Logits, ModelFile, Workspace};
use engine::npy::{self, NpyArray};

/// The project's own test data (`tests/data`).
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// A file or directory of the oracle's copy in the test data.
pub fn oracle(rel: &str) -> PathBuf {
    data_dir().join("oracle").join(rel)
}

/// An oracle reference directory: prompt ids, greedy continuation, logits.
pub struct Reference {
    pub prompt: Vec<u32>,
    pub gen: Vec<u32>,
    /// `(prompt + gen) x vocab`.
    pub logits: NpyArray<f32>,
}

impl Reference {
    pub fn load(dir: &Path) -> Reference {
        let ids = |f: &str| -> Vec<u32> {
            npy::read::<i64>(&dir.join(f))
                .unwrap_or_else(|e| panic!("{e}"))
                .data
                .iter()
                .map(|&v| v as u32)
                .collect()
        };
        Reference {
            prompt: ids("prompt_ids.npy"),
            gen: ids("gen_ids.npy"),
            logits: npy::read(&dir.join("logits.npy")).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn vocab(&self) -> usize {
        self.logits.shape[1]
    }

    pub fn row(&self, t: usize) -> &[f32] {
        let v = self.vocab();
        &self.logits.data[t * v..(t + 1) * v]
    }
}

/// The engine's output for a reference's prompt: prefill in one call, then greedy decode
/// steps of one token (free-running, or forced to `force` when given).
pub struct Run {
    pub logits: Vec<Vec<f32>>,
    pub gen: Vec<u32>,
}

pub fn run_model(
    model_path: &Path,
    prompt: &[u32],
    steps: usize,
    force: Option<&[u32]>,
    cache: CacheType,
) -> Run {
    let mf = ModelFile::open(model_path).unwrap_or_else(|e| panic!("{e}"));
    let model = mf.load_model().unwrap_or_else(|e| panic!("{e}"));
    let experts = mf
        .load_experts(&ExpertFilter::All)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cache = model.new_cache(cache, prompt.len() + steps + 1);
    let mut ws = Workspace::default();
    let v = model.cfg.vocab_size;
    let all = model
        .forward(prompt, &mut cache, &experts, &mut ws, Logits::All)
        .unwrap();
    let mut logits: Vec<Vec<f32>> = all.chunks_exact(v).map(|r| r.to_vec()).collect();
    let mut gen = Vec::new();
    for step in 0..steps {
        let next = argmax(logits.last().unwrap());
        gen.push(next);
        let feed = force.map_or(next, |f| f[step]);
        let row = model
            .forward(&[feed], &mut cache, &experts, &mut ws, Logits::Last)
            .unwrap();
        logits.push(row.to_vec());
    }
    Run { logits, gen }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Distance between two sets of logit rows.
#[derive(Debug)]
pub struct Diff {
    pub max_abs: f32,
    pub mean_abs: f64,
    pub argmax_agree: usize,
    pub rows: usize,
}

pub fn diff(got: &[Vec<f32>], reference: &Reference) -> Diff {
    let mut max_abs = 0f32;
    let mut sum = 0f64;
    let mut count = 0usize;
    let mut agree = 0;
    for (t, row) in got.iter().enumerate() {
        let r = reference.row(t);
        assert_eq!(row.len(), r.len(), "vocab size");
        for (a, b) in row.iter().zip(r) {
            let d = (a - b).abs();
            max_abs = max_abs.max(d);
            sum += d as f64;
            count += 1;
        }
        agree += (argmax(row) == argmax(r)) as usize;
    }
    Diff {
        max_abs,
        mean_abs: sum / count as f64,
        argmax_agree: agree,
        rows: got.len(),
    }
}

/// llama.cpp's distance to a dequantised reference (teacher-forced logits, greedy prefix).
pub struct LlamaCpp {
    pub mean_abs: f64,
    pub argmax_agree: usize,
    pub greedy_prefix: usize,
}

pub fn llamacpp(name: &str) -> LlamaCpp {
    let p = oracle(&format!("llamacpp/{name}.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let tf = &v["teacher_forced"];
    let agree = tf["argmax_agree"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    LlamaCpp {
        mean_abs: tf["mean_abs_diff"].as_f64().unwrap(),
        argmax_agree: agree,
        greedy_prefix: v["greedy_common_prefix"].as_u64().unwrap() as usize,
    }
}

pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A quantized GGUF against `ref-<type>` (its own weights dequantised and run through
/// transformers): at least as close as llama.cpp on the same file, teacher-forced on the
/// reference's tokens so that every row is comparable; and, for the calm `bg03` model, a
/// greedy prefix at least as long as llama.cpp's.
pub fn check_quantized(model: &str, ty: &str, llama: &str, check_greedy: bool) {
    let r = Reference::load(&oracle(&format!("{model}/ref-{ty}")));
    let path = oracle(&format!("{model}/{ty}.gguf"));
    let forced = run_model(&path, &r.prompt, r.gen.len(), Some(&r.gen), CacheType::F32);
    let d = diff(&forced.logits, &r);
    let lc = llamacpp(llama);
    eprintln!(
        "{model} {ty}: engine {d:?}; llama.cpp mean {:.4} argmax {}/56 greedy {}",
        lc.mean_abs, lc.argmax_agree, lc.greedy_prefix
    );
    assert!(
        d.mean_abs <= lc.mean_abs,
        "mean abs diff {} worse than llama.cpp's {}",
        d.mean_abs,
        lc.mean_abs
    );
    assert!(
        d.argmax_agree >= lc.argmax_agree,
        "argmax agreement {} below llama.cpp's {}",
        d.argmax_agree,
        lc.argmax_agree
    );
    if check_greedy {
        let free = run_model(&path, &r.prompt, r.gen.len(), None, CacheType::F32);
        let prefix = common_prefix(&free.gen, &r.gen);
        eprintln!("{model} {ty}: greedy prefix {prefix}/32");
        assert!(
            prefix >= lc.greedy_prefix,
            "greedy prefix {prefix} shorter than llama.cpp's {}",
            lc.greedy_prefix
        );
    }
}
