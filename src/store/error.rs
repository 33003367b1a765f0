//! The store's errors: typed, without the types of the engines behind it
//! (the local store's sled errors are turned into [`StoreError::Io`], [`StoreError::Corrupt`]
//! or [`EngineError`] here, the one place that knows them).

use std::path::PathBuf;

use super::local::{CommitError, LogError};
use super::record::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is full: {used} of max_bytes {limit} in use")]
    Full { used: u64, limit: u64 },
    #[error("disk nearly full: {free} bytes free on the store's filesystem, min_free_bytes is {min}")]
    DiskFull { free: u64, min: u64 },
    #[error("store flush to disk failed")]
    FlushFailed,
    #[error("store is closed")]
    Closed,
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: Box<StoreError> },
    #[error("store {path} is locked by another process{}; stop it first, or give this relay its own store.path", pid.map(|p| format!(" (pid {p}?)")).unwrap_or_default())]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error("cannot open store at {path}: {source}")]
    OpenIo { path: PathBuf, source: std::io::Error },
    #[error("{path} is a symbolic link: the store follows no link inside its directory (someone may have planted it to make the relay overwrite another file); remove it")]
    Link { path: PathBuf },
    #[error("store at {path} has format version {found}; this build reads version {expected} (data left untouched)")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("store at {path} holds data but no format marker; refusing to use it (data left untouched)")]
    Unmarked { path: PathBuf },
    #[error("store I/O error ({what}): {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("store database error: {0}")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Corrupt(#[from] DecodeError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("store encryption: {0}")]
    Sealing(String),
    #[error("a stored record is sealed with encryption key {key_id:?}, which is not configured ([store.encryption] keys); add it back to read the store")]
    MissingKey { key_id: String },
    #[error("message record of {0} bytes is larger than the store takes")]
    TooLarge(usize),
    /// The store's server cannot take it right now (JetStream not
    /// connected, a publish not acknowledged in time).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// What this kind of store does not do: its refusal from the
    /// capability table (`capabilities.rs`), what and why.
    #[error("{0}")]
    Unsupported(String),
    /// The store cannot be used as configured (credentials refused, a
    /// stream whose settings contradict the configuration).
    #[error("{0}")]
    Setup(String),
}

/// A failure of the database engine that is neither I/O nor a record we
/// cannot decode (sled: corruption it found itself, an unsupported
/// operation, a bug it reports). Kept as text: nothing branches on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub(in crate::store) String);

impl From<CommitError> for StoreError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::FlushFailed => StoreError::FlushFailed,
            CommitError::Closed => StoreError::Closed,
        }
    }
}

impl StoreError {
    /// Whether the condition may clear by itself while the relay runs
    /// (space freed, backlog delivered, a restart finished), so a sender
    /// should simply retry later. The others (a failed flush, I/O errors,
    /// damage) need an operator: ingress logs them as errors, not warnings.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Full { .. } | StoreError::DiskFull { .. } | StoreError::Closed | StoreError::Unavailable(_)
        )
    }
}
