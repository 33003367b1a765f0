//! Egress TLS per destination: a real HTTPS receiver that requires a client
//! certificate from the test CA accepts the destination that presents one
//! and refuses the one that does not; a renewed client certificate is
//! picked up on reload; `min_version = "1.3"` refuses a TLS 1.2-only
//! receiver.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::*;
use crate::tls::{write_pair, Ca};

/// An HTTPS receiver serving `server` (chain, key) that requires a client
/// certificate issued by `ca`; records the serial of each client's
/// certificate per request. `versions` limits the protocol versions.
async fn mtls_receiver(
    ca: &Ca,
    server: &(String, String),
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (SocketAddr, Arc<Mutex<Vec<u64>>>) {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.0.as_bytes()).collect::<Result<_, _>>().expect("certs");
    let key = PrivateKeyDer::from_pem_slice(server.1.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.cert.der().to_vec())).expect("ca");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let serial = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned())
                    .and_then(|c| {
                        let (_, cert) = x509_parser::parse_x509_certificate(&c).ok()?;
                        Some(cert.raw_serial().iter().fold(0u64, |acc, b| (acc << 8) | *b as u64))
                    })
                    .unwrap_or(0);
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let s = s.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        s.lock().expect("lock").push(serial);
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn fast_retry(name: &str) -> String {
    format!("[destinations.{name}.retry]\ninitial = \"50ms\"\nmax_interval = \"100ms\"")
}

#[tokio::test]
async fn a_client_certificate_is_presented_refused_without_and_reloaded() {
    let ca = Ca::new();
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.cert.pem()).expect("ca");
    let (cert, key) = write_pair(dir.path(), "client", &ca.leaf(41, None));
    let (addr, seen) = mtls_receiver(&ca, &ca.leaf(1, None), &[&rustls::version::TLS13, &rustls::version::TLS12]).await;
    let url = format!("https://localhost:{}/cb", addr.port());
    let with = format!(
        "ca_file = \"{}\"\n[destinations.with.tls]\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        ca_pem.display(),
        cert.display(),
        key.display()
    );
    let without = format!("ca_file = \"{}\"\n{}", ca_pem.display(), fast_retry("without"));
    let reload = Arc::new(tokio::sync::Notify::new());
    let relay = TestRelay::start_with_reload(
        dir.clone(),
        &config(&[("with", &url, &with), ("without", &url, &without)]),
        reload.clone(),
    )
    .await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"n\":1}").await.0, 200);
    relay
        .wait_metrics("delivered with the certificate, refused without", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"with\",outcome=\"delivered\"}") == 1.0
                && metric(m, "switchboard_deliveries_total{destination=\"without\",outcome=\"retried\"}") >= 1.0
        })
        .await;
    assert_eq!(*seen.lock().expect("lock"), vec![41], "only the destination with a certificate got through");

    // The certificate is renewed in place; a reload (SIGHUP) picks it up.
    write_pair(dir.path(), "client", &ca.leaf(42, None));
    reload.notify_one();
    relay
        .wait_metrics("the renewed certificate loaded", |m| {
            metric(m, "switchboard_tls_reloads_total{listener=\"destination/with\",result=\"ok\"}") >= 1.0
        })
        .await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"n\":2}").await.0, 200);
    relay
        .wait_metrics("the second delivery", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"with\",outcome=\"delivered\"}") == 2.0
        })
        .await;
    // The pool was renewed with the certificate: the next delivery presents it.
    assert_eq!(*seen.lock().expect("lock"), vec![41, 42]);
    // A broken renewal keeps the certificate in use.
    std::fs::write(&cert, "not a certificate").expect("break");
    reload.notify_one();
    relay
        .wait_metrics("the failed reload counted", |m| {
            metric(m, "switchboard_tls_reloads_total{listener=\"destination/with\",result=\"error\"}") >= 1.0
        })
        .await;
}

#[tokio::test]
async fn min_version_13_refuses_a_tls12_only_receiver() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.cert.pem()).expect("ca");
    let (cert, key) = write_pair(dir.path(), "client", &ca.leaf(7, None));
    let (addr, seen) = mtls_receiver(&ca, &ca.leaf(1, None), &[&rustls::version::TLS12]).await;
    let url = format!("https://localhost:{}/cb", addr.port());
    let tls = |name: &str, min: &str| {
        format!(
            "ca_file = \"{}\"\n[destinations.{name}.tls]\nclient_cert = \"{}\"\nclient_key = \"{}\"\nmin_version = \"{min}\"\n{}",
            ca_pem.display(),
            cert.display(),
            key.display(),
            fast_retry(name)
        )
    };
    let relay =
        TestRelay::start(&config(&[("modern", &url, &tls("modern", "1.3")), ("compat", &url, &tls("compat", "1.2"))]))
            .await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{}").await.0, 200);
    relay
        .wait_metrics("1.2 delivered, 1.3 refused", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"compat\",outcome=\"delivered\"}") == 1.0
                && metric(m, "switchboard_deliveries_total{destination=\"modern\",outcome=\"retried\"}") >= 1.0
        })
        .await;
    assert_eq!(seen.lock().expect("lock").len(), 1);
}

#[test]
fn bad_egress_tls_settings_are_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, key, why) in [
        (
            "[destinations.a.tls]\nclient_cert = \"/nonexistent.pem\"",
            "destinations.a.tls",
            "both client_cert and client_key",
        ),
        (
            "[destinations.a.tls]\nclient_cert = \"/nonexistent.pem\"\nclient_key = \"/nonexistent.key\"",
            "destinations.a.tls",
            "/nonexistent.pem",
        ),
        ("[destinations.a.tls]\nmin_version = \"1.1\"", "destinations.a.tls.min_version", "not a TLS version"),
    ] {
        let path = crate::binary::write(dir.path(), &config(&[("a", "https://localhost:1/a", extra)]));
        let out = crate::binary::check(&path);
        assert_eq!(out.status.code(), Some(78), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains(why), "{extra}: {err}");
    }
}
