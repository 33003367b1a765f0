//! Circuit breaker per destination (`breaker = { failures, cool_down }`):
//! after `failures` consecutive failed attempts (retryable failures: 5xx,
//! 408, 429, connection errors, timeouts, resets, garbage; a 4xx refusing
//! one message means the destination answered) the destination *opens*: no
//! attempts for `cool_down`, then one probe (*half-open*). The probe's
//! success closes it (the backlog then drains at the destination's
//! concurrency and rate limit); its failure opens it again with twice the
//! cool-down, up to [`MAX_COOL_DOWN`]. While open no attempt is made, so no
//! message's attempt count is spent (`max_age` still applies as
//! configured: it counts from receipt).

use std::sync::Arc;

use crate::wake::BreakerCell;
use std::time::Duration;

use tokio::time::Instant;

/// The longest a cool-down grows to while a destination stays down.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cool_down: Duration,
}

pub use crate::wake::BreakerState as State;

/// What the worker may lease now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// As many as its slots allow.
    All,
    /// One probe.
    One,
    /// Nothing until then.
    Until(Instant),
}

/// One destination's breaker (owned by its worker).
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    consecutive: u32,
    cool: Duration,
    open_until: Option<Instant>,
    probing: bool,
    shared: Arc<BreakerCell>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, shared: Arc<BreakerCell>) -> Breaker {
        shared.set(State::Closed);
        Breaker { cfg, consecutive: 0, cool: cfg.cool_down, open_until: None, probing: false, shared }
    }

    pub fn state(&self) -> State {
        self.shared.get()
    }

    fn set(&self, s: State) {
        self.shared.set(s);
    }

    /// What may be leased now (turns open into half-open once cooled down).
    pub fn allow(&mut self, now: Instant) -> Allow {
        match (self.state(), self.open_until) {
            (State::Open, Some(until)) if now < until => Allow::Until(until),
            (State::Open, _) => {
                self.set(State::HalfOpen);
                self.probing = false;
                self.allow(now)
            }
            (State::HalfOpen, _) if self.probing => Allow::Until(now + self.cool),
            (State::HalfOpen, _) => Allow::One,
            (State::Closed, _) => Allow::All,
        }
    }

    /// A probe was leased.
    pub fn probe_started(&mut self) {
        if self.state() == State::HalfOpen {
            self.probing = true;
        }
    }

    /// An attempt finished; returns the new state if it changed.
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<State> {
        let before = self.state();
        if ok {
            self.consecutive = 0;
            self.cool = self.cfg.cool_down;
            self.open_until = None;
            self.probing = false;
            self.set(State::Closed);
        } else {
            self.consecutive = self.consecutive.saturating_add(1);
            let trip = match before {
                State::HalfOpen => {
                    // The probe failed: stay away longer.
                    self.cool = (self.cool * 2).min(MAX_COOL_DOWN);
                    true
                }
                State::Closed => self.consecutive >= self.cfg.failures,
                State::Open => false,
            };
            if trip {
                self.open_until = Some(now + self.cool);
                self.probing = false;
                self.set(State::Open);
            }
        }
        let after = self.state();
        (after != before).then_some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_probes_after_the_cool_down_and_backs_off() {
        let t0 = Instant::now();
        let cfg = BreakerConfig { failures: 3, cool_down: Duration::from_secs(5) };
        let mut b = Breaker::new(cfg, Arc::default());
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(false, t0), None);
        assert_eq!(b.record(true, t0), None, "a success resets the count");
        for _ in 0..2 {
            b.record(false, t0);
        }
        assert_eq!(b.record(false, t0), Some(State::Open));
        assert_eq!(b.allow(t0 + Duration::from_secs(4)), Allow::Until(t0 + Duration::from_secs(5)));
        assert_eq!(b.allow(t0 + Duration::from_secs(5)), Allow::One);
        assert_eq!(b.state(), State::HalfOpen);
        b.probe_started();
        assert!(matches!(b.allow(t0 + Duration::from_secs(5)), Allow::Until(_)), "one probe at a time");
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(b.record(false, t1), Some(State::Open));
        assert_eq!(b.allow(t1 + Duration::from_secs(9)), Allow::Until(t1 + Duration::from_secs(10)), "doubled");
        assert_eq!(b.allow(t1 + Duration::from_secs(10)), Allow::One);
        assert_eq!(b.record(true, t1 + Duration::from_secs(10)), Some(State::Closed));
        assert_eq!(b.allow(t1 + Duration::from_secs(10)), Allow::All);
    }
}
