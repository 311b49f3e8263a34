//! The cache of weights streamed from the coordinator, for a worker without its own copy of
//! the model.
//!
//! What is streamed are the pieces of the assigned experts ([`ExpertPiece`]): byte ranges of
//! the model's tensors, the same way for a GGUF model (an expert's slice of each stacked
//! tensor) and a Hugging Face one (an expert's own tensors, plus their block scales when they
//! are FP8). [`plan`] checks every piece against the engine's types before a byte is fetched.
//!
//! Layout: `<cache dir>/<model fingerprint>/layer-<layer>/<expert, 5 digits>.<kind>` holds one
//! piece's bytes followed by their SHA-256 (32 bytes), for example
//! `worker-cache/fnv64-0123456789abcdef/layer-3/00042.gate_scales`. A piece being downloaded
//! is `<name>.part` (bytes only); it only ever grows by bytes whose chunk matched its SHA-256
//! (checked by the chunk's conversion before anything is written), and once it has the piece's
//! full length its hash is appended, it is synced and renamed to its final name. So after an
//! interruption a final file is complete, and a `.part` holds a verified prefix: the next load
//! fetches only what is missing (from the `.part`'s length on), and a restart with everything
//! cached fetches nothing. A file of the wrong length is deleted and fetched again; one whose
//! bytes no longer match their hash is found when the experts are built
//! ([`CacheError::Corrupt`]), deleted, and fetched again by [`Cache::obtain`].

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use engine::model::moe::{ExpertBuildError, LocalExperts};
use engine::model::weights::{scale_grid, RawMatrix};
use engine::quant::QuantType;
use engine::Bytes;
use proto::control::{Assignment, Chunk, ExpertPiece, FetchRequest, PieceKind, MAX_FETCH};
use sha2::{Digest, Sha256};
use tokio_stream::{Stream, StreamExt as _};

/// Bytes of the hash that ends every complete cache file.
const HASH_LEN: u64 = 32;

/// Why an assignment's pieces cannot be streamed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the assignment carries no {kind} piece of expert {expert} of layer {layer}: the \
         coordinator does not stream this model's experts; start this worker with --model"
    )]
    Missing {
        layer: u32,
        expert: u32,
        kind: PieceKind,
    },
    #[error("expert {expert} of layer {layer}: {kind} ({tensor}): {what}")]
    Bad {
        layer: u32,
        expert: u32,
        kind: PieceKind,
        tensor: String,
        what: String,
    },
}

/// Why cached experts could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "{} cached piece(s) missing or altered (deleted), first {}: {}",
        .0.len(),
        .0[0].0.display(),
        .0[0].1
    )]
    Corrupt(Vec<(PathBuf, String)>),
    #[error("building expert {expert} of layer {layer} from the cache: {err}")]
    Build {
        layer: u32,
        expert: u32,
        err: ExpertBuildError,
    },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
}

/// One matrix of an expert: its weights' piece and, for FP8, its scales' piece, with the
/// type and shape they were checked to have.
#[derive(Clone, Debug)]
pub struct MatrixWant {
    pub weights: ExpertPiece,
    pub ty: QuantType,
    pub rows: usize,
    pub cols: usize,
    pub scales: Option<(ExpertPiece, QuantType)>,
}

/// One assigned expert: gate, up and down.
#[derive(Clone, Debug)]
pub struct ExpertWant {
    pub layer: u32,
    pub expert: u32,
    /// Routed experts of the layer.
    pub n_experts: u32,
    pub matrices: [MatrixWant; 3],
}

impl ExpertWant {
    /// Its pieces (three, or six with FP8 scales).
    pub fn pieces(&self) -> impl Iterator<Item = &ExpertPiece> {
        self.matrices
            .iter()
            .flat_map(|m| std::iter::once(&m.weights).chain(m.scales.as_ref().map(|s| &s.0)))
    }
}

/// The assigned experts with their pieces, checked: every expert has its three matrices, each
/// piece's type is one the engine computes with and its length is what its type and shape
/// take, gate and up are `[inter, hidden]` and down `[hidden, inter]` with one `hidden` for
/// all, and FP8 weights (only those) come with a scale grid of `ceil(rows/128) x
/// ceil(cols/128)`.
pub fn plan(a: &Assignment) -> Result<Vec<ExpertWant>, PlanError> {
    let mut by_expert: std::collections::HashMap<(u32, u32, PieceKind), &ExpertPiece> =
        std::collections::HashMap::with_capacity(a.pieces.len());
    for p in &a.pieces {
        by_expert.insert((p.layer, p.expert, p.kind), p);
    }
    let mut hidden = None;
    let mut out = Vec::new();
    for l in &a.experts {
        let mut experts = l.experts.clone();
        experts.sort_unstable();
        for e in experts {
            let piece = |kind| by_expert.get(&(l.layer, e, kind)).copied();
            let bad = |p: &ExpertPiece, what: String| PlanError::Bad {
                layer: l.layer,
                expert: e,
                kind: p.kind,
                tensor: p.tensor.clone(),
                what,
            };
            // A piece's type and `[rows, cols]`, its length checked against them.
            let typed = |p: &ExpertPiece| -> Result<(QuantType, usize, usize), PlanError> {
                let ty = QuantType::from_name(&p.dtype)
                    .filter(|t| t.is_supported())
                    .ok_or_else(|| {
                        bad(
                            p,
                            format!("type {} is not one the engine computes with", p.dtype),
                        )
                    })?;
                let &[rows, cols] = p.shape.as_slice() else {
                    return Err(bad(p, format!("shape {:?} is not [rows, cols]", p.shape)));
                };
                let bytes = rows
                    .checked_mul(cols)
                    .and_then(|n| ty.bytes_for(n))
                    .filter(|&b| b == p.length);
                let dims = (usize::try_from(rows), usize::try_from(cols));
                match (bytes, dims) {
                    (Some(_), (Ok(r), Ok(c))) => Ok((ty, r, c)),
                    _ => Err(bad(
                        p,
                        format!(
                            "{} bytes do not hold {:?} of {}",
                            p.length, p.shape, p.dtype
                        ),
                    )),
                }
            };
            let mut mats = Vec::with_capacity(3);
            for m in 0..3 {
                let kind = PieceKind::of(m, false).expect("three matrices");
                let scales_kind = PieceKind::of(m, true).expect("three matrices");
                let w = piece(kind).ok_or(PlanError::Missing {
                    layer: l.layer,
                    expert: e,
                    kind,
                })?;
                let (ty, rows, cols) = typed(w)?;
                let scales = match (ty, piece(scales_kind)) {
                    (QuantType::F8E4M3, None) => {
                        return Err(PlanError::Missing {
                            layer: l.layer,
                            expert: e,
                            kind: scales_kind,
                        })
                    }
                    (QuantType::F8E4M3, Some(s)) => {
                        let (sty, gr, gc) = typed(s)?;
                        if [gr, gc] != scale_grid(rows, cols) {
                            return Err(bad(
                                s,
                                format!(
                                    "a {gr}x{gc} grid of scales for a {rows}x{cols} matrix, {:?} expected",
                                    scale_grid(rows, cols)
                                ),
                            ));
                        }
                        Some((s.clone(), sty))
                    }
                    (_, Some(s)) => {
                        return Err(bad(s, format!("block scales for {} weights", ty.name())))
                    }
                    (_, None) => None,
                };
                mats.push(MatrixWant {
                    weights: w.clone(),
                    ty,
                    rows,
                    cols,
                    scales,
                });
            }
            let [gate, up, down]: [MatrixWant; 3] = mats.try_into().expect("three matrices");
            let h = *hidden.get_or_insert(gate.cols);
            let (inter, want) = (gate.rows, [(gate.rows, h), (gate.rows, h), (h, gate.rows)]);
            for (m, (rows, cols)) in [&gate, &up, &down].into_iter().zip(want) {
                if (m.rows, m.cols) != (rows, cols) {
                    return Err(bad(
                        &m.weights,
                        format!(
                            "{}x{}, expected {rows}x{cols} (inter {inter}, hidden {h})",
                            m.rows, m.cols
                        ),
                    ));
                }
            }
            out.push(ExpertWant {
                layer: l.layer,
                expert: e,
                n_experts: l.n_experts,
                matrices: [gate, up, down],
            });
        }
    }
    Ok(out)
}

/// The cache directory of one model.
#[derive(Clone)]
pub struct Cache {
    dir: PathBuf,
    fingerprint: String,
}

/// A name safe as one path component.
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

/// Where one piece's bytes go on their way from the coordinator.
struct Target {
    /// Within the tensor's data.
    range: Range<u64>,
    full: PathBuf,
    part: PathBuf,
}

/// Missing bytes of one tensor, fetched together: the pieces they fill, by offset.
struct Run {
    tensor: String,
    range: Range<u64>,
    targets: Vec<Target>,
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

    /// The final and the partial file of a piece.
    fn files(&self, p: &ExpertPiece) -> (PathBuf, PathBuf) {
        let d = self.dir.join(format!("layer-{}", p.layer));
        let name = format!("{:05}.{}", p.expert, p.kind);
        (d.join(&name), d.join(format!("{name}.part")))
    }

    /// Makes sure every piece of `wants` is in the cache, fetching what is missing with
    /// `fetch` (contiguous missing bytes of a tensor in one call, up to [`MAX_FETCH`]).
    /// `progress(done, total)` is called as bytes arrive; cached bytes count as done.
    pub async fn fill<F, Fut, S, E>(
        &self,
        wants: &[ExpertWant],
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
        // Tensors in the order they first appear (layer by layer), each one's pieces by offset.
        let mut order: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let mut pieces: Vec<&ExpertPiece> = wants.iter().flat_map(ExpertWant::pieces).collect();
        for p in &pieces {
            let n = order.len();
            order.entry(p.tensor.as_str()).or_insert(n);
        }
        pieces.sort_by_key(|p| (order[p.tensor.as_str()], p.offset));
        let mut runs: Vec<Run> = Vec::new();
        for p in pieces {
            total += p.length;
            let (full, part) = self.files(p);
            if let Some(d) = full.parent() {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            match std::fs::metadata(&full) {
                Ok(m) if m.len() == p.length + HASH_LEN => {
                    done += p.length;
                    continue;
                }
                Ok(_) => {
                    tracing::warn!("{}: wrong length, fetching it again", full.display());
                    std::fs::remove_file(&full)?;
                }
                Err(_) => {}
            }
            let have = match std::fs::metadata(&part) {
                Ok(m) if m.len() < p.length => m.len(),
                Ok(_) => {
                    std::fs::remove_file(&part)?;
                    0
                }
                Err(_) => 0,
            };
            done += have;
            let need = p.offset + have..p.offset + p.length;
            let target = Target {
                range: p.range(),
                full,
                part,
            };
            match runs.last_mut() {
                Some(r) if r.tensor == p.tensor && r.range.end == need.start => {
                    r.range.end = need.end;
                    r.targets.push(target);
                }
                _ => runs.push(Run {
                    tensor: p.tensor.clone(),
                    range: need,
                    targets: vec![target],
                }),
            }
        }
        progress(done, total);
        for run in &runs {
            let mut writer = Writer {
                targets: &run.targets,
                at: 0,
                open: None,
            };
            let mut at = run.range.start;
            while at < run.range.end {
                let end = run.range.end.min(at + MAX_FETCH);
                let req = FetchRequest {
                    model_fingerprint: self.fingerprint.clone(),
                    tensor: run.tensor.clone(),
                    offset: at,
                    length: end - at,
                };
                let what = || format!("fetching bytes {at}..{end} of {}", run.tensor);
                let mut stream = fetch(req).await.with_context(what)?;
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
        Ok(())
    }

    /// Builds the experts from the cache (after [`Cache::fill`]): every piece's length and
    /// hash verified, every matrix checked against its type and shape. Pieces that do not
    /// verify (or are missing) are deleted and listed in [`CacheError::Corrupt`].
    pub fn load(&self, wants: &[ExpertWant]) -> Result<LocalExperts, CacheError> {
        let hidden = wants.first().map_or(0, |w| w.matrices[2].rows);
        let mut out = LocalExperts::new(hidden);
        let mut corrupt = Vec::new();
        for w in wants {
            let mut read = |p: &ExpertPiece| -> Result<Option<Bytes>, CacheError> {
                let (full, _) = self.files(p);
                match read_verified(&full, p.length) {
                    Ok(b) => Ok(Some(b)),
                    Err(Bad::Io(err)) => Err(CacheError::Io { path: full, err }),
                    Err(Bad::Corrupt(why)) => {
                        tracing::warn!("{}: {why}; fetching it again", full.display());
                        match std::fs::remove_file(&full) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(err) => return Err(CacheError::Io { path: full, err }),
                        }
                        corrupt.push((full, why));
                        Ok(None)
                    }
                }
            };
            let mut mats = Vec::with_capacity(3);
            for m in &w.matrices {
                let data = read(&m.weights)?;
                let scales = match &m.scales {
                    Some((p, ty)) => read(p)?.map(|b| Some((*ty, b))),
                    None => Some(None),
                };
                if let (Some(data), Some(scales)) = (data, scales) {
                    mats.push(RawMatrix {
                        ty: m.ty,
                        rows: m.rows,
                        cols: m.cols,
                        data,
                        scales,
                    });
                }
            }
            let Ok(mats) = <[RawMatrix; 3]>::try_from(mats) else {
                continue; // a piece did not verify
            };
            out.insert(
                w.layer as usize,
                w.n_experts as usize,
                w.expert as usize,
                mats,
            )
            .map_err(|err| CacheError::Build {
                layer: w.layer,
                expert: w.expert,
                err,
            })?;
        }
        if !corrupt.is_empty() {
            return Err(CacheError::Corrupt(corrupt));
        }
        Ok(out)
    }

    /// Fills the cache, then builds the experts from it; pieces found corrupt while building
    /// are fetched again once.
    pub async fn obtain<F, Fut, S, E>(
        &self,
        wants: &[ExpertWant],
        mut fetch: F,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<LocalExperts>
    where
        F: FnMut(FetchRequest) -> Fut,
        Fut: Future<Output = Result<S, E>>,
        S: Stream<Item = Result<Chunk, E>> + Unpin,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut retried = false;
        loop {
            self.fill(wants, &mut fetch, progress).await?;
            let (cache, w) = (self.clone(), wants.to_vec());
            match tokio::task::spawn_blocking(move || cache.load(&w)).await? {
                Ok(x) => return Ok(x),
                Err(CacheError::Corrupt(c)) if !retried => {
                    tracing::warn!("{} cached piece(s) will be fetched again", c.len());
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Why a cache file was not used.
enum Bad {
    Io(std::io::Error),
    Corrupt(String),
}

/// The bytes of a complete cache file of a `length`-byte piece, their hash checked.
fn read_verified(path: &Path, length: u64) -> Result<Bytes, Bad> {
    let mut v = match std::fs::read(path) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Bad::Corrupt("missing".into()))
        }
        Err(e) => return Err(Bad::Io(e)),
    };
    if v.len() as u64 != length + HASH_LEN {
        return Err(Bad::Corrupt(format!(
            "{} bytes, {} expected",
            v.len(),
            length + HASH_LEN
        )));
    }
    let (data, hash) = v.split_at(length as usize);
    if Sha256::digest(data).as_slice() != hash {
        return Err(Bad::Corrupt("bytes do not match their SHA-256".into()));
    }
    v.truncate(length as usize);
    Ok(Bytes::from_vec(v))
}

/// Appends verified bytes of one fetched run to its pieces' `.part` files, and completes each
/// piece (hash appended, synced, renamed) when its last byte arrives.
struct Writer<'a> {
    targets: &'a [Target],
    /// The first target that may still receive bytes.
    at: usize,
    /// The piece being written: its file, how many of its bytes are in it, their hash so far.
    open: Option<(std::fs::File, u64, Sha256)>,
}

impl Writer<'_> {
    /// `data` is the tensor's bytes from `offset` on.
    fn write(&mut self, mut offset: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            while self
                .targets
                .get(self.at)
                .is_some_and(|t| t.range.end <= offset)
            {
                self.at += 1;
                self.open = None;
            }
            let Some(t) = self
                .targets
                .get(self.at)
                .filter(|t| t.range.start <= offset)
            else {
                bail!("byte {offset} belongs to no piece being fetched");
            };
            let within = offset - t.range.start;
            if self.open.is_none() {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(&t.part)
                    .with_context(|| format!("opening {}", t.part.display()))?;
                let len = f.metadata()?.len();
                if len != within {
                    bail!(
                        "{} has {len} bytes but byte {within} of it arrived",
                        t.part.display()
                    );
                }
                // Resuming: the hash covers the verified prefix already there.
                let mut hash = Sha256::new();
                let mut prefix = Vec::with_capacity(len as usize);
                f.read_to_end(&mut prefix)
                    .with_context(|| format!("reading {}", t.part.display()))?;
                hash.update(&prefix);
                self.open = Some((f, len, hash));
            }
            let (f, len, hash) = self.open.as_mut().expect("opened above");
            let piece_len = t.range.end - t.range.start;
            let n = (piece_len - within).min(data.len() as u64) as usize;
            f.write_all(&data[..n])
                .with_context(|| format!("writing {}", t.part.display()))?;
            hash.update(&data[..n]);
            *len += n as u64;
            if *len == piece_len {
                let (mut f, _, hash) = self.open.take().expect("open");
                f.write_all(&hash.finalize())
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("completing {}", t.part.display()))?;
                std::fs::rename(&t.part, &t.full)
                    .with_context(|| format!("renaming {}", t.part.display()))?;
                self.at += 1;
            }
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::{LayerExperts, RpcError};
    use proto::grpc::pb;
    use std::collections::HashMap;

    const N: u64 = 4; // experts per stacked tensor
    const H: u64 = 8; // hidden
    const I: u64 = 4; // expert inter
    const STRIDE: u64 = H * I * 4; // one f32 matrix of an expert
    const CHUNK: usize = 48; // straddles pieces

    const NAMES: [&str; 3] = ["gate", "up", "down"];

    fn stacked(layer: u32, m: usize) -> String {
        format!("blk.{layer}.ffn_{}_exps.weight", NAMES[m])
    }

    /// The GGUF-like model: per layer 1 and 2, three stacked f32 tensors of `N` experts.
    fn stacked_pieces(layer: u32, experts: &[u32]) -> Vec<ExpertPiece> {
        let mut out = Vec::new();
        for &e in experts {
            for m in 0..3 {
                let shape = if m == 2 { vec![H, I] } else { vec![I, H] };
                out.push(ExpertPiece {
                    layer,
                    expert: e,
                    kind: PieceKind::of(m, false).unwrap(),
                    tensor: stacked(layer, m),
                    offset: u64::from(e) * STRIDE,
                    length: STRIDE,
                    dtype: "F32".into(),
                    shape,
                });
            }
        }
        out
    }

    /// The HF-like model: layer 1, experts of their own, FP8 with block scales; inter 130 so
    /// that gate and up have a partial second block row and down a partial second block column.
    const FP8_H: u64 = 8;
    const FP8_I: u64 = 130;

    fn hf(layer: u32, e: u32, m: usize, scales: bool) -> String {
        format!(
            "model.layers.{layer}.mlp.experts.{e}.{}_proj.weight{}",
            NAMES[m],
            if scales { "_scale_inv" } else { "" }
        )
    }

    fn hf_pieces(layer: u32, experts: &[u32]) -> Vec<ExpertPiece> {
        let mut out = Vec::new();
        for &e in experts {
            for m in 0..3 {
                let (r, c) = if m == 2 {
                    (FP8_H, FP8_I)
                } else {
                    (FP8_I, FP8_H)
                };
                let grid = scale_grid(r as usize, c as usize).map(|d| d as u64);
                out.push(ExpertPiece {
                    layer,
                    expert: e,
                    kind: PieceKind::of(m, false).unwrap(),
                    tensor: hf(layer, e, m, false),
                    offset: 0,
                    length: r * c,
                    dtype: "F8_E4M3".into(),
                    shape: vec![r, c],
                });
                out.push(ExpertPiece {
                    layer,
                    expert: e,
                    kind: PieceKind::of(m, true).unwrap(),
                    tensor: hf(layer, e, m, true),
                    offset: 0,
                    length: grid[0] * grid[1] * 4,
                    dtype: "F32".into(),
                    shape: grid.to_vec(),
                });
            }
        }
        out
    }

    /// Every tensor of both models with bytes that differ per tensor and position (valid
    /// e4m3 values and positive scales for the FP8 ones).
    fn model() -> HashMap<String, Vec<u8>> {
        let mut m = HashMap::new();
        for l in [1u32, 2] {
            for k in 0..3 {
                let v: Vec<u8> = (0..N * STRIDE / 4)
                    .flat_map(|i| {
                        ((i as f32 + 100.0 * k as f32 + 1000.0 * l as f32) * 1e-3).to_le_bytes()
                    })
                    .collect();
                m.insert(stacked(l, k), v);
            }
        }
        for p in hf_pieces(1, &[0, 1, 2, 3]) {
            let seed = (p.expert * 7 + p.kind as u32) as u64;
            let v: Vec<u8> = if p.kind.is_scales() {
                (0..p.length / 4)
                    .flat_map(|i| (0.25 * (1 + (i + seed) % 5) as f32).to_le_bytes())
                    .collect()
            } else {
                (0..p.length)
                    .map(|i| ((i * 3 + seed) % 0x70) as u8)
                    .collect()
            };
            m.insert(p.tensor, v);
        }
        m
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

    fn assignment(layers: &[(u32, Vec<u32>)], pieces: Vec<ExpertPiece>) -> Assignment {
        Assignment {
            generation: 1,
            model_fingerprint: "fnv64:00000000000000aa".into(),
            experts: layers
                .iter()
                .map(|(l, es)| LayerExperts {
                    layer: *l,
                    experts: es.clone(),
                    n_experts: N as u32,
                })
                .collect(),
            pieces,
        }
    }

    /// Experts 0, 1, 3 of layer 1 and 2 of layer 2 of the stacked model.
    fn wants() -> Vec<ExpertWant> {
        let mut pieces = stacked_pieces(1, &[3, 0, 1]);
        pieces.extend(stacked_pieces(2, &[2]));
        plan(&assignment(&[(1, vec![3, 0, 1]), (2, vec![2])], pieces)).unwrap()
    }

    /// Experts 1 and 2 of layer 1 of the FP8 model.
    fn hf_wants() -> Vec<ExpertWant> {
        plan(&assignment(&[(1, vec![2, 1])], hf_pieces(1, &[1, 2]))).unwrap()
    }

    async fn fill_these(
        cache: &Cache,
        wants: &[ExpertWant],
        fake: &mut Fake,
    ) -> Result<(u64, u64)> {
        let mut last = (0, 0);
        cache
            .fill(wants, |r| fake.fetch(r), &mut |d, t| last = (d, t))
            .await
            .map(|()| last)
    }

    async fn fill(cache: &Cache, fake: &mut Fake) -> Result<(u64, u64)> {
        fill_these(cache, &wants(), fake).await
    }

    /// Every wanted piece is in its final file with the model's bytes and their hash, and no
    /// `.part` is left.
    fn check_complete(cache: &Cache, wants: &[ExpertWant]) {
        let model = model();
        for p in wants.iter().flat_map(ExpertWant::pieces) {
            let (full, part) = cache.files(p);
            let want = &model[&p.tensor][p.offset as usize..p.range().end as usize];
            let got = std::fs::read(&full).unwrap();
            assert_eq!(&got[..want.len()], want, "{}", full.display());
            assert_eq!(&got[want.len()..], Sha256::digest(want).as_slice());
            assert!(!part.exists());
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
        check_complete(&cache, &wants());

        let local = cache.load(&wants()).unwrap();
        let held: Vec<_> = local.held().collect();
        assert_eq!(held, vec![(1, 0), (1, 1), (1, 3), (2, 2)]);
        let mlp = local.layers[1].as_ref().unwrap().experts[3]
            .as_ref()
            .unwrap();
        assert_eq!((mlp.down.rows, mlp.down.cols), (H as usize, I as usize));
        let start = (3 * STRIDE) as usize;
        assert_eq!(
            &mlp.down.data[..],
            &model()[&stacked(1, 2)][start..start + STRIDE as usize]
        );

        // A restart: the same cache, nothing fetched.
        let cache = Cache::open(root.path(), "fnv64:00000000000000aa").unwrap();
        let mut again = Fake::new();
        assert_eq!(fill(&cache, &mut again).await.unwrap(), (WANTED, WANTED));
        assert!(again.calls.is_empty());
        assert_eq!(cache.load(&wants()).unwrap().held().count(), 4);
    }

    #[tokio::test]
    async fn hf_fp8_pieces_stream_with_their_scales_and_build_the_same_matrices() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000ee").unwrap();
        let mut fake = Fake::new();
        let wants = hf_wants();
        let local = cache
            .obtain(&wants, |r| fake.fetch(r), &mut |_, _| {})
            .await
            .unwrap();
        // One call per piece: each is a tensor of its own.
        assert_eq!(fake.calls.len(), 2 * 6);
        assert!(fake.calls.iter().all(|c| c.offset == 0));
        let total: u64 = wants
            .iter()
            .flat_map(ExpertWant::pieces)
            .map(|p| p.length)
            .sum();
        assert_eq!(fake.bytes, total);
        check_complete(&cache, &wants);
        assert_eq!(local.held().collect::<Vec<_>>(), vec![(1, 1), (1, 2)]);

        // Each matrix is what the engine builds from the model's own tensors.
        let model = model();
        let mlp = local.layers[1].as_ref().unwrap().experts[2]
            .as_ref()
            .unwrap();
        for (m, got) in [&mlp.gate, &mlp.up, &mlp.down].into_iter().enumerate() {
            let (r, c) = if m == 2 {
                (FP8_H, FP8_I)
            } else {
                (FP8_I, FP8_H)
            };
            let want = engine::model::weights::fp8_matrix(
                r as usize,
                c as usize,
                Bytes::from_vec(model[&hf(1, 2, m, false)].clone()),
                QuantType::F32,
                &model[&hf(1, 2, m, true)],
            )
            .unwrap();
            assert_eq!(got.to_f32().unwrap(), want.to_f32().unwrap(), "matrix {m}");
            assert!(got.block_scales.is_some());
        }

        // A restart fetches nothing.
        let mut again = Fake::new();
        cache
            .obtain(&wants, |r| again.fetch(r), &mut |_, _| {})
            .await
            .unwrap();
        assert!(again.calls.is_empty());
    }

    #[tokio::test]
    async fn a_corrupted_cache_piece_is_a_typed_error_then_fetched_again() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000ff").unwrap();
        let wants = hf_wants();
        cache
            .obtain(&wants, |r| Fake::new().fetch(r), &mut |_, _| {})
            .await
            .unwrap();
        // One byte of expert 2's up scales flips on disk: same length, wrong content.
        let bad = wants[1].matrices[1].scales.as_ref().unwrap().0.clone();
        let (full, _) = cache.files(&bad);
        let mut bytes = std::fs::read(&full).unwrap();
        bytes[2] ^= 0x10;
        std::fs::write(&full, &bytes).unwrap();

        match cache.load(&wants) {
            Err(CacheError::Corrupt(files)) => {
                assert_eq!(files.len(), 1);
                assert_eq!(files[0].0, full);
                assert!(files[0].1.contains("SHA-256"), "{}", files[0].1);
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a corrupted piece was used"),
        }
        assert!(!full.exists(), "the corrupted piece is deleted");

        // Corrupt it again: `obtain` fetches exactly that piece and builds every expert.
        std::fs::write(&full, &bytes).unwrap();
        let mut fake = Fake::new();
        let local = cache
            .obtain(&wants, |r| fake.fetch(r), &mut |_, _| {})
            .await
            .unwrap();
        assert_eq!(local.held().count(), 2);
        assert_eq!(fake.calls.len(), 1);
        assert_eq!(fake.calls[0].tensor, bad.tensor);
        assert_eq!(fake.bytes, bad.length);
        check_complete(&cache, &wants);

        // A truncated piece is seen before anything is built, and fetched again too.
        std::fs::write(&full, &bytes[..5]).unwrap();
        let mut fake = Fake::new();
        cache
            .obtain(&wants, |r| fake.fetch(r), &mut |_, _| {})
            .await
            .unwrap();
        assert_eq!(fake.bytes, bad.length);
        check_complete(&cache, &wants);
    }

    #[test]
    fn hf_pieces_are_planned_with_their_scales_and_checked() {
        let w = hf_wants();
        assert_eq!(
            w.iter().map(|w| (w.layer, w.expert)).collect::<Vec<_>>(),
            [(1, 1), (1, 2)]
        );
        for x in &w {
            assert_eq!(x.n_experts, N as u32);
            assert_eq!(x.pieces().count(), 6);
            let [g, u, d] = &x.matrices;
            assert_eq!((g.ty, g.rows, g.cols), (QuantType::F8E4M3, 130, 8));
            assert_eq!((u.rows, u.cols), (130, 8));
            assert_eq!((d.rows, d.cols), (8, 130));
            let (s, ty) = g.scales.as_ref().unwrap();
            assert_eq!(
                (s.kind, *ty, s.shape.as_slice()),
                (PieceKind::GateScales, QuantType::F32, &[2u64, 1][..])
            );
            assert_eq!(d.scales.as_ref().unwrap().0.shape, [1, 2]);
            assert_eq!(g.weights.tensor, hf(1, x.expert, 0, false));
        }

        // Bad descriptions are refused before anything is fetched, naming what is wrong.
        let refuse = |f: &dyn Fn(&mut Vec<ExpertPiece>)| {
            let mut pieces = hf_pieces(1, &[1]);
            f(&mut pieces);
            plan(&assignment(&[(1, vec![1])], pieces)).unwrap_err()
        };
        let kind_of = |e: PlanError| match e {
            PlanError::Missing { kind, .. } => (kind, String::from("missing")),
            PlanError::Bad { kind, what, .. } => (kind, what),
        };
        let (k, _) = kind_of(refuse(&|p| p.retain(|p| p.kind != PieceKind::UpScales)));
        assert_eq!(k, PieceKind::UpScales);
        let (k, _) = kind_of(refuse(&|p| p.retain(|p| p.kind != PieceKind::Down)));
        assert_eq!(k, PieceKind::Down);
        let (k, what) = kind_of(refuse(&|p| p[1].shape = vec![1, 1]));
        assert_eq!(k, PieceKind::GateScales);
        assert!(what.contains("bytes do not hold"), "{what}");
        let (k, what) = kind_of(refuse(&|p| {
            p[1].shape = vec![1, 2];
        }));
        assert_eq!(k, PieceKind::GateScales, "{what}");
        let (k, what) = kind_of(refuse(&|p| p[2].length += 1));
        assert_eq!(k, PieceKind::Up);
        assert!(what.contains("bytes do not hold"), "{what}");
        let (_, what) = kind_of(refuse(&|p| p[0].dtype = "IQ2_XXS".into()));
        assert!(what.contains("IQ2_XXS"), "{what}");
        let (_, what) = kind_of(refuse(&|p| p[0].dtype = "F9".into()));
        assert!(what.contains("F9"), "{what}");
        let (_, what) = kind_of(refuse(&|p| p[0].shape = vec![130 * 8]));
        assert!(what.contains("[rows, cols]"), "{what}");
        // Down with the shape of gate.
        let (k, what) = kind_of(refuse(&|p| {
            p[4].shape = vec![FP8_I, FP8_H];
            p[5].shape = vec![2, 1];
        }));
        assert_eq!(k, PieceKind::Down, "{what}");
        // Scales beside BF16 weights.
        let (k, what) = kind_of(refuse(&|p| {
            p[0].dtype = "BF16".into();
            p[0].length *= 2;
        }));
        assert_eq!(k, PieceKind::GateScales);
        assert!(what.contains("BF16"), "{what}");
    }

    #[tokio::test]
    async fn an_interrupted_download_resumes_where_it_stopped() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path(), "fnv64:00000000000000bb").unwrap();
        let mut fake = Fake::new();
        fake.fail_after = Some(4); // 192 bytes: expert 0 of the first tensor and part of 1
        let e = fill(&cache, &mut fake).await.unwrap_err();
        assert!(format!("{e:#}").contains("gone"), "{e:#}");
        let gate = |e: u32| stacked_pieces(1, &[e]).remove(0);
        let (full0, _) = cache.files(&gate(0));
        let (full1, part1) = cache.files(&gate(1));
        assert!(full0.exists() && !full1.exists());
        let have = std::fs::read(&part1).unwrap();
        assert_eq!(have.len() as u64, 4 * CHUNK as u64 - STRIDE);
        assert_eq!(
            have,
            model()[&stacked(1, 0)][STRIDE as usize..(STRIDE as usize + have.len())]
        );

        let mut rest = Fake::new();
        assert_eq!(fill(&cache, &mut rest).await.unwrap(), (WANTED, WANTED));
        assert_eq!(rest.calls[0].offset, 4 * CHUNK as u64, "resumed mid-expert");
        assert_eq!(rest.bytes, WANTED - 4 * CHUNK as u64);
        check_complete(&cache, &wants());
        // The resumed piece's hash covers the bytes from before the interruption too.
        assert_eq!(cache.load(&wants()).unwrap().held().count(), 4);
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
        let gate0 = stacked_pieces(1, &[0]).remove(0);
        let (full0, part0) = cache.files(&gate0);
        assert!(!full0.exists());
        assert_eq!(
            std::fs::read(&part0).unwrap(),
            model()[&stacked(1, 0)][..2 * CHUNK]
        );
        // Loading without the missing experts fails cleanly.
        assert!(matches!(cache.load(&wants()), Err(CacheError::Corrupt(_))));
        // A good stream then completes it.
        fill(&cache, &mut Fake::new()).await.unwrap();
        check_complete(&cache, &wants());
    }

    #[test]
    fn odd_fingerprints_cannot_escape_the_cache() {
        let root = tempfile::tempdir().unwrap();
        assert!(Cache::open(root.path(), "..").is_err());
        assert!(Cache::open(root.path(), "a/b").is_err());
        assert!(Cache::open(root.path(), ".hidden").is_err());
    }

    #[test]
    fn an_assignment_without_pieces_asks_for_a_model() {
        let e = plan(&assignment(&[(1, vec![0])], vec![])).unwrap_err();
        assert!(matches!(
            e,
            PlanError::Missing {
                kind: PieceKind::Gate,
                ..
            }
        ));
        assert!(e.to_string().contains("--model"), "{e}");
    }
}
