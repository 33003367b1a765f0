//! NATS destinations (`url = "nats://host:4222"`, `subject`, `jetstream`):
//! the same worker, retries, dead letters, rate limit, breaker and history
//! as HTTP; only the send differs. The request an HTTP attempt would send
//! (`request.rs`: the header policy, ids, trace, signature, a transform's
//! body and headers) is published instead: its headers as NATS headers,
//! its body as the message.
//!
//! - `jetstream = true` (the default): delivered means the stream's PubAck
//!   arrived; the message id goes as `Nats-Msg-Id`, so a publish retried
//!   after a lost ack is stored once (within the stream's duplicate
//!   window). A subject no stream takes is a retryable failure with that
//!   reason (dead-lettered by the retry policy).
//! - `jetstream = false`: core NATS; delivered means the server took it
//!   (the client flushed it); there is no acknowledgement from a receiver.
//!
//! Credentials in the URL (`nats://user:password@host`), or a token, NKey
//! or `.creds` file (`[destinations.NAME.nats]`), are used to connect and
//! never sent as headers; `tls://`, `ca_file` or a client certificate
//! connect with TLS. One
//! connection per destination, made at its first attempt and kept (the
//! client reconnects by itself).
//!
//! A third kind (Kafka, SQS) would provide the same: connect once, publish
//! one request's headers and body, and say delivered, retryable (with why)
//! or permanent.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::retry::{Outcome, TransportError};
use super::Worker;

/// How a NATS destination connects: its authentication (as `[store]`
/// takes it for JetStream) and TLS (the destination's `ca_file` and
/// `tls.client_cert`/`client_key`; `tls://` or either of them requires TLS).
#[derive(Default)]
pub struct NatsAccess {
    pub auth: crate::store::JetAuth,
    pub ca_file: Option<std::path::PathBuf>,
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Where a NATS destination publishes.
pub struct NatsTarget {
    /// The server URL without credentials.
    pub server: String,
    access: NatsAccess,
    pub subject: String,
    pub jetstream: bool,
    client: tokio::sync::OnceCell<async_nats::Client>,
}

impl std::fmt::Debug for NatsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTarget")
            .field("server", &self.server)
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .finish_non_exhaustive()
    }
}

impl NatsTarget {
    pub fn new(server: String, access: NatsAccess, subject: String, jetstream: bool) -> NatsTarget {
        NatsTarget { server, access, subject, jetstream, client: tokio::sync::OnceCell::new() }
    }

    async fn client(&self, within: Duration) -> Result<async_nats::Client, String> {
        let connect = || async {
            let opts = async_nats::ConnectOptions::new()
                .name("switchboard-destination")
                .connection_timeout(within)
                .max_reconnects(None);
            let a = &self.access;
            let opts =
                crate::store::with_access(opts, &a.auth, a.ca_file.as_ref(), a.client_cert.as_ref(), "nats.creds_file")
                    .await?;
            opts.connect(self.server.as_str()).await.map_err(|e| e.to_string())
        };
        self.client.get_or_try_init(connect).await.cloned()
    }
}

impl Worker {
    /// Publishes `req` (what an HTTP attempt would send) to the
    /// destination's subject.
    pub(super) async fn send_nats(&self, target: &NatsTarget, req: http::Request<Full<Bytes>>) -> (Outcome, Vec<u8>) {
        let client = match target.client(self.dest.connect_timeout).await {
            Ok(c) => c,
            Err(e) => return (Outcome::transport(TransportError::Connect, &e), Vec::new()),
        };
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(never) => match never {},
        };
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &parts.headers {
            if name == http::header::AUTHORIZATION {
                continue;
            }
            if let Ok(v) = value.to_str() {
                headers.append(name.as_str(), v);
            }
        }
        let subject = target.subject.clone();
        let timeout = self.dest.timeout;
        if !target.jetstream {
            let sent = tokio::time::timeout(timeout, async {
                client.publish_with_headers(subject, headers, body).await.map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())
            })
            .await;
            return match sent {
                Ok(Ok(())) => (Outcome::Delivered { status: 200 }, Vec::new()),
                Ok(Err(e)) => (Outcome::transport(TransportError::Io, &e), Vec::new()),
                Err(_) => {
                    (Outcome::transport(TransportError::Timeout, "NATS did not take the message in time"), Vec::new())
                }
            };
        }
        if let Some(id) = parts.headers.get("x-switchboard-id").and_then(|v| v.to_str().ok()) {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let js = async_nats::jetstream::new(client);
        let published = tokio::time::timeout(timeout, async {
            match js.publish_with_headers(subject.clone(), headers, body).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        match published {
            Ok(Ok(())) => (Outcome::Delivered { status: 200 }, Vec::new()),
            Ok(Err(e)) if e.contains("no stream") || e.contains("no responders") => (
                Outcome::transport(TransportError::Io, &format!("no JetStream stream takes subject {subject:?} ({e})")),
                Vec::new(),
            ),
            Ok(Err(e)) => (Outcome::transport(TransportError::Io, &e), Vec::new()),
            Err(_) => (
                Outcome::transport(
                    TransportError::Timeout,
                    &format!("no JetStream acknowledgement within {}", humantime::format_duration(timeout)),
                ),
                Vec::new(),
            ),
        }
    }
}
