//! TLS for listeners (ingress and admin) and destinations' client
//! certificates, with certificate hot reload.
//!
//! A listener's certificate lives in a [`CertStore`]: an atomically swapped
//! `Arc<CertifiedKey>` behind rustls's `ResolvesServerCert`. Every new
//! handshake reads the current one; connections already established keep the
//! certificate they negotiated. [`CertStore::reload`] re-reads the PEM files
//! and swaps only if the new chain and key load and match; otherwise the old
//! certificate stays and the error is returned (and logged by the caller).
//! Reloads are triggered by SIGHUP and by a poll of the files' metadata
//! (certbot and cert-manager replace files or symlinks in place).
//!
//! Protocols: TLS 1.2 and 1.3 (ring provider), ALPN `h2` and `http/1.1`.
//! Keys: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate could not be loaded. Names the file; never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not belong together: {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Paths of a listener's certificate chain and key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cert={} key={}", self.cert.display(), self.key.display())
    }
}

/// A loaded certificate with the facts we report about it.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// `notAfter` of the end-entity certificate, unix seconds.
    pub not_after: i64,
}

/// Reads and checks a chain and key pair.
pub fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let cert_err = |reason: String| TlsError::Cert { path: files.cert.clone(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate found".into()));
    }
    let not_after = match x509_parser::parse_x509_certificate(&certs[0]) {
        Ok((_, cert)) => cert.validity().not_after.timestamp(),
        Err(e) => return Err(cert_err(format!("not a valid X.509 certificate: {e}"))),
    };
    // The key file's contents never go into an error message.
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key (PKCS#8, PKCS#1 or SEC1) found".into(),
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "malformed PEM".into(),
        },
    })?;
    let key = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Loaded { key: Arc::new(key), not_after })
}

/// The current certificate of one listener; cheap to clone.
#[derive(Clone)]
pub struct CertStore {
    files: TlsFiles,
    current: Arc<ArcSwap<CertifiedKey>>,
    not_after: Arc<std::sync::atomic::AtomicI64>,
    fingerprint: Arc<std::sync::Mutex<Option<FileStamp>>>,
    /// Bumped by every successful reload (a client pools its connections,
    /// so it must know when to start new ones with the new certificate).
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").field("files", &self.files).finish_non_exhaustive()
    }
}

impl CertStore {
    pub fn open(files: TlsFiles) -> Result<CertStore, TlsError> {
        let stamp = FileStamp::read(&files);
        let loaded = load(&files)?;
        Ok(CertStore {
            files,
            current: Arc::new(ArcSwap::new(loaded.key)),
            not_after: Arc::new(std::sync::atomic::AtomicI64::new(loaded.not_after)),
            fingerprint: Arc::new(std::sync::Mutex::new(stamp)),
            generation: Arc::default(),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Re-reads the files; swaps in the new certificate only if it loads.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = FileStamp::read(&self.files);
        if let Ok(mut f) = self.fingerprint.lock() {
            *f = stamp;
        }
        let loaded = load(&self.files)?;
        self.current.store(loaded.key);
        self.not_after.store(loaded.not_after, std::sync::atomic::Ordering::Relaxed);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// How many times the certificate was replaced since it was opened.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the files changed since the last (attempted) load.
    pub fn changed_on_disk(&self) -> bool {
        let now = FileStamp::read(&self.files);
        match self.fingerprint.lock() {
            Ok(f) => *f != now,
            Err(_) => false,
        }
    }

    /// A rustls server configuration that resolves through this store.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map(|b| b.with_no_client_auth().with_cert_resolver(Arc::new(self.clone())))
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

/// The same store serves a destination's client certificate (mTLS).
impl rustls::client::ResolvesClientCert for CertStore {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What we compare to notice a replaced file: modification time, size and
/// inode of both files (following symlinks, as certbot's live/ links are).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp(Vec<(Option<SystemTime>, u64, u64)>);

impl FileStamp {
    fn read(files: &TlsFiles) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let one = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len(), m.ino()));
        Some(FileStamp(vec![one(&files.cert)?, one(&files.key)?]))
    }
}

/// How often certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);
