//! The client-side rate of one group of operations, found while running
//! (AIMD, as TCP's congestion window or the AWS SDK's adaptive retry
//! mode): a token bucket whose rate starts at its ceiling (the
//! `--*-rate` flag), halves when the cloud throttles and climbs back by
//! about one call a second each second while calls go through. The cloud's
//! real limit is per account, shared with every other tool there, so no
//! constant is right; the ceiling only bounds how fast cnlb ever goes.
//!
//! A bucket may also have a [`Window`]: at most so many calls in any
//! minute, the shape of GCE's quotas (per minute, each minute's whole
//! quota usable at once). A token bucket cannot take that shape: one whose
//! burst is a minute's quota sends two minutes' worth within one.
//!
//! Pure: every method takes the time, so the tests run on a made-up clock.
//! (Its own bucket rather than governor's, whose quota is fixed when the
//! limiter is built.)

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::RateLimit;

/// The slowest a bucket goes, in calls per second, however often the
/// cloud throttles.
pub const FLOOR: f64 = 0.5;
/// A throttle multiplies the rate by this.
const DECREASE: f64 = 0.5;
/// Throttles within this of a cut answer calls sent before it, at the old
/// rate: they do not cut again (TCP cuts once per round trip).
const COOL_DOWN: Duration = Duration::from_secs(1);

/// At most `calls` calls in any `span` of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub calls: u32,
    pub span: Duration,
}

#[derive(Clone, Debug)]
pub struct Bucket {
    ceiling: RateLimit,
    rate: f64,
    tokens: f64,
    refilled: Instant,
    last_cut: Option<Instant>,
    window: Option<Window>,
    /// When the calls of the last `window.span` were sent, oldest first.
    sent: VecDeque<Instant>,
}

impl Bucket {
    /// A full bucket at its ceiling.
    pub fn new(ceiling: RateLimit, window: Option<Window>, now: Instant) -> Bucket {
        let rate = f64::from(ceiling.per_second.max(1));
        let mut bucket = Bucket {
            ceiling,
            rate,
            tokens: 0.0,
            refilled: now,
            last_cut: None,
            window,
            sent: VecDeque::new(),
        };
        bucket.tokens = bucket.burst();
        bucket
    }

    /// Calls per second now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn ceiling_rate(&self) -> f64 {
        f64::from(self.ceiling.per_second.max(1))
    }

    /// The burst shrinks with the rate: a bucket slowed to half its
    /// ceiling holds half its burst, so one burst does not undo a cut.
    fn burst(&self) -> f64 {
        (f64::from(self.ceiling.burst.max(1)) * self.rate / self.ceiling_rate()).max(1.0)
    }

    /// The window's calls shrink with the rate too.
    fn window_calls(&self, window: Window) -> usize {
        let calls = f64::from(window.calls.max(1)) * self.rate / self.ceiling_rate();
        (calls as usize).max(1)
    }

    /// How long until the window has room for one more call.
    fn window_wait(&mut self, now: Instant) -> Option<Duration> {
        let window = self.window?;
        while self
            .sent
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= window.span)
        {
            self.sent.pop_front();
        }
        let cap = self.window_calls(window);
        if self.sent.len() < cap {
            return None;
        }
        // Room comes when the `excess`-th oldest leaves.
        let excess = self.sent.len() + 1 - cap;
        let frees = self.sent.get(excess - 1)?;
        Some((*frees + window.span).saturating_duration_since(now))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst());
        self.refilled = self.refilled.max(now);
    }

    /// Takes a token, or says how long until there is one (at least a
    /// microsecond: a wait rounded to nothing would spin).
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let min = Duration::from_micros(1);
        if let Some(wait) = self.window_wait(now) {
            return Err(wait.max(min));
        }
        self.refill(now);
        // Refills in float arithmetic may fall short of a whole token by
        // a rounding error.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            if self.window.is_some() {
                self.sent.push_back(now);
            }
            Ok(())
        } else {
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / self.rate);
            Err(wait.max(min))
        }
    }

    /// The cloud throttled a call: the rate halves (down to [`FLOOR`]) and
    /// the bucket empties, since the cloud's own is empty. Returns whether
    /// the rate was cut (not within [`COOL_DOWN`] of the last cut).
    pub fn throttled(&mut self, now: Instant) -> bool {
        if self
            .last_cut
            .is_some_and(|at| now.saturating_duration_since(at) < COOL_DOWN)
        {
            return false;
        }
        self.refill(now);
        self.rate = (self.rate * DECREASE).max(FLOOR);
        self.tokens = 0.0;
        self.last_cut = Some(now);
        true
    }

    /// The cloud answered without throttling: the rate grows by one call
    /// a second per `rate` answers (one a second each second at full
    /// use), up to the ceiling.
    pub fn answered(&mut self, now: Instant) {
        if self.rate < self.ceiling_rate() {
            self.refill(now);
            self.rate = (self.rate + 1.0 / self.rate).min(self.ceiling_rate());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// How many tokens can be taken at `now`.
    fn drain(bucket: &mut Bucket, now: Instant) -> usize {
        std::iter::from_fn(|| bucket.take(now).ok()).count()
    }

    #[test]
    fn starts_full_at_its_ceiling_and_refills_at_its_rate() {
        let t = Instant::now();
        let mut b = Bucket::new(RateLimit::new(10, 20), None, t);
        assert_eq!(b.rate(), 10.0);
        assert_eq!(drain(&mut b, t), 20);
        let wait = b.take(t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert_eq!(drain(&mut b, at(t, 500)), 5);
        // Never more than the burst, however long it rests.
        assert_eq!(drain(&mut b, at(t, 60_000)), 20);
    }

    #[test]
    fn a_throttle_halves_the_rate_and_the_burst_once_per_cool_down() {
        let t = Instant::now();
        let mut b = Bucket::new(RateLimit::new(10, 20), None, t);
        assert!(b.throttled(t));
        assert_eq!(b.rate(), 5.0);
        assert_eq!(
            drain(&mut b, t),
            0,
            "the cloud's bucket is empty: so is ours"
        );
        // Answers to calls already in flight do not cut again.
        assert!(!b.throttled(at(t, 999)));
        assert_eq!(b.rate(), 5.0);
        // A rested bucket holds half the burst now.
        assert_eq!(drain(&mut b, at(t, 60_000)), 10);
        for (ms, rate) in [
            (61_000, 2.5),
            (62_000, 1.25),
            (63_000, 0.625),
            (64_000, FLOOR),
        ] {
            assert!(b.throttled(at(t, ms)));
            assert_eq!(b.rate(), rate);
        }
        assert!(b.throttled(at(t, 65_000)));
        assert_eq!(b.rate(), FLOOR, "never below the floor");
        assert_eq!(b.take(at(t, 65_000)).unwrap_err(), Duration::from_secs(2));
    }

    #[test]
    fn answers_raise_the_rate_about_one_call_a_second_each_second_up_to_the_ceiling() {
        let t = Instant::now();
        let mut b = Bucket::new(RateLimit::new(10, 20), None, t);
        b.throttled(t);
        b.throttled(at(t, 1_000));
        assert_eq!(b.rate(), 2.5);
        // Calls at the bucket's pace for 5 s: the rate climbs ~1/s per s.
        let mut now = at(t, 1_000);
        let end = at(t, 6_000);
        while now < end {
            match b.take(now) {
                Ok(()) => b.answered(now),
                Err(wait) => now += wait,
            }
        }
        assert!((6.5..8.5).contains(&b.rate()), "{}", b.rate());
        for _ in 0..1_000 {
            b.answered(now);
        }
        assert_eq!(b.rate(), 10.0, "never above the ceiling");
    }

    #[test]
    fn zero_ceilings_are_one() {
        let t = Instant::now();
        let mut b = Bucket::new(RateLimit::new(0, 0), None, t);
        assert_eq!(b.rate(), 1.0);
        assert_eq!(drain(&mut b, t), 1);
    }

    #[test]
    fn a_window_holds_its_calls_in_any_span_whatever_the_burst() {
        let t = Instant::now();
        let minute = Duration::from_secs(60);
        let window = Window {
            calls: 30,
            span: minute,
        };
        let mut b = Bucket::new(RateLimit::new(10, 20), Some(window), t);
        // The burst, then the rate, until the window is full.
        assert_eq!(drain(&mut b, t), 20);
        assert_eq!(drain(&mut b, at(t, 1_000)), 10);
        assert_eq!(drain(&mut b, at(t, 30_000)), 0, "30 in the last minute");
        // Room comes back as the calls of a minute ago leave the window.
        assert_eq!(b.take(at(t, 30_000)).unwrap_err(), Duration::from_secs(30));
        assert_eq!(drain(&mut b, at(t, 60_000)), 20);
        assert_eq!(b.take(at(t, 60_000)).unwrap_err(), Duration::from_secs(1));
        assert_eq!(drain(&mut b, at(t, 61_000)), 10);
        // Slowed to half its ceiling, it holds half as many.
        let mut b = Bucket::new(RateLimit::new(10, 20), Some(window), t);
        b.throttled(t);
        assert_eq!(drain(&mut b, at(t, 10_000)), 10);
        assert_eq!(drain(&mut b, at(t, 20_000)), 5);
        assert_eq!(drain(&mut b, at(t, 40_000)), 0, "15 in the last minute");
    }
}
