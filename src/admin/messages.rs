//! `GET /api/messages/{id}` and `GET /api/messages`: what happened to a
//! callback, and what a destination has not got.

use std::collections::HashMap;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use super::{json, Admin};
use crate::store::{DeliveryState, Inspection, Listing, StoreError};
use crate::text::{parse_time, rfc3339};

/// Most messages one page lists.
const MAX_PAGE: usize = 1000;

pub(super) fn store_error(e: &StoreError) -> Response<Full<Bytes>> {
    let status = match e {
        StoreError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json(status, json!({ "error": e.to_string() }))
}

fn bad_request(why: &str) -> Response<Full<Bytes>> {
    json(StatusCode::BAD_REQUEST, json!({ "error": why }))
}

impl Admin {
    pub(super) async fn message(&self, id: &str, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let Some(local) = self.store.parse_external_id(id) else {
            return bad_request("not a message id of this store");
        };
        match self.store.inspect(local).await {
            Ok(Some(found)) => json(StatusCode::OK, self.message_json(&found, q.get("body").is_some_and(|b| b == "1"))),
            Ok(None) => json(
                StatusCode::NOT_FOUND,
                json!({ "error": format!("no such message: unknown, or forgotten once every destination was done with it ({})", self.retention_text()) }),
            ),
            Err(e) => store_error(&e),
        }
    }

    fn message_json(&self, m: &Inspection, with_body: bool) -> Value {
        let view = self.view.load();
        let r = &m.record;
        let headers: Vec<Value> = r
            .headers
            .iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .map(|(n, v)| {
                let secret = n.eq_ignore_ascii_case("authorization") || view.sensitive.iter().any(|s| s.as_str() == n);
                let value = if secret { "***".to_string() } else { String::from_utf8_lossy(v).into_owned() };
                json!({ "name": n, "value": value })
            })
            .collect();
        let mut destinations: Vec<Value> = m
            .deliveries
            .iter()
            .map(|d| {
                let attempts: Vec<Value> = d
                    .attempts
                    .iter()
                    .map(|a| {
                        let mut v = json!({
                            "at": rfc3339(a.at_ms),
                            "duration_ms": a.duration_ms,
                            "response": String::from_utf8_lossy(&a.snippet),
                        });
                        if a.status != 0 {
                            v["status"] = json!(a.status);
                        }
                        if !a.error.is_empty() {
                            v["error"] = json!(a.error);
                        }
                        v
                    })
                    .collect();
                let mut v = json!({ "name": d.destination, "attempts": attempts });
                match &d.state {
                    DeliveryState::Pending { due_ms } => {
                        v["state"] = json!("pending");
                        v["next_attempt_at"] = json!(rfc3339(*due_ms));
                    }
                    DeliveryState::Delivered { at_ms } => {
                        v["state"] = json!("delivered");
                        if let Some(at) = at_ms {
                            v["delivered_at"] = json!(rfc3339(*at));
                        }
                    }
                    DeliveryState::Purged => v["state"] = json!("purged"),
                    DeliveryState::Dead { dead_at_ms, last_status, reason } => {
                        v["state"] = json!("dead");
                        v["dead_at"] = json!(rfc3339(*dead_at_ms));
                        v["last_status"] = json!(last_status);
                        v["reason"] = json!(reason);
                    }
                }
                v
            })
            .collect();
        // The route's other destinations: filtered out at ingress.
        for name in view.routes.get(&r.route).into_iter().flatten() {
            if !m.deliveries.iter().any(|d| &d.destination == name) {
                destinations.push(json!({ "name": name, "state": "filtered", "attempts": [] }));
            }
        }
        let mut v = json!({
            "id": self.store.external_id(m.id),
            "route": r.route,
            "received_at": rfc3339(r.received_ms),
            "sender": r.peer,
            "headers": headers,
            "body_size": r.body.len(),
            "destinations": destinations,
        });
        if let Some(until) = m.retained_until_ms {
            v["retained_until"] = json!(rfc3339(until));
        }
        if with_body {
            match std::str::from_utf8(&r.body) {
                Ok(text) => v["body"] = json!(text),
                Err(_) => {
                    use base64::Engine;
                    v["body_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&r.body));
                }
            }
        }
        v
    }

    /// The stored messages with `value` in the indexed body field `field`.
    async fn found_by_field(&self, field: &str, value: &str) -> Response<Full<Bytes>> {
        if !self.view.load().indexed.iter().any(|f| f == field) {
            return bad_request("no route indexes that field (index = [...] on a route)");
        }
        match self.store.lookup(crate::store::lookup_key(field, &json!(value))).await {
            Ok(ids) => {
                let messages: Vec<Value> = ids
                    .iter()
                    .map(|(id, at)| json!({ "id": self.store.external_id(*id), "received_at": rfc3339(*at) }))
                    .collect();
                json(StatusCode::OK, json!({ "field": field, "value": value, "messages": messages }))
            }
            Err(e) => store_error(&e),
        }
    }

    pub(super) async fn message_list(&self, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        if let (Some(field), Some(value)) = (q.get("field"), q.get("value")) {
            return self.found_by_field(field, value).await;
        }
        let Some(dest) = q.get("destination") else {
            return bad_request("destination=NAME (or field=F&value=V) is required");
        };
        let state = match q.get("state").map(String::as_str) {
            Some("pending") | None => Listing::Pending,
            Some("dead") => Listing::Dead,
            Some("delivered") => Listing::Delivered,
            Some(_) => return bad_request("state is pending, dead or delivered"),
        };
        let since = match q.get("since").map(|s| parse_time(s)) {
            None => 0,
            Some(Some(t)) => t,
            Some(None) => return bad_request("since: RFC 3339 time or unix milliseconds"),
        };
        let until = match q.get("until").map(|s| parse_time(s)) {
            None => u64::MAX,
            Some(Some(t)) => t,
            Some(None) => return bad_request("until: RFC 3339 time or unix milliseconds"),
        };
        if until < since {
            return bad_request("until is before since");
        }
        if !self.view.load().destinations.iter().any(|d| d == dest) && !self.store.known_destinations().contains(dest) {
            return json(StatusCode::NOT_FOUND, json!({ "error": "unknown destination" }));
        }
        let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
            None => 100,
            Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
            Some(_) => return bad_request("limit: 1 to 1000"),
        };
        // A cursor is the last id of a page and the query it paged.
        let query = query_tag(dest, q.get("state").map_or("pending", String::as_str), since, until);
        let after = match q.get("cursor") {
            None => None,
            Some(c) => match c.rsplit_once('.') {
                Some((id, tag)) if tag == query => match self.store.parse_external_id(id) {
                    Some(id) => Some(id),
                    None => return bad_request("cursor: a next_cursor this API gave"),
                },
                Some((id, _)) if self.store.parse_external_id(id).is_some() => {
                    return bad_request(
                        "cursor: from another query (destination, state, since and until must stay the same)",
                    )
                }
                _ => return bad_request("cursor: a next_cursor this API gave"),
            },
        };
        let q = crate::store::MessageQuery {
            destination: dest.clone(),
            state,
            since_ms: since,
            until_ms: until,
            after,
            limit,
        };
        match self.store.list_messages(&q).await {
            Ok(page) => {
                let messages: Vec<Value> = page
                    .ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let received = page.received_ms.get(i).copied().unwrap_or(crate::store::id_received_ms(*id));
                        json!({ "id": self.store.external_id(*id), "received_at": rfc3339(received) })
                    })
                    .collect();
                let next = page.next.map(|id| format!("{}.{query}", self.store.external_id(id)));
                let mut answer = json!({ "destination": dest, "messages": messages, "next_cursor": next });
                if state == Listing::Delivered {
                    // An empty list of delivered messages most often means
                    // they were not kept: say how long they are.
                    answer["retention"] = json!(self.retention_text());
                }
                json(StatusCode::OK, answer)
            }
            Err(e) => store_error(&e),
        }
    }
}

impl Admin {
    /// How long and how much of delivered messages the store keeps, in
    /// words, with the keys that change it.
    fn retention_text(&self) -> String {
        match self.store.retention() {
            (0, _) => "delivered messages are not kept: store.retain_delivered = \"0s\"".to_string(),
            (ms, bytes) => {
                let time = crate::text::duration(std::time::Duration::from_millis(ms));
                match bytes {
                    Some(b) => format!("delivered messages are kept {time} (store.retain_delivered), at most {b} bytes of them (store.retain_max_bytes), the oldest go first"),
                    None => format!("delivered messages are kept {time} (store.retain_delivered)"),
                }
            }
        }
    }
}

/// What a cursor is bound to: 8 hex digits of SHA-256 of the query it
/// pages (so a cursor used with another query is refused, not misread).
fn query_tag(dest: &str, state: &str, since: u64, until: u64) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{dest}\0{state}\0{since}\0{until}").as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}
