//! Credentials end to end: the admin token on the control API, invoke keys on private
//! functions, what reaches a function, revocation, and the CLI finding its token (flags,
//! `ember login`, the README quickstart with nothing typed).

#![allow(clippy::disallowed_methods)] // the harness spawns tasks that end with the test

mod common;

use bytes::Bytes;
use common::{cli_command, Gateway};
use http::Method;

/// Makes a key through the API; returns its secret.
async fn key(gw: &Gateway, name: &str, scope: serde_json::Value) -> String {
    let mut body = scope;
    body["name"] = name.into();
    let r = gw
        .request(Method::POST, "/api/v1/keys", &[], body.to_string())
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["key"].as_str().unwrap().to_string()
}

/// Asserts a 401 in Ember's error shape with the bearer challenge; returns its message.
fn unauthorized(r: &common::Response) -> String {
    assert_eq!(r.status, 401, "{}", r.text());
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{challenge:?}");
    let body = r.json();
    assert_eq!(body["error"]["code"], "unauthorized");
    body["error"]["message"].as_str().unwrap().to_string()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_api_answers_401_without_the_admin_token_or_with_a_wrong_one() {
    require_docker!();
    let gw = Gateway::start().await;
    let list = "/api/v1/functions";
    let message = unauthorized(&gw.raw_request(Method::GET, list, &[], Bytes::new()).await);
    assert!(message.contains("needs the admin token"), "{message}");
    assert!(
        message.contains("admin.token"),
        "says where the token is: {message}"
    );
    assert!(message.contains("ember login"), "{message}");
    for junk in [
        "Bearer wrong",
        "Basic YWRtaW46YWRtaW4=",
        "Bearer ",
        "Bearer é",
    ] {
        let r = gw
            .raw_request(Method::GET, list, &[("authorization", junk)], Bytes::new())
            .await;
        unauthorized(&r);
    }

    let invoker = key(&gw, "invoker", serde_json::json!({"invoke": ["*"]})).await;
    let bearer = format!("Bearer {invoker}");
    let r = gw
        .raw_request(
            Method::GET,
            list,
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert!(unauthorized(&r).contains("key `invoker` may only invoke"));
    let admin = key(&gw, "ops", serde_json::json!({"admin": true})).await;
    let bearer = format!("Bearer {admin}");
    let r = gw
        .raw_request(
            Method::GET,
            list,
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "an admin key works as the admin token does");
    let bearer = format!("Bearer {}", gw.token);
    let r = gw
        .raw_request(
            Method::GET,
            list,
            &[("authorization", &bearer)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);

    let health = gw
        .raw_request(Method::GET, "/healthz", &[], Bytes::new())
        .await;
    assert_eq!(health.status, 200, "health stays open");
    // Agents reach their two routes without the admin token; their handlers check a join
    // token or a node credential instead (and refuse these, which carry neither).
    let json = [("content-type", "application/json")];
    let join = gw
        .raw_request(Method::POST, "/api/v1/nodes/join", &json, r#"{"name":"n"}"#)
        .await;
    assert_eq!(join.status, 401);
    assert!(join.text().contains("join token"), "{}", join.text());
    let tunnel = gw
        .raw_request(
            Method::GET,
            "/api/v1/nodes/tunnel",
            &[("ember-node", "n")],
            "",
        )
        .await;
    assert_eq!(tunnel.status, 401);
    assert!(tunnel.text().contains("not accepted"), "{}", tunnel.text());
    // Refused before its handler reads a byte of the body (without a body here: the
    // gateway answers a refused upload at once and closes, and a client still writing
    // its body sees a broken pipe).
    let upload = gw
        .raw_request(Method::POST, "/api/v1/images?tag=x:1", &[], Bytes::new())
        .await;
    unauthorized(&upload);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_is_made_once_readable_by_its_owner_only_and_kept_across_restarts() {
    require_docker!();
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::builder().data_dir(dir.path()).start().await;
    let first = gw.token.clone();
    assert!(first.starts_with("ea_"), "{first}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.path().join("admin.token");
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    gw.kill();
    let gw = Gateway::builder().data_dir(dir.path()).start().await;
    assert_eq!(gw.token, first);
    assert_eq!(
        gw.get_json("/api/v1/functions").await["functions"],
        serde_json::json!([])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_function_admits_only_keys_allowed_to_invoke_it() {
    require_docker!();
    let gw = Gateway::start().await;
    let private = common::echo_manifest("vault", "", "[access]\nprivate = true");
    assert_eq!(gw.deploy("vault", &private).await.status, 201);
    let own = key(
        &gw,
        "vault-client",
        serde_json::json!({"invoke": ["vault"]}),
    )
    .await;
    let other = key(
        &gw,
        "other-client",
        serde_json::json!({"invoke": ["other"]}),
    )
    .await;
    let any = key(&gw, "any-client", serde_json::json!({"invoke": ["*"]})).await;
    let call = |headers: Vec<(&'static str, String)>| {
        let gw = &gw;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            gw.raw_request(Method::POST, "/fn/vault/x", &headers, "hi")
                .await
        }
    };
    let bearer = |k: &str| vec![("authorization", format!("Bearer {k}"))];
    let ember_key = |k: &str| vec![("x-ember-key", k.to_string())];

    let message = unauthorized(&call(vec![]).await);
    assert!(message.contains("`vault` is private"), "{message}");
    assert!(
        message.contains("ember keys create --name NAME --invoke vault"),
        "{message}"
    );
    assert!(
        gw.containers("vault").is_empty(),
        "a refused request starts nothing"
    );
    let message = unauthorized(&call(bearer(&other)).await);
    assert!(
        message.contains("key `other-client` may not invoke it"),
        "{message}"
    );
    unauthorized(&call(bearer("ek_not-a-key")).await);
    unauthorized(&call(ember_key(&other)).await);

    for (what, headers) in [
        ("its key as a bearer token", bearer(&own)),
        ("its key in X-Ember-Key", ember_key(&own)),
        ("a key for every function", bearer(&any)),
        ("the admin token", bearer(&gw.token)),
        ("the admin token in X-Ember-Key", ember_key(&gw.token)),
    ] {
        let r = call(headers).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.text(), "hi");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_function_never_sees_the_credential_while_a_public_one_sees_authorization() {
    require_docker!();
    let gw = Gateway::start().await;
    let private = common::echo_manifest("hidden", "", "[access]\nprivate = true");
    gw.deploy("hidden", &private).await;
    gw.deploy("open", &common::echo_manifest("open", "", ""))
        .await;
    let k = key(&gw, "k", serde_json::json!({"invoke": ["hidden"]})).await;
    let bearer = format!("Bearer {k}");
    for headers in [
        vec![("authorization", bearer.as_str())],
        vec![("x-ember-key", k.as_str())],
        vec![
            ("x-ember-key", k.as_str()),
            ("authorization", "Bearer mine"),
        ],
    ] {
        let r = gw
            .raw_request(Method::GET, "/fn/hidden/", &headers, Bytes::new())
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-echo-h-authorization"), None);
        assert_eq!(r.header("x-echo-h-x-ember-key"), None);
    }

    let headers = [
        ("authorization", "Bearer the-function's-own"),
        ("x-ember-key", k.as_str()),
        ("x-other", "kept"),
    ];
    let r = gw
        .raw_request(Method::GET, "/fn/open/", &headers, Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-echo-h-authorization").as_deref(),
        Some("Bearer the-function's-own"),
        "a public function's Authorization is its own"
    );
    assert_eq!(
        r.header("x-echo-h-x-ember-key"),
        None,
        "X-Ember-Key is Ember's"
    );
    assert_eq!(r.header("x-echo-h-x-other").as_deref(), Some("kept"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_gets_401_on_its_very_next_request() {
    require_docker!();
    let gw = Gateway::start().await;
    let private = common::echo_manifest("guarded", "", "[access]\nprivate = true");
    gw.deploy("guarded", &private).await;
    let k = key(
        &gw,
        "short-lived",
        serde_json::json!({"invoke": ["guarded"]}),
    )
    .await;
    let headers = [("x-ember-key", k.as_str())];
    let r = gw
        .raw_request(Method::GET, "/fn/guarded/", &headers, Bytes::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let revoke = "/api/v1/keys/short-lived";
    let r = gw.request(Method::DELETE, revoke, &[], Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw
        .raw_request(Method::GET, "/fn/guarded/", &headers, Bytes::new())
        .await;
    assert!(unauthorized(&r).contains("revoked?"));
    let r = gw.request(Method::DELETE, revoke, &[], Bytes::new()).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "key_not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_created_listed_and_revoked_through_the_cli_and_shown_only_once() {
    require_docker!();
    let gw = Gateway::start().await;
    let out = gw.cli(&["keys", "create", "--name", "ci", "--invoke", "echo,llm"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out).trim().to_string();
    assert!(
        secret.starts_with("ek_") && !secret.contains('\n'),
        "{secret:?}"
    );
    assert!(stderr(&out).contains("shown this once"), "{}", stderr(&out));
    let hash = ember::access::hash_secret(&secret);

    let out = gw.cli(&["keys", "create", "--name", "ci", "--invoke", "*"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a key named `ci` exists already"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("409"), "{}", stderr(&out));
    let out = gw.cli(&["keys", "create", "--name", "ops"]);
    assert!(!out.status.success(), "a scope is required");
    let out = gw.cli(&["keys", "create", "--name", "ops", "--admin"]);
    assert!(out.status.success(), "{}", stderr(&out));

    for args in [&["keys", "ls"][..], &["keys", "ls", "--json"]] {
        let out = gw.cli(args);
        assert!(out.status.success(), "{}", stderr(&out));
        let listed = stdout(&out);
        assert!(listed.contains("ci") && listed.contains("ops"), "{listed}");
        assert!(
            listed.contains("echo") && listed.contains("llm"),
            "{listed}"
        );
        assert!(
            !listed.contains(&secret[3..]),
            "the key is never shown again"
        );
        assert!(!listed.contains(&hash), "nor its hash");
    }
    let out = gw.cli(&["keys", "revoke", "ci"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = gw.cli(&["keys", "ls"]);
    assert!(!stdout(&out).contains("ci "), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_and_token_flags_work_before_and_after_the_command() {
    require_docker!();
    let gw = Gateway::start().await;
    let config = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        cli_command(config.path())
            .args(args)
            .current_dir(cwd.path())
            .output()
            .unwrap()
    };
    let (url, token) = (gw.url.as_str(), gw.token.as_str());
    for args in [
        &["--gateway", url, "--token", token, "ls"][..],
        &["ls", "--gateway", url, "--token", token],
        &["--gateway", url, "ls", "--token", token],
        &["--token", token, "keys", "ls", "--gateway", url],
    ] {
        let out = run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let out = run(&["ls", "--gateway", url]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("needs the admin token") && err.contains("401"),
        "{err}"
    );
    assert!(err.contains("no token was sent"), "{err}");
    let out = run(&["--gateway", url, "serve"]);
    assert!(!out.status.success(), "serve takes no client flags");
}

#[tokio::test(flavor = "multi_thread")]
async fn ember_login_checks_the_token_then_later_commands_need_neither_gateway_nor_token() {
    require_docker!();
    let gw = Gateway::start().await;
    let config = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        cli_command(config.path())
            .args(args)
            .current_dir(cwd.path())
            .output()
            .unwrap()
    };
    let file = config.path().join("ember/config.toml");
    let out = run(&["login", &gw.url, "--token", "ea_wrong"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nothing was saved"),
        "{}",
        stderr(&out)
    );
    assert!(!file.exists());

    let out = run(&["login", &gw.url, "--token", &gw.token]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&gw.id), "{}", stdout(&out));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = run(&["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no functions deployed"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_quickstart_needs_no_token_typed() {
    require_docker!();
    common::echo_image(); // builds functions/echo/bin/echo, which the deploy below needs
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::builder().in_dir(dir.path()).start().await;
    let _cleanup = common::Cleanup(format!("ember.gateway={}", gw.id));
    assert!(dir.path().join(".ember/admin.token").is_file());
    let config = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        cli_command(config.path())
            .args(args)
            .args(["--gateway", &gw.url])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let echo = common::repo().join("functions/echo");
    let out = run(&["deploy", echo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r = gw
        .raw_request(Method::POST, "/fn/echo/any/path", &[], "hi")
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "hi");
    let out = run(&["ls"]);
    assert!(stdout(&out).contains("echo"), "{}", stderr(&out));
    let out = run(&["rm", "echo"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
