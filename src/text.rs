//! How the relay writes and reads what people read: times (RFC 3339 UTC
//! or unix milliseconds), durations as a configuration writes them, and an
//! error with its causes on one line. A leaf: every side of the relay and
//! its client use it, it uses none of them.

use std::time::{Duration, UNIX_EPOCH};

/// Now, in unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    let real = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    real.saturating_add_signed(clock_offset_ms())
}

/// For tests only: `SWITCHBOARD_TEST_CLOCK_OFFSET_MS` (signed milliseconds)
/// steps this process's clock as [`now_ms`] reads it, so the fault suite
/// can run a relay whose clock is wrong without touching the host's. The
/// relay warns at start when it is set.
pub fn clock_offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var("SWITCHBOARD_TEST_CLOCK_OFFSET_MS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    })
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds: every time in the
/// admin API.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `T` of `since`/`until`: RFC 3339, or unix milliseconds (the CLI checks
/// its arguments with it too).
pub fn parse_time(s: &str) -> Option<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Some(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis() as u64)
}

/// `d` in the units a configuration is written in, largest first, no days
/// ("24h" stays "24h", "90m" is "1h30m"): in `check`'s printout and logs.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, ms) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

/// The error and its causes on one line, bounded in length.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
