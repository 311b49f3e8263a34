//! The cluster's token throughput: tokens counted per second, reported as a rate over a
//! sliding window. Sans-I/O: the caller passes the time, so tests drive it with a fake clock.

use std::time::{Duration, Instant};

/// Seconds the rate is averaged over.
pub const WINDOW_SECS: usize = 10;

/// Tokens counted in one-second buckets over the last [`WINDOW_SECS`] seconds.
///
/// [`TokenMeter::record`] is a few integer operations (callers keep it behind a mutex, one
/// lock per decode step). [`TokenMeter::rate`] divides the tokens of the window's buckets by
/// the time they cover: the last `WINDOW_SECS - 1` whole seconds plus the current partial one,
/// or the meter's age when it is younger than that, but never less than one second (so the
/// first tokens do not read as a huge rate).
#[derive(Debug, Clone)]
pub struct TokenMeter {
    start: Instant,
    /// `(second since start, tokens)`; a bucket whose second is not within the window is stale.
    buckets: [(u64, u64); WINDOW_SECS],
}

impl TokenMeter {
    pub fn new(start: Instant) -> Self {
        TokenMeter {
            start,
            buckets: [(u64::MAX, 0); WINDOW_SECS],
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    /// Counts `n` tokens produced at `now`.
    pub fn record(&mut self, now: Instant, n: u64) {
        let sec = self.second(now);
        let bucket = &mut self.buckets[(sec % WINDOW_SECS as u64) as usize];
        if bucket.0 != sec {
            *bucket = (sec, 0);
        }
        bucket.1 = bucket.1.saturating_add(n);
    }

    /// Tokens per second over the window ending at `now`.
    pub fn rate(&self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.start);
        let sec = age.as_secs();
        let oldest = sec.saturating_sub(WINDOW_SECS as u64 - 1);
        let tokens: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| (oldest..=sec).contains(s))
            .map(|&(_, n)| n)
            .sum();
        if tokens == 0 {
            return 0.0;
        }
        let span = age.saturating_sub(Duration::from_secs(oldest));
        tokens as f64 / span.as_secs_f64().max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn young_meter_divides_by_its_age() {
        let t0 = Instant::now();
        let mut m = TokenMeter::new(t0);
        assert_eq!(m.rate(at(t0, 5.0)), 0.0);
        for i in 0..40 {
            m.record(at(t0, 0.1 * i as f64), 1); // 10 tokens/s for 4 s
        }
        assert!(
            (m.rate(at(t0, 4.0)) - 10.0).abs() < 1e-9,
            "{}",
            m.rate(at(t0, 4.0))
        );
        // Within the first second the span is at least one second.
        let mut m = TokenMeter::new(t0);
        m.record(at(t0, 0.01), 5);
        assert_eq!(m.rate(at(t0, 0.02)), 5.0);
    }

    #[test]
    fn old_tokens_leave_the_window() {
        let t0 = Instant::now();
        let mut m = TokenMeter::new(t0);
        // 100 tokens/s for 20 s, then 20 tokens/s.
        for i in 0..2000 {
            m.record(at(t0, 0.01 * i as f64), 1);
        }
        let r = m.rate(at(t0, 20.0));
        assert!((r - 100.0).abs() < 1.0, "{r}");
        for i in 0..210 {
            m.record(at(t0, 20.0 + 0.05 * i as f64), 1); // up to 30.45 s
        }
        // At 30.5 s the window holds seconds 21..=30: 20 tokens/s throughout.
        let r = m.rate(at(t0, 30.5));
        assert!((r - 20.0).abs() < 2.0, "{r}");
        // Idle for longer than the window: nothing left.
        assert_eq!(m.rate(at(t0, 45.0)), 0.0);
        // A bucket reused after wrapping around starts from zero.
        m.record(at(t0, 50.2), 7);
        assert_eq!(m.rate(at(t0, 50.5)), 7.0 / 9.5);
    }

    #[test]
    fn a_burst_is_averaged_over_the_window() {
        let t0 = Instant::now();
        let mut m = TokenMeter::new(t0);
        m.record(at(t0, 100.5), 90);
        // The window is seconds 91..=100: 9.5 s up to 100.5 s.
        assert_eq!(m.rate(at(t0, 100.5)), 90.0 / 9.5);
        assert_eq!(m.rate(at(t0, 109.9)), 90.0 / 9.9);
        assert_eq!(m.rate(at(t0, 110.0)), 0.0);
        // Time going backwards (a caller's clock) never panics or counts in the future.
        m.record(t0, 3);
        assert_eq!(m.rate(t0), 3.0);
    }
}
