//! Replays and purges of dead letters: selected by id, by receive time, or
//! all; answered when done, or (`wait=0`) run in the background and
//! followed through `GET /api/operations/{id}`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use super::{json, query_params, Admin};
use crate::store::{lock, Progress, Selection, Source};

/// Finished operations kept for `GET /api/operations/{id}`.
const KEPT: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Replay,
    Purge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Replay => "replay",
            Kind::Purge => "purge",
        }
    }

    /// The key of the count in answers.
    fn counted(self) -> &'static str {
        match self {
            Kind::Replay => "replayed",
            Kind::Purge => "purged",
        }
    }
}

struct Operation {
    kind: Kind,
    source: Source,
    destination: String,
    progress: Arc<Progress>,
    result: Mutex<Option<Result<usize, String>>>,
}

/// The latest operations by id.
#[derive(Default)]
pub struct Operations(Mutex<Kept>);

/// The last id given, and the operations kept (oldest first).
#[derive(Default)]
struct Kept {
    last: u64,
    ops: VecDeque<(u64, Arc<Operation>)>,
}

impl Operations {
    fn add(&self, op: Arc<Operation>) -> u64 {
        let mut g = lock(&self.0);
        g.last += 1;
        let id = g.last;
        g.ops.push_back((id, op));
        while g.ops.len() > KEPT {
            g.ops.pop_front();
        }
        id
    }

    fn get(&self, id: u64) -> Option<Arc<Operation>> {
        lock(&self.0).ops.iter().find(|(i, _)| *i == id).map(|(_, op)| op.clone())
    }
}

impl Admin {
    /// The dead letters a request selects: `id`, `since`, `until`.
    fn selection(&self, q: &HashMap<String, String>) -> Result<Selection, Box<Response<Full<Bytes>>>> {
        let bad = |why: &str| Box::new(json(StatusCode::BAD_REQUEST, json!({ "error": why })));
        let mut sel = Selection::all();
        if let Some(id) = q.get("id") {
            sel.only = Some(self.store.parse_external_id(id).ok_or_else(|| bad("not a message id of this store"))?);
        }
        if let Some(t) = q.get("since") {
            sel.since_ms =
                crate::text::parse_time(t).ok_or_else(|| bad("since: RFC 3339 time or unix milliseconds"))?;
        }
        if let Some(t) = q.get("until") {
            sel.until_ms =
                Some(crate::text::parse_time(t).ok_or_else(|| bad("until: RFC 3339 time or unix milliseconds"))?);
        }
        if sel.until_ms.is_some_and(|u| u < sel.since_ms) {
            return Err(bad("until is before since"));
        }
        Ok(sel)
    }

    /// `POST /api/destinations/{dest}/replay?state=delivered|dead`: a
    /// replay of what `dest` got (stored messages: pending elsewhere, or
    /// retained), or of its dead letters.
    pub(super) async fn destination_replay(&self, dest: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        match query_params(req).get("state").map(String::as_str) {
            Some("delivered") => self.operation_on(Kind::Replay, Source::Delivered, dest, req).await,
            Some("dead") => self.operation_on(Kind::Replay, Source::Dead, dest, req).await,
            _ => json(StatusCode::BAD_REQUEST, json!({ "error": "state=delivered or state=dead is required" })),
        }
    }

    pub(super) async fn dead_operation(
        &self,
        kind: Kind,
        dest: &str,
        req: &Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        self.operation_on(kind, Source::Dead, dest, req).await
    }

    async fn operation_on(
        &self,
        kind: Kind,
        source: Source,
        dest: &str,
        req: &Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        let configured = self.view.load().destinations.iter().any(|d| d == dest);
        if !configured && (kind == Kind::Replay || !self.store.known_destinations().iter().any(|d| d == dest)) {
            return json(StatusCode::NOT_FOUND, json!({ "error": "unknown destination" }));
        }
        let q = query_params(req);
        let mut sel = match self.selection(&q) {
            Ok(s) => s,
            Err(resp) => return *resp,
        };
        let what = match source {
            Source::Dead => "dead letters",
            Source::Delivered => "delivered messages",
        };
        match self.store.covered(dest, &sel, source).await {
            Ok(0) => {
                return json(
                    StatusCode::NOT_FOUND,
                    json!({ "error": format!("nothing to {}: no {what} of {dest} match", kind.as_str()) }),
                )
            }
            Ok(_) => {}
            Err(e) => return super::messages::store_error(&e),
        }
        let progress = Arc::new(Progress::default());
        sel.progress = Some(progress.clone());
        let op =
            Arc::new(Operation { kind, source, destination: dest.to_string(), progress, result: Mutex::new(None) });
        let (store, wakers, task) = (self.store.clone(), self.wakers.clone(), op.clone());
        let run = async move {
            let done = match (task.kind, task.source) {
                (Kind::Replay, Source::Dead) => store.replay_dead(&task.destination, &sel).await,
                (Kind::Replay, Source::Delivered) => store.replay_delivered(&task.destination, &sel).await,
                (Kind::Purge, _) => store.purge_dead(&task.destination, &sel).await,
            };
            if let Ok(n) = &done {
                if task.kind == Kind::Replay {
                    wakers.wake(&task.destination);
                }
                tracing::info!(destination = %task.destination, operation = task.kind.as_str(), count = n, "{what} {}", task.kind.counted());
            }
            *lock(&task.result) = Some(done.map_err(|e| e.to_string()));
        };
        if q.get("wait").is_some_and(|w| w == "0") {
            let id = self.operations.add(op);
            self.tracker.spawn(run);
            return json(
                StatusCode::ACCEPTED,
                json!({ "operation": id.to_string(), "status": format!("/api/operations/{id}") }),
            );
        }
        run.await;
        let result = lock(&op.result).take();
        match result {
            Some(Ok(n)) => json(StatusCode::OK, json!({ kind.counted(): n })),
            Some(Err(e)) => json(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e })),
            None => json(StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": "operation ended without a result" })),
        }
    }

    pub(super) fn operation(&self, id: &str) -> Response<Full<Bytes>> {
        let Some(op) = id.parse().ok().and_then(|id| self.operations.get(id)) else {
            return json(StatusCode::NOT_FOUND, json!({ "error": "no such operation (only the latest 100 are kept)" }));
        };
        let mut v = json!({
            "operation": id,
            "kind": op.kind.as_str(),
            "state": match op.source { Source::Dead => "dead", Source::Delivered => "delivered" },
            "destination": op.destination,
            "total": op.progress.total.load(Ordering::Relaxed),
            "done": op.progress.done.load(Ordering::Relaxed),
            "finished": false,
        });
        match &*lock(&op.result) {
            None => {}
            Some(Ok(n)) => {
                v["finished"] = json!(true);
                v[op.kind.counted()] = json!(n);
            }
            Some(Err(e)) => {
                v["finished"] = json!(true);
                v["error"] = json!(e);
            }
        }
        json(StatusCode::OK, v)
    }
}
