//! The configuration file the relay runs on, for `GET /api/config`: its
//! hash, when it was loaded, and the reloads so far (the reloader reports
//! to it; admin only reads it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::lock;

/// The configuration file loaded, for `GET /api/config`.
pub struct Loaded {
    file: PathBuf,
    state: Mutex<LoadedState>,
    ok: AtomicU64,
    failed: AtomicU64,
}

struct LoadedState {
    sha256: String,
    loaded_ms: u64,
    last_error: Option<String>,
}

impl Loaded {
    /// `file` as loaded, its SHA-256 (hex).
    pub fn new(file: PathBuf, sha256: String) -> Loaded {
        Loaded {
            file,
            state: Mutex::new(LoadedState { sha256, loaded_ms: crate::text::now_ms(), last_error: None }),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// A reload applied the file as it is now (`sha256`).
    pub fn reloaded(&self, sha256: String) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        let mut s = lock(&self.state);
        s.sha256 = sha256;
        s.loaded_ms = crate::text::now_ms();
        s.last_error = None;
    }

    /// A reload was refused (the running configuration stays): why.
    pub fn refused(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        lock(&self.state).last_error = Some(why);
    }

    pub fn to_json(&self) -> serde_json::Value {
        let s = lock(&self.state);
        serde_json::json!({
            "file": self.file.display().to_string(),
            "sha256": s.sha256,
            "loaded_at": crate::text::rfc3339(s.loaded_ms),
            "reloads": { "ok": self.ok.load(Ordering::Relaxed), "error": self.failed.load(Ordering::Relaxed) },
            "last_error": s.last_error,
        })
    }
}
