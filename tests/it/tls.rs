//! TLS, for real: a throwaway CA and leaf certificates made here with
//! rcgen, a client that trusts only that CA; TLS 1.2, 1.3 and HTTP/2 on the
//! ingress, key formats, certificate reload, HTTPS destinations with an
//! internal CA, the admin listener over TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::binary::{write, RelayProcess};
use crate::support::*;

/// A test CA that issues leaf certificates for 127.0.0.1 / localhost.
pub struct Ca {
    pub cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new() -> Ca {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "Switchboard Test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("ca cert");
        Ca { cert, key }
    }

    /// Issues a leaf with serial `serial` for `key` (generated if None).
    /// Returns (chain PEM: leaf + CA, key PEM).
    pub fn leaf(&self, serial: u64, key: Option<rcgen::KeyPair>) -> (String, String) {
        let key = key.unwrap_or_else(|| rcgen::KeyPair::generate().expect("leaf key"));
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("switchboard-test-{serial}"));
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf cert");
        (format!("{}{}", cert.pem(), self.cert.pem()), key.serialize_pem())
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.cert.der().to_vec())).expect("add CA");
        roots
    }
}

pub fn write_pair(dir: &Path, name: &str, (chain, key): &(String, String)) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let keyp = dir.join(format!("{name}.key"));
    std::fs::write(&cert, chain).expect("write cert");
    std::fs::write(&keyp, key).expect("write key");
    (cert, keyp)
}

/// A TLS client trusting only `ca`, for one protocol version and ALPN list.
pub fn client_config(
    ca: &Ca,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    // Every connection does a full handshake, so it shows the certificate
    // served now (a resumed session would report the one it started with).
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn connect_tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(WAIT, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

/// Serial number of the certificate the server presented.
fn served_serial(tls: &Tls) -> u64 {
    let certs = tls.get_ref().1.peer_certificates().expect("peer certs");
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).expect("x509");
    let bytes = cert.raw_serial();
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64)
}

/// An HTTP/1.1 connection over `tls`; keeps it open for several requests.
async fn h1(tls: Tls) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1 handshake");
    tokio::spawn(conn);
    send
}

async fn post_on(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    body: &'static [u8],
) -> u16 {
    send.ready().await.expect("ready");
    let req = http::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req)).await.expect("in time").expect("response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

pub fn tls_config(dest: &str, cert: &Path, key: &Path) -> String {
    config(&[("a", dest, "")]).replace(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n",
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    )
}

#[tokio::test]
async fn https_with_tls12_tls13_and_h2_next_to_plain_http() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_pair(dir.path(), "leaf", &ca.leaf(1, None));
    let r = TestReceiver::ok().await;
    let relay = TestRelay::start(&tls_config(&r.url("/a"), &cert, &key)).await;
    let (plain, https) = (relay.ingress_all[0], relay.ingress_all[1]);

    assert_eq!(post(&format!("http://{plain}/in"), "application/json", "{\"via\":\"http\"}").await.0, 200);

    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let tls = connect_tls(https, client_config(&ca, version, &[b"http/1.1"])).await;
        assert_eq!(tls.get_ref().1.protocol_version(), Some(want));
        let mut send = h1(tls).await;
        assert_eq!(post_on(&mut send, "/in", b"{\"via\":\"https\"}").await, 200);
    }

    // HTTP/2 negotiated by ALPN.
    let tls = connect_tls(https, client_config(&ca, &rustls::version::TLS13, &[b"h2", b"http/1.1"])).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://localhost:{}/in", https.port()))
        .body(Full::new(Bytes::from_static(b"{\"via\":\"h2\"}")))
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 response");
    assert_eq!((resp.version(), resp.status().as_u16()), (http::Version::HTTP_2, 200));

    // A client that does not trust our CA fails the handshake.
    let other = Ca::new();
    let tcp = TcpStream::connect(https).await.expect("connect");
    let refused = tokio_rustls::TlsConnector::from(client_config(&other, &rustls::version::TLS13, &[]))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await;
    assert!(refused.is_err());

    let got = r.wait_for(4, WAIT).await;
    let vias: Vec<String> = got.iter().map(|x| String::from_utf8_lossy(&x.body).into_owned()).collect();
    assert!(
        vias.iter().filter(|b| b.contains("https")).count() == 2 && vias.iter().any(|b| b.contains("h2")),
        "{vias:?}"
    );
    let m = relay.metrics().await;
    assert!(m.contains("switchboard_tls_certificate_expiry_timestamp_seconds{listener=\"127.0.0.1:0\"}"), "{m}");
}

#[tokio::test]
async fn rsa_pkcs1_and_ec_sec1_keys_load_and_bad_files_are_config_errors() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // RSA, written as PKCS#1 ("BEGIN RSA PRIVATE KEY").
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "rsa8.pem"]);
    openssl(&["pkey", "-in", "rsa8.pem", "-traditional", "-out", "rsa1.pem"]);
    let rsa8 = std::fs::read_to_string(dir.path().join("rsa8.pem")).expect("read");
    let rsa_key = rcgen::KeyPair::from_pem_and_sign_algo(&rsa8, &rcgen::PKCS_RSA_SHA256).expect("rsa key");
    let (chain, _) = ca.leaf(10, Some(rsa_key));
    std::fs::write(dir.path().join("rsa.crt"), &chain).expect("write");
    assert!(std::fs::read_to_string(dir.path().join("rsa1.pem")).expect("read").contains("BEGIN RSA PRIVATE KEY"));
    // ECDSA, written as SEC1 ("BEGIN EC PRIVATE KEY").
    let (ec_chain, ec_key) = ca.leaf(11, None);
    std::fs::write(dir.path().join("ec.crt"), &ec_chain).expect("write");
    std::fs::write(dir.path().join("ec8.pem"), &ec_key).expect("write");
    openssl(&["ec", "-in", "ec8.pem", "-out", "ec1.pem"]);
    assert!(std::fs::read_to_string(dir.path().join("ec1.pem")).expect("read").contains("BEGIN EC PRIVATE KEY"));

    for (cert, key) in [("rsa.crt", "rsa1.pem"), ("rsa.crt", "rsa8.pem"), ("ec.crt", "ec1.pem"), ("ec.crt", "ec8.pem")]
    {
        let files = switchboard::tls::TlsFiles { cert: dir.path().join(cert), key: dir.path().join(key) };
        let loaded = switchboard::tls::load(&files).unwrap_or_else(|e| panic!("{cert} + {key}: {e}"));
        assert!(loaded.not_after > 0);
    }
    // An RSA certificate serves real handshakes too.
    let r = TestReceiver::ok().await;
    let relay =
        TestRelay::start(&tls_config(&r.url("/a"), &dir.path().join("rsa.crt"), &dir.path().join("rsa1.pem"))).await;
    let tls = connect_tls(relay.ingress_all[1], client_config(&ca, &rustls::version::TLS12, &[])).await;
    assert_eq!(served_serial(&tls), 10);

    // Mismatched and unreadable files are config errors naming the file.
    let mismatched = tls_config("http://127.0.0.1:1/", &dir.path().join("rsa.crt"), &dir.path().join("ec1.pem"));
    let path = write(dir.path(), &mismatched);
    let err = switchboard::config::Config::load(&path).expect_err("mismatch").to_string();
    assert!(err.contains("listeners[1].tls") && err.contains("rsa.crt") && err.contains("ec1.pem"), "{err}");
    let missing = tls_config("http://127.0.0.1:1/", &dir.path().join("nope.crt"), &dir.path().join("ec1.pem"));
    let path = write(dir.path(), &missing);
    let err = switchboard::config::Config::load(&path).expect_err("missing").to_string();
    assert!(err.contains("nope.crt"), "{err}");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n").expect("write");
    let path = write(dir.path(), &tls_config("http://127.0.0.1:1/", &dir.path().join("ec.crt"), &garbage));
    let err = switchboard::config::Config::load(&path).expect_err("garbage key").to_string();
    assert!(err.contains("garbage.pem") && !err.contains("not base64"), "{err}");
}

#[tokio::test]
async fn certificate_reload_on_signal_and_on_file_change_keeps_connections() {
    let ca = Ca::new();
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let (cert, key) = write_pair(dir.path(), "live", &ca.leaf(100, None));
    let r = TestReceiver::ok().await;
    let reload = Arc::new(tokio::sync::Notify::new());
    let relay = TestRelay::start_with_reload(dir.clone(), &tls_config(&r.url("/a"), &cert, &key), reload.clone()).await;
    let https = relay.ingress_all[1];
    let cfg = client_config(&ca, &rustls::version::TLS13, &[]);

    let old = connect_tls(https, cfg.clone()).await;
    assert_eq!(served_serial(&old), 100);
    let mut kept = h1(old).await;
    assert_eq!(post_on(&mut kept, "/in", b"{}").await, 200);

    // 1. Replace the files and signal (SIGHUP in the binary).
    write_pair(dir.path(), "live", &ca.leaf(101, None));
    reload.notify_one();
    wait_for_serial(https, &cfg, 101).await;
    assert_eq!(post_on(&mut kept, "/in", b"{}").await, 200, "the open keep-alive connection still works");

    // 2. Replace the files only: the watcher notices.
    write_pair(dir.path(), "live", &ca.leaf(102, None));
    wait_for_serial(https, &cfg, 102).await;

    // 3. A broken replacement keeps the old certificate.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n").expect("write");
    reload.notify_one();
    relay
        .wait_metrics("a failed reload", |m| {
            metric(m, "switchboard_tls_reloads_total{listener=\"127.0.0.1:0\",result=\"error\"}") >= 1.0
        })
        .await;
    let tls = connect_tls(https, cfg.clone()).await;
    assert_eq!(served_serial(&tls), 102);
    assert_eq!(post_on(&mut kept, "/in", b"{}").await, 200);
}

async fn wait_for_serial(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>, serial: u64) {
    eventually!(WAIT, format!("serial {serial} served"), {
        let got = served_serial(&connect_tls(addr, cfg.clone()).await);
        if got == serial {
            Ok(())
        } else {
            Err(format!("still serving serial {got}"))
        }
    })
}

#[tokio::test]
async fn binary_reloads_certificate_on_sighup() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_pair(dir.path(), "live", &ca.leaf(200, None));
    let toml = format!(
        "[store]\npath = \"{{store}}\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n[admin]\naddr = \"127.0.0.1:0\"\n[[routes]]\npath = \"/in\"\ndestinations = [\"a\"]\n[destinations.a]\nurl = \"http://127.0.0.1:1/\"\n",
        cert.display(),
        key.display()
    );
    let path = write(dir.path(), &toml);
    let mut relay = RelayProcess::start(&path).await;
    let cfg = client_config(&ca, &rustls::version::TLS12, &[]);
    assert_eq!(served_serial(&connect_tls(relay.ingress, cfg.clone()).await), 200);
    write_pair(dir.path(), "live", &ca.leaf(201, None));
    relay.signal(nix::sys::signal::Signal::SIGHUP);
    let logs = relay.logs.clone();
    let served = tokio::spawn(async move { wait_for_serial(relay.ingress, &cfg, 201).await });
    if let Err(e) = served.await {
        panic!("{e}; logs:\n{}", logs.lock().expect("lock").join("\n"));
    }
    assert!(relay.child_running(), "SIGHUP must not stop the relay");
}

/// An HTTPS receiver on 127.0.0.1:0 serving `chain`/`key`; counts requests.
async fn tls_receiver(chain_and_key: &(String, String)) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_and_key.0.as_bytes()).collect::<Result<_, _>>().expect("certs");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(chain_and_key.1.as_bytes()).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, c) = (acceptor.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn https_destination_with_an_internal_ca_and_refusal_without_it() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_pem = dir.path().join("internal-ca.pem");
    std::fs::write(&ca_pem, ca.cert.pem()).expect("write ca");
    let (addr, count) = tls_receiver(&ca.leaf(300, None)).await;
    let url = format!("https://localhost:{}/cb", addr.port());
    let relay = TestRelay::start(&config(&[
        ("trusting", &url, &format!("ca_file = \"{}\"", ca_pem.display())),
        ("untrusting", &url, "[destinations.untrusting.retry]\ninitial = \"50ms\""),
    ]))
    .await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"tls\":1}").await.0, 200);
    relay
        .wait_metrics("delivery over HTTPS and a refused handshake", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"trusting\",outcome=\"delivered\"}") == 1.0
                && metric(m, "switchboard_delivery_attempts_total{destination=\"untrusting\",result=\"connect\"}")
                    >= 1.0
        })
        .await;
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1, "only the destination trusting the CA got through");
}

#[tokio::test]
async fn admin_listener_over_tls() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_pair(dir.path(), "admin", &ca.leaf(400, None));
    let toml = config(&[("a", "http://127.0.0.1:1/", "")]).replace(
        "[admin]\naddr = \"127.0.0.1:0\"\n",
        &format!(
            "[admin]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    );
    let relay = TestRelay::start(&toml).await;
    let tls = connect_tls(relay.admin, client_config(&ca, &rustls::version::TLS13, &[b"http/1.1"])).await;
    assert_eq!(served_serial(&tls), 400);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/healthz").header("host", "localhost").body(Full::new(Bytes::new())).expect("req");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
}
