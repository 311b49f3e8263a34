//! Token sampling: greedy, temperature, top-k, top-p, min-p, seeded.
//!
//! One [`Sampler`] per generation stream. It owns its random generator (xoshiro256**, seeded
//! from [`SamplingParams::seed`]; no global RNG), so the same seed and the same logits give the
//! same tokens. Buffers are kept between calls: after the first call for a vocabulary size,
//! sampling allocates nothing.
//!
//! Order of operations (as in llama.cpp's common chain and Hugging Face): temperature-scaled
//! softmax, top-k, top-p (smallest set whose cumulative probability reaches p), min-p (drop
//! tokens below `min_p` × the top probability), then one draw from what is left, renormalized.
//! The most probable token always survives the filters.

/// Sampling settings of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 (or negative, or not finite) means greedy: the argmax, lowest id on ties.
    pub temperature: f32,
    /// Keep the k most probable tokens; 0 means off.
    pub top_k: usize,
    /// Nucleus size in (0, 1); 1 or more means off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` × the top one; 0 means off.
    pub min_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution (temperature 1, no filters).
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    fn is_greedy(&self) -> bool {
        !(self.temperature.is_finite() && self.temperature > 0.0) || self.top_k == 1
    }
}

/// A token left after filtering, with its renormalized probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub prob: f32,
}

/// Cumulative probabilities within this of `top_p` count as reaching it, so that float
/// rounding of exp() does not add one more token at an exact boundary.
const TOP_P_EPSILON: f64 = 1e-6;

/// Samples token ids from logits; see the module docs.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// Ids at or above this are never produced (vocabulary padding rows).
    banned_from: usize,
    /// `banned[id]`: never produce `id`. Shorter than the vocabulary: the rest are allowed.
    banned: Vec<bool>,
    /// Reused between calls: (weight, id), first logits, then probabilities.
    work: Vec<(f32, u32)>,
    /// Reused between calls: the result of [`Sampler::candidates`].
    out: Vec<Candidate>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: Xoshiro256::seed_from_u64(params.seed),
            banned_from: usize::MAX,
            banned: Vec::new(),
            work: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Never produce ids `>= first` (e.g. the embedding rows past the tokenizer's vocabulary:
    /// DeepSeek has 129,280 rows for 128,815 tokens).
    pub fn with_banned_from(mut self, first: u32) -> Self {
        self.banned_from = first as usize;
        self
    }

    /// Never produce these ids.
    pub fn with_banned_ids(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        for id in ids {
            let i = id as usize;
            if self.banned.len() <= i {
                self.banned.resize(i + 1, false);
            }
            self.banned[i] = true;
        }
        self
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The id to emit next.
    ///
    /// NaN logits count as −∞. If no logit is finite, the lowest allowed id is returned.
    ///
    /// # Panics
    /// If no id is allowed at all: `logits` empty, or every id banned (a caller's bug).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return self.argmax(logits);
        }
        self.filter(logits);
        let total: f64 = self.work.iter().map(|&(w, _)| f64::from(w)).sum();
        let mut target = self.rng.next_f64() * total;
        for &(w, id) in &self.work {
            target -= f64::from(w);
            if target < 0.0 {
                return id;
            }
        }
        // Rounding left `target` at or just above zero: the last candidate.
        self.work.last().map(|&(_, id)| id).unwrap_or(0)
    }

    /// The tokens [`Sampler::sample`] would draw from, with their renormalized probabilities
    /// (for greedy, the argmax alone with probability 1). Does not advance the RNG.
    pub fn candidates(&mut self, logits: &[f32]) -> &[Candidate] {
        self.out.clear();
        if self.params.is_greedy() {
            let id = self.argmax(logits);
            self.out.push(Candidate { id, prob: 1.0 });
            return &self.out;
        }
        self.filter(logits);
        let total: f64 = self.work.iter().map(|&(w, _)| f64::from(w)).sum();
        self.out.extend(self.work.iter().map(|&(w, id)| Candidate {
            id,
            prob: (f64::from(w) / total) as f32,
        }));
        &self.out
    }

    fn allowed_len(&self, logits: &[f32]) -> usize {
        logits.len().min(self.banned_from)
    }

    fn is_banned(&self, id: usize) -> bool {
        self.banned.get(id).copied().unwrap_or(false)
    }

    /// Greedy choice: highest logit, lowest id on ties, NaN never preferred.
    fn argmax(&self, logits: &[f32]) -> u32 {
        let mut best: Option<(f32, usize)> = None;
        for (id, &l) in logits[..self.allowed_len(logits)].iter().enumerate() {
            if self.is_banned(id) {
                continue;
            }
            let l = sanitize(l);
            if best.is_none_or(|(b, _)| l > b) {
                best = Some((l, id));
            }
        }
        let (_, id) = best.expect("no token id is allowed: empty logits or every id banned");
        id as u32
    }

    /// Leaves in `work` the surviving (unnormalized probability, id) pairs.
    fn filter(&mut self, logits: &[f32]) {
        let n = self.allowed_len(logits);
        self.work.clear();
        self.work.reserve(n);
        for (id, &l) in logits[..n].iter().enumerate() {
            if !self.is_banned(id) {
                self.work.push((sanitize(l), id as u32));
            }
        }
        assert!(
            !self.work.is_empty(),
            "no token id is allowed: empty logits or every id banned"
        );
        let p = self.params;

        // Top-k on logits (softmax keeps the order). Descending logit, ascending id on ties:
        // one total order, so runs reproduce.
        if p.top_k > 0 && p.top_k < self.work.len() {
            self.work.select_nth_unstable_by(p.top_k - 1, |a, b| {
                b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
            });
            self.work.truncate(p.top_k);
        }

        // Softmax with temperature; weights relative to the top token (which gets 1).
        let max = self
            .work
            .iter()
            .map(|&(l, _)| l)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Nothing is finite: fall back to the first allowed id.
            let first = self.work.iter().map(|&(_, id)| id).min().unwrap_or(0);
            self.work.clear();
            self.work.push((1.0, first));
            return;
        }
        let inv_t = 1.0 / p.temperature;
        let mut total = 0.0f64;
        for w in &mut self.work {
            w.0 = ((w.0 - max) * inv_t).exp();
            total += f64::from(w.0);
        }

        if p.top_p < 1.0 {
            let target = f64::from(p.top_p.max(0.0)) * total - TOP_P_EPSILON * total;
            // Sorting the whole vocabulary every token is the cost here. The tokens at or
            // above a weight are a prefix of the sorted order, so when they already reach the
            // target the nucleus lies among them: sort only those.
            for threshold in [1e-4f32, 1e-8] {
                let above: f64 = self
                    .work
                    .iter()
                    .filter(|&&(w, _)| w >= threshold)
                    .map(|&(w, _)| f64::from(w))
                    .sum();
                if above >= target {
                    self.work.retain(|&(w, _)| w >= threshold);
                    break;
                }
            }
            self.work
                .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut cum = 0.0f64;
            let mut keep = self.work.len();
            for (i, &(w, _)) in self.work.iter().enumerate() {
                cum += f64::from(w);
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.work.truncate(keep);
        }

        if p.min_p > 0.0 {
            // Weights are relative to the top token's, so the threshold is min_p itself.
            let min_p = p.min_p.min(1.0);
            self.work.retain(|&(w, _)| w >= min_p);
        }
    }
}

/// NaN never wins; +∞ becomes the largest finite value so softmax stays defined.
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l.min(f32::MAX)
    }
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn seed_from_u64(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: 42,
        }
    }

    fn ln(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn ids(c: &[Candidate]) -> Vec<u32> {
        let mut v: Vec<u32> = c.iter().map(|c| c.id).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn xoshiro_reference_values() {
        // xoshiro256** from state [1, 2, 3, 4]: the reference implementation's first outputs.
        let mut r = Xoshiro256 { s: [1, 2, 3, 4] };
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, [11520, 0, 1509978240]);
    }

    #[test]
    fn greedy_picks_argmax_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, -1.0, f32::NAN]), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NAN]), 0);
        assert_eq!(s.sample(&[1.0, f32::INFINITY, 2.0]), 1);
        let mut neg = Sampler::new(params(-1.0, 0, 1.0, 0.0));
        assert_eq!(neg.sample(&[0.0, 0.5, 0.2]), 1);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
            .collect();
        let want = Sampler::new(SamplingParams::greedy()).sample(&logits);
        for seed in 0..20 {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.5, 1, 1.0, 0.0)
            });
            assert_eq!(s.sample(&logits), want);
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 31) % 97) as f32 * 0.05).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(0.8, 50, 0.95, 0.01)
            });
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let probs = [0.1, 0.2, 0.3, 0.4];
        let n = 10_000;
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0));
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&ln(&probs)) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            let f = *c as f64 / n as f64;
            assert!((f - p).abs() < 0.02, "{counts:?}");
        }
        // Temperature 0.5 squares the probabilities: 1:4:9:16.
        let mut s = Sampler::new(params(0.5, 0, 1.0, 0.0));
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&ln(&probs)) as usize] += 1;
        }
        for (c, w) in counts.iter().zip([1.0, 4.0, 9.0, 16.0]) {
            let f = *c as f64 / n as f64;
            assert!((f - w / 30.0).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let probs = [0.05, 0.4, 0.1, 0.3, 0.15];
        let logits = ln(&probs);
        let cases: [(f32, &[u32]); 6] = [
            (0.3, &[1]),
            (0.4, &[1]),
            (0.5, &[1, 3]),
            (0.7, &[1, 3]),
            (0.71, &[1, 3, 4]),
            (0.96, &[0, 1, 2, 3, 4]),
        ];
        for (top_p, want) in cases {
            let mut s = Sampler::new(params(1.0, 0, top_p, 0.0));
            assert_eq!(ids(s.candidates(&logits)), want, "top_p {top_p}");
        }
        let mut s = Sampler::new(params(1.0, 0, 0.5, 0.0));
        let c = s.candidates(&logits).to_vec();
        let total: f32 = c.iter().map(|c| c.prob).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((c[0].prob - 0.4 / 0.7).abs() < 1e-5, "{c:?}");
        for _ in 0..100 {
            assert!([1, 3].contains(&s.sample(&logits)));
        }
    }

    #[test]
    fn top_p_on_a_large_vocabulary_matches_a_full_sort() {
        // A long tail, so the nucleus needs tokens of small weight too.
        let n = 50_000;
        let logits: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
                (x % 1000) as f32 * 0.012 - 6.0
            })
            .collect();
        for (t, top_p) in [
            (1.0f32, 0.95f32),
            (0.6, 0.95),
            (1.0, 0.5),
            (2.0, 0.999),
            (0.1, 0.9),
        ] {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut w: Vec<(f64, u32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (f64::from(((l - max) / t).exp()), i as u32))
                .collect();
            let total: f64 = w.iter().map(|x| x.0).sum();
            w.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut cum = 0.0;
            let keep = w
                .iter()
                .position(|x| {
                    cum += x.0;
                    cum >= (f64::from(top_p) - 1e-6) * total
                })
                .map_or(n, |i| i + 1);
            let mut want: Vec<u32> = w[..keep].iter().map(|x| x.1).collect();
            want.sort_unstable();
            let mut s = Sampler::new(params(t, 0, top_p, 0.0));
            let got = ids(s.candidates(&logits));
            assert_eq!(got.len(), want.len(), "t {t} top_p {top_p}");
            assert_eq!(got, want, "t {t} top_p {top_p}");
        }
    }

    #[test]
    fn min_p_drops_below_fraction_of_top() {
        let probs = [0.05, 0.4, 0.1, 0.3, 0.15];
        let logits = ln(&probs);
        let cases: [(f32, &[u32]); 4] = [
            (0.1, &[0, 1, 2, 3, 4]),
            (0.2, &[1, 2, 3, 4]),
            (0.3, &[1, 3, 4]),
            (0.9, &[1]),
        ];
        for (min_p, want) in cases {
            let mut s = Sampler::new(params(1.0, 0, 1.0, min_p));
            assert_eq!(ids(s.candidates(&logits)), want, "min_p {min_p}");
        }
    }

    #[test]
    fn filters_compose_in_order() {
        let probs = [0.05, 0.4, 0.1, 0.3, 0.15];
        let logits = ln(&probs);
        // top-k 3 -> {1, 3, 4} renormalized to .47/.35/.18; top-p .8 -> {1, 3};
        // min-p .8 drops 3 (.3/.4 = .75 < .8).
        let mut s = Sampler::new(params(1.0, 3, 0.8, 0.8));
        assert_eq!(ids(s.candidates(&logits)), [1]);
        let mut s = Sampler::new(params(1.0, 3, 0.8, 0.0));
        assert_eq!(ids(s.candidates(&logits)), [1, 3]);
        let mut s = Sampler::new(params(1.0, 3, 1.0, 0.0));
        assert_eq!(ids(s.candidates(&logits)), [1, 3, 4]);
    }

    #[test]
    fn banned_ids_are_never_sampled() {
        let mut logits = vec![0.0f32; 10];
        logits[8] = 100.0; // a padding row with a huge logit
        logits[2] = 50.0;
        logits[5] = 1.0;
        let mut g = Sampler::new(SamplingParams::greedy()).with_banned_from(8);
        assert_eq!(g.sample(&logits), 2);
        let mut g = Sampler::new(SamplingParams::greedy())
            .with_banned_from(8)
            .with_banned_ids([2]);
        assert_eq!(g.sample(&logits), 5);
        let mut s = Sampler::new(params(5.0, 0, 1.0, 0.0))
            .with_banned_from(8)
            .with_banned_ids([2, 30]);
        for _ in 0..500 {
            let id = s.sample(&logits);
            assert!(id < 8 && id != 2, "{id}");
        }
    }

    #[test]
    fn non_finite_logits_are_handled() {
        let mut s = Sampler::new(params(1.0, 0, 0.9, 0.05));
        for _ in 0..50 {
            assert_eq!(s.sample(&[f32::NAN, 2.0, f32::NEG_INFINITY]), 1);
            assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NAN]), 0);
            assert_eq!(s.sample(&[0.0, f32::INFINITY, 3.0]), 1);
        }
    }

    #[test]
    #[should_panic(expected = "no token id is allowed")]
    fn everything_banned_is_a_caller_bug() {
        Sampler::new(params(1.0, 0, 1.0, 0.0))
            .with_banned_from(0)
            .sample(&[1.0, 2.0]);
    }

    #[test]
    fn buffers_are_reused() {
        let logits: Vec<f32> = (0..4096).map(|i| (i % 13) as f32).collect();
        let mut s = Sampler::new(params(1.0, 0, 0.9, 0.0));
        s.sample(&logits);
        let cap = s.work.capacity();
        let ptr = s.work.as_ptr();
        for _ in 0..10 {
            s.sample(&logits);
        }
        assert_eq!((s.work.capacity(), s.work.as_ptr()), (cap, ptr));
    }
}
