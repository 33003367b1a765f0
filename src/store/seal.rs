//! Payloads encrypted at rest (`[store.encryption]`), for both backends:
//! the local store's records in the log and dead-lettered copies in sled,
//! and what the JetStream backend publishes, are sealed with AES-256-GCM
//! (ring), a random 96-bit nonce per record and a number as associated
//! data (a sealed record moved elsewhere does not open): the message id
//! locally; on JetStream, where the id exists only after the publish, a
//! random number carried in the message's `Switchboard-Seal` header.
//!
//! Sealed record: `[0xE1][key id length u8][key id][nonce 12][ciphertext +
//! tag 16]`. The first configured key seals; every configured key opens, by
//! the id stored in the record, so rotation adds a key in front and keeps
//! the old ones until nothing sealed with them is left. A record sealed
//! with a key that is not configured refuses the store at open, naming the
//! key id; a plain record (written before encryption was turned on) still
//! reads. Records are sealed by the log's flusher (in memory they stay
//! plain: this protects the disk, not the process).

use std::collections::HashMap;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::StoreError;

/// First byte of a sealed record (a plain one starts with its version, 1).
const SEALED: u8 = 0xE1;

pub(crate) struct Sealer {
    /// The id of the key that seals.
    write: String,
    keys: HashMap<String, LessSafeKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(seals with {:?}, opens {} keys)", self.write, self.keys.len())
    }
}

impl Sealer {
    /// `keys`: (id, 32 key bytes), the first seals. Validation made sure of
    /// the lengths; a wrong one is refused here too.
    pub(crate) fn new(keys: &[(String, Vec<u8>)]) -> Result<Sealer, String> {
        let write = keys.first().map(|(id, _)| id.clone()).ok_or("no encryption key")?;
        let mut map = HashMap::new();
        for (id, bytes) in keys {
            let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| format!("key {id:?} is not 32 bytes"))?;
            map.insert(id.clone(), LessSafeKey::new(key));
        }
        Ok(Sealer { write, keys: map, rng: SystemRandom::new() })
    }

    pub(crate) fn seal(&self, id: u64, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let key = &self.keys[&self.write];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Sealing("no randomness for a nonce".into()))?;
        let kid = self.write.as_bytes();
        let mut out = Vec::with_capacity(2 + kid.len() + NONCE_LEN + plain.len() + 16);
        out.push(SEALED);
        out.push(kid.len() as u8);
        out.extend_from_slice(kid);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let mut body = out.split_off(start);
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(id.to_be_bytes()), &mut body)
            .map_err(|_| StoreError::Sealing("sealing failed".into()))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The plain record of message `id`; a plain record is returned as is.
    pub(crate) fn open(this: Option<&Sealer>, id: u64, raw: &[u8]) -> Result<Vec<u8>, StoreError> {
        if raw.first() != Some(&SEALED) {
            return Ok(raw.to_vec());
        }
        let bad = |detail: &str| StoreError::Sealing(format!("sealed record of message {id}: {detail}"));
        let kid_len = *raw.get(1).ok_or_else(|| bad("truncated"))? as usize;
        let kid = raw.get(2..2 + kid_len).ok_or_else(|| bad("truncated"))?;
        let kid = String::from_utf8_lossy(kid).into_owned();
        let Some(key) = this.and_then(|s| s.keys.get(&kid)) else {
            return Err(StoreError::MissingKey { key_id: kid });
        };
        let nonce_at = 2 + kid_len;
        let nonce: [u8; NONCE_LEN] =
            raw.get(nonce_at..nonce_at + NONCE_LEN).and_then(|n| n.try_into().ok()).ok_or_else(|| bad("truncated"))?;
        let mut body = raw[nonce_at + NONCE_LEN..].to_vec();
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(id.to_be_bytes()), &mut body)
            .map_err(|_| bad(&format!("does not open with key {kid:?} (wrong key, or damaged)")))?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_records_open_by_key_id_and_only_for_their_message() {
        let old = Sealer::new(&[("k1".into(), vec![1; 32])]).expect("k1");
        let new = Sealer::new(&[("k2".into(), vec![2; 32]), ("k1".into(), vec![1; 32])]).expect("k2, k1");
        let sealed = old.seal(7, b"callback body").expect("seal");
        assert!(!sealed.windows(8).any(|w| w == b"callback"), "no plaintext in the sealed record");
        assert_eq!(Sealer::open(Some(&new), 7, &sealed).expect("rotation reads old records"), b"callback body");
        assert!(Sealer::open(Some(&new), 8, &sealed).is_err(), "another message id does not open it");
        let only_new = Sealer::new(&[("k2".into(), vec![2; 32])]).expect("k2");
        match Sealer::open(Some(&only_new), 7, &sealed) {
            Err(StoreError::MissingKey { key_id }) => assert_eq!(key_id, "k1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Sealer::open(None, 7, &sealed), Err(StoreError::MissingKey { .. })));
        assert_eq!(Sealer::open(None, 7, b"\x01plain").expect("plain"), b"\x01plain");
        let wrong = Sealer::new(&[("k1".into(), vec![9; 32])]).expect("wrong k1");
        assert!(matches!(Sealer::open(Some(&wrong), 7, &sealed), Err(StoreError::Sealing(_))));
    }
}
