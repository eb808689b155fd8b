//! Weights from a Hugging Face repository, against a local stand-in that
//! serves the Hub's file routes (`/{repo}/resolve/{revision}/{file}` with
//! ranges, commit and etag headers) with the demo GGUF. No test needs the
//! real Hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::json;
use sha2::{Digest, Sha256};

const GOOD: u8 = 0;
/// Range requests break off halfway through their body.
const CUT: u8 = 1;
/// The first range request pauses after its first MiB.
const SLOW: u8 = 2;

#[derive(Clone)]
struct StandIn {
    data: Arc<Bytes>,
    sha256: String,
    mode: Arc<AtomicU8>,
    body_requests: Arc<AtomicUsize>,
}

async fn resolve(
    State(hub): State<StandIn>,
    UrlPath((_org, _name, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if file != "model.gguf" {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    }
    let len = hub.data.len();
    let (start, end) = headers
        .get("range")
        .and_then(|r| {
            r.to_str()
                .ok()?
                .strip_prefix("bytes=")?
                .split_once('-')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .map_or((0, len - 1), |(a, b)| {
            (a.parse().unwrap(), b.parse::<usize>().unwrap().min(len - 1))
        });
    let slice = hub.data.slice(start..=end);
    let mode = hub.mode.load(Ordering::SeqCst);
    let body = if slice.len() <= 1 {
        Body::from(slice)
    } else {
        hub.body_requests.fetch_add(1, Ordering::SeqCst);
        let half = slice.len() / 2;
        let stream = async_stream::stream! {
            match mode {
                CUT => {
                    yield Ok::<_, std::io::Error>(slice.slice(..half));
                    yield Err(std::io::Error::other("connection lost"));
                }
                SLOW if start == 0 => {
                    yield Ok(slice.slice(..1 << 20));
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    yield Ok(slice.slice(1 << 20..));
                }
                _ => yield Ok(slice),
            }
        };
        Body::from_stream(stream)
    };
    let etag = format!("\"{}\"", hub.sha256);
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", "0123456789abcdef0123456789abcdef01234567")
        .header("x-linked-etag", &etag)
        .header("etag", &etag)
        .header("content-range", format!("bytes {start}-{end}/{len}"))
        .header("content-length", end + 1 - start)
        .body(body)
        .unwrap()
}

async fn stand_in() -> (StandIn, String) {
    let data = std::fs::read(store().join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let sha256 = format!("{:x}", Sha256::digest(&data));
    let hub = StandIn {
        data: Arc::new(Bytes::from(data)),
        sha256,
        mode: Arc::default(),
        body_requests: Arc::default(),
    };
    let app = axum::Router::new()
        .route(
            "/{org}/{name}/resolve/{rev}/{*file}",
            axum::routing::get(resolve),
        )
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hub, url)
}

/// A config whose only model comes from the stand-in, with its own store.
fn hub_config(url: &str, sha256: Option<&str>) -> (PathBuf, PathBuf) {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("models")).unwrap();
    std::fs::create_dir_all(dir.join("store")).unwrap();
    let sum = sha256.map_or(String::new(), |s| {
        format!("sha256 = {{ \"model.gguf\" = \"{s}\" }}\n")
    });
    let manifest = format!(
        "id = \"hubby\"\nkind = \"chat\"\nformat = \"gguf\"\narchitecture = \"llama\"\n[weights]\nrepo = \"test-org/smol\"\nfiles = [\"model.gguf\"]\n{sum}"
    );
    std::fs::write(dir.join("models/hubby.toml"), manifest).unwrap();
    let config = dir.join("kindling.toml");
    std::fs::write(
        &config,
        format!("[hub]\nendpoint = \"{url}\"\n[lifecycle]\nretry_backoff = \"1s\"\n[models]\nmanifests = \"models\"\nstore = \"store\"\n"),
    )
    .unwrap();
    (config, dir.join("store"))
}

/// Weight files that a load would trust: those under a snapshot.
fn snapshot_files(store: &Path) -> Vec<PathBuf> {
    let snaps = store.join("hub/models--test-org--smol/snapshots");
    let Ok(commits) = std::fs::read_dir(snaps) else {
        return Vec::new();
    };
    commits
        .filter_map(|c| Some(c.ok()?.path().join("model.gguf")))
        .filter(|p| p.exists())
        .collect()
}

#[tokio::test]
async fn hub_weights_download_on_first_load_and_never_half() {
    let (hub, url) = stand_in().await;
    let (config, store) = hub_config(&url, None);
    let server = Server::spawn(&config, &[]);
    // An interrupted download fails the load and leaves nothing trusted.
    hub.mode.store(CUT, Ordering::SeqCst);
    let (status, _, body) = post(&server, "/v1/chat/completions", &chat("hubby", json!({}))).await;
    assert_eq!(status, 503, "{body}");
    let e = error_of(&body);
    assert_eq!(e["code"], "model_load_failed");
    assert!(
        e["message"].as_str().unwrap().contains("downloading"),
        "{e}"
    );
    assert!(snapshot_files(&store).is_empty());
    // After the backoff, the next request downloads it; progress shows.
    hub.mode.store(SLOW, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let body = chat("hubby", json!({}));
    let request = post(&server, "/v1/chat/completions", &body);
    let watch = async {
        // The size is known once the Hub has answered the first range request.
        let start = std::time::Instant::now();
        loop {
            let m = model_state(&server, "hubby").await;
            let total = m["download"]["total_bytes"].as_u64().unwrap_or(0);
            if m["state"] == "downloading" && total > 0 {
                assert_eq!(total, hub.data.len() as u64, "{m}");
                assert!(
                    m["download"]["done_bytes"].as_u64().unwrap() <= total,
                    "{m}"
                );
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "never saw the download: {m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let ((status, headers, body), ()) = tokio::join!(request, watch);
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-kindling-cold-start"], "true");
    let files = snapshot_files(&store);
    assert_eq!(files.len(), 1);
    assert_eq!(
        format!("{:x}", Sha256::digest(std::fs::read(&files[0]).unwrap())),
        hub.sha256
    );
    assert!(server.logs().contains("download progress"));
    // A later load uses the store: no new download.
    hub.mode.store(GOOD, Ordering::SeqCst);
    let before = hub.body_requests.load(Ordering::SeqCst);
    let restarted = Server::spawn(&config, &[]);
    let (status, _, _) = post(
        &restarted,
        "/v1/chat/completions",
        &chat("hubby", json!({})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(hub.body_requests.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn a_checksum_mismatch_removes_the_file() {
    let (_hub, url) = stand_in().await;
    let (config, store) = hub_config(&url, Some(&"0".repeat(64)));
    let server = Server::spawn(&config, &[]);
    let (status, _, body) = post(&server, "/v1/chat/completions", &chat("hubby", json!({}))).await;
    assert_eq!(status, 503);
    assert!(
        error_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{body}"
    );
    assert!(snapshot_files(&store).is_empty());
}

#[tokio::test]
async fn kindling_pull_downloads_ahead_of_time() {
    let (hub, url) = stand_in().await;
    let (config, store) = hub_config(&url, Some(&hub.sha256));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kindling"))
            .args(["pull", "--config"])
            .arg(&config)
            .arg("hubby")
            .env_remove("KINDLING_STORE")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("hubby: ") && l.ends_with("model.gguf")),
        "{stdout}"
    );
    assert_eq!(snapshot_files(&store).len(), 1);
}
