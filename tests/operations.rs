//! What operators and cluster engines rely on: sleep and wake over HTTP,
//! JSON logs, the replica's labels on /metrics, `serve --check-config`, and
//! a start that never waits for models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn call(server: &Server, method: &str, path: &str) -> (u16, Value) {
    let req = match method {
        "POST" => client().post(server.url(path)),
        _ => client().get(server.url(path)),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn ready(server: &Server) -> (u16, Value) {
    call(server, "GET", "/health/ready").await
}

async fn device_used(server: &Server) -> u64 {
    let status = get_json(server, "/admin/status").await;
    status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["used_bytes"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn sleep_releases_models_and_readiness_and_wake_brings_them_back() {
    let server = Server::with_config("[sleep]\nretry_after = \"7s\"\n");
    let (status, _, _) = post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(
        call(&server, "GET", "/is_sleeping").await.1["is_sleeping"],
        false
    );
    let awake_rss = server.resident_bytes();
    assert!(device_used(&server).await > 0);

    // Level 1: models unloaded, weight files kept in host memory.
    let (status, body) = call(&server, "POST", "/sleep?level=1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"], json!([MODEL]));
    let weights = std::fs::metadata(store().join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"))
        .unwrap()
        .len();
    assert_eq!(body["host_memory_bytes"].as_u64().unwrap(), weights);
    assert_eq!(device_used(&server).await, 0, "device memory released");
    assert_eq!(model_state(&server, MODEL).await["state"], "cold");
    let (code, body) = ready(&server).await;
    assert_eq!((code, body["status"].as_str()), (503, Some("sleeping")));
    assert_eq!(
        call(&server, "GET", "/is_sleeping").await.1,
        json!({"is_sleeping": true, "level": 1})
    );
    assert_eq!(metric(&server, "kindling_sleep_level").await, 1.0);
    let (status, headers, body) =
        post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body)["code"], "sleeping");
    assert_eq!(headers["retry-after"], "7");

    let (status, body) = call(&server, "POST", "/wake_up").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"], json!([MODEL]));
    assert_eq!(body["was_sleeping"], true);
    assert_eq!(model_state(&server, MODEL).await["state"], "warm");
    assert_eq!(ready(&server).await.0, 200);
    let (status, _, _) = post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(status, 200);

    // Level 2: everything released; the daemon shrinks by about the model.
    let (status, body) = call(&server, "POST", "/sleep?level=2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["host_memory_bytes"], 0);
    let asleep_rss = server.resident_bytes();
    assert!(
        asleep_rss + weights / 2 < awake_rss,
        "asleep {asleep_rss} vs awake {awake_rss} (weights {weights})"
    );
    assert_eq!(metric(&server, "kindling_sleep_level").await, 2.0);
    assert_eq!(call(&server, "POST", "/wake_up").await.0, 200);
    let (status, _, _) = post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(metric(&server, "kindling_sleep_level").await, 0.0);

    // Waking an awake replica is harmless; a bad level is the client's error.
    assert_eq!(
        call(&server, "POST", "/wake_up").await.1["was_sleeping"],
        false
    );
    for bad in ["/sleep?level=3", "/sleep?level=x", "/sleep?depth=1"] {
        let (status, body) = call(&server, "POST", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(error_of(&body)["param"], "level");
    }
    assert_eq!(ready(&server).await.0, 200);
}

#[tokio::test]
async fn a_request_wakes_a_replica_configured_to_wake_on_request() {
    let server = Server::with_config("[sleep]\nwake_on_request = true\n");
    let (status, _, _) = post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(call(&server, "POST", "/sleep").await.0, 200);
    assert_eq!(ready(&server).await.0, 503);
    let (status, _, body) = post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(&server, "GET", "/is_sleeping").await.1["is_sleeping"],
        false
    );
    assert_eq!(ready(&server).await.0, 200);
    assert!(server.wait_for_log("a request wakes the replica", Duration::from_secs(5)));
}

#[tokio::test]
async fn sleep_and_wake_need_the_admin_scope() {
    let config = keys::tenancy_config("", "", "");
    let user = keys::create(&config, "user", &[]);
    let admin = keys::create(&config, "ops", &["--scope", "admin"]);
    let server = Server::spawn(&config, &[]);
    for (key, want) in [(user.as_str(), 403), (admin.as_str(), 200)] {
        for (method, path) in [("GET", "/is_sleeping"), ("POST", "/wake_up")] {
            let req = match method {
                "POST" => client().post(server.url(path)),
                _ => client().get(server.url(path)),
            };
            let status = req.bearer_auth(key).send().await.unwrap().status();
            assert_eq!(status, want, "{method} {path}");
        }
    }
    let status = client()
        .post(server.url("/sleep"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_naming_the_request() {
    let server = Server::spawn(
        &write_config(""),
        &[("KINDLING_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
    );
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", "req-json-1")
        .json(&chat(MODEL, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-json-1");
    assert!(server.wait_for_log("req-json-1", Duration::from_secs(5)));
    let logs = server.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["target"].is_string());
    }
    let request = lines
        .iter()
        .find(|l| l["request_id"] == "req-json-1")
        .expect("the request's line");
    assert_eq!(request["model"], MODEL);
    assert_eq!(request["status"], 200);
    assert_eq!(request["path"], "/v1/chat/completions");
    // Model events name the model as a field of their own.
    let loaded = lines
        .iter()
        .find(|l| l["message"] == "model ready")
        .expect("the load's line");
    assert_eq!(loaded["model"], MODEL);
    assert!(!logs.contains('\x1b'), "no colour codes in JSON logs");
}

#[tokio::test]
async fn metrics_carry_the_knative_service_revision_and_pod() {
    let server = Server::spawn(
        &write_config(""),
        &[
            ("K_SERVICE", "kindling"),
            ("K_REVISION", "kindling-00002"),
            ("POD_NAME", "kindling-00002-deployment-abc"),
        ],
    );
    let text = metrics_text(&server).await;
    let line = text
        .lines()
        .find(|l| l.starts_with("kindling_sleep_level"))
        .unwrap();
    for label in [
        "service_name=\"kindling\"",
        "revision_name=\"kindling-00002\"",
        "pod_name=\"kindling-00002-deployment-abc\"",
    ] {
        assert!(line.contains(label), "{line}");
    }
}

fn check_config(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kindling"))
        .args(["serve", "--check-config", "--config"])
        .arg(config)
        .env_remove("PORT")
        .env_remove("KINDLING_STORE")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_config_validates_and_exits() {
    let (ok, out) = check_config(&repo().join("configs/kindling.toml"));
    assert!(ok, "{out}");
    assert!(
        out.contains("model: smollm2-135m\tchat") && out.ends_with("ok\n"),
        "{out}"
    );

    let missing = config_with_manifest(&demo_manifest(
        "ghost",
        Some(std::path::Path::new("no-such/model.gguf")),
        "",
    ));
    let (ok, out) = check_config(&missing);
    assert!(
        !ok && out.contains("weights missing for 1 model(s): ghost"),
        "{out}"
    );

    // KINDLING_STORE moves the store (the container images set it).
    let out = Command::new(env!("CARGO_BIN_EXE_kindling"))
        .args(["serve", "--check-config", "--config"])
        .arg(repo().join("configs/kindling.toml"))
        .env_remove("PORT")
        .env("KINDLING_STORE", "/nonexistent-store")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("/nonexistent-store/smollm2-135m"), "{text}");

    let bad = config_with_manifest(
        "id = \"x\"\nkind = \"chat\"\nformat = \"gguf\"\narchitecture = \"llama\"\nweigths = 1\n",
    );
    let (ok, out) = check_config(&bad);
    assert!(!ok && out.contains("weigths"), "{out}");
}

#[tokio::test]
async fn the_daemon_is_ready_before_any_model_loads() {
    let manifests: Vec<(String, String)> = (0..100)
        .map(|i| {
            let preload = if i == 0 { "preload = true" } else { "" };
            (
                format!("m{i}.toml"),
                demo_manifest(&format!("m{i}"), None, preload),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = manifests
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let server = Server::spawn(&config_with_manifests("", &refs), &[]);
    assert_eq!(ready(&server).await.0, 200);
    let models = get_json(&server, "/v1/models").await;
    assert_eq!(models["data"].as_array().unwrap().len(), 100);
    // The preloaded model loads in the background, after the daemon is up.
    wait_state(&server, "m0", "warm", Duration::from_secs(60)).await;
    assert_eq!(model_state(&server, "m1").await["state"], "cold");
}

#[tokio::test]
async fn a_stream_running_when_sleep_is_asked_finishes_first() {
    let server = Server::with_config("");
    let body = chat(
        MODEL,
        json!({"stream": true, "max_tokens": 200, "ignore_eos": true}),
    );
    let stream = {
        let url = server.url("/v1/chat/completions");
        tokio::spawn(async move {
            let resp = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            sse_data(&resp.text().await.unwrap())
        })
    };
    wait_state(&server, MODEL, "busy", Duration::from_secs(30)).await;
    let (status, body) = call(&server, "POST", "/sleep?level=2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["still_draining"], json!([]));
    // The stream was not cut: it ran to its full length.
    let events = stream.await.unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(model_state(&server, MODEL).await["state"], "cold");
}
