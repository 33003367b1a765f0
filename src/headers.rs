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
//! - Everything else the sender sent is stored, and forwarded as it came,
//!   byte for byte, in order, as each destination's [`Policy`] says:
//!   `forward_headers` ("all", an allowlist or a denylist of names; the
//!   rules above hold whatever the list says), then its `add_headers`
//!   (static values, secrets allowed; they replace a sender's header of the
//!   same name), then `Forwarded` (RFC 7239) when `forwarded = true`.
//!   Delivery adds its own headers last (see `delivery/mod.rs`).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Which of the sender's headers a destination gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Forward {
    /// All of them (the default).
    #[default]
    All,
    /// Only these.
    Allow(Vec<HeaderName>),
    /// All but these.
    Deny(Vec<HeaderName>),
}

/// One destination's header policy (validated config).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub forward: Forward,
    /// Added to every request; values marked sensitive (never logged).
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Add `Forwarded: for=<sender>` (besides `X-Forwarded-For`).
    pub forwarded: bool,
}

impl Policy {
    /// Whether a stored sender header goes to this destination.
    pub fn forwards(&self, name: &HeaderName) -> bool {
        match &self.forward {
            Forward::All => true,
            Forward::Allow(names) => names.contains(name),
            Forward::Deny(names) => !names.contains(name),
        }
    }
}

/// The `Forwarded` element for a sender address (IPv6 quoted and bracketed,
/// RFC 7239 section 6).
pub fn forwarded_for(peer: &str) -> String {
    if peer.contains(':') {
        format!("for=\"[{peer}]\"")
    } else {
        format!("for={peer}")
    }
}

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
    fn allow_and_deny_lists_and_the_forwarded_element() {
        let ua = header::USER_AGENT;
        let deny = Policy { forward: Forward::Deny(vec![ua.clone()]), ..Policy::default() };
        assert!(!deny.forwards(&ua) && deny.forwards(&header::CONTENT_TYPE));
        let allow = Policy { forward: Forward::Allow(vec![ua.clone()]), ..Policy::default() };
        assert!(allow.forwards(&ua) && !allow.forwards(&header::CONTENT_TYPE));
        assert_eq!(forwarded_for("3.87.163.45"), "for=3.87.163.45");
        assert_eq!(forwarded_for("2001:db8::1"), "for=\"[2001:db8::1]\"");
    }

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
