//! The HTTP(S) client of one destination: rustls with the web PKI roots
//! and the destination's extra CAs, its TLS versions, an optional client
//! certificate, HTTP/1.1 and HTTP/2, a pool sized to its concurrency.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::Destination;

pub(super) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the HTTP(S) client for one destination.
pub(super) fn build_client(
    dest: &Destination,
    client_cert: Option<crate::tls::CertStore>,
) -> anyhow::Result<HttpClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(dest.connect_timeout));
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in &dest.extra_roots {
        roots.add(cert.clone())?;
    }
    let versions: &[&rustls::SupportedProtocolVersion] =
        if dest.tls13_only { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS13, &rustls::version::TLS12] };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let tls = match client_cert {
        Some(store) => builder.with_client_cert_resolver(Arc::new(store)),
        None => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(dest.concurrency)
        .build(https))
}
