//! Hot reload of model manifests while requests run: a manifest added,
//! edited (serving settings, then what a load makes), broken and removed
//! takes effect without a restart, through file watching, SIGHUP and
//! `POST /admin/reload`; requests to the models that stay never fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn setup(watch: &str, manifests: &[(&str, String)]) -> (PathBuf, PathBuf) {
    let files: Vec<(&str, &str)> = manifests.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let models = format!("routes_state = \"routes.json\"\nwatch_interval = \"{watch}\"");
    let config = config_with_models("", &files, &models);
    let dir = config.parent().unwrap().join("models");
    (config, dir)
}

fn manifest(id: &str, max_tokens: u32, extra: &str) -> String {
    demo_manifest(
        id,
        None,
        &format!("{extra}\n[defaults]\nmax_tokens = {max_tokens}\n"),
    )
}

async fn tokens(server: &Server, model: &str) -> (u16, u64) {
    let body = json!({
        "model": model, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    });
    let (status, _, body) = post(server, "/v1/chat/completions", &body).await;
    (
        status,
        body["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    )
}

async fn ids(server: &Server) -> Vec<String> {
    get_json(server, "/v1/models").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// Polls `check` until it holds, or panics after a minute.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(60), "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn reload(server: &Server) -> Value {
    let resp = client()
        .post(server.url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn manifests_added_edited_broken_and_removed_while_requests_run() {
    let (config, models) = setup("200ms", &[("alpha.toml", manifest("alpha", 3, ""))]);
    let server = Arc::new(Server::spawn(&config, &[]));
    // Requests to alpha run throughout; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                statuses.push(tokens(&server, "alpha").await.0);
            }
            statuses
        })
    };
    assert_eq!(tokens(&server, "alpha").await, (200, 3));

    // Added: a new id appears, picked up by the folder watch.
    std::fs::write(models.join("beta.toml"), manifest("beta", 4, "")).unwrap();
    eventually("beta listed", || async {
        ids(&server).await.contains(&"beta".to_string())
    })
    .await;
    assert_eq!(tokens(&server, "beta").await, (200, 4));

    // Edited serving settings apply to the next request, no reload.
    std::fs::write(models.join("alpha.toml"), manifest("alpha", 5, "")).unwrap();
    eventually("alpha answers with 5 tokens", || async {
        tokens(&server, "alpha").await == (200, 5)
    })
    .await;
    // An edit to what a load makes drains the loaded instance and loads anew.
    std::fs::write(
        models.join("alpha.toml"),
        manifest("alpha", 5, "context_length = 1024"),
    )
    .unwrap();
    let series = "kindling_model_evictions_total{model=\"alpha\",reason=\"reload\"}";
    eventually("alpha reloaded", || async {
        metric(&server, series).await >= 1.0
    })
    .await;
    assert_eq!(tokens(&server, "alpha").await, (200, 5));

    // Broken: refused with the reason; the previous manifest keeps serving.
    std::fs::write(models.join("alpha.toml"), "id = \"alpha\"\nkind = \"chat\n").unwrap();
    let report = reload(&server).await;
    let refused = report["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{report}");
    assert!(refused[0]["file"].as_str().unwrap().ends_with("alpha.toml"));
    assert_eq!(refused[0]["kept"], "alpha");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("invalid manifest"),
        "{report}"
    );
    assert_eq!(tokens(&server, "alpha").await, (200, 5));
    assert!(server.wait_for_log("manifest refused", Duration::from_secs(5)));
    // A newcomer that clashes with a served name is refused; the old stays.
    std::fs::write(models.join("beta-copy.toml"), manifest("beta", 9, "")).unwrap();
    let report = reload(&server).await;
    assert!(
        report["refused"].to_string().contains("already declared"),
        "{report}"
    );
    std::fs::remove_file(models.join("beta-copy.toml")).unwrap();
    assert_eq!(tokens(&server, "beta").await, (200, 4));
    // An edit that takes a name another file serves is refused too, whatever
    // the files' order; both keep serving what they did.
    std::fs::write(models.join("alpha.toml"), manifest("beta", 9, "")).unwrap();
    let report = reload(&server).await;
    let refused = report["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{report}");
    assert!(
        refused[0]["file"].as_str().unwrap().ends_with("alpha.toml"),
        "{report}"
    );
    assert_eq!(refused[0]["kept"], "alpha");
    assert_eq!(tokens(&server, "beta").await, (200, 4));
    assert_eq!(tokens(&server, "alpha").await, (200, 5));
    std::fs::write(models.join("alpha.toml"), manifest("alpha", 5, "")).unwrap();

    // Removed while a stream on it runs: the stream ends whole, then beta
    // is gone and unloaded.
    let stream = {
        let server = server.clone();
        tokio::spawn(async move {
            let body = json!({
                "model": "beta", "stream": true, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            });
            post_stream(&server, "/v1/chat/completions", &body).await
        })
    };
    eventually("beta busy", || async {
        model_state(&server, "beta").await["requests_in_flight"] == 1
    })
    .await;
    std::fs::remove_file(models.join("beta.toml")).unwrap();
    let report = reload(&server).await;
    assert_eq!(report["removed"], json!(["beta"]), "{report}");
    let (status, _) = tokens(&server, "beta").await;
    assert_eq!(status, 404, "a removed model takes no new requests");
    let events = stream.await.unwrap();
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{events:?}");
    let series = "kindling_model_evictions_total{model=\"beta\",reason=\"removed\"}";
    assert_eq!(metric(&server, series).await, 1.0);
    eventually("beta unloaded", || async {
        !get_json(&server, "/admin/status")
            .await
            .to_string()
            .contains("\"beta\"")
    })
    .await;
    assert!(!ids(&server).await.contains(&"beta".to_string()));

    // Fixed again: the good manifest takes over from the kept one.
    std::fs::write(models.join("alpha.toml"), manifest("alpha", 2, "")).unwrap();
    eventually("alpha fixed", || async {
        tokens(&server, "alpha").await == (200, 2)
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    let statuses = load.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

#[tokio::test]
async fn sighup_reloads_when_watching_is_off_and_versions_join_routes() {
    let version = |v: &str| manifest("demo", 3, &format!("version = \"{v}\""));
    let (config, models) = setup("0", &[("v1.toml", version("v1"))]);
    let server = Server::spawn(&config, &[]);
    assert_eq!(ids(&server).await, ["demo", "demo@v1"]);
    std::fs::write(models.join("v2.toml"), version("v2")).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        ids(&server).await.len(),
        2,
        "no watching: nothing changes by itself"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("demo@v2 listed", || async {
        ids(&server).await.contains(&"demo@v2".to_string())
    })
    .await;
    // With no route, the newest version takes the traffic.
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .json(&chat("demo", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-kindling-model-version"], "v2");
    // A version without a version, next to versioned ones, is refused.
    std::fs::write(models.join("plain.toml"), manifest("demo", 3, "")).unwrap();
    let report = reload(&server).await;
    assert!(
        report["refused"].to_string().contains("version"),
        "{report}"
    );
}
