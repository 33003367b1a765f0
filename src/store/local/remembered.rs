//! Durable de-duplication: the keys of recently accepted callbacks, so that
//! a sender's resend is answered with the first message's id instead of
//! being stored again, across restarts and kill -9.
//!
//! A key is a 16-byte hash (ingress computes it, `ingress/dedupe.rs`). It
//! is durable with its message, in the same log write and fdatasync: the
//! record carries it as a stored header (`format::DEDUPE_HEADER`). It is also
//! inserted into sled's `dedupe` tree (flushed by sled's group commit, no
//! fsync of its own), so it outlives its message: a segment is deleted only
//! after a sled flush that came after its messages were settled, and so
//! after their keys' inserts. At open both are read back.
//!
//! Memory: 16 bytes of key plus the message id and receive time, about 64
//! bytes per key with the map's overhead; at most `max_keys` (the oldest
//! are forgotten first, counted), and none older than the longest window.

use std::collections::{HashMap, VecDeque};

/// Keys in memory, oldest first.
#[derive(Debug, Default)]
pub(super) struct Remembered {
    map: HashMap<[u8; 16], (u64, u64)>,
    order: VecDeque<([u8; 16], u64)>,
    pub(super) max_keys: usize,
    /// Keys older than this (ms) are forgotten.
    pub(super) retention_ms: u64,
    /// Keys forgotten because of `max_keys`.
    pub(super) evicted: u64,
}

impl Remembered {
    pub(super) fn new(max_keys: usize, retention_ms: u64) -> Remembered {
        Remembered { max_keys, retention_ms, ..Remembered::default() }
    }

    /// Remembers `key` for message `id` received at `received_ms`.
    pub(super) fn insert(&mut self, key: [u8; 16], id: u64, received_ms: u64) {
        if self.max_keys == 0 {
            return;
        }
        self.map.insert(key, (id, received_ms));
        self.order.push_back((key, received_ms));
        while self.order.len() > self.max_keys {
            if let Some((old, at)) = self.order.pop_front() {
                if self.map.get(&old).is_some_and(|(_, r)| *r == at) {
                    self.map.remove(&old);
                    self.evicted += 1;
                }
            }
        }
    }

    /// The message a key belongs to, if it was received within `window_ms`
    /// before `now_ms`.
    pub(super) fn get(&self, key: &[u8; 16], now_ms: u64, window_ms: u64) -> Option<u64> {
        self.map.get(key).filter(|(_, at)| now_ms.saturating_sub(*at) <= window_ms).map(|(id, _)| *id)
    }

    /// Forgets keys older than the retention; returns them (for sled).
    pub(super) fn prune(&mut self, now_ms: u64) -> Vec<[u8; 16]> {
        let mut gone = Vec::new();
        while let Some(&(key, at)) = self.order.front() {
            if now_ms.saturating_sub(at) <= self.retention_ms {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|(_, r)| *r == at) {
                self.map.remove(&key);
                gone.push(key);
            }
        }
        gone
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_the_window_bounded_and_pruned() {
        let mut r = Remembered::new(2, 1000);
        r.insert([1; 16], 10, 100);
        assert_eq!(r.get(&[1; 16], 500, 1000), Some(10));
        assert_eq!(r.get(&[1; 16], 500, 100), None, "outside a shorter window");
        r.insert([2; 16], 11, 200);
        r.insert([3; 16], 12, 300);
        assert_eq!(r.get(&[1; 16], 400, 1000), None, "the oldest is forgotten at the cap");
        assert_eq!(r.evicted, 1);
        assert_eq!(r.prune(1250), vec![[2; 16]]);
        assert_eq!(r.len(), 1);
    }
}
