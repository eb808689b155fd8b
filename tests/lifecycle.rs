//! The model lifecycle on the real daemon with the real demo model: lazy
//! loads, budgets and eviction, keep-alive, pinning, failed loads, scale to
//! zero, cold-start signalling and the admin API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Two ids for the demo GGUF, each with a 1024-token context and a
/// 2048-position KV cache (an estimate of about 244 MB), and a 350 MiB
/// budget: one fits, two do not.
fn two_models(daemon: &str, a_extra: &str, b_extra: &str) -> Server {
    let sizes = "context_length = 1024\nkv_cache_tokens = 2048";
    let a = demo_manifest("a", None, &format!("{sizes}\n{a_extra}"));
    let b = demo_manifest("b", None, &format!("{sizes}\n{b_extra}"));
    let daemon = format!("[devices.cpu]\nbudget = \"350MiB\"\n{daemon}");
    Server::spawn(
        &config_with_manifests(&daemon, &[("a.toml", &a), ("b.toml", &b)]),
        &[],
    )
}

#[tokio::test]
async fn a_budget_for_one_model_evicts_and_reloads_in_turn() {
    let server = two_models("", "", "");
    for (i, id) in ["a", "b", "a", "b"].iter().enumerate() {
        let (status, headers, body) =
            post(&server, "/v1/chat/completions", &chat(id, json!({}))).await;
        assert_eq!(status, 200, "request {i} to {id}: {body}");
        assert_eq!(
            headers["x-kindling-cold-start"], "true",
            "each request finds its model cold"
        );
        let other = if *id == "a" { "b" } else { "a" };
        assert_eq!(model_state(&server, id).await["state"], "warm");
        assert_eq!(model_state(&server, other).await["state"], "cold");
    }
    let evicted = |m: &str| {
        format!("kindling_model_evictions_total{{model=\"{m}\",reason=\"memory_pressure\"}}")
    };
    assert_eq!(metric(&server, &evicted("a")).await, 2.0);
    assert_eq!(metric(&server, &evicted("b")).await, 1.0);
    let status = get_json(&server, "/admin/status").await;
    let cpu = &status["devices"][0];
    assert_eq!(cpu["name"], "cpu");
    assert_eq!(cpu["budget_bytes"], 350 << 20);
    assert!(cpu["used_bytes"].as_u64().unwrap() <= 350 << 20, "{status}");
    assert_eq!(status["models_resident"], json!(["b"]));
}

#[tokio::test]
async fn twenty_concurrent_requests_to_a_cold_model_share_one_load() {
    let server = two_models("", "", "");
    let body = chat("a", json!({}));
    let requests = (0..20).map(|_| post(&server, "/v1/chat/completions", &body));
    let responses = futures::future::join_all(requests).await;
    for (status, headers, body) in &responses {
        assert_eq!(*status, 200, "{body}");
        assert!(
            headers.contains_key("x-kindling-load-ms"),
            "all waited for the same load"
        );
    }
    let loads = metric(
        &server,
        "kindling_model_loads_total{model=\"a\",outcome=\"ok\"}",
    )
    .await;
    assert_eq!(loads, 1.0);
    assert_eq!(
        server.logs().matches("loading model model=\"a\"").count(),
        1
    );
}

#[tokio::test]
async fn keep_alive_from_the_request_applies_after_it() {
    let server = two_models("", "", "");
    let (status, headers, _) = post(
        &server,
        "/v1/chat/completions",
        &chat("a", json!({"keep_alive": "10m"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kindling-cold-start"], "true");
    let m = model_state(&server, "a").await;
    assert_eq!(
        (m["state"].as_str(), m["keep_alive"].as_str()),
        (Some("warm"), Some("10m"))
    );
    let until = m["keep_alive_until"].as_f64().unwrap() - m["last_used"].as_f64().unwrap();
    assert!((599.0..=601.0).contains(&until), "{m}");
    // Warm now: no cold-start header. keep_alive 0 unloads right after.
    let (status, headers, _) = post(
        &server,
        "/v1/chat/completions",
        &chat("a", json!({"keep_alive": 0})),
    )
    .await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("x-kindling-cold-start"));
    wait_state(&server, "a", "cold", Duration::from_secs(10)).await;
    let (status, _, body) = post(
        &server,
        "/v1/chat/completions",
        &chat("a", json!({"keep_alive": "soon"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&body)["param"], "keep_alive");
}

#[tokio::test]
async fn a_pinned_preloaded_model_survives_pressure() {
    let server = two_models(
        "[lifecycle]\nload_timeout = \"1s\"\n",
        "pin = true\npreload = true",
        "",
    );
    // The daemon is ready while the preload runs in the background.
    let ready = client()
        .get(server.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let m = wait_state(&server, "a", "warm", Duration::from_secs(30)).await;
    assert_eq!(m["pinned"], true);
    let (status, headers, body) =
        post(&server, "/v1/chat/completions", &chat("b", json!({}))).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body)["code"], "insufficient_memory");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(model_state(&server, "a").await["state"], "warm");
    let (status, _, _) = post(
        &server,
        "/v1/chat/completions",
        &chat("a", json!({"keep_alive": 0})),
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        model_state(&server, "a").await["state"],
        "warm",
        "pinned beats keep_alive 0"
    );
}

#[tokio::test]
async fn a_model_that_can_never_fit_says_so() {
    let m = demo_manifest("big", None, "");
    let server = Server::spawn(
        &config_with_manifests("[devices.cpu]\nbudget = \"100MiB\"\n", &[("big.toml", &m)]),
        &[],
    );
    let (status, _, body) = post(&server, "/v1/chat/completions", &chat("big", json!({}))).await;
    assert_eq!(status, 503);
    let msg = error_of(&body)["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("never fit") && msg.contains(&(100u64 << 20).to_string()),
        "{msg}"
    );
}

#[tokio::test]
async fn broken_weight_files_fail_clearly_while_others_serve() {
    let dir = temp_dir();
    let gguf = store().join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").unwrap();
    let missing = dir.join("missing.gguf");
    let manifests = [
        ("good.toml", demo_manifest("good", None, "")),
        (
            "truncated.toml",
            demo_manifest("truncated", Some(&truncated), ""),
        ),
        ("garbage.toml", demo_manifest("garbage", Some(&garbage), "")),
        ("missing.toml", demo_manifest("missing", Some(&missing), "")),
    ];
    let refs: Vec<(&str, &str)> = manifests.iter().map(|(n, m)| (*n, m.as_str())).collect();
    let server = Server::spawn(&config_with_manifests("", &refs), &[]);
    for (id, reason) in [
        ("truncated", "truncated"),
        ("garbage", "GGUF"),
        ("missing", "not found"),
    ] {
        let (status, headers, body) =
            post(&server, "/v1/chat/completions", &chat(id, json!({}))).await;
        assert_eq!(status, 503, "{id}: {body}");
        let e = error_of(&body);
        assert_eq!(e["code"], "model_load_failed");
        assert!(e["message"].as_str().unwrap().contains(reason), "{id}: {e}");
        assert!(headers.contains_key("retry-after"));
        let (status, _, body) =
            post(&server, "/v1/chat/completions", &chat("good", json!({}))).await;
        assert_eq!(status, 200, "{body}");
    }
    let m = model_state(&server, "truncated").await;
    assert_eq!(m["state"], "failed");
    assert!(m["error"].as_str().unwrap().contains("truncated"));
    // Held back by the backoff: the next request does not retry the load.
    let (status, _, body) = post(
        &server,
        "/v1/chat/completions",
        &chat("truncated", json!({})),
    )
    .await;
    assert_eq!(status, 503);
    assert!(error_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("held back"));
}

#[tokio::test]
async fn idle_expiry_scales_to_zero_and_memory_falls_back() {
    let m = demo_manifest("a", None, "");
    let server = Server::spawn(
        &config_with_manifests("[lifecycle]\nkeep_alive = \"2s\"\n", &[("a.toml", &m)]),
        &[],
    );
    // Let the start-up estimate finish before taking the baseline.
    let est = wait_state(&server, "a", "cold", Duration::from_secs(5)).await;
    for _ in 0..100 {
        if model_state(&server, "a").await["estimated_bytes"].is_u64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(est["loaded"], false);
    let baseline = server.resident_bytes();
    let (status, _, _) = post(&server, "/v1/chat/completions", &chat("a", json!({}))).await;
    assert_eq!(status, 200);
    let loaded = server.resident_bytes();
    let m = model_state(&server, "a").await;
    assert_eq!(m["state"], "warm");
    let (estimated, measured) = (
        m["estimated_bytes"].as_u64().unwrap(),
        m["measured_bytes"].as_u64().unwrap(),
    );
    assert!(
        loaded > baseline + (100 << 20),
        "loading took memory: {baseline} → {loaded}"
    );
    // The estimate from the header and the measured footprint agree.
    let ratio = measured as f64 / estimated as f64;
    assert!(
        (0.8..1.25).contains(&ratio),
        "estimated {estimated}, measured {measured}"
    );
    wait_state(&server, "a", "cold", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = server.resident_bytes();
    eprintln!("resident: baseline {baseline}, loaded {loaded}, after expiry {after}");
    assert!(
        after < baseline + (10 << 20),
        "memory not returned: {baseline} → {loaded} → {after}"
    );
    let evicted = metric(
        &server,
        "kindling_model_evictions_total{model=\"a\",reason=\"idle_expired\"}",
    )
    .await;
    assert_eq!(evicted, 1.0);
    assert_eq!(metric(&server, "kindling_models_resident").await, 0.0);
    // The next request lights it again.
    let (status, headers, _) = post(&server, "/v1/chat/completions", &chat("a", json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-kindling-cold-start"], "true");
}

#[tokio::test]
async fn a_stream_to_a_cold_model_starts_at_once() {
    let server = two_models("", "", "");
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .json(&chat("a", json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-kindling-cold-start"], "true");
    let text = resp.text().await.unwrap();
    assert!(text.starts_with(": loading model a"), "{text}");
    assert!(text.contains(": model loaded in "), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // A cold stream whose load fails ends with an error event.
    let dir = temp_dir();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"nope").unwrap();
    let m = demo_manifest("bad", Some(&bad), "");
    let server = Server::spawn(&config_with_manifests("", &[("bad.toml", &m)]), &[]);
    let data = post_stream(
        &server,
        "/v1/chat/completions",
        &chat("bad", json!({"stream": true})),
    )
    .await;
    let last: serde_json::Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "model_load_failed");
}

#[tokio::test]
async fn admin_api_loads_unloads_and_reports() {
    let server = two_models("", "", "");
    let resp = client()
        .post(server.url("/admin/models/a/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let m: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (m["state"].as_str(), m["device"].as_str()),
        (Some("warm"), Some("cpu"))
    );
    assert!(
        m["measured_bytes"].as_u64().unwrap() > 0 && m["keep_alive_until"].is_f64(),
        "{m}"
    );
    let resp = client()
        .post(server.url("/admin/models/a/unload"))
        .send()
        .await
        .unwrap();
    let m: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(m["state"], "cold");
    let admin = "kindling_model_evictions_total{model=\"a\",reason=\"admin\"}";
    assert_eq!(metric(&server, admin).await, 1.0);
    let resp = client()
        .post(server.url("/admin/models/nope/load"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let text = metrics_text(&server).await;
    for name in [
        "kindling_model_load_duration_seconds_bucket",
        "kindling_device_memory_budget_bytes{device=\"cpu\"}",
        "kindling_model_memory_estimated_bytes{model=\"a\"}",
        "kindling_requests_total{endpoint=\"/admin/models/{id}/load\",model=\"\",status=\"200\"}",
        "kindling_model_queue_depth{model=\"b\"}",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // Admin routes can be turned off.
    let m = demo_manifest("a", None, "");
    let server = Server::spawn(
        &config_with_manifests("[admin]\nenabled = false\n", &[("a.toml", &m)]),
        &[],
    );
    let resp = client()
        .get(server.url("/admin/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}
