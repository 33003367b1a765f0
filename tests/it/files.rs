//! The files the relay trusts and the files it makes (issue 23, point 3):
//! its store is private to its user, it follows no link planted inside its
//! store, and `check` and `run` warn about a configuration file or store
//! directory other users can read or change. The real binary, started with
//! the usual umask 022.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::signal::Signal;

use crate::binary::{check, write, RelayProcess};
use crate::support::*;

/// Every file and directory under `dir`, with its mode (links not followed).
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read store dir").flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).expect("metadata");
        out.push((entry.path().display().to_string(), meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            out.extend(modes(&entry.path()));
        }
    }
    out
}

/// Regression: the store's files were created 0644 and its directories
/// 0755, so any local user could read callback bodies (and ThingSpace's
/// clear-text credentials in them).
#[tokio::test]
async fn the_store_is_private_to_the_relay_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = TestReceiver::ok().await;
    let path = write(dir.path(), &config(&[("a", &r.url("/a"), "")]));
    let mut relay = RelayProcess::start(&path).await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"n\":1}").await.0, 200);
    r.wait_for(1, WAIT).await;
    relay.signal(Signal::SIGTERM);
    assert!(relay.wait_exit(WAIT).await.success());
    let store = dir.path().join("store");
    let mut all =
        vec![(store.display().to_string(), std::fs::metadata(&store).expect("store").permissions().mode() & 0o777)];
    all.extend(modes(&store));
    assert!(all.len() > 4, "the store made its files: {all:?}");
    let open: Vec<_> = all.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "open to other users: {open:?}");
}

/// Regression: a `switchboard.lock` symlink planted in the store directory
/// had its target overwritten with the relay's pid. The relay now refuses
/// to start, names the link, and leaves the target alone.
#[tokio::test]
async fn a_link_planted_in_the_store_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("precious");
    std::fs::write(&victim, "precious data").expect("victim");
    let path = write(dir.path(), &config(&[("a", "http://127.0.0.1:1/a", "")]));
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("store dir");
    for planted in ["switchboard.lock", "db"] {
        let link = store.join(planted);
        std::os::unix::fs::symlink(&victim, &link).expect("plant link");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run switchboard");
        // A relay that starts on the link runs until killed: that is the failure.
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{planted}: the relay started on a planted link"))
            .expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{planted}: started on a planted link");
        assert!(err.contains(&format!("{planted} is a symbolic link")), "{planted}: {err}");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "precious data", "{planted}");
        std::fs::remove_file(&link).expect("remove link");
    }
}

/// `check` (and `run`, in its log) warns about a configuration file every
/// user can change, one every user can read that holds secrets inline,
/// and a store directory open to other users; naming the file and what to
/// do. A private setup draws none of these warnings.
#[tokio::test]
async fn check_and_run_warn_about_files_other_users_can_read_or_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", "http://127.0.0.1:1/a", "")]).replace(
        "[admin]\naddr = \"127.0.0.1:0\"\n",
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"inline-Admin-Token-9\"\n",
    );
    let path = write(dir.path(), &toml);
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("store");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).expect("chmod store");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod config");
    let out = check(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "warnings, not errors: {err}");
    assert!(err.contains("writable by every user on this machine"), "{err}");
    assert!(err.contains("readable by every user and holds secrets inline (admin.token)"), "{err}");
    assert!(err.contains("store.path:") && err.contains("is writable by every user"), "{err}");
    assert!(!err.contains("inline-Admin-Token-9"), "the secret itself is never printed: {err}");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).expect("chmod store");
    let mut relay = RelayProcess::start(&path).await;
    let logs = relay.logs();
    assert!(logs.contains("holds secrets inline (admin.token)") && logs.contains("is open to other users"), "{logs}");
    relay.signal(Signal::SIGTERM);
    relay.wait_exit(WAIT).await;
    // Private: no warning about files.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod config");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).expect("chmod store");
    let err = String::from_utf8_lossy(&check(&path).stderr).into_owned();
    assert!(!err.contains("every user") && !err.contains("other users"), "{err}");
}
