//! Expert placement: which worker holds which routed expert. A pure planner (no I/O, no clock):
//! the same input always gives the same plan.
//!
//! Input: the MoE layers (experts per layer, bytes per expert, expert groups) and the workers
//! (usable memory, measured speed). Output: one owner per (layer, expert).
//!
//! How it plans:
//! 1. **Shares.** Each worker's share of all expert bytes is proportional to its speed, capped
//!    by its memory; what a capped worker cannot take is spread over the others by speed
//!    (water-filling). If all memory together is less than the experts need, the plan fails
//!    and says by how much, per worker.
//! 2. **Per-layer counts.** Every MoE layer is split by the same shares, because the layers run
//!    one after another and each waits for its slowest worker: a worker holding 40% of the
//!    experts of every layer does 40% of each layer's work. Counts are rounded by largest
//!    remainder on the *cumulative* byte deficit, so rounding errors do not pile up on one
//!    worker over 58 layers, and no worker ever passes its memory.
//! 3. **Groups kept whole.** DeepSeek-V3's router keeps at most `topk_group` of `n_group`
//!    expert groups per token, so a worker holding whole groups is touched by fewer tokens.
//!    Within a layer each worker first receives as many whole groups as its count allows; only
//!    the remainders are packed into the leftover groups, so at most a few groups per layer are
//!    split between workers.
//!
//! 4. **Spare copies** ([`plan_with_copies`], optional). Once every expert has its owner, the
//!    memory left over takes further copies of experts, each on a worker that does not hold
//!    that expert yet: a whole group on one worker where one has room (so a failover keeps
//!    groups together), else expert by expert; each time the worker with the most free memory
//!    times speed. Copies are best effort: what finds no room is counted
//!    ([`Plan::without_spare`]), never a reason to refuse the plan. A copy serves when the
//!    owner is lost, so the loss of one box costs no request.

use std::fmt::Write as _;

/// Index of a worker in the planner's input.
pub type WorkerIdx = usize;

/// The routed experts of one MoE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerExperts {
    /// The model's layer index.
    pub layer: u32,
    pub n_experts: u32,
    /// Bytes of one expert (gate + up + down) as stored.
    pub expert_bytes: u64,
    /// Expert groups of the router (experts `g*size..(g+1)*size` form group `g`); 1 if none.
    pub n_groups: u32,
}

/// A worker as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerCapacity {
    pub name: String,
    /// Bytes it may use for experts.
    pub memory: u64,
    /// Measured throughput (any unit, the same for every worker; e.g. matvec GB/s).
    pub speed: f64,
}

/// Why no plan exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("no workers to place experts on")]
    NoWorkers,
    #[error("worker {name:?}: speed must be a positive finite number, got {speed}")]
    BadSpeed { name: String, speed: f64 },
    #[error("layer {layer}: {n_experts} experts cannot form {n_groups} equal groups")]
    BadGroups {
        layer: u32,
        n_experts: u32,
        n_groups: u32,
    },
    #[error("{}", render_shortfall(.needed, .available, .workers))]
    DoesNotFit {
        /// Bytes of all routed experts.
        needed: u64,
        /// Memory of all workers together.
        available: u64,
        workers: Vec<Shortfall>,
    },
}

/// One worker's part of a plan that does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub name: String,
    pub memory: u64,
    /// What this worker would hold in a speed-proportional split.
    pub share: u64,
    /// `share - memory` where positive.
    pub over_by: u64,
}

fn render_shortfall(needed: &u64, available: &u64, workers: &[Shortfall]) -> String {
    let mut s = format!(
        "the routed experts need {} but the workers have {} in all: {} short",
        gib(*needed),
        gib(*available),
        gib(needed - available)
    );
    for w in workers {
        let _ = write!(
            s,
            "; {}: {} of memory for a {} share",
            w.name,
            gib(w.memory),
            gib(w.share)
        );
        if w.over_by > 0 {
            let _ = write!(s, " (over by {})", gib(w.over_by));
        }
    }
    s
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Owners of one layer's experts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    pub layer: u32,
    /// `owner[e]`: the worker holding expert `e`.
    pub owner: Vec<WorkerIdx>,
    /// `spares[e]`: the workers holding a spare copy of expert `e` (never its owner, never
    /// twice the same worker); all empty without spare copies.
    pub spares: Vec<Vec<WorkerIdx>>,
    pub n_groups: u32,
}

/// What one worker ends up holding.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WorkerLoad {
    /// Experts it owns.
    pub experts: u64,
    /// Spare copies it holds.
    pub spares: u64,
    /// Bytes of both.
    pub bytes: u64,
}

/// A complete placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub layers: Vec<LayerPlan>,
    pub workers: Vec<WorkerLoad>,
    /// Copies asked for that found no room (0 when every expert has all its copies).
    pub without_spare: u64,
}

impl Plan {
    /// The workers holding `expert` of model layer `layer`: its owner, then its spares.
    pub fn holders(&self, layer: u32, expert: u32) -> Vec<WorkerIdx> {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .and_then(|l| {
                let e = expert as usize;
                let o = *l.owner.get(e)?;
                Some(
                    std::iter::once(o)
                        .chain(l.spares[e].iter().copied())
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// The experts `worker` holds (owned or spare), per model layer (layers where it holds none
    /// are omitted).
    pub fn experts_of(&self, worker: WorkerIdx) -> Vec<(u32, Vec<u32>)> {
        self.layers
            .iter()
            .filter_map(|l| {
                let es: Vec<u32> = (0..l.owner.len())
                    .filter(|&e| l.owner[e] == worker || l.spares[e].contains(&worker))
                    .map(|e| e as u32)
                    .collect();
                (!es.is_empty()).then_some((l.layer, es))
            })
            .collect()
    }

    /// A compact, stable text form: per worker its totals, per layer the owners of each group
    /// (`0` = all of the group on worker 0; `0/2` = the group is split between workers 0 and 2;
    /// `0+1` = owned by worker 0, spare copies on worker 1), then the copies that found no room.
    pub fn render(&self, workers: &[WorkerCapacity]) -> String {
        let mut s = String::new();
        for (i, (w, load)) in workers.iter().zip(&self.workers).enumerate() {
            let _ = write!(
                s,
                "worker {i} {}: {} experts, {} bytes of {}",
                w.name, load.experts, load.bytes, w.memory
            );
            if load.spares > 0 {
                let _ = write!(s, " (with {} spare copies)", load.spares);
            }
            s.push('\n');
        }
        for l in &self.layers {
            let size = l.owner.len() / l.n_groups as usize;
            let _ = write!(s, "layer {}:", l.layer);
            for (gi, g) in l.owner.chunks(size).enumerate() {
                let mut owners: Vec<WorkerIdx> = g.to_vec();
                owners.sort_unstable();
                owners.dedup();
                let names: Vec<String> = owners.iter().map(|o| o.to_string()).collect();
                let _ = write!(s, " {}", names.join("/"));
                let mut spares: Vec<WorkerIdx> = l.spares[gi * size..(gi + 1) * size]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                spares.sort_unstable();
                spares.dedup();
                if !spares.is_empty() {
                    let names: Vec<String> = spares.iter().map(|o| o.to_string()).collect();
                    let _ = write!(s, "+{}", names.join("/"));
                }
            }
            s.push('\n');
        }
        if self.without_spare > 0 {
            let _ = writeln!(s, "copies without room: {}", self.without_spare);
        }
        s
    }
}

/// Plans the placement of `layers`' experts on `workers`, one copy of each.
pub fn plan(layers: &[LayerExperts], workers: &[WorkerCapacity]) -> Result<Plan, PlanError> {
    plan_with_copies(layers, workers, 1)
}

/// Plans the placement with up to `copies` copies of every expert (1: no spares; at most one
/// per worker). The owners are planned first, exactly as by [`plan`]; the spare copies take
/// only the memory left over, and the plan fails only when the owners do not fit.
pub fn plan_with_copies(
    layers: &[LayerExperts],
    workers: &[WorkerCapacity],
    copies: usize,
) -> Result<Plan, PlanError> {
    let mut p = plan_owners(layers, workers)?;
    for _ in 1..copies.min(workers.len()) {
        add_spares(layers, workers, &mut p);
    }
    let wanted = copies.max(1) - 1;
    p.without_spare = p
        .layers
        .iter()
        .flat_map(|lp| &lp.spares)
        .map(|s| wanted.saturating_sub(s.len()) as u64)
        .sum();
    Ok(p)
}

/// One more spare copy of every expert, where memory allows (see the module documentation).
fn add_spares(layers: &[LayerExperts], workers: &[WorkerCapacity], p: &mut Plan) {
    let mut free: Vec<u64> = workers
        .iter()
        .zip(&p.workers)
        .map(|(w, l)| w.memory.saturating_sub(l.bytes))
        .collect();
    // The worker with the most free memory times speed among `ok` that has `bytes` free
    // (ties: the lower index).
    let pick = |free: &[u64], bytes: u64, ok: &dyn Fn(WorkerIdx) -> bool| {
        (0..workers.len())
            .filter(|&w| ok(w) && free[w] >= bytes)
            .max_by(|&a, &b| {
                (free[a] as f64 * workers[a].speed)
                    .total_cmp(&(free[b] as f64 * workers[b].speed))
                    .then(b.cmp(&a))
            })
    };
    for (l, lp) in layers.iter().zip(p.layers.iter_mut()) {
        let size = (l.n_experts / l.n_groups) as usize;
        for g in 0..l.n_groups as usize {
            let range = g * size..(g + 1) * size;
            let holds = |lp: &LayerPlan, w: WorkerIdx, e: usize| {
                lp.owner[e] == w || lp.spares[e].contains(&w)
            };
            // The whole group on one worker that holds none of it.
            let whole = pick(&free, size as u64 * l.expert_bytes, &|w| {
                range.clone().all(|e| !holds(lp, w, e))
            });
            for e in range.clone() {
                let target = whole.or_else(|| pick(&free, l.expert_bytes, &|w| !holds(lp, w, e)));
                if let Some(w) = target {
                    free[w] -= l.expert_bytes;
                    lp.spares[e].push(w);
                    p.workers[w].spares += 1;
                    p.workers[w].bytes += l.expert_bytes;
                }
            }
        }
    }
}

/// The owners: one copy of every expert.
fn plan_owners(layers: &[LayerExperts], workers: &[WorkerCapacity]) -> Result<Plan, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    if let Some(w) = workers
        .iter()
        .find(|w| !(w.speed.is_finite() && w.speed > 0.0))
    {
        return Err(PlanError::BadSpeed {
            name: w.name.clone(),
            speed: w.speed,
        });
    }
    for l in layers {
        if l.n_groups == 0 || l.n_experts % l.n_groups != 0 {
            return Err(PlanError::BadGroups {
                layer: l.layer,
                n_experts: l.n_experts,
                n_groups: l.n_groups,
            });
        }
    }
    let needed: u64 = layers
        .iter()
        .map(|l| l.n_experts as u64 * l.expert_bytes)
        .sum();
    let available: u64 = workers.iter().map(|w| w.memory).sum();
    let speed_sum: f64 = workers.iter().map(|w| w.speed).sum();
    if needed > available {
        return Err(PlanError::DoesNotFit {
            needed,
            available,
            workers: workers
                .iter()
                .map(|w| {
                    let share = (needed as f64 * w.speed / speed_sum).round() as u64;
                    Shortfall {
                        name: w.name.clone(),
                        memory: w.memory,
                        share,
                        over_by: share.saturating_sub(w.memory),
                    }
                })
                .collect(),
        });
    }

    let shares = water_fill(needed as f64, workers);
    let total = needed.max(1) as f64;
    let n = workers.len();
    let mut load = vec![WorkerLoad::default(); n];
    let mut cum_bytes = 0u64;
    let mut out = Vec::with_capacity(layers.len());
    for l in layers {
        cum_bytes += l.n_experts as u64 * l.expert_bytes;
        let counts =
            layer_counts(l, &shares, total, cum_bytes, workers, &load).ok_or_else(|| {
                // Whole experts do not fit into the memory left over (granularity): report it as
                // a shortfall of one expert per worker that is full.
                PlanError::DoesNotFit {
                    needed,
                    available: workers
                        .iter()
                        .map(|w| w.memory - w.memory % l.expert_bytes.max(1))
                        .sum(),
                    workers: workers
                        .iter()
                        .zip(&shares)
                        .map(|(w, &s)| Shortfall {
                            name: w.name.clone(),
                            memory: w.memory,
                            share: s.round() as u64,
                            over_by: 0,
                        })
                        .collect(),
                }
            })?;
        for (w, &c) in counts.iter().enumerate() {
            load[w].experts += c as u64;
            load[w].bytes += c as u64 * l.expert_bytes;
        }
        out.push(LayerPlan {
            layer: l.layer,
            owner: arrange_groups(l, &counts),
            spares: vec![Vec::new(); l.n_experts as usize],
            n_groups: l.n_groups,
        });
    }
    Ok(Plan {
        layers: out,
        workers: load,
        without_spare: 0,
    })
}

/// Byte shares proportional to speed, capped by memory; the excess of capped workers goes to
/// the others by speed. Assumes `total <= Σ memory`.
fn water_fill(total: f64, workers: &[WorkerCapacity]) -> Vec<f64> {
    let n = workers.len();
    let mut capped = vec![false; n];
    let mut share = vec![0f64; n];
    loop {
        let fixed: f64 = (0..n)
            .filter(|&i| capped[i])
            .map(|i| workers[i].memory as f64)
            .sum();
        let speed: f64 = (0..n)
            .filter(|&i| !capped[i])
            .map(|i| workers[i].speed)
            .sum();
        let lambda = (total - fixed).max(0.0) / speed.max(f64::MIN_POSITIVE);
        let mut changed = false;
        for i in 0..n {
            if capped[i] {
                share[i] = workers[i].memory as f64;
            } else {
                share[i] = lambda * workers[i].speed;
                if share[i] > workers[i].memory as f64 {
                    capped[i] = true;
                    changed = true;
                }
            }
        }
        if !changed {
            return share;
        }
    }
}

/// Expert counts of one layer: each worker's cumulative byte target after this layer, minus
/// what it already holds, rounded by largest remainder; never past a worker's memory. `None`
/// when whole experts cannot be fitted into the memory that is left.
fn layer_counts(
    l: &LayerExperts,
    shares: &[f64],
    total: f64,
    cum_bytes: u64,
    workers: &[WorkerCapacity],
    load: &[WorkerLoad],
) -> Option<Vec<u32>> {
    let n = workers.len();
    let eb = l.expert_bytes.max(1);
    let room: Vec<u64> = (0..n)
        .map(|i| (workers[i].memory - load[i].bytes) / eb)
        .collect();
    // Wanted experts for this layer (fractional), from the cumulative deficit.
    let want: Vec<f64> = (0..n)
        .map(|i| {
            let target = shares[i] / total * cum_bytes as f64;
            ((target - load[i].bytes as f64) / eb as f64).max(0.0)
        })
        .collect();
    let mut counts: Vec<u32> = (0..n)
        .map(|i| (want[i].floor() as u64).min(room[i]) as u32)
        .collect();
    let mut left = l.n_experts as i64 - counts.iter().map(|&c| c as i64).sum::<i64>();
    // Too many (floors can exceed when wants overshoot): take back from the most over target.
    while left < 0 {
        let i = (0..n)
            .filter(|&i| counts[i] > 0)
            .max_by(|&a, &b| {
                (counts[a] as f64 - want[a])
                    .total_cmp(&(counts[b] as f64 - want[b]))
                    .then(b.cmp(&a))
            })
            .expect("positive counts exist when there are too many");
        counts[i] -= 1;
        left += 1;
    }
    // Hand out the rest one by one to the largest remaining deficit that has room.
    while left > 0 {
        let i = (0..n)
            .filter(|&i| (counts[i] as u64) < room[i])
            .max_by(|&a, &b| {
                (want[a] - counts[a] as f64)
                    .total_cmp(&(want[b] - counts[b] as f64))
                    .then(b.cmp(&a))
            })?;
        counts[i] += 1;
        left -= 1;
    }
    Some(counts)
}

/// Owners of a layer's experts given each worker's count: whole groups first, then the
/// remainders packed into the leftover groups (largest remainder first), so few groups split.
fn arrange_groups(l: &LayerExperts, counts: &[u32]) -> Vec<WorkerIdx> {
    let size = (l.n_experts / l.n_groups) as usize;
    let mut owner = vec![usize::MAX; l.n_experts as usize];
    // Workers by count, largest first (ties: lower index), so the biggest holders get the
    // lowest groups; deterministic.
    let mut order: Vec<WorkerIdx> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut next = 0usize;
    for &w in &order {
        let whole = counts[w] as usize / size;
        owner[next..next + whole * size].fill(w);
        next += whole * size;
    }
    let mut rest: Vec<(WorkerIdx, usize)> = order
        .iter()
        .map(|&w| (w, counts[w] as usize % size))
        .filter(|&(_, r)| r > 0)
        .collect();
    rest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (w, r) in rest {
        owner[next..next + r].fill(w);
        next += r;
    }
    debug_assert_eq!(next, owner.len());
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// DeepSeek-V3's 58 MoE layers (3..61) of 256 experts in 8 groups.
    fn v3(expert_bytes: u64) -> Vec<LayerExperts> {
        (3..61)
            .map(|layer| LayerExperts {
                layer,
                n_experts: 256,
                expert_bytes,
                n_groups: 8,
            })
            .collect()
    }

    fn worker(name: &str, memory: u64, speed: f64) -> WorkerCapacity {
        WorkerCapacity {
            name: name.into(),
            memory,
            speed,
        }
    }

    /// Every expert owned exactly once, spares on other workers than its owner and each
    /// other, no worker past its memory, loads add up.
    fn check_valid(layers: &[LayerExperts], workers: &[WorkerCapacity], p: &Plan) {
        assert_eq!(p.layers.len(), layers.len());
        let mut load = vec![WorkerLoad::default(); workers.len()];
        for (l, lp) in layers.iter().zip(&p.layers) {
            assert_eq!(lp.owner.len(), l.n_experts as usize);
            assert_eq!(lp.spares.len(), l.n_experts as usize);
            for (e, &o) in lp.owner.iter().enumerate() {
                assert!(o < workers.len(), "expert left unplaced");
                load[o].experts += 1;
                load[o].bytes += l.expert_bytes;
                let mut holders = vec![o];
                for &s in &lp.spares[e] {
                    assert!(s < workers.len());
                    assert!(!holders.contains(&s), "two copies on worker {s}");
                    holders.push(s);
                    load[s].spares += 1;
                    load[s].bytes += l.expert_bytes;
                }
                assert_eq!(p.holders(l.layer, e as u32), holders);
            }
        }
        assert_eq!(load, p.workers);
        for (w, l) in workers.iter().zip(&load) {
            assert!(l.bytes <= w.memory, "{} over memory", w.name);
        }
    }

    #[test]
    fn three_equal_workers_snapshot() {
        let layers: Vec<_> = v3(100).into_iter().take(4).collect();
        let workers = [
            worker("a", 100_000, 1.0),
            worker("b", 100_000, 1.0),
            worker("c", 100_000, 1.0),
        ];
        let p = plan(&layers, &workers).unwrap();
        check_valid(&layers, &workers, &p);
        assert_eq!(
            p.render(&workers),
            "worker 0 a: 342 experts, 34200 bytes of 100000\n\
             worker 1 b: 341 experts, 34100 bytes of 100000\n\
             worker 2 c: 341 experts, 34100 bytes of 100000\n\
             layer 3: 0 0 1 1 2 2 0/1 1/2\n\
             layer 4: 1 1 0 0 2 2 0/1 0/2\n\
             layer 5: 2 2 0 0 1 1 0/2 0/1\n\
             layer 6: 0 0 1 1 2 2 0/1 1/2\n"
        );
    }

    #[test]
    fn spare_copies_snapshot() {
        // Room for two copies of everything: every group gets one spare, whole, on another
        // worker; memory stays balanced.
        let layers: Vec<_> = v3(100).into_iter().take(3).collect();
        let workers = [
            worker("a", 60_000, 1.0),
            worker("b", 60_000, 1.0),
            worker("c", 60_000, 1.0),
        ];
        let p = plan_with_copies(&layers, &workers, 2).unwrap();
        check_valid(&layers, &workers, &p);
        assert_eq!(p.without_spare, 0);
        assert_eq!(
            p.render(&workers),
            "worker 0 a: 256 experts, 51200 bytes of 60000 (with 256 spare copies)\n\
             worker 1 b: 256 experts, 51200 bytes of 60000 (with 256 spare copies)\n\
             worker 2 c: 256 experts, 51200 bytes of 60000 (with 256 spare copies)\n\
             layer 3: 0+1 0+2 1+0 1+0 2+1 2+0 0/1+2 1/2+0\n\
             layer 4: 1+2 1+2 0+1 0+1 2+0 2+1 0/1+2 0/2+1\n\
             layer 5: 2+0 2+0 0+2 0+1 1+2 1+0 0/2+1 0/1+2\n"
        );
        // The spares change nothing of the owners.
        let owners = plan(&layers, &workers).unwrap();
        for (a, b) in p.layers.iter().zip(&owners.layers) {
            assert_eq!(a.owner, b.owner);
        }
    }

    #[test]
    fn spare_copies_take_only_the_memory_left_and_count_what_found_no_room() {
        // 768 experts of 100 bytes on 3 workers of 30000: 300 slots each, 256 owned, so 44
        // spares each at most: 132 of the 768 copies asked for.
        let layers: Vec<_> = v3(100).into_iter().take(3).collect();
        let workers = [
            worker("a", 30_000, 1.0),
            worker("b", 30_000, 1.0),
            worker("c", 30_000, 1.0),
        ];
        let p = plan_with_copies(&layers, &workers, 2).unwrap();
        check_valid(&layers, &workers, &p);
        let spares: u64 = p.workers.iter().map(|w| w.spares).sum();
        assert_eq!(spares, 132);
        assert_eq!(p.without_spare, 768 - 132);
        assert!(p.render(&workers).ends_with("copies without room: 636\n"));
        // More copies than workers: each expert gets one per other worker at most.
        let two = [worker("a", 100_000, 1.0), worker("b", 100_000, 1.0)];
        let p = plan_with_copies(&layers, &two, 3).unwrap();
        check_valid(&layers, &two, &p);
        assert!(p
            .layers
            .iter()
            .flat_map(|l| &l.spares)
            .all(|s| s.len() == 1));
        assert_eq!(p.without_spare, 768);
        // One copy: the owners' plan exactly.
        assert_eq!(
            plan_with_copies(&layers, &workers, 1).unwrap(),
            plan(&layers, &workers).unwrap()
        );
    }

    #[test]
    fn speed_and_memory_snapshot() {
        // A fast box with little memory, a slow box with a lot, and a middling one. Speeds
        // 4:1:2 would give the fast box 439 of the 768 experts; it can hold 200, and the other
        // 568 go 1:2 to the others (189.3 and 378.7).
        let layers: Vec<_> = v3(1000).into_iter().take(3).collect();
        let workers = [
            worker("fast-small", 200_000, 4.0),
            worker("slow-big", 1_000_000, 1.0),
            worker("mid", 400_000, 2.0),
        ];
        let p = plan(&layers, &workers).unwrap();
        check_valid(&layers, &workers, &p);
        assert_eq!(
            p.render(&workers),
            "worker 0 fast-small: 200 experts, 200000 bytes of 200000\n\
             worker 1 slow-big: 189 experts, 189000 bytes of 1000000\n\
             worker 2 mid: 379 experts, 379000 bytes of 400000\n\
             layer 3: 2 2 2 0 0 1 1/2 0/2\n\
             layer 4: 2 2 2 0 0 1 1/2 0/2\n\
             layer 5: 2 2 2 0 0 1 1/2 0/2\n"
        );
    }

    #[test]
    fn load_follows_speed_per_layer() {
        let layers = v3(44 << 20);
        let workers = [
            worker("a", 400 * GIB, 3.0),
            worker("b", 400 * GIB, 2.0),
            worker("c", 400 * GIB, 1.0),
        ];
        let p = plan(&layers, &workers).unwrap();
        check_valid(&layers, &workers, &p);
        for lp in &p.layers {
            let mut c = [0usize; 3];
            for &o in &lp.owner {
                c[o] += 1;
            }
            // 256 * 3/6 = 128, * 2/6 = 85.3, * 1/6 = 42.7: within one expert in every layer.
            assert!(c[0].abs_diff(128) <= 1, "{c:?}");
            assert!((85..=86).contains(&c[1]), "{c:?}");
            assert!((42..=43).contains(&c[2]), "{c:?}");
        }
        let total: u64 = p.workers.iter().map(|w| w.experts).sum();
        assert_eq!(total, 58 * 256);
        // Totals within one expert of the exact proportional split.
        let exact = [58.0 * 128.0, 58.0 * 256.0 / 3.0, 58.0 * 256.0 / 6.0];
        for (w, e) in p.workers.iter().zip(exact) {
            assert!((w.experts as f64 - e).abs() <= 1.0, "{} vs {e}", w.experts);
        }
    }

    #[test]
    fn groups_stay_whole_where_counts_allow() {
        // Four equal workers: 64 experts each per layer = two whole groups each, none split.
        let layers = v3(1);
        let workers: Vec<_> = (0..4)
            .map(|i| worker(&format!("w{i}"), 1 << 20, 1.0))
            .collect();
        let p = plan(&layers, &workers).unwrap();
        check_valid(&layers, &workers, &p);
        for lp in &p.layers {
            for g in lp.owner.chunks(32) {
                assert!(g.iter().all(|&o| o == g[0]), "split group in {lp:?}");
            }
        }
        // Three workers: at most two groups of eight split per layer.
        let workers = &workers[..3];
        let p = plan(&layers, workers).unwrap();
        for lp in &p.layers {
            let split = lp
                .owner
                .chunks(32)
                .filter(|g| g.iter().any(|&o| o != g[0]))
                .count();
            assert!(split <= 2, "{split} split groups");
        }
    }

    #[test]
    fn too_little_memory_says_by_how_much_per_worker() {
        let layers = v3(GIB / 100); // 58 * 256 experts of ~10 MiB: ~148 GiB
        let workers = [worker("a", 64 * GIB, 1.0), worker("b", 32 * GIB, 1.0)];
        let err = plan(&layers, &workers).unwrap_err();
        let PlanError::DoesNotFit {
            needed,
            available,
            workers: ws,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(*available, 96 * GIB);
        assert_eq!(*needed, 58 * 256 * (GIB / 100));
        assert_eq!(ws[0].share, needed / 2);
        assert_eq!(ws[1].over_by, needed / 2 - 32 * GIB);
        let msg = err.to_string();
        assert!(msg.contains("short"), "{msg}");
        assert!(msg.contains("b: 32.00 GiB of memory"), "{msg}");
    }

    #[test]
    fn granularity_that_cannot_fit_is_an_error_not_an_overflow() {
        // Memory adds up in bytes but not in whole experts: 3 experts of 10 bytes, two
        // workers of 15 bytes each can hold only one each.
        let layers = [LayerExperts {
            layer: 0,
            n_experts: 3,
            expert_bytes: 10,
            n_groups: 1,
        }];
        let workers = [worker("a", 15, 1.0), worker("b", 15, 1.0)];
        assert!(matches!(
            plan(&layers, &workers),
            Err(PlanError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(plan(&v3(1), &[]), Err(PlanError::NoWorkers));
        assert!(matches!(
            plan(&v3(1), &[worker("a", 1 << 30, f64::NAN)]),
            Err(PlanError::BadSpeed { .. })
        ));
        let l = [LayerExperts {
            layer: 1,
            n_experts: 10,
            expert_bytes: 1,
            n_groups: 3,
        }];
        assert!(matches!(
            plan(&l, &[worker("a", 100, 1.0)]),
            Err(PlanError::BadGroups { .. })
        ));
    }

    #[test]
    fn randomized_plans_are_valid_and_deterministic() {
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200 {
            let n_layers = 1 + next() % 6;
            let groups = [1u32, 2, 4, 8][(next() % 4) as usize];
            let n_experts = groups * (1 + (next() % 16) as u32);
            let eb = 1 + next() % 1000;
            let layers: Vec<_> = (0..n_layers as u32)
                .map(|layer| LayerExperts {
                    layer,
                    n_experts,
                    expert_bytes: eb,
                    n_groups: groups,
                })
                .collect();
            let need = n_layers * n_experts as u64 * eb;
            let nw = 1 + (next() % 5) as usize;
            let workers: Vec<_> = (0..nw)
                .map(|i| {
                    worker(
                        &format!("w{i}"),
                        need * (1 + next() % 100) / 50,
                        0.1 + (next() % 100) as f64,
                    )
                })
                .collect();
            let copies = 1 + (next() % 3) as usize;
            match plan_with_copies(&layers, &workers, copies) {
                Ok(p) => {
                    check_valid(&layers, &workers, &p);
                    assert_eq!(plan_with_copies(&layers, &workers, copies).unwrap(), p);
                    let spares: u64 = p.workers.iter().map(|w| w.spares).sum();
                    let asked = (copies as u64 - 1) * n_layers * n_experts as u64;
                    assert_eq!(spares + p.without_spare, asked);
                }
                Err(PlanError::DoesNotFit { .. }) => {
                    // Only when whole experts cannot fit: check by counting capacities.
                    let slots: u64 = workers.iter().map(|w| w.memory / eb).sum();
                    assert!(slots < n_layers * n_experts as u64, "fits but refused");
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
