//! The request one attempt sends to a destination.
//!
//! `POST` to the destination URL with the original body
//! bytes (minus `strip_body_fields`, if the destination sets them) and the
//! stored headers as `headers.rs` decides (the sender's end-to-end headers,
//! without its credentials unless `forward_sender_credentials`), plus:
//! - `webhook-id` and `x-switchboard-id`: the message id, identical across
//!   retries and destinations (`webhook-id` is left as the sender's if the
//!   sender set one, so upstream Standard Webhooks signatures still verify,
//!   except for a destination that signs: it gets our `webhook-id`,
//!   `webhook-timestamp` and `webhook-signature`, see `signing.rs`, and
//!   none of the sender's);
//! - `x-switchboard-attempt`: 1 for the first attempt, counting up;
//! - `traceparent`: the message's trace (the sender's, or one ingress
//!   started), with a new span id per attempt (`trace.rs`);
//! - `x-forwarded-for`: the sender's chain plus the address we saw.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::Full;

use super::Worker;

impl Worker {
    /// The body as this destination gets it: the original bytes, or with the
    /// `strip_body_fields` removed when it is a JSON object. Stripping
    /// re-encodes the JSON compactly (field order kept); a body that is not
    /// JSON (XML, text) goes out unchanged and is counted. A body that looks
    /// like JSON but cannot be parsed (nested deeper than the parser's 128
    /// levels, or broken) is an error: it may hold the very fields the
    /// destination asked never to get, so it is not sent at all.
    pub(super) fn body_for(&self, msg: &crate::store::MessageRecord) -> Result<Bytes, String> {
        if self.dest.strip_body_fields.is_empty() {
            return Ok(msg.body.clone());
        }
        match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&msg.body) {
            Ok(mut map) => {
                for f in &self.dest.strip_body_fields {
                    map.shift_remove(f);
                }
                serde_json::to_vec(&map).map(Bytes::from).map_err(|e| format!("strip_body_fields: cannot re-encode the body: {e}"))
            }
            Err(e) if looks_like_json(&msg.body) => Err(format!(
                "strip_body_fields: the body looks like JSON but cannot be parsed ({}), so its fields cannot be removed; not sent",
                e.to_string().chars().take(120).collect::<String>()
            )),
            Err(_) => {
                self.metrics.strip_skipped.with_label_values(&[&self.dest.name]).inc();
                Ok(msg.body.clone())
            }
        }
    }

    pub(super) fn build_request(
        &self,
        msg: &crate::store::MessageRecord,
        body: Bytes,
        extra: &[(HeaderName, HeaderValue)],
        id: u64,
        attempt: u32,
    ) -> Result<http::Request<Full<Bytes>>, http::Error> {
        let signer = self.dest.signing.as_deref();
        let mut req = http::Request::post(self.dest.url.clone()).body(Full::new(body.clone()))?;
        let headers = req.headers_mut();
        let mut forwarded_for: Option<Vec<u8>> = None;
        let credentials = self.withheld.as_ref().map(|c| c.load());
        let withheld: &[HeaderName] =
            credentials.as_ref().and_then(|c| c.get(&msg.route)).map(Vec::as_slice).unwrap_or_default();
        for (name, value) in &msg.headers {
            let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_maybe_shared(value.clone()))
            else {
                continue;
            };
            if !crate::headers::forwarded(&name, withheld) || !self.dest.headers.forwards(&name) {
                continue;
            }
            // A signing destination gets our id, timestamp and signature,
            // never the sender's (they would not match what we sign).
            if signer.is_some() && crate::headers::is_standard_webhooks(&name) {
                continue;
            }
            if name == "x-forwarded-for" {
                let prev = forwarded_for.get_or_insert_with(Vec::new);
                if !prev.is_empty() {
                    prev.extend_from_slice(b", ");
                }
                prev.extend_from_slice(value.as_bytes());
                continue;
            }
            headers.append(name, value);
        }
        if !msg.peer.is_empty() {
            let chain = forwarded_for.get_or_insert_with(Vec::new);
            if !chain.is_empty() {
                chain.extend_from_slice(b", ");
            }
            chain.extend_from_slice(msg.peer.as_bytes());
        }
        if let Some(chain) = forwarded_for {
            if let Ok(v) = HeaderValue::from_bytes(&chain) {
                headers.insert("x-forwarded-for", v);
            }
        }
        let policy = &self.dest.headers;
        if policy.forwarded && !msg.peer.is_empty() {
            let mine = crate::headers::forwarded_for(&msg.peer);
            let value = match headers.get(http::header::FORWARDED).and_then(|v| v.to_str().ok()) {
                Some(theirs) => format!("{theirs}, {mine}"),
                None => mine,
            };
            headers.insert(http::header::FORWARDED, HeaderValue::from_str(&value)?);
        }
        for (name, value) in &policy.add {
            headers.insert(name.clone(), value.clone());
        }
        // A transform's headers add or replace (`transform.rs`); what
        // follows (ids, signature, trace, attempt) is the relay's.
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        let ext_id = self.store.external_id(id);
        let ext = HeaderValue::from_str(&ext_id)?;
        if !headers.contains_key("webhook-id") {
            headers.insert("webhook-id", ext.clone());
        }
        if let Some(signer) = signer {
            let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            headers.insert("webhook-timestamp", HeaderValue::from(now));
            headers.insert("webhook-signature", HeaderValue::from_str(&signer.sign(&ext_id, now, &body))?);
        }
        headers.insert("x-switchboard-id", ext);
        // Each attempt is a child span of the message's trace.
        let stored = msg.headers.iter().find(|(n, _)| n == crate::trace::HEADER).map(|(_, v)| v);
        if let Some(tp) = stored.and_then(|v| crate::trace::child(v)) {
            headers.insert(crate::trace::HEADER, HeaderValue::from_str(&tp)?);
        }
        headers.insert("x-switchboard-attempt", HeaderValue::from(attempt));
        if let Some(auth) = &self.dest.basic_auth {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(auth.expose());
            let mut v = HeaderValue::from_str(&format!("Basic {token}"))?;
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        Ok(req)
    }
}

/// Whether `body` starts (after white space) like a JSON object.
fn looks_like_json(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}
