//! Configuration fixtures: every file in `tests/configs/valid` loads, every
//! file in `tests/configs/invalid` fails with the error its first line names
//! (`# expect: <text>`), and `config.example.toml` loads.

use std::path::{Path, PathBuf};

use switchboard::config::Config;

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no fixtures in {}", dir.display());
    v
}

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.destinations.len(), 2);
}

#[test]
fn valid_fixtures_load() {
    for f in files("tests/configs/valid") {
        if let Err(e) = Config::load(&f) {
            panic!("{} should be valid: {e}", f.display());
        }
    }
}

#[test]
fn invalid_fixtures_fail_with_their_expected_error() {
    for f in files("tests/configs/invalid") {
        let text = std::fs::read_to_string(&f).expect("read");
        let expected: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expected.is_empty(), "{} has no '# expect: ' line", f.display());
        match Config::load(&f) {
            Ok(_) => panic!("{} should be invalid", f.display()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(&*f.display().to_string()), "error does not name the file: {msg}");
                for want in expected {
                    assert!(msg.contains(want), "{}: error {msg:?} does not contain {want:?}", f.display());
                }
            }
        }
    }
}

#[test]
fn environment_overrides_nested_keys() {
    // Run the real binary's `check` so the environment is the child's alone.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "--config"])
        .arg(&path)
        .env("SWITCHBOARD_STORE__PATH", "/tmp/from-env")
        .env("SWITCHBOARD_DESTINATIONS__APP__CONCURRENCY", "3")
        .env("SWITCHBOARD_CRASH_CYCLES", "7") // not a config key: ignored
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("path = \"/tmp/from-env\""), "{stdout}");
    assert!(stdout.contains("concurrency = 3"), "{stdout}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "--config"])
        .arg(&path)
        .env("SWITCHBOARD_DESTINATIONS__APP__TIMEOUT", "soon")
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("destinations.app.timeout"), "{stderr}");
}
