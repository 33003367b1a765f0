//! How old a message is, by the NATS server's clock: `max_age` must not
//! depend on which relay took a callback, whose clock may be off from the
//! one delivering it (an hour apart in `tests/it/clock.rs`).
//!
//! Each delivered message carries the time the server stored it. The
//! difference `local now - stored` is this relay's clock offset from the
//! server plus the time the message took to arrive, so its minimum over
//! recent messages estimates the offset (from above: transit is never
//! negative, and a backlog only makes samples larger); every 30 s a relay
//! also writes a key of the state bucket and reads the time the server
//! stored it, so a relay that sees only old messages (a backlog after a
//! restart) still has a fresh sample. A message's age is
//! then `local now - (stored + offset)`: never more than its true age, so
//! a skewed clock never dead-letters early; at worst (no fresh message
//! for two minutes after this relay's clock was stepped forward) late.

use std::sync::Mutex;

use super::Jet;
use crate::store::{lock, now_ms};

/// The key of the state bucket a relay writes to read the server's clock.
const CLOCK_KEY: &str = "clock";

/// How often a relay reads the server's clock that way (besides every
/// message it is handed for the first time).
pub(super) const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// How long one window of samples lasts; the estimate is the minimum of
/// this window and the one before.
const WINDOW_MS: u64 = 60_000;

/// The estimate of this relay's clock minus the server's.
#[derive(Default)]
pub(super) struct ServerClock(Mutex<Window>);

#[derive(Default)]
struct Window {
    current: Option<i64>,
    previous: Option<i64>,
    since_ms: u64,
}

impl ServerClock {
    /// A message stored at `stored_ms` (server clock) seen at `now_ms`.
    pub fn observe(&self, now_ms: u64, stored_ms: u64) {
        let sample = now_ms as i64 - stored_ms as i64;
        let mut w = lock(&self.0);
        if now_ms.saturating_sub(w.since_ms) >= WINDOW_MS || now_ms < w.since_ms {
            w.previous = w.current.take();
            w.since_ms = now_ms;
        }
        w.current = Some(w.current.map_or(sample, |c| c.min(sample)));
    }

    /// The age at `now_ms` of a message stored at `stored_ms`, after
    /// observing it.
    pub fn age_ms(&self, now_ms: u64, stored_ms: u64) -> u64 {
        self.observe(now_ms, stored_ms);
        let w = lock(&self.0);
        let offset = match (w.current, w.previous) {
            (Some(c), Some(p)) => c.min(p),
            (Some(c), None) | (None, Some(c)) => c,
            (None, None) => 0,
        };
        (now_ms as i64 - (stored_ms as i64 + offset)).max(0) as u64
    }
}

impl Jet {
    /// A fresh sample: a put to the state bucket, read back with the time
    /// the server stored it (read after the put: the sample is never less
    /// than the offset). Failures leave the estimate as it is.
    pub(super) async fn probe_clock(&self) {
        let Ok(ready) = self.ready() else { return };
        if ready.state.put(CLOCK_KEY, bytes::Bytes::new()).await.is_err() {
            return;
        }
        if let Ok(Some(entry)) = ready.state.entry(CLOCK_KEY).await {
            let stored = (entry.created.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            self.inner.server_clock.observe(now_ms(), stored);
        }
    }
}

/// When the server stored a message (unix ms).
pub(super) fn stored_ms(published: &async_nats::jetstream::message::Info<'_>) -> u64 {
    (published.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_hour_ahead_or_behind_gives_the_true_age_never_more() {
        for skew in [-3_600_000i64, 0, 3_600_000] {
            let c = ServerClock::default();
            let real = 1_800_000_000_000u64;
            let local = |t: u64| (t as i64 + skew) as u64;
            // Fresh messages, 2 ms in transit.
            for i in 0..10 {
                c.observe(local(real + i * 10 + 2), real + i * 10);
            }
            // A message stored 10 minutes ago: 10 minutes old, not 10
            // minutes plus the skew.
            let age = c.age_ms(local(real + 200), real + 200 - 600_000);
            assert!((599_990..=600_000).contains(&age), "skew {skew}: {age}");
        }
    }

    #[test]
    fn a_backlog_alone_makes_ages_younger_not_older() {
        let c = ServerClock::default();
        // Only old messages seen: the estimate is too large, ages smaller.
        let age = c.age_ms(1_000_000, 400_000);
        assert!(age <= 600_000, "{age}");
    }

    #[test]
    fn the_estimate_follows_a_step_within_two_windows() {
        let c = ServerClock::default();
        c.observe(10_000_000_000 + 5, 10_000_000_000);
        // The relay's clock steps back an hour: new samples are smaller and
        // win at once.
        let t = 10_000_000_100u64;
        c.observe(t - 3_600_000 + 3, t);
        assert_eq!(c.age_ms(t - 3_600_000 + 1_000, t), 997);
    }
}
