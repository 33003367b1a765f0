//! De-duplication of resent callbacks, per route (`dedupe = { window,
//! ignore }`; `dedupe_window = "10m"` is the same with nothing ignored).
//!
//! Senders resend what they think failed: ThingSpace resends a callback not
//! answered within ~4 s, with `callbackCount` 2 instead of 1. The key of a
//! callback is a 16-byte hash of its route and its body, the body's listed
//! top-level JSON fields left out first (`ignore = ["callbackCount"]`; a
//! body that is not a JSON object is hashed whole); or, with `fields`
//! and/or `headers`, of just those JSON fields (dotted paths) and headers
//! (a missing one counts as its own value). A callback whose key was
//! accepted within the window is answered with the first message's id and
//! `"duplicate": true`, and stored nothing. The store keeps the keys
//! durably, with their messages (`store/remembered.rs`), so a resend after a
//! restart or kill -9 is still recognised. Two identical requests racing
//! each other can both be stored (delivery is at-least-once anyway;
//! receivers de-duplicate on `webhook-id`).

use std::time::Duration;

use sha2::{Digest, Sha256};

/// A route's de-duplication rule (validated config).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DedupeRule {
    pub window: Duration,
    /// Top-level JSON fields left out of the key.
    pub ignore: Vec<String>,
    /// Instead of the body: these JSON fields (dotted paths) ...
    pub fields: Vec<(String, Vec<super::filter::Step>)>,
    /// ... and these headers make the key.
    pub headers: Vec<http::HeaderName>,
}

impl DedupeRule {
    /// The key of a callback on `route` with `body` and `headers`.
    pub fn key(&self, route: &str, body: &[u8], headers: &http::HeaderMap) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(route.as_bytes());
        h.update([0u8]);
        if !self.fields.is_empty() || !self.headers.is_empty() {
            // Each part named and length-prefixed, so no two different
            // sets of values hash alike; a missing part is its own value.
            let parsed =
                (!self.fields.is_empty()).then(|| serde_json::from_slice::<serde_json::Value>(body).ok()).flatten();
            for (path, steps) in &self.fields {
                let value = parsed.as_ref().and_then(|v| super::filter::lookup(v, steps)).map(|v| v.to_string());
                part(&mut h, b"field", path.as_bytes(), value.as_deref().map(str::as_bytes));
            }
            for name in &self.headers {
                part(&mut h, b"header", name.as_str().as_bytes(), headers.get(name).map(|v| v.as_bytes()));
            }
            return truncate(h);
        }
        let trimmed = (!self.ignore.is_empty())
            .then(|| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body).ok())
            .flatten()
            .and_then(|mut map| {
                for f in &self.ignore {
                    map.shift_remove(f);
                }
                serde_json::to_vec(&map).ok()
            });
        h.update(trimmed.as_deref().unwrap_or(body));
        truncate(h)
    }
}

fn part(h: &mut Sha256, kind: &[u8], name: &[u8], value: Option<&[u8]>) {
    for piece in [kind, name] {
        h.update((piece.len() as u64).to_be_bytes());
        h.update(piece);
    }
    match value {
        Some(v) => {
            h.update([1u8]);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
        None => h.update([0u8]),
    }
}

fn truncate(h: Sha256) -> [u8; 16] {
    let full: [u8; 32] = h.finalize().into();
    let mut key = [0u8; 16];
    key.copy_from_slice(&full[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thingspace_resend_matches_and_distinct_callbacks_do_not() {
        let rule = DedupeRule {
            window: Duration::from_secs(600),
            ignore: vec!["callbackCount".into()],
            ..DedupeRule::default()
        };
        let none = http::HeaderMap::new();
        let first =
            br#"{"requestId":"r-1","deviceIds":[{"id":"8914","kind":"Iccid"}],"status":"Success","callbackCount":1}"#;
        let resend =
            br#"{"requestId":"r-1","deviceIds":[{"id":"8914","kind":"Iccid"}],"status":"Success","callbackCount":2}"#;
        let other_device =
            br#"{"requestId":"r-1","deviceIds":[{"id":"8915","kind":"Iccid"}],"status":"Success","callbackCount":1}"#;
        assert_eq!(rule.key("/ts", first, &none), rule.key("/ts", resend, &none));
        assert_ne!(rule.key("/ts", first, &none), rule.key("/ts", other_device, &none), "one requestId, two devices");
        assert_ne!(rule.key("/ts", first, &none), rule.key("/other", first, &none), "routes are separate");
        let plain = DedupeRule { window: Duration::from_secs(600), ..DedupeRule::default() };
        assert_ne!(plain.key("/ts", first, &none), plain.key("/ts", resend, &none), "callbackCount differs");
        assert_eq!(rule.key("/ts", b"<xml/>", &none), plain.key("/ts", b"<xml/>", &none), "not JSON: hashed whole");
        // Chosen fields and headers.
        let steps = |p: &str| (p.to_string(), super::super::filter::parse_path(p).expect("path"));
        let chosen = DedupeRule {
            fields: vec![steps("requestId"), steps("deviceIds[0].id")],
            headers: vec![http::HeaderName::from_static("x-delivery")],
            ..plain.clone()
        };
        assert_eq!(chosen.key("/ts", first, &none), chosen.key("/ts", resend, &none));
        assert_ne!(chosen.key("/ts", first, &none), chosen.key("/ts", other_device, &none));
        let mut h = http::HeaderMap::new();
        h.insert("x-delivery", "7".parse().expect("value"));
        assert_ne!(chosen.key("/ts", first, &none), chosen.key("/ts", first, &h), "the header is part of the key");
    }
}
