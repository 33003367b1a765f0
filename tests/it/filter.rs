//! Routing by content: each destination's filter decides at ingress whether
//! a callback is queued for it; a body that is not JSON never matches a body
//! condition (and is counted); filters that cannot be evaluated are config
//! errors naming the key.

use crate::support::*;

fn callback(user: &str, kind: &str) -> String {
    format!(
        r#"{{"username":"{user}","password":"","requestId":"r-1","deviceIds":[{{"id":"89148000","kind":"{kind}"}}],"status":"Success","callbackCount":1}}"#
    )
}

#[tokio::test]
async fn each_destination_gets_only_what_its_filter_matches() {
    let names = ["team_a", "team_b", "audit", "imei", "hdr", "combo"];
    let mut rs = Vec::new();
    for _ in names {
        rs.push(TestReceiver::ok().await);
    }
    let filters = [
        r#"filter = { path = "username", in = ["acct-A"] }"#,
        r#"filter = { path = "username", equals = "ACCT-B", case_insensitive = true }"#,
        "",
        r#"filter = { path = "deviceIds[0].kind", prefix = "imei", case_insensitive = true }"#,
        r#"filter = { header = "x-env", equals = "prod" }"#,
        r#"filter = { all = [{ path = "status", exists = true }, { not = { path = "username", equals = "acct-A" } }] }"#,
    ];
    let urls: Vec<String> = rs.iter().zip(names).map(|(r, n)| r.url(&format!("/{n}"))).collect();
    let dests: Vec<(&str, &str, &str)> =
        names.iter().zip(&urls).zip(filters).map(|((n, u), f)| (*n, u.as_str(), f)).collect();
    let relay = TestRelay::start(&config(&dests)).await;
    let a = callback("acct-A", "IMEI");
    let b = callback("acct-b", "Iccid");
    let xml = "<soap:Envelope><username>acct-A</username></soap:Envelope>";
    assert_eq!(post(&relay.url("/in"), "application/json", a.clone()).await.0, 200);
    let (s, _, _) =
        request("POST", &relay.url("/in"), &[("content-type", "application/json"), ("x-env", "prod")], b.clone()).await;
    assert_eq!(s, 200);
    assert_eq!(post(&relay.url("/in"), "text/xml", xml).await.0, 200);

    let bodies = |r: &TestReceiver| -> Vec<String> {
        r.received().iter().map(|g| String::from_utf8_lossy(&g.body).into_owned()).collect()
    };
    rs[2].wait_for(3, WAIT).await; // audit has no filter: it gets all three
    for (i, want) in [vec![a.clone()], vec![b.clone()], vec![], vec![a.clone()], vec![b.clone()], vec![b.clone()]]
        .into_iter()
        .enumerate()
    {
        if i == 2 {
            continue;
        }
        if !want.is_empty() {
            rs[i].wait_for(want.len(), WAIT).await;
        }
        assert_eq!(bodies(&rs[i]), want, "destination {}", names[i]);
    }
    assert_eq!(bodies(&rs[2]).len(), 3);
    let m = relay
        .wait_metrics("filtered deliveries counted", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"team_a\",outcome=\"filtered\"}") == 2.0
        })
        .await;
    assert_eq!(metric(&m, "switchboard_filter_unparsable_total{route=\"/in\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "switchboard_deliveries_total{destination=\"audit\",outcome=\"filtered\"}"), 0.0);
    // What was not queued for a destination never shows as pending there.
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"team_a\"}"), 0.0);
}

#[tokio::test]
async fn a_callback_no_destination_wants_is_answered_and_not_stored() {
    let r = TestReceiver::ok().await;
    let relay =
        TestRelay::start(&config(&[("a", &r.url("/a"), r#"filter = { path = "username", equals = "acct-A" }"#)])).await;
    let (status, _, body) = post(&relay.url("/in"), "application/json", callback("acct-Z", "Iccid")).await;
    assert_eq!(status, 200, "the sender's callback was accepted");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["filtered"], true);
    assert_eq!(metric(&relay.metrics().await, "switchboard_store_bytes"), 0.0, "nothing stored");
    assert_eq!(post(&relay.url("/in"), "application/json", callback("acct-A", "Iccid")).await.0, 200);
    let got = r.wait_for(1, WAIT).await;
    assert!(String::from_utf8_lossy(&got[0].body).contains("acct-A"));
    assert_eq!(r.count(), 1);
}

#[test]
fn filters_that_cannot_be_evaluated_are_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (filter, key, why) in [
        (r#"filter = { path = "a[x]", equals = 1 }"#, "destinations.a.filter.path", "not a number"),
        (r#"filter = { path = "a", in = [] }"#, "destinations.a.filter.in", "never matches"),
        (r#"filter = { path = "a", between = [1, 2] }"#, "destinations.a.filter", "unknown key `between`"),
        (r#"filter = { path = "a", equals = 1, prefix = "x" }"#, "destinations.a.filter", "exactly one of equals"),
        (r#"filter = { any = [] }"#, "destinations.a.filter.any", "empty list"),
        (
            r#"filter = { not = { header = "bad name", exists = true } }"#,
            "destinations.a.filter.not.header",
            "invalid header name",
        ),
    ] {
        crate::binary::assert_config_error(dir.path(), filter, key, why);
    }
    // `check` shows a valid filter in the resolved configuration.
    let path = crate::binary::write(
        dir.path(),
        &config(&[("a", "http://127.0.0.1:1/a", r#"filter = { path = "username", in = ["acct-A"] }"#)]),
    );
    let out = crate::binary::check(&path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("[destinations.a.filter]") && printed.contains("acct-A"), "{printed}");
}
