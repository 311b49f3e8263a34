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
//! the experts of lost workers. The cluster serves when every expert of the plan has a `Ready`
//! holder.

use std::collections::{BTreeMap, VecDeque};
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
    /// The cluster's readiness changed.
    Serving(bool),
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
}

/// Membership settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub min_workers: usize,
    pub heartbeat_timeout: Duration,
    /// The MoE layers to place.
    pub layers: Vec<LayerExperts>,
}

pub struct Membership {
    cfg: Config,
    workers: BTreeMap<WorkerId, Worker>,
    next_id: WorkerId,
    generation: u64,
    /// `owner[layer index in cfg.layers][expert]`, once planned.
    owner: Option<Vec<Vec<WorkerId>>>,
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

    /// The holder of `expert` of model layer `layer`, if planned.
    pub fn owner(&self, layer: u32, expert: u32) -> Option<WorkerId> {
        let li = self.cfg.layers.iter().position(|l| l.layer == layer)?;
        self.owner.as_ref()?.get(li)?.get(expert as usize).copied()
    }

    /// Owners of one model layer's experts (indexed by expert), if planned.
    pub fn layer_owners(&self, layer: u32) -> Option<&[WorkerId]> {
        let li = self.cfg.layers.iter().position(|l| l.layer == layer)?;
        self.owner.as_ref().map(|o| o[li].as_slice())
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
        });
        w.memory = hello.memory;
        w.speed = hello.speed;
        w.last_seen = now;
        w.state = WorkerState::Joining;
        // Whatever it had loaded before is gone from our point of view until it reports again.
        if !w.experts.is_empty() {
            self.generation += 1;
            w.generation = self.generation;
            let experts = w.experts.clone();
            w.state = WorkerState::Loading { done: 0, total: 0 };
            self.actions.push_back(Action::Assign {
                worker: id,
                generation: self.generation,
                experts,
            });
        }
        self.update_serving();
        self.maybe_plan();
        id
    }

    /// A heartbeat from `id`.
    pub fn handle_report(&mut self, now: Instant, id: WorkerId, r: Report) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.last_seen = now;
        if w.state == WorkerState::Lost || w.state == WorkerState::Draining {
            return;
        }
        if w.generation != 0 && r.generation == w.generation {
            w.state = if r.loaded {
                WorkerState::Ready
            } else {
                WorkerState::Loading {
                    done: r.done_bytes,
                    total: r.total_bytes,
                }
            };
        }
        self.update_serving();
    }

    /// The worker's connection closed, or the data plane found it unreachable.
    pub fn handle_disconnect(&mut self, _now: Instant, id: WorkerId) {
        self.mark_lost(id);
        self.repair();
        self.update_serving();
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
        self.update_serving();
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Experts of the plan whose holder is not `Ready`, per layer (what a request would miss).
    pub fn unavailable(&self) -> Vec<(u32, Vec<u32>)> {
        let Some(owner) = &self.owner else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (l, os) in self.cfg.layers.iter().zip(owner) {
            let missing: Vec<u32> = (0..os.len() as u32)
                .filter(|&e| {
                    self.workers
                        .get(&os[e as usize])
                        .is_none_or(|w| w.state != WorkerState::Ready)
                })
                .collect();
            if !missing.is_empty() {
                out.push((l.layer, missing));
            }
        }
        out
    }

    fn mark_lost(&mut self, id: WorkerId) {
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
        match placement::plan(&self.cfg.layers, &caps) {
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
        for (i, &id) in ids.iter().enumerate() {
            let experts = plan.experts_of(i);
            self.send(id, experts);
        }
    }

    fn send(&mut self, id: WorkerId, experts: Vec<(u32, Vec<u32>)>) {
        self.generation += 1;
        let w = self.workers.get_mut(&id).expect("known worker");
        w.generation = self.generation;
        w.experts = experts.clone();
        w.state = WorkerState::Loading { done: 0, total: 0 };
        self.actions.push_back(Action::Assign {
            worker: id,
            generation: self.generation,
            experts,
        });
    }

    /// Moves the experts of lost workers onto live workers with free memory (by speed).
    fn repair(&mut self) {
        let Some(owner) = self.owner.as_mut() else {
            return;
        };
        let lost: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.state == WorkerState::Lost)
            .map(|w| w.id)
            .collect();
        if lost.is_empty() {
            return;
        }
        // Free memory of the live workers.
        let mut free: Vec<(WorkerId, u64, f64)> = self
            .workers
            .values()
            .filter(|w| !matches!(w.state, WorkerState::Lost | WorkerState::Draining))
            .map(|w| {
                let used: u64 = self
                    .cfg
                    .layers
                    .iter()
                    .zip(owner.iter())
                    .map(|(l, os)| {
                        os.iter().filter(|&&o| o == w.id).count() as u64 * l.expert_bytes
                    })
                    .sum();
                (w.id, w.memory.saturating_sub(used), w.speed)
            })
            .collect();
        let mut changed = std::collections::BTreeSet::new();
        for (l, os) in self.cfg.layers.iter().zip(owner.iter_mut()) {
            for o in os.iter_mut() {
                if !lost.contains(o) {
                    continue;
                }
                // The live worker with room and the most speed per expert already taken.
                let best = free
                    .iter_mut()
                    .filter(|f| f.1 >= l.expert_bytes)
                    .max_by(|a, b| (a.1 as f64 * a.2).total_cmp(&(b.1 as f64 * b.2)));
                if let Some(f) = best {
                    f.1 -= l.expert_bytes;
                    *o = f.0;
                    changed.insert(f.0);
                }
            }
        }
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

    fn experts_of(&self, id: WorkerId) -> Vec<(u32, Vec<u32>)> {
        let Some(owner) = &self.owner else {
            return Vec::new();
        };
        self.cfg
            .layers
            .iter()
            .zip(owner)
            .filter_map(|(l, os)| {
                let es: Vec<u32> = (0..os.len() as u32)
                    .filter(|&e| os[e as usize] == id)
                    .collect();
                (!es.is_empty()).then_some((l.layer, es))
            })
            .collect()
    }

    fn update_serving(&mut self) {
        let serving = self.owner.is_some() && self.unavailable().is_empty();
        if serving != self.serving {
            self.serving = serving;
            self.actions.push_back(Action::Serving(serving));
        }
    }
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
        assert_eq!(acts.len(), 2);
        let Action::Assign {
            worker, experts, ..
        } = &acts[0]
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
        assert_eq!(drain(&mut m), vec![Action::Serving(true)]);
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
}
