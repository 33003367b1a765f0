//! De-duplication of resent callbacks, per route (`dedupe = { window,
//! ignore }`; `dedupe_window = "10m"` is the same with nothing ignored).
//!
//! Senders resend what they think failed: ThingSpace resends a callback not
//! answered within ~4 s, with `callbackCount` 2 instead of 1. The key of a
//! callback is a 16-byte hash of its route and its body, the body's listed
//! top-level JSON fields left out first (`ignore = ["callbackCount"]`; a
//! body that is not a JSON object is hashed whole). A callback whose key was
//! accepted within the window is answered with the first message's id and
//! `"duplicate": true`, and stored nothing. The store keeps the keys
//! durably, with their messages (`store/remembered.rs`), so a resend after a
//! restart or kill -9 is still recognised. Two identical requests racing
//! each other can both be stored (delivery is at-least-once anyway;
//! receivers de-duplicate on `webhook-id`).

use std::time::Duration;

use sha2::{Digest, Sha256};

/// A route's de-duplication rule (validated config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeRule {
    pub window: Duration,
    /// Top-level JSON fields left out of the key.
    pub ignore: Vec<String>,
}

impl DedupeRule {
    /// The key of a callback on `route` with `body`.
    pub fn key(&self, route: &str, body: &[u8]) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(route.as_bytes());
        h.update([0u8]);
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
        let full: [u8; 32] = h.finalize().into();
        let mut key = [0u8; 16];
        key.copy_from_slice(&full[..16]);
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thingspace_resend_matches_and_distinct_callbacks_do_not() {
        let rule = DedupeRule { window: Duration::from_secs(600), ignore: vec!["callbackCount".into()] };
        let first =
            br#"{"requestId":"r-1","deviceIds":[{"id":"8914","kind":"Iccid"}],"status":"Success","callbackCount":1}"#;
        let resend =
            br#"{"requestId":"r-1","deviceIds":[{"id":"8914","kind":"Iccid"}],"status":"Success","callbackCount":2}"#;
        let other_device =
            br#"{"requestId":"r-1","deviceIds":[{"id":"8915","kind":"Iccid"}],"status":"Success","callbackCount":1}"#;
        assert_eq!(rule.key("/ts", first), rule.key("/ts", resend));
        assert_ne!(rule.key("/ts", first), rule.key("/ts", other_device), "one requestId, two devices");
        assert_ne!(rule.key("/ts", first), rule.key("/other", first), "routes are separate");
        let plain = DedupeRule { window: Duration::from_secs(600), ignore: vec![] };
        assert_ne!(plain.key("/ts", first), plain.key("/ts", resend), "the whole body differs by callbackCount");
        assert_eq!(rule.key("/ts", b"<xml/>"), plain.key("/ts", b"<xml/>"), "not JSON: hashed whole");
    }
}
