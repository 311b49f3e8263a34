//! Serving metrics and their Prometheus text exposition: counters, gauges and histograms kept
//! in atomics (cheap to update from the scheduler's thread and the data plane's tasks), and
//! per-expert hit counts taken from the routing the model sends to its routed experts.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::model::moe::{ExpertError, MoeScratch, RoutedExperts, Routing};

/// A cumulative histogram with fixed bucket bounds (seconds), as Prometheus wants it.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound (observations `<=` it, not cumulative here), then the overflow.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

/// Round trips of one MoE layer to one worker: 50 µs to 10 s.
pub const RTT_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
];

/// Time to first token: 10 ms to 5 min.
pub const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Appends `name_bucket`, `name_sum` and `name_count` lines with `labels` (`k="v",...` or
    /// empty). The `# TYPE` line is the caller's.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

/// How many times each routed expert was chosen, per MoE layer.
#[derive(Debug)]
pub struct ExpertHits {
    /// `(model layer, counts per expert)`, in layer order.
    layers: Vec<(usize, Vec<AtomicU64>)>,
}

impl ExpertHits {
    /// From the model's expert layout (`(layer, experts, bytes per expert)`).
    pub fn new(layout: &[(usize, usize, u64)]) -> Self {
        ExpertHits {
            layers: layout
                .iter()
                .map(|&(l, n, _)| (l, (0..n).map(|_| AtomicU64::new(0)).collect()))
                .collect(),
        }
    }

    pub fn record(&self, layer: usize, routing: &Routing) {
        let Ok(i) = self.layers.binary_search_by_key(&layer, |(l, _)| *l) else {
            return;
        };
        let counts = &self.layers[i].1;
        for t in 0..routing.n_tokens() {
            for &e in routing.token(t).0 {
                if let Some(c) = counts.get(e as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn get(&self, layer: usize, expert: usize) -> u64 {
        self.layers
            .iter()
            .find(|(l, _)| *l == layer)
            .and_then(|(_, c)| c.get(expert))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Lines of `name{layer=..,expert=..} n` for every expert chosen at least once.
    fn render(&self, out: &mut String, name: &str) {
        for (l, counts) in &self.layers {
            for (e, c) in counts.iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(out, "{name}{{layer=\"{l}\",expert=\"{e}\"}} {n}");
                }
            }
        }
    }
}

/// Routed experts that count every expert the router chooses, then hand the layer on.
pub struct CountingExperts {
    pub inner: Arc<dyn RoutedExperts>,
    pub hits: Arc<ExpertHits>,
}

impl RoutedExperts for CountingExperts {
    fn begin(&self, layer: usize, xs: &[f32], routing: &Routing) -> Result<(), ExpertError> {
        self.hits.record(layer, routing);
        self.inner.begin(layer, xs, routing)
    }

    fn as_gpu(&self) -> Option<&engine::gpu::GpuExperts> {
        self.inner.as_gpu()
    }

    fn eval(
        &self,
        layer: usize,
        xs: &[f32],
        routing: &Routing,
        out: &mut [f32],
        scratch: &mut MoeScratch,
    ) -> Result<(), ExpertError> {
        self.inner.eval(layer, xs, routing, out, scratch)
    }
}

/// What the API and the scheduler count.
#[derive(Debug)]
pub struct Metrics {
    pub requests: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests that ended with an error after being accepted.
    pub failed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Forward steps of the batch.
    pub steps: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub active: AtomicUsize,
    pub ttft: Histogram,
    pub hits: Arc<ExpertHits>,
}

impl Metrics {
    pub fn new(hits: Arc<ExpertHits>) -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            hits,
        }
    }
}

/// One worker's round-trip histogram, by name.
pub struct WorkerRtt<'a> {
    pub name: &'a str,
    pub hist: &'a Histogram,
}

/// The Prometheus text exposition (format 0.0.4) of everything.
pub fn render(m: &Metrics, tokens_per_second: f64, workers: &[WorkerRtt<'_>]) -> String {
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        &mut out,
        "dsv3_requests_total",
        "Generation requests accepted.",
        ld(&m.requests),
    );
    counter(
        &mut out,
        "dsv3_requests_rejected_total",
        "Requests refused because the queue was full.",
        ld(&m.rejected),
    );
    counter(
        &mut out,
        "dsv3_requests_failed_total",
        "Accepted requests that ended with an error.",
        ld(&m.failed),
    );
    counter(
        &mut out,
        "dsv3_prompt_tokens_total",
        "Prompt tokens processed.",
        ld(&m.prompt_tokens),
    );
    counter(
        &mut out,
        "dsv3_generated_tokens_total",
        "Tokens generated.",
        ld(&m.generated_tokens),
    );
    counter(
        &mut out,
        "dsv3_forward_steps_total",
        "Batched forward steps.",
        ld(&m.steps),
    );
    gauge(
        &mut out,
        "dsv3_tokens_per_second",
        "Generated tokens per second, recent window.",
        tokens_per_second,
    );
    gauge(
        &mut out,
        "dsv3_queue_depth",
        "Requests waiting for a batch slot.",
        m.queue_depth.load(Ordering::Relaxed) as f64,
    );
    gauge(
        &mut out,
        "dsv3_active_sequences",
        "Sequences in the running batch.",
        m.active.load(Ordering::Relaxed) as f64,
    );
    let _ = writeln!(
        out,
        "# HELP dsv3_time_to_first_token_seconds From request to its first generated token.\n# TYPE dsv3_time_to_first_token_seconds histogram"
    );
    m.ttft
        .render(&mut out, "dsv3_time_to_first_token_seconds", "");
    let _ = writeln!(
        out,
        "# HELP dsv3_worker_round_trip_seconds One MoE layer's round trip to a worker.\n# TYPE dsv3_worker_round_trip_seconds histogram"
    );
    for w in workers {
        let labels = format!("worker=\"{}\"", escape_label(w.name));
        w.hist
            .render(&mut out, "dsv3_worker_round_trip_seconds", &labels);
    }
    let _ = writeln!(
        out,
        "# HELP dsv3_expert_hits_total Times the router chose a routed expert.\n# TYPE dsv3_expert_hits_total counter"
    );
    m.hits.render(&mut out, "dsv3_expert_hits_total");
    out
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        for ms in [0.5, 1.0, 5.0, 50.0, 500.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let mut s = String::new();
        h.render(&mut s, "x", "w=\"a\"");
        assert_eq!(
            s,
            "x_bucket{w=\"a\",le=\"0.001\"} 2\nx_bucket{w=\"a\",le=\"0.01\"} 3\n\
             x_bucket{w=\"a\",le=\"0.1\"} 4\nx_bucket{w=\"a\",le=\"+Inf\"} 5\n\
             x_sum{w=\"a\"} 0.5565\nx_count{w=\"a\"} 5\n"
        );
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn expert_hits_count_each_chosen_expert_per_layer() {
        let hits = ExpertHits::new(&[(1, 4, 10), (2, 4, 10)]);
        let routing = Routing {
            top_k: 2,
            experts: vec![0, 3, 3, 1],
            weights: vec![0.5; 4],
        };
        hits.record(2, &routing);
        hits.record(7, &routing); // not a MoE layer: ignored
        assert_eq!(
            (0..4).map(|e| hits.get(2, e)).collect::<Vec<_>>(),
            [1, 1, 0, 2]
        );
        assert_eq!(hits.get(1, 3), 0);
        let m = Metrics::new(Arc::new(hits));
        m.requests.fetch_add(3, Ordering::Relaxed);
        let text = render(&m, 1.5, &[]);
        assert!(text.contains("dsv3_requests_total 3\n"), "{text}");
        assert!(text.contains("dsv3_tokens_per_second 1.5\n"), "{text}");
        assert!(
            text.contains("dsv3_expert_hits_total{layer=\"2\",expert=\"3\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("layer=\"1\""), "{text}");
        // Every sample line is `name{labels} value` or `name value` with a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let v = line.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
