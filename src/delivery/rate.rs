//! Rate limit per destination (`rate_limit = { per_second, burst }`): a
//! token bucket the worker takes one token from per attempt, replays and
//! retries included, so a replay of a large dead-letter set cannot flood a
//! recovering receiver. Tokens refill continuously at `per_second`, up to
//! `burst`; a worker with no token waits for the next one instead of
//! leasing.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// The bucket itself (one per worker).
#[derive(Debug)]
pub struct Bucket {
    limit: RateLimit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Bucket {
        Bucket { limit, tokens: f64::from(limit.burst), at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        self.at = now;
    }

    /// Whole tokens available now (at most `want`).
    pub fn available(&mut self, want: usize, now: Instant) -> usize {
        self.refill(now);
        (self.tokens.floor().max(0.0) as usize).min(want)
    }

    /// Takes `n` tokens (after `available` said they are there).
    pub fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When the next whole token is there.
    pub fn next_token(&mut self, now: Instant) -> Instant {
        self.refill(now);
        let missing = (1.0 - self.tokens).max(0.0);
        now + Duration::from_secs_f64(missing / self.limit.per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RateLimit { per_second: 10.0, burst: 3 }, t0);
        assert_eq!(b.available(8, t0), 3);
        b.take(3);
        assert_eq!(b.available(8, t0), 0);
        let next = b.next_token(t0);
        assert_eq!(next.duration_since(t0), Duration::from_millis(100));
        assert_eq!(b.available(8, t0 + Duration::from_millis(250)), 2);
        assert_eq!(b.available(8, t0 + Duration::from_secs(10)), 3, "never more than the burst");
    }
}
