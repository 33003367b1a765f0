//! Inbound de-duplication, per route and opt-in (`dedupe_window`).
//!
//! Senders resend what they think failed: ThingSpace resends a callback not
//! answered within ~4 s even if the first attempt then succeeds. With a
//! window set, ingress remembers the SHA-256 of each accepted body (keyed
//! with its route) and answers an identical body within the window with the
//! first one's id, storing nothing.
//!
//! Bounds and limits: at most [`MAX_ENTRIES`] bodies are remembered (the
//! oldest are forgotten first), in memory only, so a restart forgets them; two
//! identical requests racing each other can both be stored (delivery is
//! at-least-once anyway; receivers de-duplicate on `webhook-id`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest, Sha256};

/// Upper bound on remembered bodies (about 100 bytes each).
pub const MAX_ENTRIES: usize = 100_000;

type Key = [u8; 32];

#[derive(Default)]
pub struct Dedupe {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashMap<Key, (String, Instant)>,
    /// Keys in the order they were remembered, with their expiry.
    order: VecDeque<(Instant, Key)>,
}

impl State {
    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, key)) = self.order.front() {
            if expires > now && self.order.len() <= MAX_ENTRIES {
                break;
            }
            self.order.pop_front();
            // Only forget the entry if it was not remembered again since.
            if self.seen.get(&key).is_some_and(|(_, e)| *e == expires) {
                self.seen.remove(&key);
            }
        }
    }
}

impl Dedupe {
    pub fn key(route: &str, body: &[u8]) -> Key {
        let mut h = Sha256::new();
        h.update(route.as_bytes());
        h.update([0u8]);
        h.update(body);
        h.finalize().into()
    }

    /// The id of an identical body accepted and still within its window.
    pub fn lookup(&self, key: &Key, now: Instant) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.expire(now);
        s.seen.get(key).map(|(id, _)| id.clone())
    }

    /// Remembers an accepted body until `expires`.
    pub fn remember(&self, key: Key, id: String, expires: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.seen.insert(key, (id, expires));
        s.order.push_back((expires, key));
        s.expire(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn remembers_within_the_window_per_route() {
        let d = Dedupe::default();
        let now = Instant::now();
        let k = Dedupe::key("/a", b"{}");
        assert_eq!(d.lookup(&k, now), None);
        d.remember(k, "msg_1".into(), now + Duration::from_secs(60));
        assert_eq!(d.lookup(&k, now).as_deref(), Some("msg_1"));
        assert_eq!(d.lookup(&Dedupe::key("/b", b"{}"), now), None, "routes are separate");
        assert_eq!(d.lookup(&Dedupe::key("/a", b"{ }"), now), None, "bytes, not JSON meaning");
        assert_eq!(d.lookup(&k, now + Duration::from_secs(61)), None, "forgotten after the window");
    }

    #[test]
    fn memory_is_bounded() {
        let d = Dedupe::default();
        let later = Instant::now() + Duration::from_secs(3600);
        for i in 0..(MAX_ENTRIES + 10) {
            d.remember(Dedupe::key("/a", &i.to_be_bytes()), format!("msg_{i}"), later);
        }
        let s = d.state.lock().expect("lock");
        assert!(s.seen.len() <= MAX_ENTRIES && s.order.len() <= MAX_ENTRIES);
        drop(s);
        assert_eq!(d.lookup(&Dedupe::key("/a", &0usize.to_be_bytes()), Instant::now()), None, "oldest forgotten first");
    }
}
