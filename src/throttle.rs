//! One log line a second at most for events that come in floods (store
//! refusals during an outage, refusals for want of body memory, HTTP/2
//! rapid-reset connections): an event that finds a line written less than
//! a second ago is only counted, and the next line says how many it did
//! not say.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct LogThrottle {
    /// When the last line went out (unix ms).
    logged_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl LogThrottle {
    /// `Some(n)` if a line may go out now, `n` being the events not logged
    /// since the last one; `None` (the event counted) otherwise.
    pub fn admit(&self) -> Option<u64> {
        let now = crate::text::now_ms();
        let last = self.logged_ms.load(Relaxed);
        if now.saturating_sub(last) < 1000 || self.logged_ms.compare_exchange(last, now, Relaxed, Relaxed).is_err() {
            self.unlogged.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.unlogged.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_then_counts_until_a_second_has_passed() {
        let t = LogThrottle::default();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        // As if the last line were a second old.
        t.logged_ms.fetch_sub(1000, Relaxed);
        assert_eq!(t.admit(), Some(2));
    }
}
