//! `switchboard status`, `dlq` and `destinations`: a client of a running
//! relay's admin API, for people (tables) and scripts (`--json`).
//!
//! Where the relay is: `--admin URL`, else `SWITCHBOARD_ADMIN`, else the
//! `admin.addr` of `--config FILE` (0.0.0.0 read as 127.0.0.1). The token:
//! `--token`, else `SWITCHBOARD_ADMIN_TOKEN`, else the config file's
//! `admin.token`. Plain HTTP only (an `admin.tls` listener is reached
//! through a port-forward or a proxy that terminates TLS).
//!
//! Exit codes (also in README): 0 done; 1 the relay answered with an error;
//! 2 bad usage; 3 relay not reachable; 4 token required or refused; 5 no
//! such destination or message; 78 the config file given cannot be read.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::secret::Secret;

/// Why a command failed: one line for the operator, and the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("relay not reachable at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("token refused by the relay at {0} (--token, SWITCHBOARD_ADMIN_TOKEN or admin.token)")]
    TokenRefused(String),
    #[error("the relay at {0} requires a token: give --token, SWITCHBOARD_ADMIN_TOKEN, or --config with admin.token")]
    TokenRequired(String),
    #[error("no such destination: {0}")]
    NoSuchDestination(String),
    /// The id, and the relay's word on why (how long it keeps delivered messages).
    #[error("no such message: {0} ({1})")]
    NoSuchMessage(String, String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Config(String),
    /// The command line does not say what is needed (exit 2, as clap's).
    #[error("{0}")]
    Usage(String),
}

impl CtlError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Failed(_) => 1,
            CtlError::Unreachable { .. } => 3,
            CtlError::TokenRefused(_) | CtlError::TokenRequired(_) => 4,
            CtlError::NoSuchDestination(_) | CtlError::NoSuchMessage(..) => 5,
            CtlError::Config(_) => 78,
            CtlError::Usage(_) => 2,
        }
    }
}

/// An operation on the messages of one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Dead letters back into its queue.
    ReplayDead,
    /// Dead letters deleted.
    PurgeDead,
    /// Messages it got (still stored) sent to it again.
    ReplayDelivered,
}

/// How long one request to the admin API may take (a replay of many dead
/// letters is one request).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The admin API of one relay.
pub struct AdminClient {
    base: String,
    token: Option<Secret>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// Where the relay is and what token to use, as the command line gave them.
pub struct Target {
    pub admin: Option<String>,
    pub token: Option<String>,
    pub config: Option<std::path::PathBuf>,
}

impl AdminClient {
    pub fn new(target: &Target) -> Result<AdminClient, CtlError> {
        let raw = match &target.config {
            Some(path) => Some(crate::config::Config::load_raw(path).map_err(|e| CtlError::Config(e.to_string()))?),
            None => None,
        };
        let base = match (&target.admin, &raw) {
            // `127.0.0.1:9090` is taken as `http://127.0.0.1:9090`.
            (Some(url), _) if !url.contains("://") => format!("http://{}", url.trim_end_matches('/')),
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(raw)) => format!("http://{}", raw.admin.addr.replace("0.0.0.0", "127.0.0.1")),
            (None, None) => {
                return Err(CtlError::Usage(
                    "where is the relay? give --admin URL (or SWITCHBOARD_ADMIN, or --config FILE)".into(),
                ))
            }
        };
        if base.parse::<http::Uri>().map_or(true, |u| u.host().is_none()) {
            return Err(CtlError::Usage(format!(
                "--admin {base}: not an address; give it as http://HOST:PORT or HOST:PORT"
            )));
        }
        if base.starts_with("https://") {
            return Err(CtlError::Usage(format!(
                "{base}: the CLI speaks plain HTTP to the admin API; reach an admin.tls listener through a port-forward or a TLS-terminating proxy"
            )));
        }
        let token = match (&target.token, raw.as_ref().and_then(|r| r.admin.token.as_ref())) {
            (Some(t), _) => Some(Secret::new(t.clone())),
            (None, Some(t)) => {
                Some(crate::secret::resolve(&t.0).map_err(|e| CtlError::Config(format!("admin.token: {e}")))?)
            }
            (None, None) => None,
        };
        Ok(AdminClient { base, token, client: Client::builder(TokioExecutor::new()).build_http() })
    }

    /// A 401: no token was given, or the one given is wrong.
    fn token_error(&self) -> CtlError {
        match self.token {
            None => CtlError::TokenRequired(self.base.clone()),
            Some(_) => CtlError::TokenRefused(self.base.clone()),
        }
    }

    /// One request; the answer's JSON, or the error it stands for.
    async fn call(&self, method: &str, path: &str) -> Result<serde_json::Value, CtlError> {
        let (status, body) = self.raw(method, path).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        match status {
            200..=299 => Ok(v),
            401 => Err(self.token_error()),
            _ => Err(CtlError::Failed(format!(
                "{method} {path}: {status} {}",
                v["error"].as_str().unwrap_or("(no reason given)")
            ))),
        }
    }

    async fn raw(&self, method: &str, path: &str) -> Result<(u16, Bytes), CtlError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |why: String| CtlError::Unreachable { url: self.base.clone(), why };
        let mut req = http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", t.expose()));
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| CtlError::Config(format!("{url}: {e}")))?;
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req)).await {
            Err(_) => {
                return Err(unreachable(format!("no answer within {}", humantime::format_duration(REQUEST_TIMEOUT))))
            }
            Ok(Err(e)) => return Err(unreachable(crate::text::error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| unreachable(e.to_string()))?.to_bytes();
        Ok((status, body))
    }

    /// `GET /api/destinations` (each with its deliveries per second over
    /// the last minute, kept by the relay).
    pub async fn status(&self) -> Result<serde_json::Value, CtlError> {
        self.call("GET", "/api/destinations").await
    }

    /// Fails with [`CtlError::NoSuchDestination`] unless the relay knows `dest`.
    async fn known(&self, dest: &str) -> Result<(), CtlError> {
        let list = self.call("GET", "/api/destinations").await?;
        let found = list["destinations"].as_array().is_some_and(|a| a.iter().any(|d| d["name"] == dest));
        if found {
            Ok(())
        } else {
            Err(CtlError::NoSuchDestination(dest.to_string()))
        }
    }

    pub async fn dead_letters(&self, dest: &str, limit: usize) -> Result<serde_json::Value, CtlError> {
        self.known(dest).await?;
        self.call("GET", &format!("/api/dead-letters/{dest}?limit={limit}")).await
    }

    /// Runs `op` on the messages of `dest` that `select` names (`id`,
    /// `since`, `until`) as a background operation followed to its end;
    /// `progress` sees (done, total) as it goes.
    pub async fn operation(
        &self,
        dest: &str,
        op: Op,
        select: &[(&str, Option<String>)],
        progress: impl Fn(u64, u64),
    ) -> Result<serde_json::Value, CtlError> {
        self.known(dest).await?;
        let mut q = String::from("?wait=0");
        for (k, v) in select {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", encode(v)));
            }
        }
        let dest = encode(dest);
        let started = match op {
            Op::PurgeDead => self.call("DELETE", &format!("/api/dead-letters/{dest}{q}")).await?,
            Op::ReplayDead => self.call("POST", &format!("/api/dead-letters/{dest}/replay{q}")).await?,
            Op::ReplayDelivered => {
                self.call("POST", &format!("/api/destinations/{dest}/replay{q}&state=delivered")).await?
            }
        };
        let Some(status) = started["status"].as_str() else {
            return Err(CtlError::Failed(format!("unexpected answer: {started}")));
        };
        loop {
            let v = self.call("GET", status).await?;
            progress(v["done"].as_u64().unwrap_or(0), v["total"].as_u64().unwrap_or(0));
            if v["finished"] == true {
                return match v["error"].as_str() {
                    Some(e) => Err(CtlError::Failed(e.to_string())),
                    None => Ok(v),
                };
            }
            // A poll of the operator's tool, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn message(&self, id: &str, body: bool) -> Result<serde_json::Value, CtlError> {
        let (status, raw) =
            self.raw("GET", &format!("/api/messages/{}{}", encode(id), if body { "?body=1" } else { "" })).await?;
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
        match status {
            200 => Ok(v),
            401 => Err(self.token_error()),
            404 => {
                let why = v["error"].as_str().unwrap_or_default();
                let why = why.strip_prefix("no such message: ").unwrap_or(why);
                Err(CtlError::NoSuchMessage(id.to_string(), why.to_string()))
            }
            _ => Err(CtlError::Failed(format!("{status} {}", v["error"].as_str().unwrap_or("(no reason given)")))),
        }
    }

    pub async fn find(&self, field: &str, value: &str) -> Result<serde_json::Value, CtlError> {
        self.call("GET", &format!("/api/messages?field={}&value={}", encode(field), encode(value))).await
    }

    pub async fn messages(&self, dest: &str, query: &[(&str, Option<String>)]) -> Result<serde_json::Value, CtlError> {
        self.known(dest).await?;
        let mut q = format!("/api/messages?destination={}", encode(dest));
        for (k, v) in query {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", encode(v)));
            }
        }
        self.call("GET", &q).await
    }

    /// `verb`: `pause`, `resume` or `retry-now`.
    pub async fn destination(&self, dest: &str, verb: &str) -> Result<serde_json::Value, CtlError> {
        self.known(dest).await?;
        self.call("POST", &format!("/api/destinations/{}/{verb}", encode(dest))).await
    }
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `status` as a table.
pub fn status_table(v: &serde_json::Value) -> String {
    let mut rows =
        vec![["DESTINATION", "STATE", "BREAKER", "PENDING", "OLDEST", "DELIVERED/S (1 MIN)", "DEAD"].map(String::from)];
    for d in v["destinations"].as_array().into_iter().flatten() {
        let oldest = d["oldest_age_seconds"]
            .as_f64()
            .map(|s| humantime::format_duration(Duration::from_secs(s as u64)).to_string())
            .unwrap_or_else(|| "-".into());
        let mut name = d["name"].as_str().unwrap_or_default().to_string();
        if d["configured"] == false {
            name.push_str(" (not configured)");
        }
        rows.push([
            name,
            d["state"].as_str().unwrap_or("-").to_string(),
            d["breaker"].as_str().unwrap_or("-").to_string(),
            d["pending"].to_string(),
            oldest,
            d["delivered_per_second"].to_string(),
            d["dead_letters"].to_string(),
        ]);
    }
    let mut out = table(&rows);
    let store = &v["store"];
    if let Some(kind) = store["kind"].as_str() {
        out.push_str(&format!(
            "store: {kind}, {:.1} MiB pending, {} message(s) kept after delivery\n",
            store["bytes"].as_f64().unwrap_or(0.0) / 1_048_576.0,
            store["retained_messages"].as_u64().unwrap_or(0)
        ));
    }
    out
}

/// Dead letters as a table.
pub fn dead_letter_table(v: &serde_json::Value) -> String {
    let mut rows = vec![["ID", "ATTEMPTS", "LAST STATUS", "DEAD SINCE", "REASON"].map(String::from)];
    for d in v["dead_letters"].as_array().into_iter().flatten() {
        let at = d["dead_at"].as_str().unwrap_or_default().to_string();
        rows.push([
            d["id"].as_str().unwrap_or_default().to_string(),
            d["attempts"].to_string(),
            d["last_status"].as_u64().map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            at,
            d["reason"].as_str().unwrap_or_default().to_string(),
        ]);
    }
    table(&rows)
}

/// One message, for people.
pub fn message_text(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{}  route {}  received {}  from {}  {} bytes\n",
        v["id"].as_str().unwrap_or_default(),
        v["route"].as_str().unwrap_or_default(),
        v["received_at"].as_str().unwrap_or_default(),
        v["sender"].as_str().unwrap_or_default(),
        v["body_size"]
    );
    let mut rows = vec![["DESTINATION", "STATE", "WHEN", "LAST ATTEMPT"].map(String::from)];
    for d in v["destinations"].as_array().into_iter().flatten() {
        let state = d["state"].as_str().unwrap_or_default().to_string();
        let when = d["next_attempt_at"]
            .as_str()
            .or(d["dead_at"].as_str())
            .or(d["delivered_at"].as_str())
            .unwrap_or("")
            .to_string();
        let last = d["attempts"].as_array().and_then(|a| a.last()).map(|a| {
            let what = a["status"].as_u64().map(|s| s.to_string()).or(a["error"].as_str().map(str::to_string));
            format!("{} {} ({} ms)", a["at"].as_str().unwrap_or_default(), what.unwrap_or_default(), a["duration_ms"])
        });
        rows.push([
            d["name"].as_str().unwrap_or_default().to_string(),
            state,
            when,
            last.unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&table(&rows));
    if let Some(until) = v["retained_until"].as_str() {
        out.push_str(&format!("delivered everywhere; kept until {until} (store.retain_delivered)\n"));
    }
    if let Some(body) = v["body"].as_str() {
        out.push_str(&format!("\n{body}\n"));
    }
    out
}

/// A page of messages, for people.
pub fn message_list_text(v: &serde_json::Value) -> String {
    let mut rows = vec![["ID", "RECEIVED"].map(String::from)];
    for m in v["messages"].as_array().into_iter().flatten() {
        rows.push([
            m["id"].as_str().unwrap_or_default().to_string(),
            m["received_at"].as_str().unwrap_or_default().to_string(),
        ]);
    }
    let mut out = table(&rows);
    if let Some(next) = v["next_cursor"].as_str() {
        out.push_str(&format!("(more: --cursor {next})\n"));
    }
    if let (1, Some(retention)) = (rows.len(), v["retention"].as_str()) {
        out.push_str(&format!("(none: {retention})\n"));
    }
    out
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up() {
        let v = serde_json::json!({ "destinations": [
            { "name": "app", "state": "active", "breaker": "closed", "pending": 12, "oldest_age_seconds": 3.5,
              "delivered_per_second": 41.0, "dead_letters": 0, "configured": true },
            { "name": "old", "state": "active", "breaker": "closed", "pending": 1, "oldest_age_seconds": null,
              "delivered_per_second": 0.0, "dead_letters": 2, "configured": false },
        ]});
        let t = status_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "no store line without a store: {t}");
        assert!(lines[0].starts_with("DESTINATION           STATE"), "{t}");
        assert!(lines[1].contains("3s") && lines[1].contains("41.0"), "{t}");
        assert!(lines[2].starts_with("old (not configured)"), "{t}");
        let mut v = v;
        v["store"] = serde_json::json!({ "kind": "local", "bytes": 3_145_728, "retained_messages": 42 });
        let t = status_table(&v);
        assert!(t.ends_with("store: local, 3.0 MiB pending, 42 message(s) kept after delivery\n"), "{t}");
    }

    #[test]
    fn exit_codes_are_distinct() {
        let codes = [
            CtlError::Failed(String::new()).exit_code(),
            CtlError::Unreachable { url: String::new(), why: String::new() }.exit_code(),
            CtlError::TokenRefused(String::new()).exit_code(),
            CtlError::NoSuchDestination(String::new()).exit_code(),
            CtlError::Usage(String::new()).exit_code(),
            CtlError::Config(String::new()).exit_code(),
        ];
        assert_eq!(codes, [1, 3, 4, 5, 2, 78]);
    }

    /// Regression (issue 23, point 10): `--admin 127.0.0.1:9090` (no scheme)
    /// failed as "invalid format" with exit 78; no address at all exited 78.
    #[test]
    fn admin_addresses_without_a_scheme_are_http_and_a_missing_one_is_a_usage_error() {
        let target = |admin: Option<&str>| Target { admin: admin.map(str::to_string), token: None, config: None };
        let client = AdminClient::new(&target(Some("127.0.0.1:9090"))).expect("accepted");
        assert_eq!(client.base, "http://127.0.0.1:9090");
        assert!(client.token_error().to_string().contains("requires a token"));
        for bad in [None, Some("https://127.0.0.1:9090"), Some("not an address")] {
            let err = AdminClient::new(&target(bad)).err().expect("refused");
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
    }
}
