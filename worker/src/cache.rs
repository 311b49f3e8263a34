//! The cache of weights streamed from the coordinator, for a worker without its own copy of
//! the model (GGUF models only: one stacked tensor per layer and matrix, expert outermost).
//!
//! Layout: `<cache dir>/<model fingerprint>/<tensor name>/<expert>` holds the bytes of one
//! expert's slice of one stacked tensor (`TensorInfo::expert_range`), for example
//! `worker-cache/fnv64-0123456789abcdef/blk.3.ffn_gate_exps.weight/00042`. A slice being
//! downloaded is `<expert>.part`; it only ever grows by bytes whose chunk matched its SHA-256
//! (checked by the chunk's conversion before anything is written), and once it has the
//! slice's full length it is synced and renamed to its final name. So after an interruption a
//! final file is complete, and a `.part` holds a verified prefix: the next load fetches only
//! what is missing (from the `.part`'s length on), and a restart with everything cached
//! fetches nothing. A file of the wrong length is deleted and fetched again.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use engine::model::moe::LocalExperts;
use engine::model::weights::{ExpertMatrix, RawMatrix};
use engine::quant::QuantType;
use engine::Bytes;
use proto::control::{Chunk, FetchRequest, TensorInfo, MAX_FETCH};
use tokio_stream::{Stream, StreamExt as _};

/// One MoE layer's share of an assignment: its three stacked tensors (gate, up, down) and the
/// experts wanted from them.
#[derive(Clone, Debug)]
pub struct LayerWant {
    pub layer: u32,
    pub tensors: [TensorInfo; 3],
    /// Ascending, distinct.
    pub experts: Vec<u32>,
}

impl LayerWant {
    /// The layer's tensors from an assignment's list, checked to be stacked expert tensors
    /// that hold `experts`.
    pub fn from_assignment(layer: u32, experts: Vec<u32>, tensors: &[TensorInfo]) -> Result<Self> {
        let find = |m: ExpertMatrix| -> Result<TensorInfo> {
            let name = m.gguf_name(layer as usize);
            let t = tensors.iter().find(|t| t.name == name).ok_or_else(|| {
                anyhow!(
                    "the assignment carries no tensor {name}: the coordinator cannot stream this \
                     model's experts (GGUF models only); start this worker with --model"
                )
            })?;
            if t.shape.len() != 3 || t.expert_stride.is_none() {
                bail!("{name}: not a stacked expert tensor (shape {:?})", t.shape);
            }
            if let Some(&e) = experts.iter().find(|&&e| t.expert_range(e).is_none()) {
                bail!("{name}: expert {e} is outside its {} experts", t.shape[0]);
            }
            Ok(t.clone())
        };
        let tensors = [
            find(ExpertMatrix::Gate)?,
            find(ExpertMatrix::Up)?,
            find(ExpertMatrix::Down)?,
        ];
        let mut experts = experts;
        experts.sort_unstable();
        experts.dedup();
        Ok(LayerWant {
            layer,
            tensors,
            experts,
        })
    }
}

/// The cache directory of one model.
pub struct Cache {
    dir: PathBuf,
    fingerprint: String,
}

/// A name safe as one path component (tensor names come from the coordinator).
fn component(what: &str, s: &str) -> Result<String> {
    let s: String = s.chars().map(|c| if c == ':' { '-' } else { c }).collect();
    if s.is_empty()
        || s.starts_with('.')
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("{what} {s:?} cannot name a cache file");
    }
    Ok(s)
}

impl Cache {
    /// `<root>/<fingerprint>/`, created if missing.
    pub fn open(root: &Path, fingerprint: &str) -> Result<Cache> {
        let dir = root.join(component("model fingerprint", fingerprint)?);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Cache {
            dir,
            fingerprint: fingerprint.to_string(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn tensor_dir(&self, tensor: &str) -> Result<PathBuf> {
        Ok(self.dir.join(component("tensor name", tensor)?))
    }

    /// The final and the partial file of expert `e` of `tensor`.
    fn files(&self, tensor: &str, e: u32) -> Result<(PathBuf, PathBuf)> {
        let d = self.tensor_dir(tensor)?;
        Ok((d.join(format!("{e:05}")), d.join(format!("{e:05}.part"))))
    }

    /// Makes sure every wanted expert slice is in the cache, fetching what is missing with
    /// `fetch` (contiguous missing bytes of a tensor in one call, up to [`MAX_FETCH`]).
    /// `progress(done, total)` is called as bytes arrive; cached bytes count as done.
    pub async fn fill<F, Fut, S, E>(
        &self,
        wants: &[LayerWant],
        mut fetch: F,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()>
    where
        F: FnMut(FetchRequest) -> Fut,
        Fut: Future<Output = Result<S, E>>,
        S: Stream<Item = Result<Chunk, E>> + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut total = 0u64;
        let mut done = 0u64;
        // Per tensor: the byte ranges still missing, ascending.
        let mut plan: Vec<(&TensorInfo, Vec<std::ops::Range<u64>>)> = Vec::new();
        for w in wants {
            for t in &w.tensors {
                let stride = t
                    .expert_stride
                    .ok_or_else(|| anyhow!("{}: not stacked", t.name))?;
                std::fs::create_dir_all(self.tensor_dir(&t.name)?)?;
                let mut missing: Vec<std::ops::Range<u64>> = Vec::new();
                for &e in &w.experts {
                    let range = t
                        .expert_range(e)
                        .ok_or_else(|| anyhow!("{}: no expert {e}", t.name))?;
                    total += stride;
                    let (full, part) = self.files(&t.name, e)?;
                    match std::fs::metadata(&full) {
                        Ok(m) if m.len() == stride => {
                            done += stride;
                            continue;
                        }
                        Ok(_) => {
                            tracing::warn!("{}: wrong length, fetching it again", full.display());
                            std::fs::remove_file(&full)?;
                        }
                        Err(_) => {}
                    }
                    let have = match std::fs::metadata(&part) {
                        Ok(m) if m.len() < stride => m.len(),
                        Ok(_) => {
                            std::fs::remove_file(&part)?;
                            0
                        }
                        Err(_) => 0,
                    };
                    done += have;
                    let need = range.start + have..range.end;
                    match missing.last_mut() {
                        Some(last) if last.end == need.start => last.end = need.end,
                        _ => missing.push(need),
                    }
                }
                if !missing.is_empty() {
                    plan.push((t, missing));
                }
            }
        }
        progress(done, total);
        for (t, ranges) in plan {
            let stride = t.expert_stride.expect("checked above");
            for r in ranges {
                let mut at = r.start;
                while at < r.end {
                    let end = r.end.min(at + MAX_FETCH);
                    let req = FetchRequest {
                        model_fingerprint: self.fingerprint.clone(),
                        tensor: t.name.clone(),
                        offset: at,
                        length: end - at,
                    };
                    let what = || format!("fetching bytes {at}..{end} of {}", t.name);
                    let mut stream = fetch(req).await.with_context(what)?;
                    let mut writer = Writer {
                        cache: self,
                        tensor: &t.name,
                        stride,
                        open: None,
                    };
                    let mut next = at;
                    while let Some(item) = stream.next().await {
                        let chunk = item.with_context(what)?;
                        if chunk.offset != next || chunk.data.len() as u64 > end - next {
                            bail!(
                                "{}: a chunk of {} bytes at {} where {next}..{end} was expected",
                                what(),
                                chunk.data.len(),
                                chunk.offset
                            );
                        }
                        writer.write(next, &chunk.data)?;
                        next += chunk.data.len() as u64;
                        done += chunk.data.len() as u64;
                        progress(done, total);
                    }
                    if next != end {
                        bail!("{}: the stream ended at byte {next}", what());
                    }
                    at = end;
                }
            }
        }
        Ok(())
    }

    /// Builds the experts from the cache (after [`Cache::fill`]), each checked against its
    /// tensor's type and shape.
    pub fn load(&self, wants: &[LayerWant]) -> Result<LocalExperts> {
        let hidden = wants
            .first()
            .map(|w| w.tensors[2].shape[1] as usize)
            .unwrap_or(0);
        let mut out = LocalExperts::new(hidden);
        for w in wants {
            let n = w.tensors[0].shape[0] as usize;
            for &e in &w.experts {
                let mut mats = Vec::with_capacity(3);
                for t in &w.tensors {
                    let ty = QuantType::from_ggml_id(t.ggml_type)
                        .ok_or_else(|| anyhow!("{}: unknown ggml type {}", t.name, t.ggml_type))?;
                    let (full, _) = self.files(&t.name, e)?;
                    let data = std::fs::read(&full)
                        .with_context(|| format!("reading {}", full.display()))?;
                    mats.push(RawMatrix {
                        ty,
                        rows: t.shape[1] as usize,
                        cols: t.shape[2] as usize,
                        data: Bytes::from_vec(data),
                    });
                }
                let [g, u, d]: [RawMatrix; 3] = mats.try_into().expect("three matrices");
                out.insert(w.layer as usize, n, e as usize, [g, u, d])
                    .with_context(|| {
                        format!("building expert {e} of layer {} from the cache", w.layer)
                    })?;
            }
        }
        Ok(out)
    }
}

/// Appends verified bytes of one fetched range to the experts' `.part` files.
struct Writer<'a> {
    cache: &'a Cache,
    tensor: &'a str,
    stride: u64,
    /// The expert being written, its file and how many of its bytes are in it.
    open: Option<(u32, std::fs::File, u64)>,
}

impl Writer<'_> {
    /// `data` is the tensor's bytes from `offset` on.
    fn write(&mut self, mut offset: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let e = (offset / self.stride) as u32;
            let within = offset % self.stride;
            let (full, part) = self.cache.files(self.tensor, e)?;
            if self.open.as_ref().is_none_or(|o| o.0 != e) {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&part)
                    .with_context(|| format!("opening {}", part.display()))?;
                let len = f.metadata()?.len();
                if len != within {
                    bail!(
                        "{} has {len} bytes but byte {within} of it arrived",
                        part.display()
                    );
                }
                self.open = Some((e, f, len));
            }
            let (_, f, len) = self.open.as_mut().expect("opened above");
            let n = (self.stride - within).min(data.len() as u64) as usize;
            f.write_all(&data[..n])
                .with_context(|| format!("writing {}", part.display()))?;
            *len += n as u64;
            if *len == self.stride {
                f.sync_all()?;
                self.open = None;
                std::fs::rename(&part, &full)
                    .with_context(|| format!("renaming {}", part.display()))?;
            }
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }
}

/// All the experts a worker holds, per layer.
pub fn by_layer(want: &BTreeSet<(u32, u32)>) -> Vec<(u32, Vec<u32>)> {
    let mut out: Vec<(u32, Vec<u32>)> = Vec::new();
    for &(l, e) in want {
        match out.last_mut() {
            Some((last, es)) if *last == l => es.push(e),
            _ => out.push((l, vec![e])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::RpcError;
    use proto::grpc::pb;
    use std::collections::HashMap;

    const N: u64 = 4; // experts per tensor
    const H: u64 = 8; // hidden
    const I: u64 = 4; // expert inter
    const STRIDE: u64 = H * I * 4; // one f32 matrix of an expert
    const CHUNK: usize = 48; // straddles experts

    fn tensors(layer: u32) -> [TensorInfo; 3] {
        ExpertMatrix::ALL.map(|m| {
            let (r, c) = if m == ExpertMatrix::Down {
                (H, I)
            } else {
                (I, H)
            };
            TensorInfo {
                name: m.gguf_name(layer as usize),
                ggml_type: 0, // F32
                shape: vec![N, r, c],
                file_index: 0,
                offset: 0,
                size: N * STRIDE,
                expert_stride: Some(STRIDE),
            }
        })
    }

    /// Small f32 values that differ per tensor and byte.
    fn model() -> HashMap<String, Vec<u8>> {
        let mut m = HashMap::new();
        for l in [1u32, 2] {
            for (k, t) in tensors(l).iter().enumerate() {
                let v: Vec<f32> = (0..N * STRIDE / 4)
                    .map(|i| (i as f32 + 100.0 * k as f32 + 1000.0 * l as f32) * 1e-3)
                    .collect();
                m.insert(t.name.clone(), bytemuck_bytes(&v));
            }
        }
        m
    }

    fn bytemuck_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    type Chunks = tokio_stream::Iter<std::vec::IntoIter<Result<Chunk, RpcError>>>;

    /// A stand-in coordinator: serves `model`, counts calls and bytes, and can break the
    /// stream after `fail_after` chunks (in all calls together) or corrupt chunk `corrupt`.
    struct Fake {
        model: HashMap<String, Vec<u8>>,
        calls: Vec<FetchRequest>,
        chunks: usize,
        bytes: u64,
        fail_after: Option<usize>,
        corrupt: Option<usize>,
    }

    impl Fake {
        fn new() -> Self {
            Fake {
                model: model(),
                calls: Vec::new(),
                chunks: 0,
                bytes: 0,
                fail_after: None,
                corrupt: None,
            }
        }

        fn fetch(&mut self, req: FetchRequest) -> std::future::Ready<Result<Chunks, RpcError>> {
            let data = &self.model[&req.tensor];
            let mut items = Vec::new();
            let mut at = req.offset;
            while at < req.offset + req.length {
                let end = (at + CHUNK as u64).min(req.offset + req.length);
                if self.fail_after == Some(self.chunks) {
                    items.push(Err(RpcError::Status(tonic::Status::unavailable("gone"))));
                    break;
                }
                let mut p = pb::Chunk::from(Chunk {
                    offset: at,
                    data: data[at as usize..end as usize].to_vec(),
                });
                if self.corrupt == Some(self.chunks) {
                    p.data[3] ^= 0x40;
                }
                self.chunks += 1;
                match Chunk::try_from(p) {
                    Ok(c) => {
                        self.bytes += c.data.len() as u64;
                        items.push(Ok(c));
                    }
                    Err(e) => {
                        items.push(Err(RpcError::Invalid(e)));
                        break;
                    }
                }
                at = end;
            }
            self.calls.push(req);
            std::future::ready(Ok(tokio_stream::iter(items)))
        }
    }

    fn wants() -> Vec<LayerWant> {
        let all: Vec<TensorInfo> = tensors(1).into_iter().chain(tensors(2)).collect();
        vec![
            LayerWant::from_assignment(1, vec![0, 1, 3], &all).unwrap(),
            LayerWant::from_assignment(2, vec![2], &all).unwrap(),
        ]
    }

    async fn fill(cache: &Cache, fake: &mut Fake) -> Result<(u64, u64)> {
        let mut last = (0, 0);
        cache
            .fill(&wants(), |r| fake.fetch(r), &mut |d, t| last = (d, t))
            .await
            .map(|()| last)
    }

    /// Every wanted slice is in its final file with the model's bytes, and no `.part` is left.
    fn check_complete(cache: &Cache) {
        let model = model();
        for w in wants() {
            for t in &w.tensors {
                for &e in &w.experts {
                    let (full, part) = cache.files(&t.name, e).unwrap();
                    let r = t.expert_range(e).unwrap();
                    assert_eq!(
                        std::fs::read(&full).unwrap(),
                        model[&t.name][r.start as usize..r.end as usize]
                    );
                    assert!(!part.exists());
                }
            }
        }
    }

    const WANTED: u64 = 4 * 3 * STRIDE;

    #[tokio::test]
    async fn fills_builds_experts_and_reuses_the_cache_without_fetching() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000aa").unwrap();
        let mut fake = Fake::new();
        assert_eq!(fill(&cache, &mut fake).await.unwrap(), (WANTED, WANTED));
        // Experts 0 and 1 of layer 1 are contiguous: one call per tensor for them, one for 3.
        assert_eq!(fake.calls.len(), 3 * 2 + 3);
        assert_eq!(fake.bytes, WANTED);
        check_complete(&cache);

        let local = cache.load(&wants()).unwrap();
        let held: Vec<_> = local.held().collect();
        assert_eq!(held, vec![(1, 0), (1, 1), (1, 3), (2, 2)]);
        let mlp = local.layers[1].as_ref().unwrap().experts[3]
            .as_ref()
            .unwrap();
        assert_eq!((mlp.down.rows, mlp.down.cols), (H as usize, I as usize));

        // A restart: the same cache, nothing fetched.
        let cache = Cache::open(root.path(), "fnv64:00000000000000aa").unwrap();
        let mut again = Fake::new();
        assert_eq!(fill(&cache, &mut again).await.unwrap(), (WANTED, WANTED));
        assert!(again.calls.is_empty());
        assert_eq!(cache.load(&wants()).unwrap().held().count(), 4);
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_where_it_stopped() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000bb").unwrap();
        let mut fake = Fake::new();
        fake.fail_after = Some(4); // 192 bytes: expert 0 of the first tensor and part of 1
        let e = fill(&cache, &mut fake).await.unwrap_err();
        assert!(format!("{e:#}").contains("gone"), "{e:#}");
        let gate = ExpertMatrix::Gate.gguf_name(1);
        let (full0, _) = cache.files(&gate, 0).unwrap();
        let (full1, part1) = cache.files(&gate, 1).unwrap();
        assert!(full0.exists() && !full1.exists());
        let have = std::fs::read(&part1).unwrap();
        assert_eq!(have.len() as u64, 4 * CHUNK as u64 - STRIDE);
        assert_eq!(
            have,
            model()[&gate][STRIDE as usize..(STRIDE as usize + have.len())]
        );

        let mut rest = Fake::new();
        assert_eq!(fill(&cache, &mut rest).await.unwrap(), (WANTED, WANTED));
        assert_eq!(rest.calls[0].offset, 4 * CHUNK as u64, "resumed mid-expert");
        assert_eq!(rest.bytes, WANTED - 4 * CHUNK as u64);
        check_complete(&cache);
    }

    #[tokio::test]
    async fn a_chunk_with_a_bad_hash_fails_the_load_and_is_not_kept() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000cc").unwrap();
        let mut fake = Fake::new();
        fake.corrupt = Some(2);
        let e = fill(&cache, &mut fake).await.unwrap_err();
        assert!(format!("{e:#}").contains("SHA-256"), "{e:#}");
        // Only the two verified chunks were written.
        let gate = ExpertMatrix::Gate.gguf_name(1);
        let (full0, part0) = cache.files(&gate, 0).unwrap();
        assert!(!full0.exists());
        assert_eq!(std::fs::read(&part0).unwrap(), model()[&gate][..2 * CHUNK]);
        // Loading without the missing experts fails cleanly.
        assert!(cache.load(&wants()).is_err());
        // A good stream then completes it.
        fill(&cache, &mut Fake::new()).await.unwrap();
        check_complete(&cache);
    }

    #[test]
    fn odd_names_cannot_escape_the_cache() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000dd").unwrap();
        assert!(cache.files("../x", 0).is_err());
        assert!(cache.files("a/b", 0).is_err());
        assert!(cache.files(".hidden", 0).is_err());
        assert!(Cache::open(root.path(), "..").is_err());
    }

    #[test]
    fn a_missing_tensor_names_the_gguf_only_limit() {
        let e = LayerWant::from_assignment(1, vec![0], &[]).unwrap_err();
        assert!(e.to_string().contains("GGUF"), "{e}");
    }
}
