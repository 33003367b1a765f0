//! Lookup of stored messages by a body field their route indexes
//! (`index = ["requestId"]`): "what happened to the callbacks of ThingSpace
//! request R?". Ingress hashes each indexed field's value with its name into
//! an 8-byte key and the record carries the keys (same write); the store
//! keeps key → message ids in memory for the messages it holds, rebuilt at
//! open, and forgets a message's keys when it is done everywhere.
//!
//! Memory: about 80 bytes per indexed field of a stored message (the id in
//! its key's list, the key in the message's list, two hash-map entries
//! amortised over the messages that share a key); bounded by the messages
//! stored, like the due queues.

use std::collections::HashMap;

#[derive(Default)]
pub(super) struct Lookup {
    by_key: HashMap<u64, Vec<u64>>,
    keys_of: HashMap<u64, Vec<u64>>,
}

impl Lookup {
    pub(super) fn add(&mut self, id: u64, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        for k in keys {
            let ids = self.by_key.entry(*k).or_default();
            // Ids mostly arrive in order; recovery reads kept copies first.
            match ids.binary_search(&id) {
                Ok(_) => {}
                Err(at) => ids.insert(at, id),
            }
        }
        self.keys_of.insert(id, keys.to_vec());
    }

    pub(super) fn remove(&mut self, id: u64) {
        let Some(keys) = self.keys_of.remove(&id) else { return };
        for k in keys {
            if let Some(ids) = self.by_key.get_mut(&k) {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    self.by_key.remove(&k);
                }
            }
        }
    }

    /// The stored messages with `key`, oldest first.
    pub(super) fn find(&self, key: u64) -> Vec<u64> {
        self.by_key.get(&key).cloned().unwrap_or_default()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys_of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::lookup_key;

    #[test]
    fn add_find_remove() {
        let mut l = Lookup::default();
        let k = lookup_key("requestId", &serde_json::json!("r-1"));
        assert_eq!(k, lookup_key("requestId", &serde_json::json!("r-1")));
        assert_ne!(k, lookup_key("requestId", &serde_json::json!("r-2")));
        l.add(5, &[k]);
        l.add(3, &[k]);
        assert_eq!(l.find(k), vec![3, 5]);
        l.remove(3);
        assert_eq!(l.find(k), vec![5]);
        l.remove(5);
        assert!(l.find(k).is_empty() && l.is_empty());
    }
}
