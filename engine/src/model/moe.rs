//! The MoE layer, cut where the cluster cuts it: the router (always with the dense part)
//! produces a [`Routing`] value; a [`RoutedExperts`] implementation turns hidden vectors plus
//! routing into the weighted sum of the chosen experts' outputs. [`LocalExperts`] evaluates
//! experts held in this process; a remote implementation sends the same inputs over a network.

use crate::config::{ModelConfig, Scoring};
use crate::cpu::pool::PARALLEL_VALUES;
use crate::model::ops;
use crate::model::weights::{fp8_matrix, ExpertMatrix, ExpertSet, Mlp, MoeWeights, RawMatrix};
use crate::quant::{QuantError, QuantType};
use crate::tensor::{ActBuf, GroupBuf, Matrix};

/// Per token, the chosen experts (ascending by id) and their final weights (normalised and
/// scaled by the routed scaling factor).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `n_tokens * top_k` expert ids.
    pub experts: Vec<u32>,
    /// `n_tokens * top_k` weights, aligned with `experts`.
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn n_tokens(&self) -> usize {
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Token `t`'s `(experts, weights)`.
    pub fn token(&self, t: usize) -> (&[u32], &[f32]) {
        let r = t * self.top_k..(t + 1) * self.top_k;
        (&self.experts[r.clone()], &self.weights[r])
    }

    fn reset(&mut self, top_k: usize) {
        self.top_k = top_k;
        self.experts.clear();
        self.weights.clear();
    }
}

/// Reusable buffers of the router.
#[derive(Default)]
pub struct RouterScratch {
    logits: Vec<f32>,
    scores: Vec<f32>,
    biased: Vec<f32>,
    group_score: Vec<f32>,
    /// Per group: kept by the group-limited selection.
    keep: Vec<bool>,
    order: Vec<u32>,
    act: ActBuf,
}

/// Routes `n` hidden vectors (`xs`, `n x hidden`, already normalised) exactly as DeepSeek-V3:
/// affinities `s = sigmoid(logits)`, selection on `s + bias` restricted to the best `topk_group`
/// groups (a group's score is the sum of its two best biased affinities; dropped groups are
/// `-inf`), weights from the unbiased `s`, normalised (if configured) and scaled.
pub fn route(
    cfg: &ModelConfig,
    w: &MoeWeights,
    xs: &[f32],
    n: usize,
    out: &mut Routing,
    s: &mut RouterScratch,
) {
    s.logits.resize(n * cfg.n_routed, 0.0);
    w.router.matmul(xs, n, &mut s.logits, &mut s.act);
    select(cfg, w, n, out, s);
}

/// The router's logits buffer, sized for `n` tokens: fill it with `router · x` and call
/// [`select`] (what [`route`] does, for callers that batch the product with others).
pub fn router_logits<'a>(cfg: &ModelConfig, n: usize, s: &'a mut RouterScratch) -> &'a mut [f32] {
    s.logits.resize(n * cfg.n_routed, 0.0);
    &mut s.logits
}

/// The selection part of [`route`], from the logits already in `s` (see [`router_logits`]).
pub fn select(
    cfg: &ModelConfig,
    w: &MoeWeights,
    n: usize,
    out: &mut Routing,
    s: &mut RouterScratch,
) {
    let logits = std::mem::take(&mut s.logits);
    route_logits(cfg, w.bias.as_deref(), &logits, n, out, s);
    s.logits = logits;
}

/// The selection half of [`route`], from router logits computed elsewhere (`n x n_routed`,
/// e.g. on the GPU): the same scores, group limit, top-k and weights.
pub fn route_logits(
    cfg: &ModelConfig,
    bias: Option<&[f32]>,
    all_logits: &[f32],
    n: usize,
    out: &mut Routing,
    s: &mut RouterScratch,
) {
    let ne = cfg.n_routed;
    let k = cfg.top_k;
    out.reset(k);
    let per_group = ne / cfg.n_group;
    for t in 0..n {
        let logits = &all_logits[t * ne..(t + 1) * ne];
        s.scores.clear();
        match cfg.scoring {
            Scoring::Sigmoid => s.scores.extend(logits.iter().map(|&v| ops::sigmoid(v))),
            Scoring::Softmax => {
                s.scores.extend_from_slice(logits);
                ops::softmax(&mut s.scores);
            }
        }
        s.biased.clear();
        s.biased.extend_from_slice(&s.scores);
        if let Some(b) = bias {
            for (v, bv) in s.biased.iter_mut().zip(b) {
                *v += bv;
            }
        }
        if cfg.topk_group < cfg.n_group {
            s.group_score.clear();
            for g in s.biased.chunks_exact(per_group) {
                let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                for &v in g {
                    if v > a {
                        b = a;
                        a = v;
                    } else if v > b {
                        b = v;
                    }
                }
                s.group_score.push(if per_group >= 2 { a + b } else { a });
            }
            top_indices(&s.group_score, cfg.topk_group, &mut s.order);
            s.keep.clear();
            s.keep.resize(cfg.n_group, false);
            for &g in &s.order {
                s.keep[g as usize] = true;
            }
            for (g, chunk) in s.biased.chunks_exact_mut(per_group).enumerate() {
                if !s.keep[g] {
                    chunk.fill(f32::NEG_INFINITY);
                }
            }
        }
        top_indices(&s.biased, k, &mut s.order);
        s.order.sort_unstable();
        let sum: f32 = s.order.iter().map(|&e| s.scores[e as usize]).sum();
        let norm = if cfg.norm_topk {
            1.0 / (sum + 1e-20)
        } else {
            1.0
        };
        for &e in &s.order {
            out.experts.push(e);
            out.weights
                .push(s.scores[e as usize] * norm * cfg.routed_scale);
        }
    }
}

/// Indices of the `k` largest values (ties: lower index first; NaN never chosen), largest
/// first. One pass, keeping the best `k` so far in order (`k` is small: 8 of 256 experts).
fn top_indices(v: &[f32], k: usize, out: &mut Vec<u32>) {
    out.clear();
    if k == 0 {
        return;
    }
    for (i, &x) in v.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if out.len() == k {
            // A tie with the last kept value keeps the earlier index.
            if x <= v[out[k - 1] as usize] {
                continue;
            }
            out.pop();
        }
        let at = out
            .iter()
            .position(|&j| v[j as usize] < x)
            .unwrap_or(out.len());
        out.insert(at, i as u32);
    }
}

/// A failure of the routed-expert part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpertError {
    #[error("layer {layer}: expert {expert} is not held here")]
    NotHeld { layer: usize, expert: u32 },
    #[error("layer {layer}: experts unavailable: {detail}")]
    Unavailable { layer: usize, detail: String },
}

/// Reusable buffers of an expert evaluation.
#[derive(Default)]
pub struct MoeScratch {
    pairs: Vec<Pair>,
    lists: Vec<Vec<(u32, f32)>>,
    /// Experts with tokens, in id order, and their token counts.
    active: Vec<(u32, usize)>,
    /// The token and weight of each gathered row of `x` (and of `y`).
    rows: Vec<(u32, f32)>,
    /// Each token's rows of `y` with their weights, in gather order (expert by expert): token
    /// `t`'s are `contrib[starts[t]..starts[t + 1]]`.
    starts: Vec<usize>,
    contrib: Vec<(u32, f32)>,
    x: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    y: Vec<f32>,
    group: GroupBuf,
}

/// The routed-expert part of the MoE layers: `out[t] += Σ_j w_tj · Expert_{e_tj}(x_t)`.
///
/// The forward pass calls [`RoutedExperts::begin`], then computes the shared expert, then calls
/// [`RoutedExperts::eval`]: an implementation whose experts live elsewhere sends the work in
/// `begin` and collects the answers in `eval`, so the shared expert is computed while the
/// workers compute theirs. `eval` must also work without a `begin` before it.
pub trait RoutedExperts: Send + Sync {
    /// Starts evaluating layer `layer` for `xs` (`n x hidden`) without waiting for the result.
    /// The default does nothing (the work happens in `eval`).
    fn begin(&self, _layer: usize, _xs: &[f32], _routing: &Routing) -> Result<(), ExpertError> {
        Ok(())
    }

    /// The GPU-resident expert set behind this implementation, if it is one: the wgpu
    /// backend then evaluates the experts on the device without a round trip through the host.
    fn as_gpu(&self) -> Option<&crate::gpu::GpuExperts> {
        None
    }

    /// Evaluates the routed experts of MoE layer `layer` for `xs` (`n x hidden`), adding the
    /// weighted outputs into `out` (`n x hidden`).
    fn eval(
        &self,
        layer: usize,
        xs: &[f32],
        routing: &Routing,
        out: &mut [f32],
        scratch: &mut MoeScratch,
    ) -> Result<(), ExpertError>;
}

/// One (token, expert, weight) triple of a layer's work: token `t` of the batch needs expert
/// `expert` with routing weight `weight`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// Experts held in this process, evaluated on the CPU backend.
pub struct LocalExperts {
    pub hidden: usize,
    /// Per layer (`None` for dense layers).
    pub layers: Vec<Option<ExpertSet>>,
}

/// Why an expert could not be built from raw matrices.
#[derive(Debug, thiserror::Error)]
pub enum ExpertBuildError {
    #[error(
        "layer {layer}, expert {expert}: {matrix} is {rows}x{cols}, expected {want_rows}x{want_cols}"
    )]
    Shape {
        layer: usize,
        expert: usize,
        matrix: ExpertMatrix,
        rows: usize,
        cols: usize,
        want_rows: usize,
        want_cols: usize,
    },
    #[error("layer {layer}, expert {expert}: {matrix}: {err}")]
    Quant {
        layer: usize,
        expert: usize,
        matrix: ExpertMatrix,
        err: QuantError,
    },
    #[error("layer {layer}, expert {expert}: {matrix}: {what}")]
    Scales {
        layer: usize,
        expert: usize,
        matrix: ExpertMatrix,
        what: &'static str,
    },
    #[error("layer {layer}: expert {expert} is not below the layer's {n_experts} experts")]
    OutOfRange {
        layer: usize,
        expert: usize,
        n_experts: usize,
    },
    #[error("layer {layer}: {n_experts} experts given, the layer already has {have}")]
    Count {
        layer: usize,
        n_experts: usize,
        have: usize,
    },
}

impl LocalExperts {
    /// Holds no experts yet; [`LocalExperts::insert`] adds them.
    pub fn new(hidden: usize) -> Self {
        LocalExperts {
            hidden,
            layers: Vec::new(),
        }
    }

    /// Adds expert `expert` of `layer` (a layer of `n_experts` routed experts) from its
    /// matrices as stored: `gate` and `up` must be `[inter, hidden]`, `down` `[hidden, inter]`,
    /// with `inter` taken from `gate`, and each one's bytes must match its type and shape (FP8
    /// weights with their block scales, see [`RawMatrix::scales`]).
    pub fn insert(
        &mut self,
        layer: usize,
        n_experts: usize,
        expert: usize,
        [gate, up, down]: [RawMatrix; 3],
    ) -> Result<(), ExpertBuildError> {
        if expert >= n_experts {
            return Err(ExpertBuildError::OutOfRange {
                layer,
                expert,
                n_experts,
            });
        }
        if let Some(Some(set)) = self.layers.get(layer) {
            if set.experts.len() != n_experts {
                return Err(ExpertBuildError::Count {
                    layer,
                    n_experts,
                    have: set.experts.len(),
                });
            }
        }
        let (h, inter) = (self.hidden, gate.rows);
        let build = |m: RawMatrix, which: ExpertMatrix, rows: usize, cols: usize| {
            if (m.rows, m.cols) != (rows, cols) {
                return Err(ExpertBuildError::Shape {
                    layer,
                    expert,
                    matrix: which,
                    rows: m.rows,
                    cols: m.cols,
                    want_rows: rows,
                    want_cols: cols,
                });
            }
            let quant = |err| ExpertBuildError::Quant {
                layer,
                expert,
                matrix: which,
                err,
            };
            let scales = |what: &'static str| ExpertBuildError::Scales {
                layer,
                expert,
                matrix: which,
                what,
            };
            match (m.ty, m.scales) {
                (QuantType::F8E4M3, Some((ty, s))) => {
                    fp8_matrix(m.rows, m.cols, m.data, ty, &s).map_err(quant)
                }
                (QuantType::F8E4M3, None) => Err(scales("FP8 weights without their block scales")),
                (_, Some(_)) => Err(scales("block scales given for weights that are not FP8")),
                (ty, None) => Matrix::new(ty, m.rows, m.cols, m.data).map_err(quant),
            }
        };
        let mlp = Mlp {
            gate: build(gate, ExpertMatrix::Gate, inter, h)?,
            up: build(up, ExpertMatrix::Up, inter, h)?,
            down: build(down, ExpertMatrix::Down, h, inter)?,
        };
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let set = self.layers[layer].get_or_insert_with(|| ExpertSet {
            experts: (0..n_experts).map(|_| None).collect(),
        });
        set.experts[expert] = Some(mlp);
        Ok(())
    }

    /// Evaluates, for every token, only the chosen experts that are held here and skips the
    /// rest.
    pub fn eval_held(
        &self,
        layer: usize,
        xs: &[f32],
        routing: &Routing,
        out: &mut [f32],
        s: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        let set = self.set(layer)?;
        let mut pairs = std::mem::take(&mut s.pairs);
        pairs.clear();
        for t in 0..routing.n_tokens() {
            let (es, ws) = routing.token(t);
            for (&e, &w) in es.iter().zip(ws) {
                if set.experts.get(e as usize).is_some_and(|x| x.is_some()) {
                    pairs.push(Pair {
                        token: t as u32,
                        expert: e,
                        weight: w,
                    });
                }
            }
        }
        let r = self.eval_pairs(layer, xs, &pairs, out, s);
        s.pairs = pairs;
        r
    }

    /// Evaluates exactly the given (token, expert, weight) pairs: `out[t] += w · E_e(x_t)`.
    /// The entry point a worker uses for its share of a layer; an expert that is not held
    /// here, or a token outside `xs`, is an error and nothing is added.
    pub fn eval_pairs(
        &self,
        layer: usize,
        xs: &[f32],
        pairs: &[Pair],
        out: &mut [f32],
        s: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        let set = self.set(layer)?;
        let h = self.hidden;
        let n = xs.len() / h.max(1);
        if s.lists.len() < set.experts.len() {
            s.lists.resize_with(set.experts.len(), Vec::new);
        }
        for l in s.lists.iter_mut() {
            l.clear();
        }
        for p in pairs {
            let held = set
                .experts
                .get(p.expert as usize)
                .is_some_and(|x| x.is_some());
            if !held {
                return Err(ExpertError::NotHeld {
                    layer,
                    expert: p.expert,
                });
            }
            if p.token as usize >= n {
                return Err(ExpertError::Unavailable {
                    layer,
                    detail: format!("token {} of a batch of {n}", p.token),
                });
            }
            s.lists[p.expert as usize].push((p.token, p.weight));
        }
        // Every chosen expert's tokens, gathered expert by expert.
        s.active.clear();
        s.rows.clear();
        let (mut inter_total, mut rows_total) = (0, 0);
        for (e, expert) in set.experts.iter().enumerate() {
            let Some(mlp) = expert else { continue };
            let m = s.lists[e].len();
            if m == 0 {
                continue;
            }
            s.active.push((e as u32, m));
            s.rows.extend_from_slice(&s.lists[e]);
            inter_total += m * mlp.gate.rows;
            rows_total += m;
        }
        if s.x.len() < rows_total * h {
            s.x.resize(rows_total * h, 0.0);
        }
        gather_rows(xs, h, &s.rows, &mut s.x[..rows_total * h]);
        s.gate.resize(inter_total, 0.0);
        s.up.resize(inter_total, 0.0);
        s.y.resize(rows_total * h, 0.0);
        let mlp_of = |e: u32| {
            set.experts[e as usize]
                .as_ref()
                .expect("active experts are held")
        };
        // All gate and up products in one dispatch, then all down products in another.
        {
            let mut g = s.group.group();
            let (mut gr, mut ur) = (&mut s.gate[..], &mut s.up[..]);
            let mut x0 = 0;
            for &(e, m) in &s.active {
                let mlp = mlp_of(e);
                let len = m * mlp.gate.rows;
                let (gs, rest) = std::mem::take(&mut gr).split_at_mut(len);
                gr = rest;
                let (us, rest) = std::mem::take(&mut ur).split_at_mut(len);
                ur = rest;
                let x = &s.x[x0..x0 + m * h];
                x0 += m * h;
                g.push(&mlp.gate, x, m, gs);
                g.push(&mlp.up, x, m, us);
            }
            g.run();
        }
        ops::swiglu_par(&mut s.gate, &s.up);
        {
            let mut g = s.group.group();
            let mut yr = &mut s.y[..];
            let mut i0 = 0;
            for &(e, m) in &s.active {
                let mlp = mlp_of(e);
                let len = m * mlp.gate.rows;
                let (ys, rest) = std::mem::take(&mut yr).split_at_mut(m * h);
                yr = rest;
                g.push(&mlp.down, &s.gate[i0..i0 + len], m, ys);
                i0 += len;
            }
            g.run();
        }
        // Each token's rows of `y` (a counting sort of the rows by token, stable, so in expert
        // order as before), added into its row of `out`. After the prefix sums `starts[t]` is
        // token `t`'s start and `starts[t + 1]` its end; filling moves each start to its end.
        s.starts.clear();
        s.starts.resize(n + 1, 0);
        for &(t, _) in &s.rows {
            s.starts[t as usize + 1] += 1;
        }
        for t in 0..n {
            s.starts[t + 1] += s.starts[t];
        }
        s.contrib.resize(rows_total, (0, 0.0));
        for (r, &(t, w)) in s.rows.iter().enumerate() {
            let at = &mut s.starts[t as usize];
            s.contrib[*at] = (r as u32, w);
            *at += 1;
        }
        // Each `starts[t]` now holds its token's end, the next one's start: shift them back.
        s.starts.copy_within(0..n, 1);
        s.starts[0] = 0;
        scatter_rows(&s.y, h, &s.starts, &s.contrib, &mut out[..n * h]);
        Ok(())
    }

    fn set(&self, layer: usize) -> Result<&ExpertSet, ExpertError> {
        self.layers
            .get(layer)
            .and_then(|l| l.as_ref())
            .ok_or(ExpertError::Unavailable {
                layer,
                detail: "not a MoE layer here".into(),
            })
    }

    /// The `(layer, expert)` pairs held here.
    pub fn held(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.layers.iter().enumerate().flat_map(|(l, set)| {
            set.iter().flat_map(move |s| {
                s.experts
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_some())
                    .map(move |(e, _)| (l, e))
            })
        })
    }
}

impl RoutedExperts for LocalExperts {
    fn eval(
        &self,
        layer: usize,
        xs: &[f32],
        routing: &Routing,
        out: &mut [f32],
        s: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        if let Some(Some(set)) = self.layers.get(layer) {
            if let Some(&e) = routing
                .experts
                .iter()
                .find(|&&e| set.experts.get(e as usize).is_none_or(|x| x.is_none()))
            {
                return Err(ExpertError::NotHeld { layer, expert: e });
            }
        }
        self.eval_held(layer, xs, routing, out, s)
    }
}

/// SwiGLU block for `m` rows: `y = down(silu(gate x) * up x)`, buffers resized as needed
/// (gate and up in one dispatch).
pub fn mlp_forward(
    mlp: &Mlp,
    x: &[f32],
    m: usize,
    gate: &mut Vec<f32>,
    up: &mut Vec<f32>,
    y: &mut Vec<f32>,
    g: &mut GroupBuf,
) {
    let inter = mlp.gate.rows;
    gate.resize(m * inter, 0.0);
    up.resize(m * inter, 0.0);
    let mut grp = g.group();
    grp.push(&mlp.gate, x, m, gate);
    grp.push(&mlp.up, x, m, up);
    grp.run();
    mlp_down(mlp, gate, up, m, y, g);
}

/// Rows (tokens) per task when gathering or scattering rows over the kernels' pool.
const ROWS_PER_TASK: usize = 16;

/// `dst` row `i` = row `rows[i].0` of `xs` (`h` wide), spread over the kernels' pool when large.
fn gather_rows(xs: &[f32], h: usize, rows: &[(u32, f32)], dst: &mut [f32]) {
    if h == 0 {
        return;
    }
    let copy = |i0: usize, d: &mut [f32]| {
        for (d, &(t, _)) in d.chunks_exact_mut(h).zip(&rows[i0..]) {
            d.copy_from_slice(&xs[t as usize * h..(t as usize + 1) * h]);
        }
    };
    if dst.len() < PARALLEL_VALUES {
        return copy(0, dst);
    }
    crate::cpu::pool::global()
        .for_each_chunk_mut(dst, ROWS_PER_TASK * h, |i, d| copy(i * ROWS_PER_TASK, d));
}

/// `out` row `t` += `w · y[r]` for each `(r, w)` of `contrib[starts[t]..starts[t + 1]]`, in
/// that order (the same sums whether or not spread over the kernels' pool).
fn scatter_rows(y: &[f32], h: usize, starts: &[usize], contrib: &[(u32, f32)], out: &mut [f32]) {
    if h == 0 {
        return;
    }
    let add = |t0: usize, o: &mut [f32]| {
        for (t, o) in (t0..).zip(o.chunks_exact_mut(h)) {
            for &(r, w) in &contrib[starts[t]..starts[t + 1]] {
                ops::axpy(o, w, &y[r as usize * h..(r as usize + 1) * h]);
            }
        }
    };
    if contrib.len() * h < PARALLEL_VALUES {
        return add(0, out);
    }
    crate::cpu::pool::global()
        .for_each_chunk_mut(out, ROWS_PER_TASK * h, |i, o| add(i * ROWS_PER_TASK, o));
}

/// The second half of [`mlp_forward`], once `gate` and `up` hold their products:
/// `y = down(silu(gate) * up)` (`gate` is overwritten).
pub fn mlp_down(
    mlp: &Mlp,
    gate: &mut [f32],
    up: &[f32],
    m: usize,
    y: &mut Vec<f32>,
    g: &mut GroupBuf,
) {
    ops::swiglu_par(gate, up);
    y.resize(m * mlp.down.rows, 0.0);
    let mut grp = g.group();
    grp.push(&mlp.down, gate, m, y);
    grp.run();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch large enough that its gather, SwiGLU and scatter run on the pool gives every
    /// token exactly what that token gets alone (where they run on the caller).
    #[test]
    fn a_large_batch_adds_the_same_bits_as_tokens_alone() {
        use crate::bench::splitmix;
        let (h, inter, n_exp, n, k) = (256, 64, 8, 200, 3);
        let m = |rows: usize, cols: usize, seed: u64| {
            let data: Vec<u8> = (0..rows * cols)
                .flat_map(|i| {
                    let v = ((splitmix(seed ^ ((i as u64) << 8)) >> 40) as f32
                        / (1u64 << 24) as f32
                        - 0.5)
                        * 0.2;
                    half::bf16::from_f32(v).to_bits().to_le_bytes()
                })
                .collect();
            Matrix::new(QuantType::BF16, rows, cols, crate::Bytes::from_vec(data)).unwrap()
        };
        let experts = (0..n_exp)
            .map(|e| {
                Some(Mlp {
                    gate: m(inter, h, 3 * e as u64 + 1),
                    up: m(inter, h, 3 * e as u64 + 2),
                    down: m(h, inter, 3 * e as u64 + 3),
                })
            })
            .collect();
        let x = LocalExperts {
            hidden: h,
            layers: vec![None, Some(ExpertSet { experts })],
        };
        let xs: Vec<f32> = (0..n * h)
            .map(|i| ((splitmix(i as u64 + 99) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0)
            .collect();
        // Token t takes experts t, t + 3, t + 5 (mod 8), weights varying by token.
        let pairs: Vec<Pair> = (0..n)
            .flat_map(|t| {
                (0..k).map(move |j| Pair {
                    token: t as u32,
                    expert: ((t + [0, 3, 5][j]) % n_exp) as u32,
                    weight: 0.1 + 0.05 * j as f32 + 0.001 * t as f32,
                })
            })
            .collect();
        assert!(n * k * h >= PARALLEL_VALUES && n * k * inter >= PARALLEL_VALUES);
        let start = |t: usize| {
            (0..h)
                .map(|i| (t * h + i) as f32 * 1e-4)
                .collect::<Vec<f32>>()
        };
        let mut batch: Vec<f32> = (0..n).flat_map(start).collect();
        let mut s = MoeScratch::default();
        x.eval_pairs(1, &xs, &pairs, &mut batch, &mut s).unwrap();
        for t in 0..n {
            let mut alone = start(t);
            let mine: Vec<Pair> = pairs
                .iter()
                .filter(|p| p.token == t as u32)
                .map(|p| Pair { token: 0, ..*p })
                .collect();
            x.eval_pairs(1, &xs[t * h..(t + 1) * h], &mine, &mut alone, &mut s)
                .unwrap();
            let got = &batch[t * h..(t + 1) * h];
            assert!(
                got.iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "token {t}"
            );
            assert!(
                got.iter().zip(start(t)).any(|(a, b)| a != &b),
                "token {t} unchanged"
            );
        }
    }

    #[test]
    fn top_indices_prefers_lower_index_on_ties() {
        let mut o = Vec::new();
        top_indices(&[1.0, 3.0, 3.0, f32::NEG_INFINITY, 2.0], 3, &mut o);
        assert_eq!(o, vec![1, 2, 4]);
        top_indices(&[f32::NEG_INFINITY, 0.5], 2, &mut o);
        assert_eq!(o, vec![1, 0]);
        top_indices(&[f32::NAN, 0.5, f32::NAN], 3, &mut o);
        assert_eq!(o, vec![1]);
        top_indices(&[0.5, 0.7], 0, &mut o);
        assert!(o.is_empty());
    }

    /// Against a full sort by (value descending, index ascending), NaN left out: many
    /// vectors with few distinct values (ties), infinities and NaN, every k.
    #[test]
    fn top_indices_matches_a_full_sort() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut o = Vec::new();
        for case in 0..400 {
            let n = 1 + (next() % 40) as usize;
            let v: Vec<f32> = (0..n)
                .map(|_| match next() % 10 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    r => {
                        (r % 4) as f32 * 0.25
                            + if case % 2 == 0 {
                                (next() % 100) as f32
                            } else {
                                0.0
                            }
                    }
                })
                .collect();
            let mut want: Vec<u32> = (0..n as u32).filter(|&i| !v[i as usize].is_nan()).collect();
            want.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
            for k in 0..=n + 1 {
                top_indices(&v, k, &mut o);
                assert_eq!(o, want[..k.min(want.len())], "{v:?}, k = {k}");
            }
        }
    }

    fn raw(rows: usize, cols: usize) -> RawMatrix {
        RawMatrix {
            ty: QuantType::F32,
            rows,
            cols,
            data: crate::Bytes::from_vec(vec![0; rows * cols * 4]),
            scales: None,
        }
    }

    #[test]
    fn insert_checks_shapes_and_ranges() {
        let mut x = LocalExperts::new(8);
        x.insert(3, 4, 2, [raw(6, 8), raw(6, 8), raw(8, 6)])
            .unwrap();
        assert_eq!(x.held().collect::<Vec<_>>(), vec![(3, 2)]);
        assert!(x.layers[..3].iter().all(Option::is_none));
        let e = x
            .insert(3, 4, 1, [raw(6, 8), raw(6, 8), raw(6, 8)])
            .unwrap_err();
        assert!(
            matches!(
                e,
                ExpertBuildError::Shape {
                    matrix: ExpertMatrix::Down,
                    ..
                }
            ),
            "{e}"
        );
        let e = x
            .insert(3, 4, 4, [raw(6, 8), raw(6, 8), raw(8, 6)])
            .unwrap_err();
        assert!(matches!(e, ExpertBuildError::OutOfRange { .. }), "{e}");
        let e = x
            .insert(3, 5, 0, [raw(6, 8), raw(6, 8), raw(8, 6)])
            .unwrap_err();
        assert!(matches!(e, ExpertBuildError::Count { .. }), "{e}");
        let mut short = raw(6, 8);
        short.data = crate::Bytes::from_vec(vec![0; 10]);
        let e = x
            .insert(3, 4, 0, [short, raw(6, 8), raw(8, 6)])
            .unwrap_err();
        assert!(
            matches!(
                e,
                ExpertBuildError::Quant {
                    matrix: ExpertMatrix::Gate,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(x.held().count(), 1);
    }

    #[test]
    fn insert_builds_fp8_experts_with_partial_edge_blocks() {
        // inter 130: the gate and up grids are 2x1 (the second block row has 2 rows), the
        // down grid 1x2.
        let (h, inter) = (8, 130);
        let fp8 = |rows: usize, cols: usize, scale: f32| {
            let [gr, gc] = crate::model::weights::scale_grid(rows, cols);
            let s: Vec<u8> = (0..gr * gc)
                .flat_map(|i| (scale * (i + 1) as f32).to_le_bytes())
                .collect();
            RawMatrix {
                ty: QuantType::F8E4M3,
                rows,
                cols,
                data: crate::Bytes::from_vec(vec![0x38; rows * cols]), // e4m3 1.0
                scales: Some((QuantType::F32, crate::Bytes::from_vec(s))),
            }
        };
        let mut x = LocalExperts::new(h);
        x.insert(
            1,
            2,
            0,
            [fp8(inter, h, 0.5), fp8(inter, h, 1.0), fp8(h, inter, 2.0)],
        )
        .unwrap();
        let mlp = x.layers[1].as_ref().unwrap().experts[0].as_ref().unwrap();
        let gate = mlp.gate.to_f32().unwrap();
        assert_eq!(
            (gate[0], gate[127 * h], gate[128 * h], gate[129 * h]),
            (0.5, 0.5, 1.0, 1.0)
        );
        let down = mlp.down.to_f32().unwrap();
        assert_eq!((down[127], down[128], down[129]), (2.0, 4.0, 4.0));

        let mut bare = fp8(inter, h, 1.0);
        bare.scales = None;
        let e = x
            .insert(1, 2, 1, [bare, fp8(inter, h, 1.0), fp8(h, inter, 1.0)])
            .unwrap_err();
        assert!(
            matches!(
                e,
                ExpertBuildError::Scales {
                    matrix: ExpertMatrix::Gate,
                    ..
                }
            ),
            "{e}"
        );
        let mut f32_with_scales = raw(h, inter);
        f32_with_scales.scales = fp8(h, inter, 1.0).scales;
        let e = x
            .insert(
                1,
                2,
                1,
                [fp8(inter, h, 1.0), fp8(inter, h, 1.0), f32_with_scales],
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                ExpertBuildError::Scales {
                    matrix: ExpertMatrix::Down,
                    ..
                }
            ),
            "{e}"
        );
        let mut short = fp8(inter, h, 1.0);
        short.scales = Some((QuantType::F32, crate::Bytes::from_vec(vec![0; 4])));
        let e = x
            .insert(1, 2, 1, [fp8(inter, h, 1.0), short, fp8(h, inter, 1.0)])
            .unwrap_err();
        assert!(
            matches!(
                e,
                ExpertBuildError::Quant {
                    matrix: ExpertMatrix::Up,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(x.held().count(), 1);
    }
}
