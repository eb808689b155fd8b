//! Model versions and gray release over HTTP, with two versions of the demo
//! model (same weights, different default `max_tokens`, so their answers
//! differ): weighted sticky splits, promote and rollback under load,
//! shadow traffic, the guard's automatic rollback, and the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::keys::{call, create};
use common::*;
use serde_json::{json, Value};

/// Long enough that neither version stops before its `max_tokens`.
const PROMPT: &str = "Write a long story about a dragon who lives in a castle.";

/// v1 answers with 3 tokens, v2 with 6.
fn version(v: &str, max_tokens: u32) -> String {
    demo_manifest(
        "demo",
        None,
        &format!("version = \"{v}\"\n[defaults]\nmax_tokens = {max_tokens}\n"),
    )
}

/// A config serving `manifests`, with `daemon` settings; routes are saved
/// next to it.
fn versioned(daemon: &str, manifests: &[(&str, String)], watch: &str) -> PathBuf {
    let files: Vec<(&str, &str)> = manifests.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let models = format!("routes_state = \"routes.json\"\nwatch_interval = \"{watch}\"");
    config_with_models(daemon, &files, &models)
}

fn two_versions(daemon: &str) -> PathBuf {
    versioned(
        daemon,
        &[("v1.toml", version("v1", 3)), ("v2.toml", version("v2", 6))],
        "2s",
    )
}

/// One chat request: (status, version header, completion tokens, body).
async fn ask(
    server: &Server,
    model: &str,
    extra: Value,
    headers: &[(&str, &str)],
) -> (u16, String, u64, Value) {
    let mut body = json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let mut req = client()
        .post(server.url("/v1/chat/completions"))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let version = resp
        .headers()
        .get("x-kindling-model-version")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    (status, version, tokens, body)
}

async fn send(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = client().request(method.parse().unwrap(), server.url(path));
    let req = match body {
        Some(b) => req.json(&b),
        None => req,
    };
    let resp = req.send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn versions_are_listed_addressed_and_split_by_sticky_weights() {
    let config = two_versions("[routes.demo]\nweights = { v1 = 90, v2 = 10 }\n");
    let server = Server::spawn(&config, &[]);
    let models = get_json(&server, "/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["demo", "demo@v1", "demo@v2"]);
    assert_eq!(
        model_state(&server, "demo").await["versions"],
        json!(["v1", "v2"])
    );

    // `id@version` is exact; each version answers with its own defaults.
    let (status, v, tokens, body) = ask(&server, "demo@v2", json!({}), &[]).await;
    assert_eq!((status, v.as_str(), tokens), (200, "v2", 6), "{body}");
    assert_eq!(body["model"], "demo@v2");
    let (_, v, tokens, _) = ask(&server, "demo@v1", json!({}), &[]).await;
    assert_eq!((v.as_str(), tokens), ("v1", 3));
    let (status, _, _, body) = ask(&server, "demo@v9", json!({}), &[]).await;
    assert_eq!(status, 404, "{body}");

    // 90/10 over 200 users: the version and the answer agree every time.
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let mut on_v2 = 0;
    for chunk in users.chunks(8) {
        let answers = futures::future::join_all(
            chunk
                .iter()
                .map(|u| ask(&server, "demo", json!({"user": u}), &[])),
        )
        .await;
        for (status, v, tokens, body) in answers {
            assert_eq!(status, 200, "{body}");
            let want = if v == "v2" { 6 } else { 3 };
            assert_eq!(tokens, want, "version {v} answered with its defaults");
            on_v2 += usize::from(v == "v2");
        }
    }
    // Binomial(200, 0.1): mean 20, standard deviation 4.2.
    assert!((5..=36).contains(&on_v2), "{on_v2} of 200 on v2");

    // Sticky: the same user (or session) always lands on the same version.
    for u in &users[..5] {
        let first = ask(&server, "demo", json!({"user": u, "max_tokens": 1}), &[])
            .await
            .1;
        for _ in 0..3 {
            assert_eq!(
                ask(&server, "demo", json!({"user": u, "max_tokens": 1}), &[])
                    .await
                    .1,
                first
            );
        }
    }
    let session = [("x-session-id", "session-7")];
    let first = ask(&server, "demo", json!({"max_tokens": 1}), &session)
        .await
        .1;
    for u in ["a", "b", "c"] {
        let v = ask(
            &server,
            "demo",
            json!({"user": u, "max_tokens": 1}),
            &session,
        )
        .await
        .1;
        assert_eq!(v, first, "X-Session-Id wins over `user`");
    }
    let text = metrics_text(&server).await;
    assert!(
        text.contains("kindling_version_requests_total{model=\"demo\",version=\"v2\",traffic=\"primary\",outcome=\"ok\"}"),
        "{text}"
    );
    assert!(text.contains("kindling_route_weight_percent{model=\"demo\",version=\"v1\"} 90"));
    assert!(text.contains("kindling_version_time_to_first_token_seconds_count{model=\"demo\",version=\"v1\",traffic=\"primary\"}"));
}

#[tokio::test]
async fn promote_and_rollback_under_load_fail_nothing_and_keep_running_streams() {
    let config = two_versions("[routes.demo]\nweights = { v1 = 100 }\n");
    let server = Arc::new(Server::spawn(&config, &[]));
    // A long stream starts on v1.
    let stream = {
        let server = server.clone();
        tokio::spawn(async move {
            let body = json!({
                "model": "demo", "stream": true, "max_tokens": 40, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPT}],
            });
            let resp = client()
                .post(server.url("/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let version = resp.headers()["x-kindling-model-version"]
                .to_str()
                .unwrap()
                .to_string();
            (version, sse_data(&resp.text().await.unwrap()))
        })
    };
    // Load from four clients throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (server, stop, served) = (server.clone(), stop.clone(), served.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let user = format!("load-{w}-{i}");
                    let (status, v, _, body) =
                        ask(&server, "demo", json!({"user": user, "max_tokens": 2}), &[]).await;
                    served[usize::from(v == "v2")].fetch_add(1, Ordering::SeqCst);
                    results.push((status, v, body));
                    i += 1;
                }
                results
            })
        })
        .collect();
    // Until the load has been served on each side of each switch.
    let until = |side: usize, more_than: usize| {
        let served = served.clone();
        async move {
            let start = Instant::now();
            while served[side].load(Ordering::SeqCst) <= more_than {
                assert!(start.elapsed() < Duration::from_secs(120));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until(0, 0).await;

    let (status, view) = send(
        &server,
        "POST",
        "/admin/routes/demo/promote",
        Some(json!({"version": "v2"})),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["weights"], json!({"v1": 0.0, "v2": 100.0}));
    // Effective for the very next request.
    assert_eq!(
        ask(&server, "demo", json!({"max_tokens": 1}), &[]).await.1,
        "v2"
    );
    until(1, 0).await;
    let (status, view) = send(&server, "POST", "/admin/routes/demo/rollback", None).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["weights"], json!({"v1": 100.0}));
    assert_eq!(
        ask(&server, "demo", json!({"max_tokens": 1}), &[]).await.1,
        "v1"
    );
    let on_v1 = served[0].load(Ordering::SeqCst);
    until(0, on_v1).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for task in load {
        for (status, v, body) in task.await.unwrap() {
            assert_eq!(status, 200, "no request fails across the switches: {body}");
            seen.insert(v);
            total += 1;
        }
    }
    assert!(total >= 3, "{total} requests");
    assert!(seen.contains("v1") && seen.contains("v2"), "{seen:?}");
    // The stream that started on v1 finished there, whole.
    let (version, events) = stream.await.unwrap();
    assert_eq!(version, "v1");
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["model"] == "demo@v1" && c.get("error").is_none()));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));

    // The history names who, what and when, and survives a restart.
    let (_, history) = send(&server, "GET", "/admin/routes/demo/history", None).await;
    let actions: Vec<&str> = history["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["promote", "rollback"]);
    assert_eq!(history["data"][0]["actor"], "anonymous");
    assert_eq!(history["data"][0]["from"]["weights"], json!({"v1": 100.0}));
    let (status, body) = send(&server, "POST", "/admin/routes/demo/rollback", None).await;
    assert_eq!(status, 409, "nothing left to roll back to: {body}");
    drop(Arc::try_unwrap(server).ok());
    let again = Server::spawn(&config, &[]);
    let (_, route) = send(&again, "GET", "/admin/routes/demo", None).await;
    assert_eq!(route["weights"], json!({"v1": 100.0}));
    assert_eq!(route["origin"], "admin");
    let (_, history) = send(&again, "GET", "/admin/routes/demo/history", None).await;
    assert_eq!(history["data"].as_array().unwrap().len(), 2);

    // Bad routes are refused with the field at fault.
    let (status, body) = send(
        &again,
        "PUT",
        "/admin/routes/demo",
        Some(json!({"weights": {"v1": 50, "v3": 50}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_of(&body)["message"]
        .as_str()
        .unwrap()
        .contains("no version `v3`"));
    let (status, body) = send(
        &again,
        "PUT",
        "/admin/routes/demo",
        Some(json!({"weights": {"v1": 50}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = send(&again, "GET", "/admin/routes/nothing", None).await;
    assert_eq!(status, 404);

    // The CLI wraps the same API.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kindling"))
            .arg("route")
            .args(args)
            .args(["--url", &again.base])
            .env_remove("KINDLING_API_KEY")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let shown = cli(&["set", "demo", "v1=70", "v2=30", "--shadow", "v1:5"]);
    assert!(
        shown.contains("v1=70 v2=30") && shown.contains("shadow v1 5%"),
        "{shown}"
    );
    let json: Value = serde_json::from_str(&cli(&["show", "demo", "--json"])).unwrap();
    assert_eq!(json["weights"], json!({"v1": 70.0, "v2": 30.0}));
    assert!(cli(&["history", "demo"])
        .lines()
        .last()
        .unwrap()
        .contains("set"));
    assert!(cli(&["list"]).starts_with("demo  v1=70 v2=30"));
}

#[tokio::test]
async fn shadow_traffic_reaches_the_shadow_version_without_changing_answers() {
    let config = two_versions(
        "[routes.demo]\nweights = { v1 = 100 }\nshadow = { version = \"v2\", percent = 100 }\n",
    );
    let server = Server::spawn(&config, &[]);
    let reference = ask(&server, "demo@v1", json!({}), &[]).await.3;
    let reference = &reference["choices"][0]["message"]["content"];
    for i in 0..6 {
        let (status, v, tokens, body) =
            ask(&server, "demo", json!({"user": format!("u{i}")}), &[]).await;
        assert_eq!((status, v.as_str(), tokens), (200, "v1", 3), "{body}");
        assert_eq!(&body["choices"][0]["message"]["content"], reference);
    }
    let series = "kindling_version_requests_total{model=\"demo\",version=\"v2\",traffic=\"shadow\",outcome=\"ok\"}";
    let start = Instant::now();
    while metric(&server, series).await < 6.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            metrics_text(&server).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, compare) = send(
        &server,
        "GET",
        "/admin/routes/demo/compare?window=10m",
        None,
    )
    .await;
    assert_eq!(compare["baseline"]["version"], "v1");
    // The reference request to `demo@v1` counts for v1 too.
    assert_eq!(compare["baseline"]["figures"]["requests"], 7);
    assert_eq!(compare["shadow"]["version"], "v2");
    assert_eq!(compare["shadow"]["figures"]["requests"], 6);
    assert!(compare["shadow"]["latency_p95_ratio"].as_f64().unwrap() > 0.0);
    // Mirrored copies are never billed or counted as served tokens.
    let text = metrics_text(&server).await;
    assert!(
        !text.contains("kindling_version_tokens_total{model=\"demo\",version=\"v2\""),
        "{text}"
    );
}

#[tokio::test]
async fn the_guard_rolls_a_failing_canary_back_by_itself() {
    let broken = demo_manifest(
        "demo",
        Some(Path::new("missing/nowhere.gguf")),
        "version = \"v2\"\n",
    );
    let config = versioned(
        "[routes.demo]\nweights = { v1 = 50, v2 = 50 }\nguard = { max_error_rate_increase = 0.2, min_requests = 3, window = \"5m\" }\n",
        &[("v1.toml", version("v1", 3)), ("v2.toml", broken)],
        "2s",
    );
    let server = Server::spawn(&config, &[]);
    let mut failed = 0;
    for i in 0..40 {
        let (status, v, _, body) = ask(
            &server,
            "demo",
            json!({"user": format!("g{i}"), "max_tokens": 1}),
            &[],
        )
        .await;
        match v.as_str() {
            "v1" => assert_eq!(status, 200, "{body}"),
            "v2" => {
                assert_eq!(status, 503, "{body}");
                failed += 1;
            }
            other => panic!("version {other}"),
        }
    }
    assert_eq!(
        failed, 3,
        "the guard trips on the third failure in its window"
    );
    let (_, route) = send(&server, "GET", "/admin/routes/demo", None).await;
    assert_eq!(route["weights"], json!({"v1": 100.0, "v2": 0.0}));
    let (_, history) = send(&server, "GET", "/admin/routes/demo/history", None).await;
    let last = history["data"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["actor"].as_str(), last["action"].as_str()),
        (Some("guard"), Some("guard_rollback"))
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("error rate 100.0%"),
        "{last}"
    );
    assert_eq!(
        metric(
            &server,
            "kindling_route_rollbacks_total{model=\"demo\",trigger=\"guard\"}"
        )
        .await,
        1.0
    );
    assert!(server.wait_for_log("guard tripped", Duration::from_secs(5)));
}

#[tokio::test]
async fn routes_need_the_admin_scope_and_usage_records_name_the_version() {
    let config = versioned(
        "[auth]\nkeys_file = \"keys.toml\"\n[usage]\npath = \"usage.sqlite\"\n[routes.demo]\nweights = { v1 = 50, v2 = 50 }\n",
        &[("v1.toml", version("v1", 3)), ("v2.toml", version("v2", 6))],
        "2s",
    );
    let app = create(&config, "app", &["--models", "demo"]);
    let ops = create(&config, "ops", &["--scope", "admin"]);
    let server = Server::spawn(&config, &[]);
    for path in [
        "/admin/routes",
        "/admin/routes/demo",
        "/admin/routes/demo/history",
    ] {
        let (status, _, body) = call(&server, "GET", path, Some(&app), None).await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, _, _) = call(
        &server,
        "POST",
        "/admin/routes/demo/promote",
        Some(&app),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = call(&server, "POST", "/admin/reload", Some(&app), None).await;
    assert_eq!(status, 403);
    // A key scoped to the id may use every version of it.
    let mut by_version = std::collections::BTreeMap::new();
    for i in 0..12 {
        let body = json!({"model": "demo", "user": format!("u{i}"), "max_tokens": 1,
            "messages": [{"role": "user", "content": PROMPT}]});
        let (status, headers, body) = call(
            &server,
            "POST",
            "/v1/chat/completions",
            Some(&app),
            Some(body),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let v = headers["x-kindling-model-version"]
            .to_str()
            .unwrap()
            .to_string();
        *by_version.entry(v).or_insert(0u64) += 1;
    }
    let body = json!({"model": "demo@v2", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]});
    let (status, _, _) = call(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&app),
        Some(body),
    )
    .await;
    assert_eq!(status, 200);
    *by_version.entry("v2".to_string()).or_insert(0) += 1;
    // The admin key sees the records grouped by version.
    let (status, _, usage) = call(
        &server,
        "GET",
        "/admin/usage?group_by=model,version",
        Some(&ops),
        None,
    )
    .await;
    assert_eq!(status, 200, "{usage}");
    let rows: std::collections::BTreeMap<String, u64> = usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["model"], "demo");
            (
                r["version"].as_str().unwrap().to_string(),
                r["requests"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, by_version);
    let (status, _, route) = call(&server, "GET", "/admin/routes/demo", Some(&ops), None).await;
    assert_eq!((status, route["origin"].as_str()), (200, Some("config")));
}

#[tokio::test]
async fn a_version_without_traffic_is_evicted_like_any_idle_model() {
    // Room for one instance of the demo model, not two.
    let small = |v: &str| {
        demo_manifest(
            "demo",
            None,
            &format!("version = \"{v}\"\ncontext_length = 1024\nkv_cache_tokens = 2048\n"),
        )
    };
    let config = versioned(
        "[devices.cpu]\nbudget = \"350MiB\"\n[routes.demo]\nweights = { v1 = 100 }\n",
        &[("v1.toml", small("v1")), ("v2.toml", small("v2"))],
        "2s",
    );
    let server = Server::spawn(&config, &[]);
    assert_eq!(
        ask(&server, "demo", json!({"max_tokens": 1}), &[]).await.1,
        "v1"
    );
    assert_eq!(model_state(&server, "demo@v1").await["state"], "warm");
    let (status, _) = send(
        &server,
        "PUT",
        "/admin/routes/demo",
        Some(json!({"weights": {"v1": 0, "v2": 100}})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, v, _, body) = ask(&server, "demo", json!({"max_tokens": 1}), &[]).await;
    assert_eq!((status, v.as_str()), (200, "v2"), "{body}");
    assert_eq!(model_state(&server, "demo@v1").await["state"], "cold");
    let series = "kindling_model_evictions_total{model=\"demo@v1\",reason=\"memory_pressure\"}";
    assert_eq!(metric(&server, series).await, 1.0);
    // The id shows the state of the version with the largest share.
    assert_eq!(model_state(&server, "demo").await["state"], "warm");
}
