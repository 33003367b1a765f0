//! Named senders (`[routes.auth.github]` and the others): each one the
//! `hmac` check with that sender's exact layout, its default tolerance and
//! its own delivery id as the default de-duplication key.
//!
//! | sender | signature header | signed | key |
//! |---|---|---|---|
//! | `github` | `X-Hub-Signature-256: sha256=<hex>` | body | HMAC-SHA256 |
//! | `stripe` | `Stripe-Signature: t=..,v1=<hex>` | `t.body` | HMAC-SHA256 |
//! | `shopify` | `X-Shopify-Hmac-SHA256: <base64>` | body | HMAC-SHA256 |
//! | `slack` | `X-Slack-Signature: v0=<hex>`, `X-Slack-Request-Timestamp` | `v0:ts:body` | HMAC-SHA256 |
//! | `twilio` | `X-Twilio-Signature: <base64>` | URL + sorted form parameters, or URL with `bodySHA256` | HMAC-SHA1 |
//! | `standard-webhooks` | `webhook-signature: v1,<base64>`, `webhook-id`, `webhook-timestamp` | `id.ts.body` | HMAC-SHA256, `whsec_` key |
//! | `svix` | `svix-signature`, `svix-id`, `svix-timestamp` | `id.ts.body` | HMAC-SHA256, `whsec_` key |

use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::auth::{ct_eq, decode_hex, header_str, reject, Encoding, HmacAuth, HmacScheme, Rejection};

/// A named sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    Stripe,
    Shopify,
    Slack,
    Twilio,
    StandardWebhooks,
    Svix,
}

/// Where a sender's own delivery id is: the default de-duplication key.
pub enum DeliveryId {
    Header(&'static str),
    Field(&'static str),
}

impl Provider {
    /// Every named sender, with its key in `[routes.auth]`.
    pub const ALL: [(&'static str, Provider); 7] = [
        ("github", Provider::GitHub),
        ("stripe", Provider::Stripe),
        ("shopify", Provider::Shopify),
        ("slack", Provider::Slack),
        ("twilio", Provider::Twilio),
        ("standard-webhooks", Provider::StandardWebhooks),
        ("svix", Provider::Svix),
    ];

    /// Whether the sender signs a timestamp (so `tolerance` applies).
    pub fn signs_time(self) -> bool {
        matches!(self, Provider::Stripe | Provider::Slack | Provider::StandardWebhooks | Provider::Svix)
    }

    /// Whether its secrets are `whsec_` base64 keys.
    pub fn base64_keys(self) -> bool {
        matches!(self, Provider::StandardWebhooks | Provider::Svix)
    }

    /// The sender's delivery id; `None` where it has no one id for every
    /// kind of request (Slack).
    pub fn delivery_id(self) -> Option<DeliveryId> {
        match self {
            Provider::GitHub => Some(DeliveryId::Header("x-github-delivery")),
            Provider::Stripe => Some(DeliveryId::Field("id")),
            Provider::Shopify => Some(DeliveryId::Header("x-shopify-webhook-id")),
            Provider::Slack => None,
            Provider::Twilio => Some(DeliveryId::Header("i-twilio-idempotency-token")),
            Provider::StandardWebhooks => Some(DeliveryId::Header("webhook-id")),
            Provider::Svix => Some(DeliveryId::Header("svix-id")),
        }
    }

    /// The check for this sender with `secrets` (raw key bytes) and
    /// `tolerance` (default: five minutes, Slack's and Stripe's own).
    pub fn auth(self, secrets: Vec<Vec<u8>>, tolerance: Option<Duration>, public_url: Option<String>) -> HmacAuth {
        let h = HeaderName::from_static;
        let (scheme, header, prefix, encoding, timestamp_header, id_header) = match self {
            Provider::GitHub => (HmacScheme::Plain, h("x-hub-signature-256"), "sha256=", Encoding::Hex, None, None),
            Provider::Stripe => (HmacScheme::Stripe, h("stripe-signature"), "", Encoding::Hex, None, None),
            Provider::Shopify => (HmacScheme::Plain, h("x-shopify-hmac-sha256"), "", Encoding::Base64, None, None),
            Provider::Slack => (
                HmacScheme::Slack,
                h("x-slack-signature"),
                "v0=",
                Encoding::Hex,
                Some(h("x-slack-request-timestamp")),
                None,
            ),
            Provider::Twilio => (HmacScheme::Twilio, h("x-twilio-signature"), "", Encoding::Base64, None, None),
            Provider::StandardWebhooks => {
                (HmacScheme::StandardWebhooks, h("webhook-signature"), "", Encoding::Base64, None, None)
            }
            Provider::Svix => (
                HmacScheme::StandardWebhooks,
                h("svix-signature"),
                "",
                Encoding::Base64,
                Some(h("svix-timestamp")),
                Some(h("svix-id")),
            ),
        };
        HmacAuth {
            scheme,
            header,
            prefix: prefix.into(),
            encoding,
            timestamp_header,
            tolerance: tolerance.unwrap_or(Duration::from_secs(300)),
            secrets,
            id_header,
            public_url,
        }
    }
}

/// Slack's `url_verification` request: its challenge, to answer with.
pub fn slack_handshake(body: &[u8]) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if v.get("type")?.as_str()? != "url_verification" {
        return None;
    }
    let challenge = v.get("challenge")?.as_str()?;
    Some(serde_json::json!({ "challenge": challenge }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl HmacAuth {
    pub(super) fn check_slack(&self, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<(), Rejection> {
        let missing = reject("missing_credentials", "signature header missing");
        let bad = reject("bad_signature", "signature does not match");
        let ts_header = self.timestamp_header.clone().unwrap_or(HeaderName::from_static("x-slack-request-timestamp"));
        let ts = header_str(headers, &ts_header).ok_or(reject("missing_credentials", "signature timestamp missing"))?;
        let value = header_str(headers, &self.header).ok_or(missing)?;
        self.fresh(ts, now)?;
        let sig =
            value.trim().strip_prefix("v0=").and_then(|s| decode_hex(&s.to_ascii_lowercase())).ok_or(bad.clone())?;
        self.verify(&[b"v0:", ts.trim().as_bytes(), b":", body], &sig).then_some(()).ok_or(bad)
    }

    /// Twilio signs the URL it called (`public_url` and the query string)
    /// and, for a form body, each parameter's name and value in name
    /// order; for any other body the URL carries `bodySHA256`, the body's
    /// SHA-256 in hex, which must match.
    pub(super) fn check_twilio(&self, headers: &HeaderMap, query: Option<&str>, body: &[u8]) -> Result<(), Rejection> {
        let missing = reject("missing_credentials", "signature header missing");
        let bad = reject("bad_signature", "signature does not match");
        let value = header_str(headers, &self.header).ok_or(missing)?;
        let sig = base64::engine::general_purpose::STANDARD.decode(value.trim()).map_err(|_| bad.clone())?;
        let base = self.public_url.as_deref().unwrap_or_default();
        let mut signed = match query.filter(|q| !q.is_empty()) {
            Some(q) => format!("{base}?{q}"),
            None => base.to_string(),
        }
        .into_bytes();
        let form = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
        if form {
            let mut params: Vec<(String, String)> =
                url::form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            params.sort();
            params.dedup();
            for (k, v) in params {
                signed.extend_from_slice(k.as_bytes());
                signed.extend_from_slice(v.as_bytes());
            }
        } else {
            let claimed = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .find(|(k, _)| k == "bodySHA256")
                .map(|(_, v)| v.to_ascii_lowercase())
                .ok_or(bad.clone())?;
            if !ct_eq(hex(&Sha256::digest(body)).as_bytes(), claimed.as_bytes()) {
                return Err(bad);
            }
        }
        let ok = self.secrets.iter().fold(false, |acc, k| {
            let mac = <Hmac<Sha1> as Mac>::new_from_slice(k).map(|mut m| {
                m.update(&signed);
                m.finalize().into_bytes().to_vec()
            });
            acc | mac.is_ok_and(|m| ct_eq(&m, &sig))
        });
        ok.then_some(()).ok_or(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn slack_signs_version_time_and_body() {
        let auth = Provider::Slack.auth(vec![b"s3cret".to_vec()], None, None);
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let sig = hex(&super::super::auth::mac(b"s3cret", &[b"v0:1700000000:", b"{}"]));
        let mut h = HeaderMap::new();
        h.insert("x-slack-request-timestamp", "1700000000".parse().expect("value"));
        h.insert("x-slack-signature", format!("v0={sig}").parse().expect("value"));
        assert_eq!(auth.check_slack(&h, b"{}", now), Ok(()));
        assert_eq!(auth.check_slack(&h, b"{ }", now).map_err(|r| r.label), Err("bad_signature"));
        let late = now + Duration::from_secs(301);
        assert_eq!(auth.check_slack(&h, b"{}", late).map_err(|r| r.label), Err("stale_timestamp"));
    }

    #[test]
    fn the_slack_handshake_answers_only_url_verification() {
        let got = slack_handshake(br#"{"type":"url_verification","challenge":"abc","token":"t"}"#);
        assert_eq!(got, Some(serde_json::json!({"challenge": "abc"})));
        assert_eq!(slack_handshake(br#"{"type":"event_callback","challenge":"abc"}"#), None);
        assert_eq!(slack_handshake(b"not json"), None);
    }
}
