//! The daemon as a process: start-up, health, the model list, lazy loading,
//! configuration errors, PORT, back-pressure, disconnects and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

async fn get(server: &Server, path: &str) -> (u16, Value) {
    let resp = client().get(server.url(path)).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn long_completion(max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true, "stream": stream, "seed": 1})
}

#[tokio::test]
async fn starts_without_loading_and_loads_on_first_request() {
    let server = Server::start();
    assert_eq!(get(&server, "/health/live").await.0, 200);
    assert_eq!(get(&server, "/health/ready").await.0, 200);
    assert_eq!(get(&server, "/v2/health/ready").await.0, 200);
    let (status, list) = get(&server, "/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    let data = list["data"].as_array().unwrap();
    assert!(data.iter().all(|m| m["loaded"] == false), "{list}");
    let m = data.iter().find(|m| m["id"] == MODEL).unwrap();
    assert_eq!(
        (
            m["id"].as_str(),
            m["object"].as_str(),
            m["loaded"].as_bool()
        ),
        (Some(MODEL), Some("model"), Some(false))
    );
    assert!(m["created"].as_u64().is_some() && m["owned_by"].is_string());
    assert!(!server.logs().contains("model loaded"));

    let (status, _, _) = post(
        &server,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let (_, one) = get(&server, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(one["id"], MODEL);
    assert_eq!(one["loaded"], true);
}

#[tokio::test]
async fn concurrent_first_requests_share_one_load() {
    let server = Server::start();
    let body = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2});
    let results =
        futures::future::join_all((0..4).map(|_| post(&server, "/v1/completions", &body))).await;
    assert!(results.iter().all(|(s, _, _)| *s == 200));
    assert_eq!(
        server.logs().matches("model loaded").count(),
        1,
        "{}",
        server.logs()
    );
}

#[test]
fn help_documents_every_command_and_option() {
    let bin = env!("CARGO_BIN_EXE_kindling");
    let top = Command::new(bin).arg("--help").output().unwrap();
    let top = String::from_utf8(top.stdout).unwrap();
    for word in ["serve", "models", "--version"] {
        assert!(top.contains(word), "{top}");
    }
    let serve = Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let serve = String::from_utf8(serve.stdout).unwrap();
    for word in [
        "--config",
        "--listen",
        "PORT",
        "RUST_LOG",
        "SIGTERM",
        "127.0.0.1:8080",
    ] {
        assert!(serve.contains(word), "{serve}");
    }
}

#[test]
fn bad_config_fails_at_start_naming_file_and_field() {
    let bin = env!("CARGO_BIN_EXE_kindling");
    let run = |config: &std::path::Path| {
        let out = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    let missing = temp_dir().join("absent.toml");
    assert!(run(&missing).contains("absent.toml"));
    let cfg = write_config("[server]\nshutdown_timeout = \"soon\"\n");
    let err = run(&cfg);
    assert!(
        err.contains("kindling.toml") && err.contains("shutdown_timeout") && err.contains("30s"),
        "{err}"
    );
    let cfg = write_config("[server]\nlisten_addr = \"x\"\n");
    let err = run(&cfg);
    assert!(
        err.contains("listen_addr") && err.contains("unknown field"),
        "{err}"
    );
    let dir = temp_dir();
    std::fs::write(dir.join("bad.toml"), "id = \"x\"\nkind = \"chat\"\nformat = \"onnx\"\narchitecture = \"llama\"\n[weights]\npath = \"a\"\n").unwrap();
    let cfg = dir.join("kindling.toml");
    std::fs::write(
        &cfg,
        format!("[models]\nmanifests = {:?}\nstore = {:?}\n", dir, store()),
    )
    .unwrap();
    let err = run(&cfg);
    assert!(
        err.contains("bad.toml") && err.contains("format") && err.contains("gguf"),
        "{err}"
    );
}

#[tokio::test]
async fn port_variable_is_honoured() {
    // Listening on every interface needs a key.
    let server = Server::spawn(
        &repo().join("configs/kindling.toml"),
        &[("PORT", "0"), ("KINDLING_API_KEY", "k")],
    );
    assert!(
        server.logs().contains("listening on http://0.0.0.0:"),
        "{}",
        server.logs()
    );
    assert_eq!(get(&server, "/health/live").await.0, 200);
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let server = Server::with_config("[engine]\nqueue_size = 1\nmax_sequences = 1\n");
    // One request runs (the batch holds one sequence), one waits in the
    // queue; the third has no room. When the first client leaves, its
    // place goes to the waiting request.
    let mut running = client()
        .post(server.url("/v1/completions"))
        .json(&long_completion(400, true))
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    // The model was cold: the stream's headers came at once; wait for the
    // first token so that the request really holds the worker.
    let mut seen = Vec::new();
    while !seen.windows(5).any(|w| w == b"data:") {
        seen.extend(running.chunk().await.unwrap().unwrap());
    }
    let waiting = {
        let url = server.url("/v1/completions");
        tokio::spawn(async move {
            client()
                .post(url)
                .json(&long_completion(2, false))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, headers, b) = post(&server, "/v1/completions", &long_completion(2, false)).await;
    assert_eq!(status, 429, "{b}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(error_of(&b)["code"], "rate_limit_exceeded");
    drop(running);
    assert_eq!(waiting.await.unwrap(), 200);
}

#[tokio::test]
async fn many_prompts_take_one_queue_slot() {
    let server = Server::with_config("[engine]\nqueue_size = 1\n");
    let prompts: Vec<String> = (0..6).map(|i| format!("Fact number {i}:")).collect();
    let body = json!({"model": MODEL, "prompt": prompts, "max_tokens": 2, "ignore_eos": true});
    let (status, _, b) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["choices"].as_array().unwrap().len(), 6);
    assert_eq!(b["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn client_disconnect_stops_generation() {
    use tokio::io::AsyncReadExt;

    let server = Server::start();
    let mut socket = raw_post(&server, "/v1/completions", &long_completion(4000, true)).await;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while received.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    drop(socket);
    assert!(
        server.wait_for_log(
            "generation cancelled: the client went away",
            Duration::from_secs(10)
        ),
        "generation went on after the client left:\n{}",
        server.logs()
    );
    assert!(server.wait_for_log("stream ended", Duration::from_secs(5)));
    // The worker is free again: a new request is served at once.
    let (status, _, _) = post(&server, "/v1/completions", &long_completion(2, false)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut server = Server::start();
    let resp = client()
        .post(server.url("/v1/completions"))
        .json(&long_completion(60, true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    server.sigterm();
    assert!(server.wait_for_log("shutting down", Duration::from_secs(5)));
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "in-flight stream was cut: {text}"
    );
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("did not exit");
    assert!(status.success(), "exit status {status}");
    // New connections are refused once it is gone.
    assert!(client()
        .get(server.url("/health/live"))
        .send()
        .await
        .is_err());
}
