//! Standard Webhooks signatures for the requests a destination gets
//! (`[destinations.NAME.signing]`).
//!
//! Each attempt carries `webhook-id` (the message id), `webhook-timestamp`
//! (Unix seconds of the attempt) and `webhook-signature`: one entry per
//! configured key, space-separated, so a receiver can rotate by accepting
//! any of them:
//! - `whsec_<base64 secret>`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`;
//! - `whsk_<base64 32-byte Ed25519 seed>`: `v1a,<base64 Ed25519 signature of
//!   the same>`; the receiver needs only the public key, `whpk_<base64 32
//!   bytes>` (`switchboard keygen --ed25519` prints both).
//!
//! The body signed is exactly the bytes sent (after `strip_body_fields`).
//! Keys never appear in `Debug` output, logs or errors.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::Sha256;

/// One signing key.
#[derive(Clone)]
enum Key {
    Hmac(Vec<u8>),
    Ed25519(Arc<Ed25519KeyPair>),
}

/// The keys a destination signs with, in the order configured.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Key>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({} keys, ***)", self.keys.len())
    }
}

/// Parses one configured key; the error says why it is not usable and
/// never contains the key.
fn parse_key(raw: &str) -> Result<Key, &'static str> {
    if let Some(b64) = raw.strip_prefix("whsec_") {
        let key = B64.decode(b64.trim()).map_err(|_| "a whsec_ secret must be base64 after the prefix")?;
        if key.is_empty() {
            return Err("a whsec_ secret must not be empty");
        }
        return Ok(Key::Hmac(key));
    }
    if let Some(b64) = raw.strip_prefix("whsk_") {
        let seed = B64.decode(b64.trim()).map_err(|_| "a whsk_ key must be base64 after the prefix")?;
        if seed.len() != 32 {
            return Err("a whsk_ key must be a 32-byte Ed25519 seed (switchboard keygen --ed25519 makes one)");
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| "not a valid Ed25519 seed")?;
        return Ok(Key::Ed25519(Arc::new(pair)));
    }
    Err("a signing key starts with whsec_ (HMAC, v1) or whsk_ (Ed25519, v1a)")
}

impl Signer {
    /// A signer over `keys` (each `whsec_...` or `whsk_...`); the error
    /// names the index of the first bad one and why.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Signer, (usize, &'static str)> {
        let keys =
            keys.into_iter().enumerate().map(|(i, k)| parse_key(k).map_err(|e| (i, e))).collect::<Result<_, _>>()?;
        Ok(Signer { keys })
    }

    /// The `webhook-signature` value for message `id` sent at `timestamp`
    /// (Unix seconds) with `body`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let ts = timestamp.to_string();
        let mut signed = Vec::with_capacity(id.len() + ts.len() + 2 + body.len());
        signed.extend_from_slice(id.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(ts.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(body);
        let parts: Vec<String> = self
            .keys
            .iter()
            .map(|k| match k {
                Key::Hmac(secret) => {
                    // HMAC takes keys of any length: this cannot fail.
                    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
                        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
                    mac.update(&signed);
                    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
                }
                Key::Ed25519(pair) => format!("v1a,{}", B64.encode(pair.sign(&signed).as_ref())),
            })
            .collect();
        parts.join(" ")
    }
}

/// A new `whsec_` secret (32 random bytes).
pub fn new_hmac_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", B64.encode(bytes))
}

/// A new Ed25519 key pair: (`whsk_` secret seed, `whpk_` public key).
pub fn new_ed25519_pair() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    // Any 32 bytes are a valid seed.
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).unwrap_or_else(|_| unreachable!("any 32 bytes are a seed"));
    (format!("whsk_{}", B64.encode(seed)), format!("whpk_{}", B64.encode(pair.public_key().as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's published test vector.
    #[test]
    fn the_specification_vector() {
        let signer = Signer::new(["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]).expect("secret");
        let sig = signer.sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn several_keys_sign_with_each_and_ed25519_verifies_with_the_public_key() {
        let (sk, pk) = new_ed25519_pair();
        let hmac = new_hmac_secret();
        let signer = Signer::new([hmac.as_str(), sk.as_str()]).expect("keys");
        let sig = signer.sign("msg_1", 1700000000, b"<xml/>");
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts[0].starts_with("v1,"));
        let ed = B64.decode(parts[1].strip_prefix("v1a,").expect("v1a")).expect("b64");
        let public = B64.decode(pk.strip_prefix("whpk_").expect("whpk_")).expect("b64");
        let verify = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public);
        assert!(verify.verify(b"msg_1.1700000000.<xml/>", &ed).is_ok());
        assert!(verify.verify(b"msg_1.1700000001.<xml/>", &ed).is_err());
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        for (raw, why) in
            [("secret", "starts with whsec_"), ("whsec_!!!", "base64"), ("whsec_", "empty"), ("whsk_AAAA", "32-byte")]
        {
            let (i, e) = Signer::new(["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", raw]).expect_err(raw);
            assert_eq!(i, 1);
            assert!(e.contains(why), "{raw}: {e}");
            assert!(!e.contains(raw.trim_start_matches("whsec_").trim_start_matches("whsk_")) || raw.len() < 8);
        }
        let s = Signer::new(["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]).expect("ok");
        assert!(!format!("{s:?}").contains("C2FV"));
    }
}
