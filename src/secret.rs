//! Secrets: values that must never be printed. [`Secret`] is a resolved
//! value whose `Debug` and `Serialize` show a mask; [`SecretString`] is a
//! secret as written in the configuration file (a literal, `env:NAME` or
//! `file:/path`), printed as written when it is a reference and masked when
//! it is a literal. Its own module so that the configuration and the stages
//! that use secrets (sender authentication, admin token) need not import
//! each other for it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A string that must never be printed: `Debug`, `Display` and `Serialize` show a mask.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A secret as written in the file: a literal, `env:NAME` or `file:/path`.
/// Printing shows references as written and literals masked.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_reference() {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("\"***\"")
        }
    }
}

impl SecretString {
    fn is_reference(&self) -> bool {
        self.0.starts_with("env:") || self.0.starts_with("file:")
    }
}

impl Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_reference() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str("***")
        }
    }
}

/// Resolves a configured secret: `env:NAME`, `file:/path` or the literal value.
/// Errors name the variable or file, never a value.
pub fn resolve(raw: &str) -> Result<Secret, String> {
    if let Some(name) = raw.strip_prefix("env:") {
        return std::env::var(name).map(Secret::new).map_err(|_| format!("environment variable {name} is not set"));
    }
    if let Some(path) = raw.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
            .map_err(|e| format!("cannot read secret file {path}: {e}"));
    }
    Ok(Secret::new(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_resolve_from_env_and_file_without_leaking() {
        assert_eq!(resolve("literal").expect("literal").expose(), "literal");
        let err = resolve("env:SWITCHBOARD_TEST_SURELY_UNSET_VAR").expect_err("unset");
        assert!(err.contains("SWITCHBOARD_TEST_SURELY_UNSET_VAR"));
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        std::fs::write(&p, "from-file\n").expect("write");
        assert_eq!(resolve(&format!("file:{}", p.display())).expect("file").expose(), "from-file");
    }
}
