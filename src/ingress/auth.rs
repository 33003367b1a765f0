//! Sender authentication and source filtering for routes.
//!
//! A route may require one of:
//! - `body_fields`: top-level JSON fields (ThingSpace sends the registered
//!   username/password in the body); several passwords are accepted so a
//!   rotated one keeps working while the sender still uses the old one;
//! - `basic`: HTTP Basic credentials;
//! - `header`: a named header carrying a shared secret;
//! - `hmac`: HMAC-SHA256 of the raw body, in the `plain` (GitHub-style
//!   `prefix + hex|base64`, optionally over `timestamp.body`), `stripe` or
//!   `standard-webhooks` layout;
//! - a named sender (`github`, `stripe`, `shopify`, `slack`, `twilio`,
//!   `standard-webhooks`, `svix`): the `hmac` check with that sender's
//!   exact layout (`providers.rs`).
//!
//! Secrets are compared in constant time ([`subtle`]). A rejection carries a
//! short reason for the sender and a bounded label for metrics; neither ever
//! contains a secret or a value the sender sent.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Why a request was refused: `label` is a bounded metric label value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub label: &'static str,
    pub reason: &'static str,
}

/// Every `reason` label a rejection by [`Auth`] counts under (the series
/// exist at 0 from the start for a route with auth).
pub const REJECTION_LABELS: [&str; 5] =
    ["not_json", "missing_credentials", "bad_credentials", "bad_signature", "stale_timestamp"];

pub(super) const fn reject(label: &'static str, reason: &'static str) -> Rejection {
    Rejection { label, reason }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Hex,
    Base64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HmacScheme {
    Plain,
    Stripe,
    StandardWebhooks,
    /// Slack: `v0=` and hex over `v0:<timestamp>:<body>` (named sender
    /// `slack` only).
    #[serde(skip)]
    Slack,
    /// Twilio: base64 HMAC-SHA1 over the public URL and the sorted form
    /// parameters, or over the URL with `bodySHA256` for other bodies
    /// (named sender `twilio` only).
    #[serde(skip)]
    Twilio,
}

#[derive(Debug, Clone)]
pub enum Auth {
    BodyFields { username_field: String, password_field: String, username: Secret, passwords: Vec<Secret> },
    Basic { username: Secret, passwords: Vec<Secret> },
    Header { name: HeaderName, values: Vec<Secret> },
    Hmac(HmacAuth),
}

#[derive(Debug, Clone)]
pub struct HmacAuth {
    pub scheme: HmacScheme,
    pub header: HeaderName,
    pub prefix: String,
    pub encoding: Encoding,
    pub timestamp_header: Option<HeaderName>,
    pub tolerance: Duration,
    /// Raw key bytes (Standard Webhooks `whsec_` secrets already decoded).
    pub secrets: Vec<Vec<u8>>,
    /// Standard Webhooks' id header (`webhook-id`; Svix: `svix-id`).
    pub id_header: Option<HeaderName>,
    /// Twilio: the URL the sender was given for this route (the request's
    /// query string is appended), since the relay sits behind proxies.
    pub public_url: Option<String>,
}

pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

fn any_matches(candidates: &[Secret], given: &[u8]) -> bool {
    // Check every candidate (no early exit) so timing does not reveal which matched.
    candidates.iter().fold(false, |acc, c| acc | ct_eq(c.expose().as_bytes(), given))
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Auth {
    /// Whether the check needs the body (else it runs before the body is read).
    pub fn needs_body(&self) -> bool {
        matches!(self, Auth::BodyFields { .. } | Auth::Hmac(_))
    }

    /// The request headers that carry the sender's credentials in this mode:
    /// not forwarded unless a destination asks (see `headers.rs`).
    pub fn credential_headers(&self) -> Vec<HeaderName> {
        match self {
            Auth::BodyFields { .. } => Vec::new(),
            Auth::Basic { .. } => vec![http::header::AUTHORIZATION],
            Auth::Header { name, .. } => vec![name.clone()],
            Auth::Hmac(h) => {
                let mut v = vec![h.header.clone()];
                v.extend(h.timestamp_header.clone());
                if h.scheme == HmacScheme::StandardWebhooks && h.timestamp_header.is_none() {
                    v.push(HeaderName::from_static("webhook-timestamp"));
                }
                v
            }
        }
    }

    /// `query`: the request's query string (Twilio signs the URL).
    pub fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), Rejection> {
        match self {
            Auth::BodyFields { username_field, password_field, username, passwords } => {
                let map = match serde_json::from_slice::<serde_json::Value>(body) {
                    Ok(serde_json::Value::Object(map)) => map,
                    // serde_json stops at 128 levels; say so rather than "not JSON".
                    Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
                        return Err(reject(
                            "not_json",
                            "the JSON body is nested deeper than 128 levels: too deep to read credentials from",
                        ))
                    }
                    _ => return Err(reject("not_json", "this route expects a JSON object body with credentials")),
                };
                let (Some(u), Some(p)) = (
                    map.get(username_field).and_then(|v| v.as_str()),
                    map.get(password_field).and_then(|v| v.as_str()),
                ) else {
                    return Err(reject("missing_credentials", "credentials missing from the body"));
                };
                let user_ok = ct_eq(username.expose().as_bytes(), u.as_bytes());
                if user_ok & any_matches(passwords, p.as_bytes()) {
                    Ok(())
                } else {
                    Err(reject("bad_credentials", "wrong credentials"))
                }
            }
            Auth::Basic { username, passwords } => {
                let Some(value) = header_str(headers, &http::header::AUTHORIZATION) else {
                    return Err(reject("missing_credentials", "basic credentials required"));
                };
                let decoded = value
                    .strip_prefix("Basic ")
                    .or_else(|| value.strip_prefix("basic "))
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok());
                let Some(decoded) = decoded else {
                    return Err(reject("missing_credentials", "basic credentials required"));
                };
                let (u, p) = match decoded.iter().position(|b| *b == b':') {
                    Some(i) => (&decoded[..i], &decoded[i + 1..]),
                    None => (&decoded[..], &b""[..]),
                };
                if ct_eq(username.expose().as_bytes(), u) & any_matches(passwords, p) {
                    Ok(())
                } else {
                    Err(reject("bad_credentials", "wrong credentials"))
                }
            }
            Auth::Header { name, values } => match headers.get(name) {
                None => Err(reject("missing_credentials", "shared-secret header missing")),
                Some(v) if any_matches(values, v.as_bytes()) => Ok(()),
                Some(_) => Err(reject("bad_credentials", "wrong shared secret")),
            },
            Auth::Hmac(h) => h.check(headers, query, body, now),
        }
    }

    /// A handshake the sender expects answered, not forwarded: Slack's
    /// `url_verification` (after its signature was checked). The answer's
    /// JSON body.
    pub fn handshake(&self, body: &[u8]) -> Option<serde_json::Value> {
        match self {
            Auth::Hmac(h) if h.scheme == HmacScheme::Slack => super::providers::slack_handshake(body),
            _ => None,
        }
    }
}

pub(super) fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else { return Vec::new() };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

pub(super) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl HmacAuth {
    pub(super) fn fresh(&self, ts: &str, now: SystemTime) -> Result<(), Rejection> {
        let ts: u64 = ts.trim().parse().map_err(|_| reject("bad_signature", "invalid signature timestamp"))?;
        let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if now.abs_diff(ts) > self.tolerance.as_secs() {
            return Err(reject("stale_timestamp", "signature timestamp outside the tolerance"));
        }
        Ok(())
    }

    /// True if `sig` equals the MAC of `parts` under any secret.
    pub(super) fn verify(&self, parts: &[&[u8]], sig: &[u8]) -> bool {
        self.secrets.iter().fold(false, |acc, k| acc | ct_eq(&mac(k, parts), sig))
    }

    fn check(&self, headers: &HeaderMap, query: Option<&str>, body: &[u8], now: SystemTime) -> Result<(), Rejection> {
        let missing = reject("missing_credentials", "signature header missing");
        let bad = reject("bad_signature", "signature does not match");
        match self.scheme {
            HmacScheme::Plain => {
                let value = header_str(headers, &self.header).ok_or(missing)?;
                let encoded = value.trim().strip_prefix(self.prefix.as_str()).ok_or(bad.clone())?;
                let sig = match self.encoding {
                    Encoding::Hex => decode_hex(&encoded.to_ascii_lowercase()),
                    Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(encoded).ok(),
                }
                .ok_or(bad.clone())?;
                let ok = match &self.timestamp_header {
                    Some(th) => {
                        let ts = header_str(headers, th)
                            .ok_or(reject("missing_credentials", "signature timestamp missing"))?;
                        self.fresh(ts, now)?;
                        self.verify(&[ts.trim().as_bytes(), b".", body], &sig)
                    }
                    None => self.verify(&[body], &sig),
                };
                ok.then_some(()).ok_or(bad)
            }
            HmacScheme::Stripe => {
                let value = header_str(headers, &self.header).ok_or(missing)?;
                let mut ts = None;
                let mut sigs = Vec::new();
                for item in value.split(',') {
                    match item.trim().split_once('=') {
                        Some(("t", t)) => ts = Some(t),
                        Some(("v1", s)) => sigs.extend(decode_hex(s)),
                        _ => {}
                    }
                }
                let ts = ts.ok_or(bad.clone())?;
                self.fresh(ts, now)?;
                let ok = sigs.iter().fold(false, |acc, s| acc | self.verify(&[ts.as_bytes(), b".", body], s));
                ok.then_some(()).ok_or(bad)
            }
            HmacScheme::Slack => self.check_slack(headers, body, now),
            HmacScheme::Twilio => self.check_twilio(headers, query, body),
            HmacScheme::StandardWebhooks => {
                let id_header = self.id_header.clone().unwrap_or(HeaderName::from_static("webhook-id"));
                let ts_header = self.timestamp_header.clone().unwrap_or(HeaderName::from_static("webhook-timestamp"));
                let id = header_str(headers, &id_header).ok_or(missing.clone())?;
                let ts = header_str(headers, &ts_header).ok_or(missing.clone())?;
                let value = header_str(headers, &self.header).ok_or(missing)?;
                self.fresh(ts, now)?;
                let ok = value
                    .split(' ')
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .filter_map(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    .fold(false, |acc, s| acc | self.verify(&[id.as_bytes(), b".", ts.as_bytes(), b".", body], &s));
                ok.then_some(()).ok_or(bad)
            }
        }
    }
}

/// The client address of a request: the peer, unless the peer is a trusted
/// proxy, in which case the rightmost untrusted hop of `X-Forwarded-For`
/// (or, without it, of `Forwarded: for=`).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| parse_hop(s.trim()))
        .collect();
    if hops.is_empty() {
        hops = headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split([',', ';']))
            .filter_map(|kv| kv.trim().strip_prefix("for=").or_else(|| kv.trim().strip_prefix("For=")))
            .filter_map(|s| parse_hop(s.trim_matches('"')))
            .collect();
    }
    // Walk from the proxy nearest to us outwards; the first hop we do not
    // trust is the client. Everything left of it could be forged.
    let mut client = peer;
    for hop in hops.iter().rev() {
        client = *hop;
        if !is_trusted(hop) {
            break;
        }
    }
    client
}

fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // "[2001:db8::1]:443", "192.0.2.1:8080"
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[').and_then(|r| r.split(']').next()).and_then(|ip| ip.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
        }
        h
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let trusted = [net("10.0.0.0/8")];
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 3.87.163.45, 10.0.0.7")]);
        // Untrusted peer: headers ignored.
        assert_eq!(
            client_ip("192.0.2.9".parse().expect("ip"), &h, &trusted),
            "192.0.2.9".parse::<IpAddr>().expect("ip")
        );
        // Trusted peer: rightmost untrusted hop, not the (forgeable) leftmost.
        assert_eq!(
            client_ip("10.1.1.1".parse().expect("ip"), &h, &trusted),
            "3.87.163.45".parse::<IpAddr>().expect("ip")
        );
        let fwd = headers(&[("forwarded", "for=192.0.2.60;proto=https, for=\"[2001:db8::1]:443\"")]);
        assert_eq!(
            client_ip("10.1.1.1".parse().expect("ip"), &fwd, &trusted),
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            client_ip("10.1.1.1".parse().expect("ip"), &HeaderMap::new(), &trusted),
            "10.1.1.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn allowlist_handles_v4_v6_and_mapped() {
        let allow = [net("3.87.163.45/32"), net("2001:db8::/32")];
        assert!(crate::server::allowed("3.87.163.45".parse().expect("ip"), &allow));
        assert!(crate::server::allowed("::ffff:3.87.163.45".parse().expect("ip"), &allow));
        assert!(crate::server::allowed("2001:db8::5".parse().expect("ip"), &allow));
        assert!(!crate::server::allowed("3.87.163.46".parse().expect("ip"), &allow));
        assert!(crate::server::allowed("8.8.8.8".parse().expect("ip"), &[]));
    }

    #[test]
    fn hmac_schemes() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let body = b"{\"a\":1}";
        let key = b"topsecret".to_vec();
        let plain = HmacAuth {
            scheme: HmacScheme::Plain,
            header: HeaderName::from_static("x-hub-signature-256"),
            prefix: "sha256=".into(),
            encoding: Encoding::Hex,
            timestamp_header: None,
            tolerance: Duration::from_secs(300),
            secrets: vec![b"old".to_vec(), key.clone()],
            id_header: None,
            public_url: None,
        };
        let hex: String = mac(&key, &[body]).iter().map(|b| format!("{b:02x}")).collect();
        let good = headers(&[("x-hub-signature-256", &format!("sha256={hex}"))]);
        assert_eq!(plain.check(&good, None, body, now), Ok(()));
        assert_eq!(plain.check(&good, None, b"{\"a\":2}", now).map_err(|r| r.label), Err("bad_signature"));
        assert_eq!(plain.check(&HeaderMap::new(), None, body, now).map_err(|r| r.label), Err("missing_credentials"));

        let stripe = HmacAuth {
            scheme: HmacScheme::Stripe,
            header: HeaderName::from_static("stripe-signature"),
            ..plain.clone()
        };
        let sig: String = mac(&key, &[b"1700000000", b".", body]).iter().map(|b| format!("{b:02x}")).collect();
        let h = headers(&[("stripe-signature", &format!("t=1700000000,v1={sig}"))]);
        assert_eq!(stripe.check(&h, None, body, now), Ok(()));
        let late = now + Duration::from_secs(3600);
        assert_eq!(stripe.check(&h, None, body, late).map_err(|r| r.label), Err("stale_timestamp"));

        let sw = HmacAuth {
            scheme: HmacScheme::StandardWebhooks,
            header: HeaderName::from_static("webhook-signature"),
            ..plain
        };
        let sig =
            base64::engine::general_purpose::STANDARD.encode(mac(&key, &[b"msg_1", b".", b"1700000000", b".", body]));
        let h = headers(&[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "1700000000"),
            ("webhook-signature", &format!("v1,bm9wZQ== v1,{sig}")),
        ]);
        assert_eq!(sw.check(&h, None, body, now), Ok(()));
    }
}
