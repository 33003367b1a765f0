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
    let s = std::str::from_utf8(value).ok()?.trim();
    // `version-trace-parent-flags`, 2, 32, 16 and 2 lower-case hex digits
    // (so no other dash fits).
    let b = s.as_bytes();
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (version, trace, parent, flags) = (&s[..2], &s[3..35], &s[36..52], &s[53..]);
    let hex = |p: &str| p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = hex(version)
        && version != "ff"
        && hex(trace)
        && hex(parent)
        && hex(flags)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some((trace, flags))
}

/// A new trace for a callback that came without one (sampled flag set, so
/// receivers that trace keep it).
pub fn new_traceparent() -> String {
    let mut rng = rand::thread_rng();
    let trace: u128 = rng.gen_range(1..=u128::MAX);
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    push_hex(&mut s, trace, 32);
    s.push('-');
    push_hex(&mut s, u128::from(rng.gen_range(1..=u64::MAX)), 16);
    s.push_str("-01");
    s
}

/// The `traceparent` of one delivery attempt: a child of `stored`.
pub fn child(stored: &[u8]) -> Option<String> {
    let (trace, flags) = parse(stored)?;
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    s.push_str(trace);
    s.push('-');
    push_hex(&mut s, u128::from(rand::thread_rng().gen_range(1..=u64::MAX)), 16);
    s.push('-');
    s.push_str(flags);
    Some(s)
}

/// The low `digits` hex digits of `v`, lower case, most significant first
/// (what `format!("{v:0digits$x}")` writes, without its machinery: this
/// runs per callback and per attempt).
fn push_hex(out: &mut String, v: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (i * 4)) & 0xf) as usize]));
    }
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
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-701",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
            "00-4bf92f3577b34da6a3ce929d0e0e47\u{e9}-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
        let c = child(tp.as_bytes()).expect("child");
        assert!(c.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && c.ends_with("-01"));
        assert_ne!(c, tp);
        assert!(parse(new_traceparent().as_bytes()).is_some());
        for v in [1u128, 0xabc, u128::from(u64::MAX), u128::MAX] {
            let mut s = String::new();
            push_hex(&mut s, v, 32);
            assert_eq!(s, format!("{v:032x}"));
        }
        let mut s = String::new();
        push_hex(&mut s, 0x00f0_67aa_0ba9_02b7, 16);
        assert_eq!(s, "00f067aa0ba902b7");
    }
}
