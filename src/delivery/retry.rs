//! Delivery outcomes and the retry policy.
//!
//! This is the one place that decides what an attempt's result means
//! ([`Outcome::classify`]) and what happens next ([`RetryPolicy::decide`]).
//! Both are pure: the caller passes in the attempt number, the message age and
//! the randomness, so the whole policy is covered by table tests.
//!
//! Classification: 2xx is delivered; 408, 429, every 5xx, connection errors and
//! timeouts are retryable (as are statuses a destination lists in `retry_on`);
//! any other status (1xx/3xx/4xx) is permanent and goes to the dead-letter
//! store without retries. The schedule is the `backoff` crate's
//! `ExponentialBackoff`, capped by `max_interval`, ended by `max_attempts`
//! and/or `max_age`. A `Retry-After` from the destination replaces the computed
//! delay, clamped to `retry_after_cap`.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;

/// What one attempt ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered { status: u16 },
    Retryable { cause: Cause, retry_after: Option<Duration>, reason: String },
    Permanent { status: u16, reason: String },
}

/// What made an attempt retryable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Status(u16),
    Transport(TransportError),
}

/// Why an attempt failed before a status line arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    Connect,
    Timeout,
    /// The connection failed after connecting (reset, closed, protocol error).
    Io,
}

impl TransportError {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportError::Connect => "connect",
            TransportError::Timeout => "timeout",
            TransportError::Io => "io",
        }
    }
}

impl Outcome {
    /// Every value [`Outcome::result_label`] gives (the series exist at 0
    /// from the start).
    pub const RESULT_LABELS: [&'static str; 8] = ["2xx", "4xx", "5xx", "other", "request", "connect", "timeout", "io"];

    /// The outcome's class for the `result` label of
    /// `switchboard_delivery_attempts_total` (2xx, 4xx, 5xx, other, request,
    /// connect, timeout, io), decided here with the rest of the classification.
    pub fn result_label(&self) -> &'static str {
        let status = match self {
            Outcome::Delivered { .. } => return "2xx",
            Outcome::Retryable { cause: Cause::Transport(t), .. } => return t.as_str(),
            Outcome::Retryable { cause: Cause::Status(s), .. } | Outcome::Permanent { status: s, .. } => *s,
        };
        match status {
            0 => "request",
            100..=399 => "other",
            400..=499 => "4xx",
            _ => "5xx",
        }
    }

    /// Classifies a response status; `retry_after` is the raw header, if any.
    pub fn classify(status: u16, retry_after: Option<&str>, retry_on: &[u16], now: SystemTime) -> Outcome {
        match status {
            200..=299 => Outcome::Delivered { status },
            408 | 429 | 500..=599 => Outcome::Retryable {
                cause: Cause::Status(status),
                retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
                reason: format!("http {status}"),
            },
            s if retry_on.contains(&s) => Outcome::Retryable {
                cause: Cause::Status(status),
                retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
                reason: format!("http {status}"),
            },
            _ => Outcome::Permanent { status, reason: format!("http {status}") },
        }
    }

    pub fn transport(kind: TransportError, detail: &str) -> Outcome {
        Outcome::Retryable {
            cause: Cause::Transport(kind),
            retry_after: None,
            reason: format!("{}: {detail}", kind.as_str()),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status } | Outcome::Permanent { status, .. } => Some(*status),
            Outcome::Retryable { cause: Cause::Status(s), .. } => Some(*s),
            Outcome::Retryable { cause: Cause::Transport(_), .. } => None,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Retryable { reason, .. } | Outcome::Permanent { reason, .. } => reason,
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What to do with a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Done,
    RetryAfter(Duration),
    DeadLetter { reason: String },
}

/// Per-destination retry settings (see `config.example.toml` for defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_interval: Duration,
    pub multiplier: f64,
    /// Randomization factor in [0, 1): the delay is drawn from `d * (1 ± jitter)`.
    pub jitter: f64,
    pub max_attempts: Option<u32>,
    pub max_age: Duration,
    pub retry_after_cap: Duration,
    pub retry_on: Vec<u16>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max_interval: Duration::from_secs(600),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: None,
            max_age: Duration::from_secs(24 * 3600),
            retry_after_cap: Duration::from_secs(3600),
            retry_on: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The backoff delay after failed attempt number `attempt` (1-based).
    ///
    /// The `backoff` crate draws the jitter itself; it runs with its own clock
    /// disabled (`max_elapsed_time: None`) because the age limit is ours.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        let current = Duration::from_secs_f64(base.min(self.max_interval.as_secs_f64()));
        let mut b = backoff::ExponentialBackoff {
            current_interval: current,
            initial_interval: self.initial,
            randomization_factor: self.jitter,
            multiplier: self.multiplier,
            max_interval: self.max_interval,
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        b.next_backoff().unwrap_or(current)
    }

    /// Decides what follows attempt number `attempt` (1-based) of a message
    /// that is `age` old, given the attempt's outcome.
    pub fn decide(&self, attempt: u32, outcome: &Outcome, age: Duration) -> Action {
        let retry_after = match outcome {
            Outcome::Delivered { .. } => return Action::Done,
            Outcome::Permanent { reason, .. } => {
                return Action::DeadLetter { reason: format!("permanent failure: {reason}") }
            }
            Outcome::Retryable { retry_after, .. } => *retry_after,
        };
        if let Some(max) = self.max_attempts {
            if attempt >= max {
                return Action::DeadLetter {
                    reason: format!("gave up after {attempt} attempts: {}", outcome.reason()),
                };
            }
        }
        let delay = match retry_after {
            Some(d) => d.min(self.retry_after_cap),
            None => self.delay(attempt),
        };
        if age + delay > self.max_age {
            return Action::DeadLetter {
                reason: format!(
                    "gave up after {attempt} attempts, max_age {} reached: {}",
                    humantime::format_duration(self.max_age),
                    outcome.reason()
                ),
            };
        }
        Action::RetryAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { jitter: 0.0, ..RetryPolicy::default() }
    }

    fn retryable(retry_after: Option<Duration>) -> Outcome {
        Outcome::Retryable { cause: Cause::Status(503), retry_after, reason: "http 503".into() }
    }

    #[test]
    fn classification_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cases: &[(u16, &[u16], &str)] = &[
            (200, &[], "delivered"),
            (204, &[], "delivered"),
            (299, &[], "delivered"),
            (301, &[], "permanent"),
            (400, &[], "permanent"),
            (401, &[], "permanent"),
            (404, &[], "permanent"),
            (409, &[], "permanent"),
            (409, &[409], "retryable"),
            (408, &[], "retryable"),
            (429, &[], "retryable"),
            (500, &[], "retryable"),
            (503, &[], "retryable"),
            (599, &[], "retryable"),
        ];
        for (status, retry_on, want) in cases {
            let got = match Outcome::classify(*status, None, retry_on, now) {
                Outcome::Delivered { .. } => "delivered",
                Outcome::Retryable { .. } => "retryable",
                Outcome::Permanent { .. } => "permanent",
            };
            assert_eq!(got, *want, "status {status} retry_on {retry_on:?}");
        }
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        match Outcome::classify(503, Some("12"), &[], now) {
            Outcome::Retryable { retry_after, .. } => assert_eq!(retry_after, Some(Duration::from_secs(12))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exponential_schedule_is_capped() {
        let p = policy();
        let delays: Vec<u64> = (1..=12).map(|a| p.delay(a).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        // Huge attempt numbers must not overflow.
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(600));
    }

    #[test]
    fn jitter_stays_within_its_factor() {
        let p = RetryPolicy { jitter: 0.5, ..RetryPolicy::default() };
        for _ in 0..200 {
            let d = p.delay(3).as_secs_f64();
            assert!((2.0..=6.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn decisions_table() {
        let p = RetryPolicy { max_attempts: Some(3), max_age: Duration::from_secs(100), ..policy() };
        let young = Duration::from_secs(1);
        assert_eq!(p.decide(1, &Outcome::Delivered { status: 200 }, young), Action::Done);
        assert_eq!(p.decide(1, &retryable(None), young), Action::RetryAfter(Duration::from_secs(1)));
        assert_eq!(p.decide(2, &retryable(None), young), Action::RetryAfter(Duration::from_secs(2)));
        assert!(matches!(p.decide(3, &retryable(None), young), Action::DeadLetter { .. }));
        let permanent = Outcome::Permanent { status: 400, reason: "http 400".into() };
        assert!(matches!(p.decide(1, &permanent, young), Action::DeadLetter { .. }));
        // Retry-After replaces the backoff delay, clamped to the cap.
        assert_eq!(
            p.decide(1, &retryable(Some(Duration::from_secs(9))), young),
            Action::RetryAfter(Duration::from_secs(9))
        );
        let capped = RetryPolicy { retry_after_cap: Duration::from_secs(5), ..p.clone() };
        assert_eq!(
            capped.decide(1, &retryable(Some(Duration::from_secs(9))), young),
            Action::RetryAfter(Duration::from_secs(5))
        );
        // The next attempt would land past max_age.
        assert!(matches!(p.decide(1, &retryable(None), Duration::from_millis(99_500)), Action::DeadLetter { .. }));
    }
}
