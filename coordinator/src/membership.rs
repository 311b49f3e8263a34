//! Cluster membership as a plain state machine: workers join, report, load, serve, vanish and
//! come back. No sockets and no clock of its own: the driver feeds events with the current
//! time (`handle_*`) and carries out what [`Membership::poll_action`] asks for.
//!
//! Lifecycle of a worker: `Joining` (said hello, no assignment yet) → `Loading` (assignment
//! sent; progress from heartbeats) → `Ready` (its experts of the current assignment are
//! loaded) → `Lost` (no heartbeat for `heartbeat_timeout`, or its connection dropped). A lost
//! worker keeps its assignment: when it comes back under the same name it gets the same experts
//! again. If instead another worker has room, the lost worker's experts are re-placed there
//! (repair), so serving resumes without anyone restarting.
//!
//! Planning waits for `min_workers`; the first plan covers every expert, later changes only move
//! the experts of lost or drained workers.
//!
//! The plan (`owner`: who must hold each expert) and the routes (who answers for it now) differ
//! while experts move: a worker keeps serving what it has loaded (`held`) while it loads a new
//! assignment, so an expert is routed to its planned owner once that one holds it, and until
//! then to another live worker that still holds it (a draining one). The cluster serves when
//! every expert has a route to a live worker that holds it.
//!
//! Spare copies (`Config::copies` > 1): the plan also gives workers spare copies of experts
//! other workers own, in the memory the owners leave (see `placement`). A spare holder serves
//! an expert when its owner is lost (the routes go to any live worker that holds it), so the
//! loss of one box interrupts nothing. The lost owner keeps the expert: when it comes back and
//! has loaded it again, the routes return to it, so the load spreads as planned. Only experts
//! with no live spare are repaired (moved to workers with room). A drained worker's experts
//! go to their spare holders where they have one. Experts with fewer live holders than
//! `copies` get spares on live workers with free memory, so a worker that joins a running
//! cluster restores the copies a loss took.
//!
//! Draining worker W (`handle_drain`): its experts are re-placed onto live workers with room (the
//! same allocator as the repair of lost workers; refused, changing nothing, when they do not
//! fit), those load them while W keeps serving, the routes switch to them as each is loaded,
//! and once no route points at W (plus `drain_grace`, for requests already on the way) W is
//! sent an empty assignment. It stays listed as `Draining` with no experts and never gets any
//! again; when it disconnects or goes silent it leaves the membership.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::placement::{self, LayerExperts, Plan, PlanError, WorkerCapacity};

/// A worker's stable id within this coordinator's run (slot index).
pub type WorkerId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    Joining,
    Loading { done: u64, total: u64 },
    Ready,
    Draining,
    Lost,
}

impl WorkerState {
    pub fn label(&self) -> String {
        match self {
            WorkerState::Joining => "joining".into(),
            WorkerState::Loading { done, total } => {
                format!("loading {}%", (done * 100).checked_div(*total).unwrap_or(0))
            }
            WorkerState::Ready => "ready".into(),
            WorkerState::Draining => "draining".into(),
            WorkerState::Lost => "lost".into(),
        }
    }
}

/// What a worker says when it connects.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub name: String,
    pub memory: u64,
    pub speed: f64,
}

/// What a worker reports in a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// The assignment generation the report is about.
    pub generation: u64,
    pub loaded: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Something the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send `worker` its (new) assignment: the experts it must hold, per layer.
    Assign {
        worker: WorkerId,
        generation: u64,
        experts: Vec<(u32, Vec<u32>)>,
    },
    /// Log: a worker was declared lost (its experts are unavailable until repaired).
    Lost { worker: WorkerId, name: String },
    /// Log: planning failed (not enough memory among the workers present).
    PlanFailed(PlanError),
    /// Log: the plan is made, with `spares` spare copies placed and `without_spare` of those
    /// asked for left out for lack of memory.
    Planned { spares: u64, without_spare: u64 },
    /// The cluster's readiness changed.
    Serving(bool),
    /// The routes changed: read them with [`Membership::layer_owners`] (and the fallbacks with
    /// [`Membership::layer_holders`]).
    Routes,
    /// A draining worker disconnected or went silent and left the membership.
    Left { worker: WorkerId, name: String },
}

/// Why a drain is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("no worker {0}")]
    Unknown(WorkerId),
    #[error("worker {0:?} is offline: its experts are repaired as for any lost worker")]
    Lost(String),
    #[error(
        "cannot drain worker {name:?}: the other workers lack {:.1} MiB of memory for its \
         experts ({missing} bytes)",
        *missing as f64 / (1u64 << 20) as f64
    )]
    NoRoom { name: String, missing: u64 },
}

/// Where a drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    /// Its experts are loading elsewhere; some routes still point at it.
    Moving,
    /// No route points at it since then; it is told to drop its experts after the grace.
    Released(Instant),
    /// It was sent an empty assignment.
    Done,
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub id: WorkerId,
    pub name: String,
    pub memory: u64,
    pub speed: f64,
    pub state: WorkerState,
    pub last_seen: Instant,
    /// Generation of the assignment this worker has been sent (0: none).
    pub generation: u64,
    /// The experts it is assigned, per layer.
    pub experts: Vec<(u32, Vec<u32>)>,
    /// `(layer, expert)` it has loaded and serves: the experts of the last assignment it
    /// reported loaded (it keeps serving them while it loads the next one).
    pub held: BTreeSet<(u32, u32)>,
}

/// Membership settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub min_workers: usize,
    pub heartbeat_timeout: Duration,
    /// The MoE layers to place.
    pub layers: Vec<LayerExperts>,
    /// How long a drained worker keeps its experts after no route points at it any more
    /// (requests sent just before the switch are still answered).
    pub drain_grace: Duration,
    /// Copies of every expert the plan asks for (1: no spares); spares take only the memory
    /// the owners leave.
    pub copies: usize,
}

pub struct Membership {
    cfg: Config,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    generation: u64,
    /// The plan: `owner[layer index in cfg.layers][expert]`, once planned.
    owner: Option<Vec<Vec<WorkerId>>>,
    /// Spare holders, same indexing as `owner` (empty lists without spares).
    spares: Vec<Vec<Vec<WorkerId>>>,
    /// Who answers for each expert now (same shape as `owner`).
    routes: Option<Vec<Vec<WorkerId>>>,
    /// Every live worker that serves each expert, the route first.
    holders: Option<Vec<Vec<Vec<WorkerId>>>>,
    drains: BTreeMap<WorkerId, Drain>,
    serving: bool,
    actions: VecDeque<Action>,
}

impl Membership {
    pub fn new(cfg: Config) -> Self {
        Membership {
            cfg,
            workers: BTreeMap::new(),
            next_id: 1,
            generation: 0,
            owner: None,
            spares: Vec::new(),
            routes: None,
            holders: None,
            drains: BTreeMap::new(),
            serving: false,
            actions: VecDeque::new(),
        }
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    pub fn is_serving(&self) -> bool {
        self.serving
    }

    pub fn is_planned(&self) -> bool {
        self.owner.is_some()
    }

    /// The planned holder of `expert` of model layer `layer`, if planned.
    pub fn owner(&self, layer: u32, expert: u32) -> Option<WorkerId> {
        let li = self.cfg.layers.iter().position(|l| l.layer == layer)?;
        self.owner.as_ref()?.get(li)?.get(expert as usize).copied()
    }

    /// Who answers for each of one model layer's experts now (indexed by expert), if planned.
    pub fn layer_owners(&self, layer: u32) -> Option<&[WorkerId]> {
        let li = self.cfg.layers.iter().position(|l| l.layer == layer)?;
        self.routes.as_ref().map(|o| o[li].as_slice())
    }

    /// For each of one model layer's experts, every live worker that serves it, the current
    /// route first (what a request falls back on when its route fails), if planned.
    pub fn layer_holders(&self, layer: u32) -> Option<&[Vec<WorkerId>]> {
        let li = self.cfg.layers.iter().position(|l| l.layer == layer)?;
        self.holders.as_ref().map(|h| h[li].as_slice())
    }

    /// Experts with at least two live workers serving them, and all experts: how much of the
    /// model survives the loss of one more box without a gap.
    pub fn redundancy(&self) -> (u64, u64) {
        let total = self.cfg.layers.iter().map(|l| l.n_experts as u64).sum();
        let spared = self
            .holders
            .iter()
            .flatten()
            .flatten()
            .filter(|h| h.len() >= 2)
            .count();
        (spared as u64, total)
    }

    /// How many spare copies (experts other workers own) `id` is assigned.
    pub fn spares_held(&self, id: WorkerId) -> u64 {
        self.spares
            .iter()
            .flatten()
            .filter(|s| s.contains(&id))
            .count() as u64
    }

    /// Whether `id` is draining (or drained).
    pub fn is_draining(&self, id: WorkerId) -> bool {
        self.drains.contains_key(&id)
    }

    /// A worker connected (first time, or again under the same name). Returns its id.
    pub fn handle_hello(&mut self, now: Instant, hello: Hello) -> WorkerId {
        let existing = self
            .workers
            .values()
            .find(|w| w.name == hello.name)
            .map(|w| w.id);
        let id = existing.unwrap_or_else(|| {
            let id = self.next_id;
            self.next_id += 1;
            id
        });
        let w = self.workers.entry(id).or_insert_with(|| Worker {
            id,
            name: hello.name.clone(),
            memory: hello.memory,
            speed: hello.speed,
            state: WorkerState::Joining,
            last_seen: now,
            generation: 0,
            experts: Vec::new(),
            held: BTreeSet::new(),
        });
        w.memory = hello.memory;
        w.speed = hello.speed;
        w.last_seen = now;
        // Whatever it had loaded before is gone from our point of view until it reports again.
        w.held.clear();
        let draining = self.drains.contains_key(&id);
        w.state = if draining {
            WorkerState::Draining
        } else {
            WorkerState::Joining
        };
        if !w.experts.is_empty() || draining {
            let experts = w.experts.clone();
            self.send(id, experts);
        }
        self.maybe_plan();
        self.settle(now);
        id
    }

    /// A heartbeat from `id`.
    pub fn handle_report(&mut self, now: Instant, id: WorkerId, r: Report) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.last_seen = now;
        if w.state == WorkerState::Lost {
            return;
        }
        if w.generation != 0 && r.generation == w.generation {
            if r.loaded {
                w.held = flatten(&w.experts);
            }
            if w.state != WorkerState::Draining {
                w.state = if r.loaded {
                    WorkerState::Ready
                } else {
                    WorkerState::Loading {
                        done: r.done_bytes,
                        total: r.total_bytes,
                    }
                };
            }
        }
        self.settle(now);
    }

    /// The operator drains `id`: its experts move to other workers with room while it keeps
    /// serving them (see the module documentation). Refused, changing nothing, when the other
    /// workers lack the memory; draining a draining worker again is accepted.
    pub fn handle_drain(&mut self, now: Instant, id: WorkerId) -> Result<(), DrainError> {
        let w = self.workers.get(&id).ok_or(DrainError::Unknown(id))?;
        if self.drains.contains_key(&id) {
            return Ok(());
        }
        if w.state == WorkerState::Lost {
            return Err(DrainError::Lost(w.name.clone()));
        }
        let name = w.name.clone();
        // Draining: so the allocator gives it nothing.
        let before = std::mem::replace(
            &mut self.workers.get_mut(&id).expect("known worker").state,
            WorkerState::Draining,
        );
        let moved = self.replace(&BTreeSet::from([id]), false);
        if let Some((owner, spares, targets, missing)) = moved {
            if missing > 0 {
                self.workers.get_mut(&id).expect("known worker").state = before;
                return Err(DrainError::NoRoom { name, missing });
            }
            self.owner = Some(owner);
            self.spares = spares;
            for t in targets {
                let experts = self.experts_of(t);
                self.send(t, experts);
            }
        }
        self.drains.insert(id, Drain::Moving);
        self.settle(now);
        Ok(())
    }

    /// The worker's connection closed, or the data plane found it unreachable.
    pub fn handle_disconnect(&mut self, now: Instant, id: WorkerId) {
        self.mark_lost(id);
        self.repair();
        self.settle(now);
    }

    /// Time passes: workers silent for longer than the timeout are lost.
    pub fn handle_tick(&mut self, now: Instant) {
        let timeout = self.cfg.heartbeat_timeout;
        let silent: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| {
                w.state != WorkerState::Lost && now.saturating_duration_since(w.last_seen) > timeout
            })
            .map(|w| w.id)
            .collect();
        for id in silent {
            self.mark_lost(id);
        }
        self.repair();
        self.settle(now);
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Experts of the plan without a live worker that holds them, per layer (what a request
    /// would miss).
    pub fn unavailable(&self) -> Vec<(u32, Vec<u32>)> {
        let Some(routes) = &self.routes else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (l, rs) in self.cfg.layers.iter().zip(routes) {
            let missing: Vec<u32> = (0..rs.len() as u32)
                .filter(|&e| !self.holds(rs[e as usize], l.layer, e))
                .collect();
            if !missing.is_empty() {
                out.push((l.layer, missing));
            }
        }
        out
    }

    /// Whether `id` is live and serves `expert` of `layer`.
    fn holds(&self, id: WorkerId, layer: u32, expert: u32) -> bool {
        self.workers
            .get(&id)
            .is_some_and(|w| w.state != WorkerState::Lost && w.held.contains(&(layer, expert)))
    }

    fn mark_lost(&mut self, id: WorkerId) {
        if self.drains.remove(&id).is_some() {
            // It was leaving anyway and its experts are planned elsewhere: it leaves now.
            if let Some(w) = self.workers.remove(&id) {
                self.actions.push_back(Action::Left {
                    worker: id,
                    name: w.name,
                });
            }
            return;
        }
        if let Some(w) = self.workers.get_mut(&id) {
            if w.state != WorkerState::Lost {
                w.state = WorkerState::Lost;
                self.actions.push_back(Action::Lost {
                    worker: id,
                    name: w.name.clone(),
                });
            }
        }
    }

    fn live(&self) -> Vec<&Worker> {
        self.workers
            .values()
            .filter(|w| !matches!(w.state, WorkerState::Lost | WorkerState::Draining))
            .collect()
    }

    fn maybe_plan(&mut self) {
        if self.owner.is_some() {
            self.repair();
            return;
        }
        let live = self.live();
        if live.len() < self.cfg.min_workers.max(1) {
            return;
        }
        let ids: Vec<WorkerId> = live.iter().map(|w| w.id).collect();
        let caps: Vec<WorkerCapacity> = live
            .iter()
            .map(|w| WorkerCapacity {
                name: w.name.clone(),
                memory: w.memory,
                speed: w.speed,
            })
            .collect();
        match placement::plan_with_copies(&self.cfg.layers, &caps, self.cfg.copies) {
            Ok(plan) => self.adopt(&plan, &ids),
            Err(e) => self.actions.push_back(Action::PlanFailed(e)),
        }
    }

    fn adopt(&mut self, plan: &Plan, ids: &[WorkerId]) {
        let owner: Vec<Vec<WorkerId>> = plan
            .layers
            .iter()
            .map(|l| l.owner.iter().map(|&i| ids[i]).collect())
            .collect();
        self.owner = Some(owner);
        self.spares = plan
            .layers
            .iter()
            .map(|l| {
                l.spares
                    .iter()
                    .map(|s| s.iter().map(|&i| ids[i]).collect())
                    .collect()
            })
            .collect();
        self.actions.push_back(Action::Planned {
            spares: plan.workers.iter().map(|w| w.spares).sum(),
            without_spare: plan.without_spare,
        });
        for (i, &id) in ids.iter().enumerate() {
            let experts = plan.experts_of(i);
            self.send(id, experts);
        }
    }

    fn send(&mut self, id: WorkerId, experts: Vec<(u32, Vec<u32>)>) {
        self.generation += 1;
        let w = self.workers.get_mut(&id).expect("known worker");
        w.generation = self.generation;
        // It keeps serving what it holds while it loads, but drops what it is no longer given.
        let new = flatten(&experts);
        w.held.retain(|x| new.contains(x));
        w.experts = experts.clone();
        if w.state != WorkerState::Draining {
            w.state = WorkerState::Loading { done: 0, total: 0 };
        }
        self.actions.push_back(Action::Assign {
            worker: id,
            generation: self.generation,
            experts,
        });
    }

    /// Moves the experts of lost workers onto live workers with free memory (by speed).
    fn repair(&mut self) {
        let lost: BTreeSet<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Lost)
            .map(|w| w.id)
            .collect();
        if !lost.is_empty() {
            let Some((owner, spares, changed, _)) = self.replace(&lost, true) else {
                return;
            };
            self.owner = Some(owner);
            self.spares = spares;
            for id in changed {
                let experts = self.experts_of(id);
                self.send(id, experts);
            }
            // Forget the experts of lost workers that were moved away.
            for id in lost {
                let experts = self.experts_of(id);
                if let Some(w) = self.workers.get_mut(&id) {
                    w.experts = experts;
                }
            }
        }
        self.replenish();
    }

    /// With spare copies asked for: experts with fewer than `copies` holders that are not
    /// lost get spares on live workers with free memory (the most free memory times speed
    /// first; never a worker that already has the expert, lost or not). So a worker that
    /// joins a running cluster, or memory left after a loss, restores the copies.
    fn replenish(&mut self) {
        let Some(owner) = &self.owner else {
            return;
        };
        if self.cfg.copies <= 1 {
            return;
        }
        let mut free = self.free_memory(owner, &self.spares, &BTreeSet::new());
        let smallest = self.cfg.layers.iter().map(|l| l.expert_bytes).min();
        if smallest.is_none_or(|b| free.iter().all(|f| f.1 < b)) {
            // No room anywhere (the usual case once planned): nothing to look at.
            return;
        }
        let live: BTreeSet<WorkerId> = free.iter().map(|f| f.0).collect();
        // New spares as (layer index, expert, worker), applied after the look.
        let mut adds = Vec::new();
        for (li, (l, (os, ss))) in self
            .cfg
            .layers
            .iter()
            .zip(owner.iter().zip(&self.spares))
            .enumerate()
        {
            for (e, (o, s)) in os.iter().zip(ss).enumerate() {
                let mut have =
                    usize::from(live.contains(o)) + s.iter().filter(|x| live.contains(x)).count();
                let first = adds.len();
                while have < self.cfg.copies {
                    let best = free
                        .iter_mut()
                        .filter(|f| {
                            f.1 >= l.expert_bytes
                                && f.0 != *o
                                && !s.contains(&f.0)
                                && !adds[first..]
                                    .iter()
                                    .any(|a: &(usize, usize, WorkerId)| a.2 == f.0)
                        })
                        .max_by(|a, b| (a.1 as f64 * a.2).total_cmp(&(b.1 as f64 * b.2)));
                    let Some(f) = best else { break };
                    f.1 -= l.expert_bytes;
                    adds.push((li, e, f.0));
                    have += 1;
                }
            }
        }
        let mut changed = BTreeSet::new();
        for (li, e, w) in adds {
            self.spares[li][e].push(w);
            changed.insert(w);
        }
        for id in changed {
            let experts = self.experts_of(id);
            self.send(id, experts);
        }
    }

    /// Free memory of the live workers not in `except`: their memory less what `owner` and
    /// `spares` give them. `(id, free bytes, speed)`.
    fn free_memory(
        &self,
        owner: &[Vec<WorkerId>],
        spares: &[Vec<Vec<WorkerId>>],
        except: &BTreeSet<WorkerId>,
    ) -> Vec<(WorkerId, u64, f64)> {
        self.live()
            .iter()
            .filter(|w| !except.contains(&w.id))
            .map(|w| {
                let used: u64 = self
                    .cfg
                    .layers
                    .iter()
                    .zip(owner.iter().zip(spares))
                    .map(|(l, (os, ss))| {
                        let n = os.iter().filter(|&&o| o == w.id).count()
                            + ss.iter().filter(|s| s.contains(&w.id)).count();
                        n as u64 * l.expert_bytes
                    })
                    .sum();
                (w.id, w.memory.saturating_sub(used), w.speed)
            })
            .collect()
    }

    /// The plan with the experts `from` owns moved onto the live worker with the most free
    /// memory times speed, except those a live spare holder serves: with `keep_spares` (`from`
    /// is lost and may come back) they stay, and the routes go to the spare meanwhile; without
    /// (`from` leaves) the spare holder becomes the owner. Spares held by `from` stay with
    /// `keep_spares` (a lost worker loads them again when it comes back), else they are
    /// dropped. Returns the owners, the spares, the workers that got experts to load, and the
    /// bytes of the experts that found no room (they stay where they were); `None` if nothing
    /// is planned yet.
    #[allow(clippy::type_complexity)]
    fn replace(
        &self,
        from: &BTreeSet<WorkerId>,
        keep_spares: bool,
    ) -> Option<(
        Vec<Vec<WorkerId>>,
        Vec<Vec<Vec<WorkerId>>>,
        BTreeSet<WorkerId>,
        u64,
    )> {
        let mut owner = self.owner.clone()?;
        let mut spares = self.spares.clone();
        let live: BTreeSet<WorkerId> = self
            .live()
            .iter()
            .map(|w| w.id)
            .filter(|id| !from.contains(id))
            .collect();
        // Free memory of the live workers (owned and spare experts both take room).
        let mut free = self.free_memory(&owner, &spares, from);
        let mut changed = BTreeSet::new();
        let mut missing = 0;
        for (l, (os, ss)) in self
            .cfg
            .layers
            .iter()
            .zip(owner.iter_mut().zip(spares.iter_mut()))
        {
            for (o, s) in os.iter_mut().zip(ss.iter_mut()) {
                if !keep_spares {
                    s.retain(|x| !from.contains(x));
                }
                if !from.contains(o) {
                    continue;
                }
                if let Some(k) = s.iter().position(|x| live.contains(x)) {
                    // A live spare serves it already: a lost owner keeps it (the routes go to
                    // the spare until the owner is back), a leaving one hands it over.
                    if !keep_spares {
                        *o = s.remove(k);
                    }
                    continue;
                }
                let best = free
                    .iter_mut()
                    .filter(|f| f.1 >= l.expert_bytes)
                    .max_by(|a, b| (a.1 as f64 * a.2).total_cmp(&(b.1 as f64 * b.2)));
                match best {
                    Some(f) => {
                        f.1 -= l.expert_bytes;
                        *o = f.0;
                        changed.insert(f.0);
                    }
                    None => missing += l.expert_bytes,
                }
            }
        }
        Some((owner, spares, changed, missing))
    }

    fn experts_of(&self, id: WorkerId) -> Vec<(u32, Vec<u32>)> {
        let Some(owner) = &self.owner else {
            return Vec::new();
        };
        // `spares` has the shape of `owner` once planned.
        self.cfg
            .layers
            .iter()
            .zip(owner.iter().zip(&self.spares))
            .filter_map(|(l, (os, ss))| {
                let es: Vec<u32> = (0..os.len())
                    .filter(|&e| os[e] == id || ss[e].contains(&id))
                    .map(|e| e as u32)
                    .collect();
                (!es.is_empty()).then_some((l.layer, es))
            })
            .collect()
    }

    /// After every event: recompute the routes, move drains along, update readiness.
    fn settle(&mut self, now: Instant) {
        let holders = self.compute_holders();
        let routes = self.derive_routes(holders.as_ref());
        if routes != self.routes || holders != self.holders {
            self.routes = routes;
            self.holders = holders;
            self.actions.push_back(Action::Routes);
        }
        let drains: Vec<(WorkerId, Drain)> = self.drains.iter().map(|(&k, &v)| (k, v)).collect();
        for (id, phase) in drains {
            let routed = self.routes.iter().flatten().flatten().any(|&r| r == id);
            let phase = match phase {
                Drain::Moving if !routed => Drain::Released(now),
                p => p,
            };
            let phase = match phase {
                Drain::Released(t) if now.saturating_duration_since(t) >= self.cfg.drain_grace => {
                    self.send(id, Vec::new());
                    Drain::Done
                }
                p => p,
            };
            self.drains.insert(id, phase);
        }
        let serving = self.owner.is_some() && self.unavailable().is_empty();
        if serving != self.serving {
            self.serving = serving;
            self.actions.push_back(Action::Serving(serving));
        }
    }

    /// Every live worker serving each expert: its planned owner first if it holds it, then
    /// the others by id.
    fn compute_holders(&self) -> Option<Vec<Vec<Vec<WorkerId>>>> {
        let owner = self.owner.as_ref()?;
        Some(
            self.cfg
                .layers
                .iter()
                .zip(owner)
                .map(|(l, os)| {
                    os.iter()
                        .enumerate()
                        .map(|(e, &o)| {
                            let e = e as u32;
                            let first = self.holds(o, l.layer, e).then_some(o);
                            first
                                .into_iter()
                                .chain(
                                    self.workers
                                        .keys()
                                        .copied()
                                        .filter(|&w| w != o && self.holds(w, l.layer, e)),
                                )
                                .collect()
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// The routes: each expert's first live holder (its planned owner when that holds it),
    /// else the owner (a request fails there, naming it).
    fn derive_routes(
        &self,
        holders: Option<&Vec<Vec<Vec<WorkerId>>>>,
    ) -> Option<Vec<Vec<WorkerId>>> {
        let owner = self.owner.as_ref()?;
        Some(
            holders?
                .iter()
                .zip(owner)
                .map(|(hs, os)| {
                    hs.iter()
                        .zip(os)
                        .map(|(h, &o)| h.first().copied().unwrap_or(o))
                        .collect()
                })
                .collect(),
        )
    }
}

/// `(layer, expert)` pairs of a per-layer list.
fn flatten(experts: &[(u32, Vec<u32>)]) -> BTreeSet<(u32, u32)> {
    experts
        .iter()
        .flat_map(|(l, es)| es.iter().map(move |&e| (*l, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min_workers: usize) -> Config {
        Config {
            min_workers,
            heartbeat_timeout: Duration::from_secs(3),
            layers: (1..3)
                .map(|layer| LayerExperts {
                    layer,
                    n_experts: 8,
                    expert_bytes: 10,
                    n_groups: 2,
                })
                .collect(),
            drain_grace: Duration::from_millis(500),
            copies: 1,
        }
    }

    fn hello(name: &str, memory: u64) -> Hello {
        Hello {
            name: name.into(),
            memory,
            speed: 1.0,
        }
    }

    fn drain(m: &mut Membership) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn ready(m: &mut Membership, now: Instant, id: WorkerId) {
        let g = m.worker(id).unwrap().generation;
        m.handle_report(
            now,
            id,
            Report {
                generation: g,
                loaded: true,
                done_bytes: 1,
                total_bytes: 1,
            },
        );
    }

    #[test]
    fn plans_when_enough_workers_and_serves_when_all_loaded() {
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(2));
        let a = m.handle_hello(t0, hello("a", 1000));
        assert!(drain(&mut m).is_empty(), "one worker of two: no plan yet");
        let b = m.handle_hello(t0, hello("b", 1000));
        let acts = drain(&mut m);
        assert_eq!(acts.len(), 4);
        assert_eq!(
            acts[0],
            Action::Planned {
                spares: 0,
                without_spare: 0
            }
        );
        assert_eq!(acts[3], Action::Routes);
        let Action::Assign {
            worker, experts, ..
        } = &acts[1]
        else {
            panic!("{acts:?}")
        };
        assert_eq!(*worker, a);
        assert_eq!(experts, &vec![(1, vec![0, 1, 2, 3]), (2, vec![0, 1, 2, 3])]);
        assert!(!m.is_serving());
        assert_eq!(m.unavailable().len(), 2);
        ready(&mut m, t0, a);
        assert!(!m.is_serving());
        // A report about an older generation does not count.
        m.handle_report(
            t0,
            b,
            Report {
                generation: 0,
                loaded: true,
                done_bytes: 0,
                total_bytes: 0,
            },
        );
        assert!(!m.is_serving());
        ready(&mut m, t0, b);
        assert!(m.is_serving());
        // Each loaded worker adds holders (the routes' fallbacks), then the cluster serves.
        assert_eq!(
            drain(&mut m),
            vec![Action::Routes, Action::Routes, Action::Serving(true)]
        );
        assert_eq!(m.layer_holders(2).unwrap()[4], [b]);
        assert_eq!(m.owner(2, 4), Some(b));
        assert_eq!(m.layer_owners(1), Some(&[a, a, a, a, b, b, b, b][..]));
    }

    #[test]
    fn a_silent_worker_is_lost_and_comes_back_with_the_same_experts() {
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(2));
        // Memory for exactly its half: no room to repair elsewhere.
        let a = m.handle_hello(t0, hello("a", 80));
        let b = m.handle_hello(t0, hello("b", 80));
        ready(&mut m, t0, a);
        ready(&mut m, t0, b);
        drain(&mut m);
        let t1 = t0 + Duration::from_secs(2);
        m.handle_report(
            t1,
            a,
            Report {
                generation: m.worker(a).unwrap().generation,
                loaded: true,
                done_bytes: 0,
                total_bytes: 0,
            },
        );
        m.handle_tick(t0 + Duration::from_secs(4));
        assert_eq!(
            drain(&mut m),
            vec![
                Action::Lost {
                    worker: b,
                    name: "b".into()
                },
                // b no longer holds anything: the fallbacks change.
                Action::Routes,
                Action::Serving(false)
            ]
        );
        assert_eq!(m.worker(b).unwrap().state.label(), "lost");
        let missing = m.unavailable();
        assert_eq!(missing.len(), 2, "{missing:?}");
        // It comes back under the same name: same id, same experts.
        let t2 = t0 + Duration::from_secs(10);
        assert_eq!(m.handle_hello(t2, hello("b", 80)), b);
        let acts = drain(&mut m);
        assert!(
            matches!(&acts[..], [Action::Assign { worker, experts, .. }] if *worker == b && experts[0].1.len() == 4),
            "{acts:?}"
        );
        ready(&mut m, t2, b);
        assert!(m.is_serving());
    }

    /// Two copies asked for, and two workers with room for all 16 experts each (8 owned, 8
    /// spare), planned but not loaded.
    fn two_with_spares(t0: Instant) -> (Membership, WorkerId, WorkerId) {
        let mut m = Membership::new(Config {
            copies: 2,
            ..cfg(2)
        });
        let a = m.handle_hello(t0, hello("a", 160));
        let b = m.handle_hello(t0, hello("b", 160));
        (m, a, b)
    }

    #[test]
    fn spare_copies_serve_through_a_loss_and_the_owner_takes_its_experts_back() {
        let t0 = Instant::now();
        let (mut m, a, b) = two_with_spares(t0);
        let acts = drain(&mut m);
        assert_eq!(
            acts[0],
            Action::Planned {
                spares: 16,
                without_spare: 0
            }
        );
        let all: Vec<(u32, Vec<u32>)> = vec![(1, (0..8).collect()), (2, (0..8).collect())];
        assert_eq!(assigned(&acts, a), Some(all.clone()));
        assert_eq!(assigned(&acts, b), Some(all));
        assert_eq!((m.spares_held(a), m.spares_held(b)), (8, 8));
        assert_eq!(m.redundancy(), (0, 16));
        ready(&mut m, t0, a);
        ready(&mut m, t0, b);
        assert!(m.is_serving());
        assert_eq!(m.redundancy(), (16, 16));
        let planned: Vec<Vec<WorkerId>> = [1, 2]
            .iter()
            .map(|&l| m.layer_owners(l).unwrap().to_vec())
            .collect();
        assert_eq!(routed_to(&m, a), 8);
        for (i, l) in [1u32, 2].into_iter().enumerate() {
            for (e, hs) in m.layer_holders(l).unwrap().iter().enumerate() {
                let other = if planned[i][e] == a { b } else { a };
                assert_eq!(hs, &[planned[i][e], other], "layer {l} expert {e}");
            }
        }
        drain(&mut m);

        // b goes silent: no gap, a answers for everything, nothing moves.
        ready(&mut m, t0 + Duration::from_secs(2), a);
        m.handle_tick(t0 + Duration::from_secs(4));
        let acts = drain(&mut m);
        assert!(m.is_serving(), "{acts:?}");
        assert!(!acts.contains(&Action::Serving(false)), "{acts:?}");
        assert!(
            !acts.iter().any(|x| matches!(x, Action::Assign { .. })),
            "{acts:?}"
        );
        assert_eq!(routed_to(&m, a), 16);
        assert_eq!(m.redundancy(), (0, 16));
        assert!(m.unavailable().is_empty());

        // b comes back, reloads, and gets its share of the routes again.
        let t2 = t0 + Duration::from_secs(5);
        assert_eq!(m.handle_hello(t2, hello("b", 160)), b);
        assert_eq!(routed_to(&m, a), 16, "until b has loaded");
        ready(&mut m, t2, b);
        assert_eq!(routed_to(&m, b), 8);
        assert_eq!(m.redundancy(), (16, 16));
        for (i, l) in [1u32, 2].into_iter().enumerate() {
            assert_eq!(m.layer_owners(l).unwrap(), &planned[i][..]);
        }

        // Draining b: its experts go to their spare holder a, at once (a holds them).
        m.handle_drain(t2, b).unwrap();
        assert_eq!(
            (1..=2)
                .map(|l| m
                    .layer_owners(l)
                    .unwrap()
                    .iter()
                    .filter(|&&o| o == a)
                    .count())
                .sum::<usize>(),
            16
        );
        // a owns everything now; b's spares are dropped with it.
        assert!((1..=2).all(|l| (0..8).all(|e| m.owner(l, e) == Some(a))));
        assert_eq!((m.spares_held(a), m.spares_held(b)), (0, 0));
        assert!(m.is_serving());
    }

    #[test]
    fn a_worker_that_joins_later_restores_the_copies_a_loss_took() {
        let t0 = Instant::now();
        let (mut m, a, b) = two_with_spares(t0);
        ready(&mut m, t0, a);
        ready(&mut m, t0, b);
        assert_eq!(m.redundancy(), (16, 16));
        drain(&mut m);
        // b is lost; a has no room for more: one copy of everything, nothing to send.
        m.handle_disconnect(t0, b);
        assert!(m.is_serving());
        assert_eq!(m.redundancy(), (0, 16));
        let acts = drain(&mut m);
        assert!(
            !acts.iter().any(|x| matches!(x, Action::Assign { .. })),
            "{acts:?}"
        );
        // c joins with room for 12: it gets spares of 12 experts, and never a second copy of
        // one; a's assignment does not change.
        let c = m.handle_hello(t0, hello("c", 120));
        let acts = drain(&mut m);
        let got = assigned(&acts, c).expect("c gets spares");
        assert_eq!(got.iter().map(|(_, es)| es.len()).sum::<usize>(), 12);
        assert!(assigned(&acts, a).is_none(), "{acts:?}");
        ready(&mut m, t0, c);
        assert_eq!(m.redundancy(), (12, 16));
        for (l, es) in &got {
            for &e in es {
                assert_eq!(m.layer_holders(*l).unwrap()[e as usize].len(), 2);
            }
        }
        // Nothing more to place: the next ticks send nothing.
        m.handle_tick(t0 + Duration::from_millis(100));
        assert!(!drain(&mut m)
            .iter()
            .any(|x| matches!(x, Action::Assign { .. })),);
        // Without copies asked for, a later worker gets nothing.
        let mut m = Membership::new(cfg(2));
        for n in ["a", "b"] {
            let id = m.handle_hello(t0, hello(n, 160));
            ready(&mut m, t0, id);
        }
        drain(&mut m);
        m.handle_hello(t0, hello("c", 160));
        assert!(!drain(&mut m)
            .iter()
            .any(|x| matches!(x, Action::Assign { .. })),);
    }

    #[test]
    fn with_some_spares_a_loss_leaves_a_gap_only_where_there_was_none() {
        let t0 = Instant::now();
        let mut m = Membership::new(Config {
            copies: 2,
            ..cfg(3)
        });
        // 16 experts of 10 bytes on three workers of 80: the owners take 160 of the 240, so
        // only some experts get a spare, and nobody has room to take over a lost worker's.
        let ids = ["a", "b", "c"].map(|n| m.handle_hello(t0, hello(n, 80)));
        let acts = drain(&mut m);
        let Some(Action::Planned {
            spares,
            without_spare,
        }) = acts.first().cloned()
        else {
            panic!("{acts:?}")
        };
        assert!(spares > 0 && without_spare > 0, "{acts:?}");
        assert_eq!(spares + without_spare, 16);
        for id in ids {
            ready(&mut m, t0, id);
        }
        assert!(m.is_serving());
        assert_eq!(m.redundancy(), (spares, 16));
        let c = ids[2];
        // What c owns without a spare elsewhere is what the cluster must miss.
        let mut want: Vec<(u32, Vec<u32>)> = Vec::new();
        for l in [1u32, 2] {
            let es: Vec<u32> = (0..8u32)
                .filter(|&e| {
                    m.owner(l, e) == Some(c) && m.layer_holders(l).unwrap()[e as usize].len() == 1
                })
                .collect();
            if !es.is_empty() {
                want.push((l, es));
            }
        }
        let owned_by_c = (1..=2u32)
            .map(|l| (0..8).filter(|&e| m.owner(l, e) == Some(c)).count())
            .sum::<usize>();
        let gaps = want.iter().map(|(_, es)| es.len()).sum::<usize>();
        assert!(
            gaps > 0 && gaps < owned_by_c,
            "{gaps} of {owned_by_c}: both cases"
        );
        m.handle_disconnect(t0, c);
        assert_eq!(m.unavailable(), want);
        assert!(!m.is_serving());
        // Every expert c owned with a spare is routed to that spare.
        for l in [1u32, 2] {
            for e in 0..8u32 {
                if m.owner(l, e) == Some(c)
                    && !want.iter().any(|(wl, es)| *wl == l && es.contains(&e))
                {
                    let r = m.layer_owners(l).unwrap()[e as usize];
                    assert_ne!(r, c);
                    assert_eq!(m.layer_holders(l).unwrap()[e as usize], [r]);
                }
            }
        }
    }

    #[test]
    fn experts_of_a_lost_worker_move_to_a_worker_with_room() {
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(2));
        let a = m.handle_hello(t0, hello("a", 80));
        let b = m.handle_hello(t0, hello("b", 80));
        ready(&mut m, t0, a);
        ready(&mut m, t0, b);
        drain(&mut m);
        m.handle_disconnect(t0, a);
        assert!(!m.is_serving());
        // A new, big worker arrives and takes a's experts.
        let c = m.handle_hello(t0, hello("c", 1000));
        let acts = drain(&mut m);
        assert!(
            acts.iter()
                .any(|x| matches!(x, Action::Assign { worker, experts, .. }
                if *worker == c && experts.iter().map(|e| e.1.len()).sum::<usize>() == 8)),
            "{acts:?}"
        );
        assert!(m.worker(a).unwrap().experts.is_empty());
        ready(&mut m, t0, c);
        assert!(m.is_serving());
        assert!(m.unavailable().is_empty());
    }

    #[test]
    fn not_enough_memory_is_reported_not_planned() {
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(1));
        m.handle_hello(t0, hello("small", 50));
        let acts = drain(&mut m);
        assert!(
            matches!(
                &acts[..],
                [Action::PlanFailed(PlanError::DoesNotFit { .. })]
            ),
            "{acts:?}"
        );
        assert!(!m.is_planned());
    }

    /// Three workers with room for 12 of the 16 experts each, all loaded.
    fn three_ready(t0: Instant) -> (Membership, [WorkerId; 3]) {
        let mut m = Membership::new(cfg(3));
        let ids = ["a", "b", "c"].map(|n| m.handle_hello(t0, hello(n, 120)));
        for id in ids {
            ready(&mut m, t0, id);
        }
        assert!(m.is_serving());
        drain(&mut m);
        (m, ids)
    }

    fn routed_to(m: &Membership, id: WorkerId) -> usize {
        [1, 2]
            .iter()
            .map(|&l| {
                m.layer_owners(l)
                    .unwrap()
                    .iter()
                    .filter(|&&o| o == id)
                    .count()
            })
            .sum()
    }

    fn assigned(acts: &[Action], id: WorkerId) -> Option<Vec<(u32, Vec<u32>)>> {
        acts.iter().rev().find_map(|a| match a {
            Action::Assign {
                worker, experts, ..
            } if *worker == id => Some(experts.clone()),
            _ => None,
        })
    }

    #[test]
    fn a_drained_worker_keeps_serving_until_its_experts_are_loaded_elsewhere() {
        let t0 = Instant::now();
        let (mut m, [a, b, c]) = three_ready(t0);
        let held_b = routed_to(&m, b);
        assert!(held_b > 0);
        m.handle_drain(t0, b).unwrap();
        assert_eq!(m.worker(b).unwrap().state, WorkerState::Draining);
        assert!(m.is_draining(b));
        let acts = drain(&mut m);
        // The others get bigger assignments (their own experts plus some of b's); b is not
        // told anything yet and still answers for its experts.
        let (na, nc) = (assigned(&acts, a).unwrap(), assigned(&acts, c).unwrap());
        let count = |x: &[(u32, Vec<u32>)]| x.iter().map(|e| e.1.len()).sum::<usize>();
        assert_eq!(count(&na) + count(&nc), 16);
        assert!(count(&na) <= 12 && count(&nc) <= 12);
        assert!(assigned(&acts, b).is_none(), "{acts:?}");
        assert_eq!(routed_to(&m, b), held_b);
        assert!(m.is_serving(), "no gap while the others load");
        assert_eq!(m.owner(1, 0).map(|o| o != b), Some(true));
        assert_eq!(
            m.workers()
                .filter(|w| w.state == WorkerState::Ready)
                .count(),
            0,
            "a and c are loading"
        );

        // a has loaded: the routes of its new experts switch to it, b keeps c's share.
        ready(&mut m, t0, a);
        let acts = drain(&mut m);
        assert_eq!(acts, vec![Action::Routes]);
        let left = routed_to(&m, b);
        assert!(left > 0 && left < held_b);
        assert!(m.is_serving());

        // c has loaded: nothing routes to b; after the grace b is told it holds nothing.
        let t1 = t0 + Duration::from_millis(100);
        ready(&mut m, t1, c);
        assert_eq!(drain(&mut m), vec![Action::Routes]);
        assert_eq!(routed_to(&m, b), 0);
        m.handle_tick(t1 + Duration::from_millis(400));
        assert!(drain(&mut m).is_empty(), "within the grace");
        m.handle_tick(t1 + Duration::from_millis(500));
        let acts = drain(&mut m);
        assert_eq!(assigned(&acts, b), Some(vec![]), "{acts:?}");
        assert_eq!(acts.len(), 1);
        ready(&mut m, t1, b);
        let w = m.worker(b).unwrap();
        assert_eq!(w.state, WorkerState::Draining);
        assert!(w.experts.is_empty() && w.held.is_empty());
        assert!(m.is_serving());
        assert!(m.unavailable().is_empty());

        // Draining again is accepted and changes nothing; a hello gives it nothing.
        m.handle_drain(t1, b).unwrap();
        m.handle_hello(t1, hello("b", 120));
        assert_eq!(assigned(&drain(&mut m), b), Some(vec![]));
        assert_eq!(m.worker(b).unwrap().state, WorkerState::Draining);
        assert_eq!(routed_to(&m, b), 0);

        // When it goes away it leaves the membership.
        m.handle_disconnect(t1, b);
        assert_eq!(
            drain(&mut m),
            vec![Action::Left {
                worker: b,
                name: "b".into()
            }]
        );
        assert!(m.worker(b).is_none());
        assert!(m.is_serving());
    }

    #[test]
    fn a_drain_without_room_elsewhere_is_refused_and_changes_nothing() {
        let t0 = Instant::now();
        let mut m = Membership::new(cfg(2));
        // a has room for 2 more experts; b's 8 need 80 bytes, 60 are missing.
        let a = m.handle_hello(t0, hello("a", 100));
        let b = m.handle_hello(t0, hello("b", 80));
        ready(&mut m, t0, a);
        ready(&mut m, t0, b);
        drain(&mut m);
        let before: Vec<Vec<WorkerId>> = [1, 2]
            .iter()
            .map(|&l| m.layer_owners(l).unwrap().to_vec())
            .collect();
        assert_eq!(
            m.handle_drain(t0, b),
            Err(DrainError::NoRoom {
                name: "b".into(),
                missing: 60
            })
        );
        let msg = m.handle_drain(t0, b).unwrap_err().to_string();
        assert!(msg.contains("60 bytes"), "{msg}");
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.worker(b).unwrap().state, WorkerState::Ready);
        assert!(!m.is_draining(b));
        for (i, &l) in [1, 2].iter().enumerate() {
            assert_eq!(m.layer_owners(l).unwrap(), &before[i][..]);
            assert!((0..8).all(|e| m.owner(l, e) == Some(before[i][e as usize])));
        }
        assert_eq!(m.handle_drain(t0, 99), Err(DrainError::Unknown(99)));
        m.handle_disconnect(t0, a);
        assert!(matches!(m.handle_drain(t0, a), Err(DrainError::Lost(_))));
    }

    #[test]
    fn a_draining_worker_lost_before_the_others_loaded_leaves_at_once() {
        let t0 = Instant::now();
        let (mut m, [a, b, c]) = three_ready(t0);
        m.handle_drain(t0, b).unwrap();
        drain(&mut m);
        m.handle_disconnect(t0, b);
        let acts = drain(&mut m);
        assert!(
            acts.contains(&Action::Left {
                worker: b,
                name: "b".into()
            }) && acts.contains(&Action::Serving(false)),
            "{acts:?}"
        );
        assert!(m.worker(b).is_none());
        ready(&mut m, t0, a);
        ready(&mut m, t0, c);
        assert!(m.is_serving());
        assert_eq!(routed_to(&m, a) + routed_to(&m, c), 16);
    }

    #[test]
    fn a_worker_loading_a_bigger_assignment_still_serves_what_it_holds() {
        let t0 = Instant::now();
        let (mut m, [a, b, c]) = three_ready(t0);
        let held_b = routed_to(&m, b);
        // b is lost; its experts go to a and c, which keep serving their own meanwhile: only
        // b's experts are missing.
        m.handle_disconnect(t0, b);
        let acts = drain(&mut m);
        assert!(assigned(&acts, a).is_some() && assigned(&acts, c).is_some());
        assert!(matches!(
            m.worker(a).unwrap().state,
            WorkerState::Loading { .. }
        ));
        let missing: usize = m.unavailable().iter().map(|(_, es)| es.len()).sum();
        assert_eq!(missing, held_b);
        assert!(!m.is_serving());
        ready(&mut m, t0, a);
        ready(&mut m, t0, c);
        assert!(m.is_serving());
        assert_eq!(routed_to(&m, b), 0);
    }
}
