//! Header policy per destination: `forward_headers` (all, allow, deny),
//! `add_headers` (static and secret values) and `forwarded`, with real
//! receivers; and the config errors for policies that cannot work.

use crate::support::*;

#[tokio::test]
async fn each_destination_gets_the_headers_its_policy_says() {
    let rs = [TestReceiver::ok().await, TestReceiver::ok().await, TestReceiver::ok().await, TestReceiver::ok().await];
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-from-file\n").expect("token file");
    let toml = config(&[
        ("deny", &rs[0].url("/deny"), "forward_headers = { deny = [\"user-agent\"] }"),
        ("allow", &rs[1].url("/allow"), "forward_headers = { allow = [\"content-type\", \"x-keep\"] }"),
        (
            "add",
            &rs[2].url("/add"),
            &format!("add_headers = {{ \"X-Source\" = \"switchboard\", \"X-Token\" = \"file:{}\" }}", token.display()),
        ),
        ("fwd", &rs[3].url("/fwd"), "forwarded = true"),
    ]);
    let relay = TestRelay::start_in(dir, &toml).await;
    let sent = [
        ("content-type", "application/json"),
        ("user-agent", "Verizon's callback service"),
        ("x-keep", "1"),
        ("x-other", "2"),
        ("x-source", "the sender's"),
    ];
    assert_eq!(request("POST", &relay.url("/in"), &sent, "{}").await.0, 200);
    let got: Vec<Received> = {
        let mut v = Vec::new();
        for r in &rs {
            v.push(r.wait_for(1, WAIT).await.remove(0));
        }
        v
    };
    let [deny, allow, add, fwd] = [&got[0], &got[1], &got[2], &got[3]];
    assert_eq!(deny.header("user-agent"), None);
    assert_eq!(deny.header("x-keep").as_deref(), Some("1"));
    assert_eq!(deny.header("x-other").as_deref(), Some("2"));
    assert_eq!(allow.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(allow.header("x-keep").as_deref(), Some("1"));
    assert_eq!(allow.header("user-agent"), None);
    assert_eq!(allow.header("x-other"), None);
    // Our own headers are not the sender's: an allowlist does not drop them.
    assert!(allow.header("x-switchboard-id").is_some() && allow.header("x-forwarded-for").is_some());
    assert_eq!(add.header("x-source").as_deref(), Some("switchboard"), "an added header replaces the sender's");
    assert_eq!(add.header("x-token").as_deref(), Some("tok-from-file"));
    assert_eq!(add.header("user-agent").as_deref(), Some("Verizon's callback service"));
    assert_eq!(fwd.header("forwarded").as_deref(), Some("for=127.0.0.1"));
    assert_eq!(deny.header("forwarded"), None, "Forwarded only when asked");
}

#[test]
fn policies_that_cannot_work_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, key, why) in [
        ("forward_headers = \"some\"", "destinations.a.forward_headers", "is not a header policy"),
        (
            "forward_headers = { allow = [\"x\"], deny = [\"y\"] }",
            "destinations.a.forward_headers",
            "exactly one of allow or deny",
        ),
        (
            "forward_headers = { deny = [\"bad name\"] }",
            "destinations.a.forward_headers.deny[0]",
            "invalid header name",
        ),
        ("add_headers = { \"Bad Name\" = \"x\" }", "destinations.a.add_headers.Bad Name", "invalid header name"),
        ("add_headers = { \"Connection\" = \"close\" }", "destinations.a.add_headers.Connection", "cannot be added"),
        (
            "add_headers = { \"X-Token\" = \"env:SWITCHBOARD_SURELY_UNSET_TOKEN\" }",
            "destinations.a.add_headers.X-Token",
            "is not set",
        ),
    ] {
        crate::binary::assert_config_error(dir.path(), extra, key, why);
    }
    // A literal added value may be a secret: `check` masks it.
    let path = crate::binary::write(
        dir.path(),
        &config(&[("a", "http://127.0.0.1:1/a", "add_headers = { \"X-Token\" = \"tok-literal-1234\" }")]),
    );
    let out = crate::binary::check(&path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("tok-literal-1234"));
}
