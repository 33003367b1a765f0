//! A destination's recent deliveries, kept in the relay: 15 minutes of
//! delivered and failed attempt counts in 10-second buckets. The status page
//! draws its sparklines from it and `status` reads its one-minute rate, so
//! both show figures the moment they load (a history kept in the browser
//! tab was empty on every load; a rate over one second read 0 between
//! bursts). Counters in Prometheus stay the source for alerting and graphs;
//! this is only the glance.

use std::sync::Mutex;

/// Seconds per bucket.
pub const BUCKET_SECONDS: u64 = 10;
/// Buckets kept: 15 minutes.
pub const BUCKETS: usize = 90;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Which 10-second interval since the epoch this bucket counts.
    interval: u64,
    delivered: u32,
    failed: u32,
}

/// One destination's history. Recording takes a lock held for a few
/// instructions, once per settled attempt.
pub struct Recent {
    started_ms: u64,
    ring: Mutex<[Bucket; BUCKETS]>,
}

/// What the admin API returns: oldest bucket first, the current (partial)
/// bucket last.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Series {
    pub bucket_seconds: u64,
    pub delivered: Vec<u32>,
    pub failed: Vec<u32>,
    /// Deliveries per second over the last minute (or since the relay
    /// started, if that is less), one decimal.
    pub delivered_per_second: f64,
}

impl Recent {
    pub fn new(now_ms: u64) -> Recent {
        Recent { started_ms: now_ms, ring: Mutex::new([Bucket::default(); BUCKETS]) }
    }

    /// One settled attempt at `now_ms`: delivered, or not (a retry, a dead
    /// letter, a 410).
    pub fn record(&self, now_ms: u64, delivered: bool) {
        let interval = now_ms / 1000 / BUCKET_SECONDS;
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut ring[(interval % BUCKETS as u64) as usize];
        if b.interval != interval {
            *b = Bucket { interval, ..Bucket::default() };
        }
        if delivered {
            b.delivered = b.delivered.saturating_add(1);
        } else {
            b.failed = b.failed.saturating_add(1);
        }
    }

    /// The last 15 minutes as of `now_ms`.
    pub fn series(&self, now_ms: u64) -> Series {
        let current = now_ms / 1000 / BUCKET_SECONDS;
        let ring = *self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut delivered = Vec::with_capacity(BUCKETS);
        let mut failed = Vec::with_capacity(BUCKETS);
        for back in (0..BUCKETS as u64).rev() {
            let Some(interval) = current.checked_sub(back) else {
                delivered.push(0);
                failed.push(0);
                continue;
            };
            let b = ring[(interval % BUCKETS as u64) as usize];
            let (d, f) = if b.interval == interval { (b.delivered, b.failed) } else { (0, 0) };
            delivered.push(d);
            failed.push(f);
        }
        // The last minute: the six whole buckets before the current one
        // and the current one's part so far.
        let into_current_ms = now_ms % (BUCKET_SECONDS * 1000);
        let window_ms = (60_000 + into_current_ms).min(now_ms.saturating_sub(self.started_ms)).max(1000);
        let minute: u64 = delivered[BUCKETS - 7..].iter().map(|&d| u64::from(d)).sum();
        let rate = minute as f64 * 1000.0 / window_ms as f64;
        Series { bucket_seconds: BUCKET_SECONDS, delivered, failed, delivered_per_second: (rate * 10.0).round() / 10.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000_000; // a bucket boundary (divisible by 10 s)

    #[test]
    fn counts_land_in_their_bucket_and_age_out_after_fifteen_minutes() {
        let r = Recent::new(T0 - 3_600_000);
        r.record(T0 + 1_000, true);
        r.record(T0 + 9_999, true);
        r.record(T0 + 10_000, false);
        let s = r.series(T0 + 15_000);
        assert_eq!(s.delivered.len(), BUCKETS);
        assert_eq!(&s.delivered[BUCKETS - 2..], &[2, 0]);
        assert_eq!(&s.failed[BUCKETS - 2..], &[0, 1]);
        assert_eq!(s.delivered_per_second, (2.0f64 / 65.0 * 10.0).round() / 10.0);
        // 14 min 50 s later the first bucket is the oldest shown ...
        let s = r.series(T0 + 890_000);
        assert_eq!(s.delivered[0], 2);
        assert_eq!(s.delivered_per_second, 0.0);
        // ... and 10 s later it is gone; a bucket reused by a new interval starts from 0.
        assert_eq!(r.series(T0 + 900_000).delivered.iter().sum::<u32>(), 0);
        r.record(T0 + 900_500, true);
        let s = r.series(T0 + 900_500);
        assert_eq!(s.delivered.iter().sum::<u32>(), 1, "the old count in that slot was not carried over");
        assert_eq!(s.failed[0], 1, "the failure at T0 + 10 s is the oldest bucket now");
    }

    #[test]
    fn a_relay_started_seconds_ago_divides_by_its_age_not_a_minute() {
        let r = Recent::new(T0);
        for i in 0..40 {
            r.record(T0 + i * 100, true);
        }
        assert_eq!(r.series(T0 + 4_000).delivered_per_second, 10.0);
    }
}
