//! Header policy, in one place: which request headers are stored with a
//! message, which are forwarded to a destination, and which never travel.
//!
//! - Hop-by-hop headers (and those the sender lists in `Connection`), `Host`,
//!   `Content-Length` and `Expect` describe one connection, not the message:
//!   never stored, never forwarded.
//! - The headers that authenticated the sender to us (a route's `basic`
//!   `Authorization`, its `header` secret, its `hmac` signature and
//!   timestamp headers: `Auth::credential_headers` in `ingress/auth.rs`) are
//!   stored only when a destination of the route sets
//!   `forward_sender_credentials`, and forwarded only to those that do.
//! - Everything else the sender sent is stored and forwarded as it came,
//!   byte for byte, in order; delivery adds its own (see `delivery.rs`).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName};

/// Headers that describe one connection, not the message: never stored or forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
            | "http2-settings"
    )
}

/// The request's end-to-end headers, in order, as stored with the message,
/// leaving out `withheld` (the sender's credentials, unless a destination
/// wants them).
pub fn stored(headers: &HeaderMap, withheld: &[HeaderName]) -> Vec<(String, Bytes)> {
    // Headers the sender marked as hop-by-hop through `Connection` (usually none).
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name) && !withheld.contains(name))
        .filter(|(name, _)| !listed.iter().any(|l| l == name.as_str()))
        .map(|(name, value)| (name.as_str().to_string(), Bytes::copy_from_slice(value.as_bytes())))
        .collect()
}

/// Whether a stored header goes to a destination: not hop-by-hop (stores
/// written before this policy may hold some) and not one of `withheld`.
pub fn forwarded(name: &HeaderName, withheld: &[HeaderName]) -> bool {
    !is_hop_by_hop(name) && !withheld.contains(name)
}

/// The Standard Webhooks headers (`webhook-id`, `-timestamp`, `-signature`):
/// a destination that signs gets ours instead of the sender's.
pub fn is_standard_webhooks(name: &HeaderName) -> bool {
    matches!(name.as_str(), "webhook-id" | "webhook-timestamp" | "webhook-signature")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_connection_headers_are_not_stored() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().expect("value"));
        h.insert("authorization", "Basic eDp5".parse().expect("value"));
        h.insert("connection", "x-hop".parse().expect("value"));
        h.insert("x-hop", "1".parse().expect("value"));
        h.insert("x-keep", "1".parse().expect("value"));
        let names: Vec<String> = stored(&h, &[header::AUTHORIZATION]).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["content-type", "x-keep"]);
        assert!(!forwarded(&header::AUTHORIZATION, &[header::AUTHORIZATION]));
        assert!(forwarded(&header::AUTHORIZATION, &[]));
        assert!(!forwarded(&header::HOST, &[]));
    }
}
