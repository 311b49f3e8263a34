//! The worker's expert computation: small batches on the data plane's own thread, large ones
//! on the blocking pool (see [`INLINE_TOKENS`]).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use engine::gpu::GpuExperts;
use engine::model::moe::{ExpertError, LocalExperts, MoeScratch, Pair};
use proto::wire::{code, ErrorFrame, ExpertRequest, ExpertResult};

/// Where the experts are computed.
pub enum Compute {
    /// The CPU backend, over host (memory-mapped) weights.
    Cpu(Arc<LocalExperts>),
    /// The wgpu backend: weights resident on the device. `held` lists what was uploaded.
    Gpu {
        experts: Arc<GpuExperts>,
        held: BTreeSet<(u32, u32)>,
        hidden: usize,
    },
}

impl Compute {
    fn hidden(&self) -> usize {
        match self {
            Compute::Cpu(e) => e.hidden,
            Compute::Gpu { hidden, .. } => *hidden,
        }
    }

    fn eval_pairs(
        &self,
        layer: usize,
        xs: &[f32],
        pairs: &[Pair],
        out: &mut [f32],
        scratch: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        match self {
            Compute::Cpu(e) => e.eval_pairs(layer, xs, pairs, out, scratch),
            Compute::Gpu { experts, .. } => experts.eval_pairs(layer, xs, pairs, out),
        }
    }
}

/// Requests of at most this many tokens (decode steps) are computed on the thread that asks.
/// A layer's round trip is a chain of wake-ups, and handing a request to another thread and
/// back cost two of them (a futex wake each way, on a busy machine a context switch each):
/// the loopback cluster's round trip less compute fell from 247-271 us to 181-183 us. The
/// data plane has little to do meanwhile (its other requests would wait for this compute
/// anyway; the control plane runs apart), but it must keep its connection alive, so larger
/// batches (a prefill's, seconds on a slow box) go to a thread of the blocking pool.
pub const INLINE_TOKENS: usize = 16;

/// A handle to the experts. Cloning is cheap.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    experts: Compute,
    held: BTreeSet<(u32, u32)>,
    scratch: Mutex<(MoeScratch, Vec<Pair>)>,
}

impl Executor {
    /// An executor over `experts` on the CPU backend.
    pub fn start(experts: Arc<LocalExperts>) -> Executor {
        Executor::start_with(Compute::Cpu(experts))
    }

    /// An executor over `experts` on either backend.
    pub fn start_with(experts: Compute) -> Executor {
        let held = match &experts {
            Compute::Cpu(e) => e.held().map(|(l, e)| (l as u32, e as u32)).collect(),
            Compute::Gpu { held, .. } => held.clone(),
        };
        Executor {
            inner: Arc::new(Inner {
                experts,
                held,
                scratch: Mutex::new((MoeScratch::default(), Vec::new())),
            }),
        }
    }

    /// The `(layer, expert)` pairs this executor computes.
    pub fn held(&self) -> &BTreeSet<(u32, u32)> {
        &self.inner.held
    }

    /// Evaluates a request's experts for its tokens: one partial sum per token.
    pub async fn eval(&self, req: ExpertRequest) -> Result<ExpertResult, ErrorFrame> {
        if req.n_tokens() <= INLINE_TOKENS {
            // Not while another request computes (a large one, on the blocking pool): this
            // thread would wait for it without serving the connection.
            if let Ok(mut guard) = self.inner.scratch.try_lock() {
                return self.eval_with(&req, &mut guard);
            }
        }
        let this = self.clone();
        let id = req.request_id;
        tokio::task::spawn_blocking(move || {
            let mut guard = this.inner.scratch.lock().unwrap_or_else(|e| e.into_inner());
            this.eval_with(&req, &mut guard)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ErrorFrame {
                request_id: id,
                code: code::INTERNAL,
                message: format!("the expert computation failed: {e}"),
            })
        })
    }

    fn eval_with(
        &self,
        req: &ExpertRequest,
        (scratch, pairs): &mut (MoeScratch, Vec<Pair>),
    ) -> Result<ExpertResult, ErrorFrame> {
        let r = compute(&self.inner.experts, req, pairs, scratch);
        // The next request is a network round trip away: the kernels' idle threads park
        // instead of spinning on the cores the data plane needs meanwhile.
        engine::cpu::pool::global().rest();
        r
    }
}

fn compute(
    experts: &Compute,
    req: &ExpertRequest,
    pairs: &mut Vec<Pair>,
    scratch: &mut MoeScratch,
) -> Result<ExpertResult, ErrorFrame> {
    let err = |code, message: String| ErrorFrame {
        request_id: req.request_id,
        code,
        message,
    };
    if req.hidden != experts.hidden() {
        return Err(err(
            code::BAD_REQUEST,
            format!(
                "hidden width {} but the model's is {}",
                req.hidden,
                experts.hidden()
            ),
        ));
    }
    pairs.clear();
    for (t, es, ws) in req.pairs() {
        for (&e, &w) in es.iter().zip(ws) {
            pairs.push(Pair {
                token: t as u32,
                expert: e as u32,
                weight: w,
            });
        }
    }
    let t0 = std::time::Instant::now();
    // The answer's buffer leaves with the frame: one allocation, no copy.
    let mut out = vec![0f32; req.xs.len()];
    experts
        .eval_pairs(req.layer as usize, &req.xs, pairs, &mut out, scratch)
        .map_err(|e| {
            let c = match e {
                engine::model::moe::ExpertError::NotHeld { .. } => code::NOT_HELD,
                _ => code::BAD_REQUEST,
            };
            err(c, e.to_string())
        })?;
    Ok(ExpertResult {
        request_id: req.request_id,
        layer: req.layer,
        hidden: req.hidden,
        dtype: req.dtype,
        compute_us: t0.elapsed().as_micros().min(u32::MAX as u128) as u32,
        ys: out,
    })
}
