//! Keys end to end: the real daemon with the demo models, keys made with
//! `kindling keys`, checked on every route; CORS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::keys::*;
use common::*;
use serde_json::json;

#[tokio::test]
async fn the_auth_matrix_and_a_keys_file_that_changes_while_serving() {
    let config = tenancy_config("", "flush_interval = \"200ms\"", "");
    let alice = create(&config, "alice", &["--models", CHAT]);
    let root = create(&config, "root", &["--scope", "admin"]);
    let server = Server::spawn(&config, &[("KINDLING_API_KEY", "plain-secret")]);
    // No key, a wrong key: 401 with the Bearer challenge.
    for key in [None, Some("kdl-not-a-key")] {
        let (status, headers, body) = call(&server, "GET", "/v1/models", key, None).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    // x-api-key works too; health and metrics stay open.
    let resp = client()
        .get(server.url("/v1/models"))
        .header("x-api-key", &root)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for open in ["/health/live", "/health/ready", "/metrics"] {
        assert_eq!(
            call(&server, "GET", open, None, None).await.0,
            200,
            "{open}"
        );
    }
    // A key scoped to one model sees only it, and may not use another.
    let (_, _, models) = call(&server, "GET", "/v1/models", Some(&alice), None).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [CHAT]);
    let path = format!("/v1/models/{EMBED}");
    assert_eq!(call(&server, "GET", &path, Some(&alice), None).await.0, 404);
    let body = json!({"model": EMBED, "input": "hello"});
    let (status, _, e) = call(&server, "POST", "/v1/embeddings", Some(&alice), Some(body)).await;
    assert_eq!(status, 403, "{e}");
    assert_eq!(e["error"]["code"], "model_not_allowed");
    // Inference keys stay out of the admin API; admin keys and --api-key keys get in.
    let (status, _, e) = call(&server, "GET", "/admin/status", Some(&alice), None).await;
    assert_eq!(status, 403, "{e}");
    for key in [root.as_str(), "plain-secret"] {
        assert_eq!(
            call(&server, "GET", "/admin/status", Some(key), None)
                .await
                .0,
            200
        );
    }
    // A stream in flight when its key is revoked finishes; new requests get 401.
    let mut body = chat_body(48);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&alice)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    keys(&config, &["revoke", "alice"]);
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let t0 = Instant::now();
    while call(&server, "GET", "/v1/models", Some(&alice), None)
        .await
        .0
        != 401
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "revoked key still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A key made while the daemon runs works within seconds.
    let bob = create(&config, "bob", &[]);
    let t0 = Instant::now();
    while call(&server, "GET", "/v1/models", Some(&bob), None).await.0 != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "new key not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No secret in the log or the keys file.
    let file = std::fs::read_to_string(config.parent().unwrap().join("keys.toml")).unwrap();
    for secret in [&alice, &root, &bob] {
        assert!(!server.logs().contains(secret.as_str()));
        assert!(!file.contains(&secret[12..]));
    }
    assert!(!server.logs().contains("plain-secret"));
    let list = keys(&config, &["list"]);
    assert!(list.contains("alice") && list.contains("revoked"), "{list}");
}

#[test]
fn no_public_listening_without_a_key_unless_asked() {
    let config = write_config("");
    let out = Command::new(bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-key") && err.contains("--insecure-public"),
        "{err}"
    );
    // With a key it starts; with --insecure-public too.
    let server = Server::spawn(&config, &[("PORT", "0"), ("KINDLING_API_KEY", "k")]);
    assert!(server.logs().contains("listening on http://0.0.0.0:"));
}

/// Totals per key from `/admin/usage`.
#[tokio::test]
async fn cors_is_off_by_default_and_answers_configured_origins() {
    let preflight = |server: &Server| {
        client()
            .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let closed = Server::with_config("");
    let resp = preflight(&closed).await.unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    let config = tenancy_config(
        "metrics_need_key = true",
        "",
        "[server]\ncors_origins = [\"https://app.example\"]",
    );
    let key = create(&config, "web", &[]);
    let open = Server::spawn(&config, &[]);
    // This config keys /metrics too.
    assert_eq!(call(&open, "GET", "/metrics", None, None).await.0, 401);
    assert_eq!(
        call(&open, "GET", "/metrics", Some(&key), None).await.0,
        200
    );
    // The preflight needs no key; the answer names the origin.
    let resp = preflight(&open).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let resp = client()
        .get(open.url("/v1/models"))
        .header("origin", "https://app.example")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let resp = client()
        .get(open.url("/v1/models"))
        .header("origin", "https://elsewhere.example")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
}
