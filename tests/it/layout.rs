//! The layout's rules, checked on the source (issue 24): what `lib.rs` and
//! ARCHITECTURE.md say about who imports whom holds, files and functions
//! stay readable. Each rule fails with the file and what broke it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Stages of the relay: peers that import none of each other.
const PEERS: [&str; 3] = ["ingress", "delivery", "admin"];
/// What runs the relay: none of it imports configuration, the composition
/// root or the operator's client.
const RELAY_SIDE: [&str; 5] = ["ingress", "delivery", "admin", "server", "store"];
/// Shared leaves: they import no stage but the store.
const LEAVES: [&str; 12] = [
    "metrics",
    "wake",
    "recent",
    "headers",
    "tls",
    "trace",
    "secret",
    "text",
    "throttle",
    "fieldpath",
    "events",
    "otel",
];
/// What only the binary's side imports.
const TOP: [&str; 4] = ["config", "relay", "client", "cli"];

const MAX_FILE_LINES: usize = 650;
const MAX_FN_LINES: usize = 100;
/// A longer function says why in its doc comment, with these words.
const LONG_ON_PURPOSE: &str = "Long on purpose:";

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each file with its lines, comments dropped (a doc may name any module).
fn sources() -> Vec<(PathBuf, String, Vec<String>)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            let code = text.lines().filter(|l| !l.trim_start().starts_with("//")).map(str::to_string).collect();
            let rel = p.strip_prefix(src()).expect("under src").to_path_buf();
            (rel, text, code)
        })
        .collect()
}

/// The top-level module a file belongs to (`store/local/index.rs` → `store`).
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().expect("component").as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// `crate::X` paths a file names, by top-level module X.
fn imports(code: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let mut g: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for (rel, _, code) in sources() {
        let from = module_of(&rel);
        for to in imports(&code) {
            if to != from {
                g.entry(from.clone()).or_default().entry(to).or_insert_with(|| rel.clone());
            }
        }
    }
    g
}

#[test]
fn no_import_circles_between_top_level_modules() {
    let g = graph();
    // Depth-first search; a back edge is a circle, reported with its files.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeMap<String, PathBuf>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut circle = path[at..].to_vec();
            circle.push(n.to_string());
            return Some(circle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for to in g.get(n).map(|e| e.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
            if let Some(c) = visit(&to, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(circle) = visit(n, &g, &mut Vec::new(), &mut done) {
            let files: Vec<String> =
                circle.windows(2).map(|w| format!("{} → {} ({})", w[0], w[1], g[&w[0]][&w[1]].display())).collect();
            panic!("import circle: {}", files.join(", "));
        }
    }
}

#[test]
fn stages_import_neither_each_other_nor_the_binary_side_and_leaves_no_stage() {
    let g = graph();
    let mut broken = Vec::new();
    for (from, to) in g.iter().flat_map(|(f, e)| e.iter().map(move |(t, p)| (f, (t, p)))) {
        let (to, file) = to;
        let peer = PEERS.contains(&from.as_str()) && PEERS.contains(&to.as_str());
        let upward = RELAY_SIDE.contains(&from.as_str()) && TOP.contains(&to.as_str());
        let leaf = LEAVES.contains(&from.as_str()) && !LEAVES.contains(&to.as_str()) && to != "store";
        if peer || upward || leaf {
            broken.push(format!("{from} imports {to} ({})", file.display()));
        }
    }
    assert!(broken.is_empty(), "layout rules broken:\n{}", broken.join("\n"));
}

#[test]
fn the_store_backends_are_equal_folders() {
    let mut broken = Vec::new();
    for (rel, _, code) in sources() {
        let path = rel.to_string_lossy().replace('\\', "/");
        let text = code.join("\n");
        if path.starts_with("store/jetstream/") && text.contains("store::local") {
            broken.push(format!("{path}: the JetStream backend imports the local one"));
        }
        if path.starts_with("store/local/") && text.contains("store::jetstream") {
            broken.push(format!("{path}: the local backend imports the JetStream one"));
        }
        if !path.starts_with("store/local/") && text.contains("sled::") {
            broken.push(format!("{path}: names sled outside store/local/"));
        }
        // The NATS client: the JetStream store, the NATS destination kind
        // (`delivery/nats.rs`, a destination, not a store) and config's
        // address check.
        let nats_allowed =
            path.starts_with("store/jetstream/") || path == "delivery/nats.rs" || path.starts_with("config/");
        if !nats_allowed && text.contains("async_nats::") {
            broken.push(format!("{path}: names async_nats outside store/jetstream/, delivery/nats.rs and config"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn files_and_functions_stay_readable() {
    let mut broken = Vec::new();
    for (rel, text, _) in sources() {
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() > MAX_FILE_LINES {
            broken.push(format!("{}: {} lines (at most {MAX_FILE_LINES})", rel.display(), lines.len()));
        }
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue; // test files: one scenario a function
        }
        for (i, line) in lines.iter().enumerate() {
            let Some(fn_name) = fn_name(line) else { continue };
            let len = fn_len(&lines[i..]);
            if len <= MAX_FN_LINES {
                continue;
            }
            let doc: Vec<&str> = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with("///") || l.trim_start().starts_with("#["))
                .copied()
                .collect();
            if !doc.iter().any(|l| l.contains(LONG_ON_PURPOSE)) {
                broken.push(format!(
                    "{}:{}: fn {fn_name} is {len} lines and its doc does not say why",
                    rel.display(),
                    i + 1
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The name of the function a line starts, if it starts one.
fn fn_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    if t.starts_with("//") {
        return None;
    }
    let mut words = t.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if w == "fn" {
            let name: String = words.next()?.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            return Some(name);
        }
        if !(w.starts_with("pub") || w == "async" || w == "const" || w == "unsafe") {
            return None;
        }
    }
    None
}

/// Lines from a function's first line to its closing brace (1 for a
/// declaration without a body).
fn fn_len(lines: &[&str]) -> usize {
    let mut depth = 0i64;
    let mut started = false;
    for (n, line) in lines.iter().enumerate() {
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    started = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if started && depth <= 0 {
            return n + 1;
        }
        if !started && line.trim_end().ends_with(';') {
            return 1;
        }
    }
    lines.len()
}

/// ARCHITECTURE.md's capability table is the code's (`store/capabilities.rs`).
#[test]
fn the_capability_table_in_architecture_md_is_the_codes() {
    use switchboard::store::{Capability, StoreKind};
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).expect("read");
    for c in Capability::ALL {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}`", c.name())))
            .unwrap_or_else(|| panic!("ARCHITECTURE.md has no row for `{}`", c.name()));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for (kind, cell) in [(StoreKind::Local, cells[2]), (StoreKind::JetStream, cells[3])] {
            let has = kind.capabilities().has(c);
            assert_eq!(cell.starts_with("yes"), has, "{}: {kind} says {cell:?}, the code says {has}", c.name());
        }
    }
}
