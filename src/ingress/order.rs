//! Ordering per key: the key under which a callback is delivered in order
//! to a destination with `ordering = "per_key"` (`order_key`: a JSON body
//! field by dotted path, `deviceIds.0.id` or `deviceIds[0].id`, or
//! `header:NAME`) or `ordering = "fifo"` (one key for every callback).
//!
//! Ingress computes the key when it accepts the callback and the store
//! keeps it in the message's record (same write, same fdatasync): of one
//! key's pending messages the store hands out only the oldest, so they are
//! attempted one at a time in arrival order, and a failing one holds its
//! key alone (`store/index.rs`). The order is rebuilt from the log at open.
//!
//! A key is 8 bytes of SHA-256 of the value (a JSON string's characters,
//! any other JSON value's compact text, a header's bytes): two different
//! values sharing a key only share one order, they are never merged. A
//! callback without the field or header (or with a body that is not JSON)
//! is not ordered for that destination: it is delivered as it comes, at
//! the destination's full concurrency, and counted
//! (`switchboard_order_key_missing_total`).

use http::{HeaderMap, HeaderName};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::filter::{lookup, parse_path, Step};

/// What a destination's messages are ordered by (validated config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderKey {
    /// `ordering = "fifo"`: one order for every message.
    Fifo,
    /// `ordering = "per_key"` with a body field.
    Body(Vec<Step>),
    /// `ordering = "per_key"` with `order_key = "header:NAME"`.
    Header(HeaderName),
}

/// The key of every message of a `fifo` destination.
const FIFO_KEY: u64 = 0;

impl OrderKey {
    /// Parses an `order_key`: `header:NAME`, or a dotted JSON path.
    pub fn parse(s: &str) -> Result<OrderKey, String> {
        if let Some(name) = s.strip_prefix("header:") {
            return HeaderName::from_bytes(name.trim().as_bytes())
                .map(OrderKey::Header)
                .map_err(|_| format!("{name:?} is not a valid header name"));
        }
        parse_path(s).map(OrderKey::Body)
    }

    /// Whether finding the key needs the body parsed as JSON.
    pub fn reads_body(&self) -> bool {
        matches!(self, OrderKey::Body(_))
    }

    /// The callback's key, or `None` if it has no value there (it is then
    /// delivered unordered).
    pub fn key(&self, headers: &HeaderMap, body: Option<&Value>) -> Option<u64> {
        match self {
            OrderKey::Fifo => Some(FIFO_KEY),
            OrderKey::Header(name) => headers.get(name).map(|v| hash(v.as_bytes())),
            OrderKey::Body(steps) => match lookup(body?, steps)? {
                Value::Null => None,
                Value::String(s) => Some(hash(s.as_bytes())),
                other => Some(hash(other.to_string().as_bytes())),
            },
        }
    }
}

fn hash(value: &[u8]) -> u64 {
    let digest = Sha256::digest(value);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Value {
        serde_json::from_str(s).expect("json")
    }

    #[test]
    fn the_thingspace_device_id_is_a_key_by_either_path_form() {
        let a = body(r#"{"requestId":"r1","deviceIds":[{"id":"8914800000","kind":"iccid"}],"callbackCount":1}"#);
        let b = body(r#"{"requestId":"r1","deviceIds":[{"id":"8914800001","kind":"iccid"}],"callbackCount":1}"#);
        let dotted = OrderKey::parse("deviceIds.0.id").expect("path");
        let bracket = OrderKey::parse("deviceIds[0].id").expect("path");
        let h = HeaderMap::new();
        let ka = dotted.key(&h, Some(&a)).expect("key");
        assert_eq!(Some(ka), bracket.key(&h, Some(&a)));
        assert_ne!(Some(ka), dotted.key(&h, Some(&b)), "two devices, two orders");
    }

    #[test]
    fn a_callback_without_the_key_is_unordered() {
        let k = OrderKey::parse("deviceIds.0.id").expect("path");
        let h = HeaderMap::new();
        assert_eq!(k.key(&h, Some(&body(r#"{"deviceIds":[]}"#))), None);
        assert_eq!(k.key(&h, Some(&body(r#"{"deviceIds":[{"id":null}]}"#))), None);
        assert_eq!(k.key(&h, None), None, "not JSON");
        assert_eq!(OrderKey::Fifo.key(&h, None), Some(FIFO_KEY));
    }

    #[test]
    fn header_keys_and_bad_keys() {
        let k = OrderKey::parse("header:X-Device").expect("header");
        let mut h = HeaderMap::new();
        assert_eq!(k.key(&h, None), None);
        h.insert("x-device", "d1".parse().expect("value"));
        assert!(k.key(&h, None).is_some());
        assert!(OrderKey::parse("header:bad name").is_err());
        assert!(OrderKey::parse("").is_err());
        assert!(OrderKey::parse("a..b").is_err());
        assert!(OrderKey::parse("a[x]").is_err());
    }

    #[test]
    fn numbers_and_strings_are_keys_by_their_text() {
        let k = OrderKey::parse("n").expect("path");
        let h = HeaderMap::new();
        assert_eq!(k.key(&h, Some(&body(r#"{"n":7}"#))), k.key(&h, Some(&body(r#"{"n":"7"}"#))));
    }
}
