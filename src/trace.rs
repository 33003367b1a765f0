//! W3C Trace Context (`traceparent`): a callback keeps the sender's trace
//! (or gets one at ingress, stored with it), and every delivery attempt is
//! a child span of it: the same trace id, a new span id per attempt, so a
//! receiver's traces join the sender's and tell attempts apart.
//!
//! Format: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; an id
//! of all zeros is invalid (https://www.w3.org/TR/trace-context/).

use rand::Rng;

pub const HEADER: &str = "traceparent";

/// The trace id and flags of a valid `traceparent` value.
pub fn parse(value: &[u8]) -> Option<(&str, &str)> {
    let s = std::str::from_utf8(value).ok()?;
    let parts: Vec<&str> = s.trim().split('-').collect();
    let [version, trace, parent, flags] = parts.as_slice() else { return None };
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = hex(version, 2)
        && *version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some((trace, flags))
}

/// A new trace for a callback that came without one (sampled flag set, so
/// receivers that trace keep it).
pub fn new_traceparent() -> String {
    let mut rng = rand::thread_rng();
    let trace: u128 = rng.gen_range(1..=u128::MAX);
    format!("00-{trace:032x}-{}-01", span_id(&mut rng))
}

/// The `traceparent` of one delivery attempt: a child of `stored`.
pub fn child(stored: &[u8]) -> Option<String> {
    let (trace, flags) = parse(stored)?;
    Some(format!("00-{trace}-{}-{flags}", span_id(&mut rand::thread_rng())))
}

fn span_id(rng: &mut impl Rng) -> String {
    format!("{:016x}", rng.gen_range(1..=u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_traceparents() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse(tp.as_bytes()), Some(("4bf92f3577b34da6a3ce929d0e0e4736", "01")));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        let c = child(tp.as_bytes()).expect("child");
        assert!(c.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && c.ends_with("-01"));
        assert_ne!(c, tp);
        assert!(parse(new_traceparent().as_bytes()).is_some());
    }
}
