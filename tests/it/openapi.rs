//! `docs/admin-api.yaml` against the live admin API: every documented path
//! and method answers a sample request with a documented status and, for
//! JSON, the documented required fields; without the token a secured path
//! answers 401; and every route the admin router has is documented.

use std::collections::BTreeSet;
use std::path::Path;

use crate::support::*;

const TOKEN: &str = "openapi-test-token";

fn spec() -> serde_yaml::Value {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-api.yaml"))
        .expect("read docs/admin-api.yaml");
    serde_yaml::from_str(&text).expect("the OpenAPI description parses")
}

/// A `$ref` to `#/components/...` resolved.
fn resolve<'a>(spec: &'a serde_yaml::Value, v: &'a serde_yaml::Value) -> &'a serde_yaml::Value {
    match v.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix("#/")) {
        Some(path) => path.split('/').fold(spec, |node, key| &node[key]),
        None => v,
    }
}

/// Checks `value` has the schema's required fields, one level into arrays
/// of objects too; returns what is missing.
fn missing(spec: &serde_yaml::Value, schema: &serde_yaml::Value, value: &serde_json::Value, at: &str) -> Vec<String> {
    let schema = resolve(spec, schema);
    let mut out = Vec::new();
    for req in schema["required"].as_sequence().into_iter().flatten().filter_map(|r| r.as_str()) {
        if value.get(req).is_none() {
            out.push(format!("{at}.{req}"));
        }
    }
    if let Some(props) = schema["properties"].as_mapping() {
        for (k, p) in props {
            let (Some(k), Some(items)) = (k.as_str(), p.get("items")) else { continue };
            if let Some(first) = value.get(k).and_then(|a| a.as_array()).and_then(|a| a.first()) {
                out.extend(missing(spec, items, first, &format!("{at}.{k}[0]")));
            }
        }
    }
    out
}

/// The admin router's routes, read from its `match`, as path templates.
fn router_routes() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin/mod.rs")).expect("read");
    let mut out = BTreeSet::new();
    for part in src.split("(&Method::").skip(1) {
        let Some((method, rest)) = part.split_once(", [") else { continue };
        let Some((segments, _)) = rest.split_once(']') else { continue };
        let path: Vec<String> = segments
            .split(',')
            .map(str::trim)
            .map(|s| if s.starts_with('"') { s.trim_matches('"').to_string() } else { "{}".to_string() })
            .collect();
        out.insert((method.to_lowercase(), format!("/{}", path.join("/"))));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_matches_the_live_admin_api() {
    let spec = spec();
    assert_eq!(spec["openapi"].as_str(), Some("3.1.0"));
    let refuse = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let down = dead_addr().await;
    let toml = config(&[
        ("app", &refuse.url("/a"), ""),
        ("down", &format!("http://{down}/d"), "retry = { initial = \"1h\", max_interval = \"1h\" }"),
    ])
    .replace("[admin]\naddr = \"127.0.0.1:0\"\n", &format!("[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"))
    .replace("destinations = [\"app\", \"down\"]\n", "destinations = [\"app\", \"down\"]\nindex = [\"requestId\"]\n");
    let relay = TestRelay::start(&toml).await;
    let id = acked_id(&post(&relay.url("/in"), "application/json", r#"{"requestId":"r-9"}"#).await.2);
    let auth = format!("Bearer {TOKEN}");
    let call = |method: &'static str, path: String| {
        let (url, auth) = (relay.admin_url(&path), auth.clone());
        async move { request(method, &url, &[("authorization", auth.as_str())], "").await }
    };
    // A dead letter at `app`, and an operation to look at.
    eventually!(WAIT, "a dead letter", {
        let (_, _, b) = call("GET", "/api/dead-letters/app".into()).await;
        let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
        if v["dead_letters"].as_array().is_some_and(|a| !a.is_empty()) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let (_, _, b) = call("POST", "/api/dead-letters/app/replay?wait=0".into()).await;
    let op =
        serde_json::from_slice::<serde_json::Value>(&b).expect("json")["operation"].as_str().expect("op").to_string();

    let mut documented = BTreeSet::new();
    let paths = spec["paths"].as_mapping().expect("paths");
    for (path, item) in paths {
        let path = path.as_str().expect("path");
        for (method, op_spec) in item.as_mapping().expect("methods") {
            let method = method.as_str().expect("method");
            let template =
                path.split('/').map(|s| if s.starts_with('{') { "{}" } else { s }).collect::<Vec<_>>().join("/");
            documented.insert((method.to_string(), template));
            let concrete =
                path.replace("{destination}", "app").replace("{id}", &id).replace("{operation}", &op).replace(
                    "/api/messages",
                    if path == "/api/messages" { "/api/messages?destination=down" } else { "/api/messages" },
                );
            let m: &'static str = match method {
                "get" => "GET",
                "post" => "POST",
                "delete" => "DELETE",
                other => panic!("method {other}"),
            };
            let (status, headers, body) = call(m, concrete.clone()).await;
            let responses = &op_spec["responses"];
            let documented_status = &responses[status.to_string().as_str()];
            assert!(!documented_status.is_null(), "{method} {concrete}: {status} is not documented");
            let json_schema = &documented_status["content"]["application/json"]["schema"];
            if !json_schema.is_null() {
                assert!(
                    headers.get("content-type").is_some_and(|c| c.as_bytes().starts_with(b"application/json")),
                    "{method} {concrete}"
                );
                let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
                let gaps = missing(&spec, json_schema, &v, "");
                assert!(gaps.is_empty(), "{method} {concrete}: missing {gaps:?} in {v}");
            }
            let open = op_spec.get("security").and_then(|s| s.as_sequence()).is_some_and(|s| s.is_empty());
            if !open {
                let (s, _, _) = request(m, &relay.admin_url(&concrete), &[], "").await;
                assert_eq!(s, 401, "{method} {concrete} without the token");
            }
        }
    }
    let routes = router_routes();
    assert!(routes.len() >= 12, "the router's routes were read: {routes:?}");
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    assert!(undocumented.is_empty(), "routes the relay answers but docs/admin-api.yaml lacks: {undocumented:?}");
    let stale: Vec<_> = documented.difference(&routes).collect();
    assert!(stale.is_empty(), "documented but not routed: {stale:?}");
    relay.stop().await.expect("stop");
}
