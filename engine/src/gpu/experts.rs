//! [`GpuExperts`]: routed experts resident on the device, evaluated for a batch of tokens with
//! per-token (expert, weight) lists.
//!
//! Every expert of a layer owns a region of `max_tokens` rows in the gathered input and in its
//! gate/up/down products, so an expert's product always starts at the same offsets: its prepared
//! calls (bind groups and parameter blocks) are built once per token count and reused. One
//! evaluation gathers the active rows (`gather`), runs gate and up for each active expert over
//! its `m` rows, `swiglu_rows`, down, and adds `w · y` into every token's output in expert
//! order (`scatter`, no atomics: deterministic).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ops::{Kernels, Op, Readback};
use super::{GpuBuffer, GpuContext, GpuError, GpuMatrix};
use crate::model::moe::{ExpertError, LocalExperts, MoeScratch, Pair, RoutedExperts, Routing};

const NONE: u32 = u32::MAX;

struct GpuMlp {
    gate: GpuMatrix,
    up: GpuMatrix,
    down: GpuMatrix,
}

type HostIo = Arc<(GpuBuffer, GpuBuffer, Readback)>;

struct State {
    k: Kernels,
    xg: GpuBuffer,
    g: GpuBuffer,
    u: GpuBuffer,
    y: GpuBuffer,
    idx: GpuBuffer,
    slots: GpuBuffer,
    wts: GpuBuffer,
    swiglu: Op,
    /// `(gather, scatter)` per `(x, out)` buffer pair.
    io: HashMap<(u64, u64), (Op, Op)>,
    /// Host entry points: input, output, readback.
    host: Option<HostIo>,
    lists: Vec<Vec<(u32, f32)>>,
}

/// Routed experts held on the device (see the module documentation).
pub struct GpuExperts {
    ctx: Arc<GpuContext>,
    hidden: usize,
    inter: usize,
    n_experts: usize,
    max_tokens: usize,
    layers: Vec<Option<Vec<Option<GpuMlp>>>>,
    state: Mutex<State>,
}

impl GpuExperts {
    /// Uploads every expert `experts` holds. Batches of up to `max_tokens` tokens are evaluated
    /// in one pass (larger ones in several); the regions take `n_experts x max_tokens` rows of
    /// the hidden and intermediate widths.
    pub fn upload(
        ctx: Arc<GpuContext>,
        experts: &LocalExperts,
        max_tokens: usize,
    ) -> Result<Self, GpuError> {
        let hidden = experts.hidden;
        let mut inter = 0;
        let mut n_experts = 0;
        let mut total = 0u64;
        for set in experts.layers.iter().flatten() {
            n_experts = n_experts.max(set.experts.len());
            for m in set.experts.iter().flatten() {
                inter = inter.max(m.gate.rows);
                total += (m.gate.data.len() + m.up.data.len() + m.down.data.len()) as u64;
            }
        }
        if n_experts == 0 || inter == 0 {
            return Err(GpuError::BadArgument("no routed experts to upload".into()));
        }
        let limit = ctx.page_limit() as usize;
        let per_token = n_experts * hidden.max(inter) * 4;
        let max_tokens = max_tokens.clamp(1, (limit / per_token).max(1));
        ctx.check_fits(total)?;
        let mut layers = Vec::with_capacity(experts.layers.len());
        for set in &experts.layers {
            layers.push(match set {
                None => None,
                Some(s) => Some(
                    s.experts
                        .iter()
                        .map(|e| {
                            e.as_ref()
                                .map(|m| {
                                    Ok::<_, GpuError>(GpuMlp {
                                        gate: GpuMatrix::upload(&ctx, &m.gate)?,
                                        up: GpuMatrix::upload(&ctx, &m.up)?,
                                        down: GpuMatrix::upload(&ctx, &m.down)?,
                                    })
                                })
                                .transpose()
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            });
        }
        let rows = n_experts * max_tokens;
        let k = Kernels::new(&ctx, crate::model::kv_cache::CacheType::F32)?;
        let xg = ctx.alloc_f32("experts x", rows * hidden)?;
        let g = ctx.alloc_f32("experts gate", rows * inter)?;
        let u = ctx.alloc_f32("experts up", rows * inter)?;
        let y = ctx.alloc_f32("experts y", rows * hidden)?;
        let idx = ctx.alloc_f32("experts rows", rows * 2)?;
        let slots = ctx.alloc_f32("experts slots", max_tokens * n_experts)?;
        let wts = ctx.alloc_f32("experts weights", max_tokens * n_experts)?;
        let swiglu = Op::new(&ctx, &k.swiglu_rows, &[(1, &idx), (4, &g), (5, &u)])?;
        Ok(GpuExperts {
            hidden,
            inter,
            n_experts,
            max_tokens,
            layers,
            state: Mutex::new(State {
                k,
                xg,
                g,
                u,
                y,
                idx,
                slots,
                wts,
                swiglu,
                io: HashMap::new(),
                host: None,
                lists: Vec::new(),
            }),
            ctx,
        })
    }

    /// The context the experts live in.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// Tokens one pass evaluates.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn check(&self, layer: usize, n: usize, pairs: &[Pair]) -> Result<(), ExpertError> {
        let set =
            self.layers
                .get(layer)
                .and_then(|l| l.as_ref())
                .ok_or(ExpertError::Unavailable {
                    layer,
                    detail: "not a MoE layer here".into(),
                })?;
        for p in pairs {
            if set.get(p.expert as usize).is_none_or(|e| e.is_none()) {
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
        }
        Ok(())
    }

    /// Records `out[t] += Σ w · E_e(x_t)` over `pairs` for the `n` tokens of `x` (`n x hidden`
    /// f32 from offset 0) into `enc`. Checks every pair first (nothing is recorded on error).
    /// At most one evaluation per submission (the tables are written before it), and `n` at
    /// most [`GpuExperts::max_tokens`].
    #[allow(clippy::too_many_arguments)]
    pub fn encode_pairs(
        &self,
        enc: &mut wgpu::CommandEncoder,
        layer: usize,
        x: &GpuBuffer,
        n: usize,
        pairs: &[Pair],
        out: &GpuBuffer,
    ) -> Result<(), ExpertError> {
        let gpu_err = |e: GpuError| ExpertError::Unavailable {
            layer,
            detail: e.to_string(),
        };
        if n > self.max_tokens {
            return Err(gpu_err(GpuError::BadArgument(format!(
                "{n} tokens in one expert pass of at most {}",
                self.max_tokens
            ))));
        }
        self.check(layer, n, pairs)?;
        let set = self.layers[layer].as_ref().expect("checked");
        let ctx = &*self.ctx;
        let (h, inter, mt) = (self.hidden, self.inter, self.max_tokens);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *st;
        // Per expert, its tokens in pair order; the region row of (expert, i) is e * mt + i.
        st.lists.resize_with(self.n_experts, Vec::new);
        for l in st.lists.iter_mut() {
            l.clear();
        }
        for p in pairs {
            st.lists[p.expert as usize].push((p.token, p.weight));
        }
        let mut idx = Vec::with_capacity(pairs.len() * 2);
        let mut per_token: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for (e, l) in st.lists.iter().enumerate() {
            for (i, &(t, w)) in l.iter().enumerate() {
                let row = (e * mt + i) as u32;
                idx.extend([row, t]);
                per_token[t as usize].push((row, w));
            }
        }
        if idx.is_empty() {
            return Ok(());
        }
        let slots = per_token.iter().map(Vec::len).max().unwrap_or(0);
        let mut sl = vec![NONE; n * slots];
        let mut wt = vec![0f32; n * slots];
        for (t, list) in per_token.iter().enumerate() {
            for (j, &(r, w)) in list.iter().enumerate() {
                sl[t * slots + j] = r;
                wt[t * slots + j] = w;
            }
        }
        let q = ctx.queue();
        q.write_buffer(st.idx.buffer(), 0, bytemuck::cast_slice(&idx));
        q.write_buffer(st.slots.buffer(), 0, bytemuck::cast_slice(&sl));
        q.write_buffer(st.wts.buffer(), 0, bytemuck::cast_slice(&wt));
        let key = (x.id(), out.id());
        if !st.io.contains_key(&key) {
            let gather = Op::new(ctx, &st.k.gather, &[(1, &st.idx), (2, x), (3, &st.xg)])
                .map_err(gpu_err)?;
            let scatter = Op::new(
                ctx,
                &st.k.scatter,
                &[(6, &st.slots), (7, &st.wts), (8, &st.y), (9, out)],
            )
            .map_err(gpu_err)?;
            st.io.insert(key, (gather, scatter));
        }
        let (gather, scatter) = &st.io[&key];
        let rows = (idx.len() / 2) as u32;
        gather.encode(
            ctx,
            enc,
            &[rows, h as u32, 0],
            ((h as u32).div_ceil(64), rows, 1),
        );
        for (e, l) in st.lists.iter().enumerate() {
            if l.is_empty() {
                continue;
            }
            let m = set[e].as_ref().expect("checked");
            let (xo, io) = (e * mt * h, e * mt * inter);
            m.gate
                .encode_matmul(ctx, enc, &st.xg, xo, l.len(), &st.g, io)
                .map_err(gpu_err)?;
            m.up.encode_matmul(ctx, enc, &st.xg, xo, l.len(), &st.u, io)
                .map_err(gpu_err)?;
        }
        st.swiglu.encode(
            ctx,
            enc,
            &[rows, inter as u32, 0],
            ((inter as u32).div_ceil(64), rows, 1),
        );
        for (e, l) in st.lists.iter().enumerate() {
            if l.is_empty() {
                continue;
            }
            let m = set[e].as_ref().expect("checked");
            m.down
                .encode_matmul(ctx, enc, &st.g, e * mt * inter, l.len(), &st.y, e * mt * h)
                .map_err(gpu_err)?;
        }
        scatter.encode(
            ctx,
            enc,
            &[n as u32, h as u32, slots as u32],
            ((h as u32).div_ceil(64), n as u32, 1),
        );
        Ok(())
    }

    /// Evaluates exactly the given pairs on the device for host vectors: `out[t] += w ·
    /// E_e(x_t)` (the entry point a GPU worker uses for its share of a layer). An expert not
    /// held here, or a token outside `xs`, is an error and nothing is added.
    pub fn eval_pairs(
        &self,
        layer: usize,
        xs: &[f32],
        pairs: &[Pair],
        out: &mut [f32],
    ) -> Result<(), ExpertError> {
        let h = self.hidden;
        let n = xs.len() / h.max(1);
        self.check(layer, n, pairs)?;
        let gpu_err = |e: GpuError| ExpertError::Unavailable {
            layer,
            detail: e.to_string(),
        };
        let ctx = &*self.ctx;
        let mut chunk_pairs = Vec::new();
        let mut result = Vec::new();
        for t0 in (0..n).step_by(self.max_tokens) {
            let m = self.max_tokens.min(n - t0);
            chunk_pairs.clear();
            chunk_pairs.extend(
                pairs
                    .iter()
                    .filter(|p| (t0..t0 + m).contains(&(p.token as usize)))
                    .map(|p| Pair {
                        token: p.token - t0 as u32,
                        ..*p
                    }),
            );
            if chunk_pairs.is_empty() {
                continue;
            }
            let io = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if st.host.is_none() {
                    let len = self.max_tokens * h;
                    st.host = Some(Arc::new((
                        ctx.alloc_f32("experts host x", len).map_err(gpu_err)?,
                        ctx.alloc_f32("experts host out", len).map_err(gpu_err)?,
                        Readback::new(ctx, len).map_err(gpu_err)?,
                    )));
                }
                st.host.clone().expect("created above")
            };
            let (xb, ob, rb) = (&io.0, &io.1, &io.2);
            ctx.write_f32(xb, 0, &xs[t0 * h..(t0 + m) * h])
                .map_err(gpu_err)?;
            ctx.write_f32(ob, 0, &vec![0f32; m * h]).map_err(gpu_err)?;
            let mut enc = ctx.encoder("experts");
            self.encode_pairs(&mut enc, layer, xb, m, &chunk_pairs, ob)?;
            result.clear();
            rb.read(ctx, enc, &[(ob, 0, m * h)], &mut result)
                .map_err(gpu_err)?;
            for (d, s) in out[t0 * h..(t0 + m) * h].iter_mut().zip(&result) {
                *d += s;
            }
        }
        Ok(())
    }
}

/// Routing to pairs: every (token, expert, weight) in token order, experts ascending.
pub(crate) fn routing_pairs(routing: &Routing, out: &mut Vec<Pair>) {
    out.clear();
    for t in 0..routing.n_tokens() {
        let (es, ws) = routing.token(t);
        for (&e, &w) in es.iter().zip(ws) {
            out.push(Pair {
                token: t as u32,
                expert: e,
                weight: w,
            });
        }
    }
}

impl RoutedExperts for GpuExperts {
    fn as_gpu(&self) -> Option<&GpuExperts> {
        Some(self)
    }

    fn eval(
        &self,
        layer: usize,
        xs: &[f32],
        routing: &Routing,
        out: &mut [f32],
        _scratch: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        let mut pairs = Vec::new();
        routing_pairs(routing, &mut pairs);
        self.eval_pairs(layer, xs, &pairs, out)
    }
}
