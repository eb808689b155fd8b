//! `/v1/embeddings` over HTTP against the real daemon and the demo model:
//! the OpenAI shape in every input form, base64, errors with the right
//! parameter, dynamic batching that changes no result, fairness between a
//! large request and small ones, deadlines and cancellation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use futures::future::join_all;
use serde_json::{json, Value};

const EMBED: &str = "all-minilm-l6-v2";

fn vector(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a float array")
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

async fn embed(server: &Server, body: Value) -> (u16, Value) {
    let (status, _, b) = post(server, "/v1/embeddings", &body).await;
    (status, b)
}

async fn one(server: &Server, input: Value) -> Vec<f32> {
    let (status, b) = embed(server, json!({"model": EMBED, "input": input})).await;
    assert_eq!(status, 200, "{b}");
    vector(&b["data"][0]["embedding"])
}

fn reference() -> Vec<(String, Vec<u32>, Vec<f32>)> {
    let text =
        std::fs::read_to_string(repo().join("models/tests/data/minilm_reference.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            (
                c["text"].as_str().unwrap().to_string(),
                ids,
                vector(&c["embedding"]),
            )
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[tokio::test]
async fn every_input_form_and_encoding() {
    let server = Server::start();
    let cases = reference();
    let texts: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let (status, b) = embed(&server, json!({"model": EMBED, "input": texts})).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["object"], "list");
    assert_eq!(b["model"], EMBED);
    let data = b["data"].as_array().unwrap();
    assert_eq!(data.len(), cases.len());
    let tokens: usize = cases.iter().map(|c| c.1.len()).sum();
    assert_eq!(b["usage"]["prompt_tokens"], tokens);
    assert_eq!(b["usage"]["total_tokens"], tokens);
    for (i, (d, case)) in data.iter().zip(&cases).enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let v = vector(&d["embedding"]);
        assert!(cosine(&v, &case.2) >= 0.9999, "{:?}", case.0);
    }
    let first = vector(&data[1]["embedding"]);
    // A single string, token ids, and a list of token-id lists: the same vector.
    assert_eq!(one(&server, json!(cases[1].0)).await, first);
    assert_eq!(one(&server, json!(cases[1].1)).await, first);
    assert_eq!(one(&server, json!([cases[1].1, cases[2].1])).await, first);
    // base64: little-endian f32, the same values.
    let (status, b) = embed(
        &server,
        json!({"model": EMBED, "input": cases[1].0, "encoding_format": "base64", "dimensions": 384}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, first);
    let listed = get_json(&server, &format!("/v1/models/{EMBED}")).await;
    assert_eq!(listed["kind"], "embedding");
}

#[tokio::test]
async fn bad_requests_name_the_parameter() {
    let server = Server::start();
    let long_ids: Vec<u32> = std::iter::once(101)
        .chain(std::iter::repeat_n(2000, 300))
        .collect();
    let many: Vec<&str> = vec!["x"; 2049];
    let cases = [
        (json!({"model": EMBED, "input": []}), 400, "input"),
        (json!({"model": EMBED, "input": ""}), 400, "input"),
        (json!({"model": EMBED, "input": ["ok", ""]}), 400, "input"),
        (json!({"model": EMBED, "input": many}), 400, "input"),
        (json!({"model": EMBED, "input": [1, "a"]}), 400, "input"),
        (json!({"model": EMBED, "input": [-1, 5]}), 400, "input"),
        (json!({"model": EMBED, "input": 5}), 400, "input"),
        (
            json!({"model": EMBED, "input": [[101, 30522]]}),
            400,
            "input",
        ),
        (json!({"model": EMBED, "input": [long_ids]}), 400, "input"),
        (
            json!({"model": EMBED, "input": "word ".repeat(400), "truncate": false}),
            400,
            "input",
        ),
        (
            json!({"model": EMBED, "input": "hi", "encoding_format": "int8"}),
            400,
            "encoding_format",
        ),
        (
            json!({"model": EMBED, "input": "hi", "dimensions": 128}),
            400,
            "dimensions",
        ),
        (
            json!({"model": EMBED, "input": "hi", "dimensions": 0}),
            400,
            "dimensions",
        ),
        (
            json!({"model": EMBED, "input": "hi", "timeout": -1}),
            400,
            "timeout",
        ),
        (json!({"model": MODEL, "input": "hi"}), 400, "model"),
        (json!({"model": "nope", "input": "hi"}), 404, "model"),
    ];
    for (body, status, param) in cases {
        let (got, b) = embed(&server, body.clone()).await;
        assert_eq!(got, status, "{body}: {b}");
        assert_eq!(b["error"]["param"], param, "{body}: {b}");
        assert!(b["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Chat on an embedding model is refused too.
    let (status, _, b) = post(&server, "/v1/chat/completions", &chat(EMBED, json!({}))).await;
    assert_eq!(status, 400, "{b}");
    // A long text is cut at 256 tokens by default.
    let (status, b) = embed(
        &server,
        json!({"model": EMBED, "input": "word ".repeat(400)}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["usage"]["prompt_tokens"], 256);
}

/// Sentences of varied lengths for the batching tests.
fn sentence(i: usize) -> String {
    let words = [
        "serving", "models", "on", "a", "small", "cpu", "is", "honest", "work", "today",
    ];
    (0..(3 + i * 7 % 40))
        .map(|j| words[(i + j * 3) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn concurrent_requests_are_batched_and_each_equals_its_solo_result() {
    let server = Server::start();
    let count = 40;
    let mut solo = Vec::new();
    for i in 0..count {
        solo.push(one(&server, json!(sentence(i))).await);
    }
    let steps_before = metric(
        &server,
        &format!("kindling_batch_steps{{model=\"{EMBED}\"}}"),
    )
    .await;
    let big: Vec<String> = (0..count).map(sentence).collect();
    let singles = (0..count).map(|i| {
        let server = &server;
        async move { one(server, json!(sentence(i))).await }
    });
    let big_request = embed(&server, json!({"model": EMBED, "input": big}));
    let (together, (status, b)) = tokio::join!(join_all(singles), big_request);
    assert_eq!(status, 200, "{b}");
    for (i, v) in together.iter().enumerate() {
        assert_eq!(v, &solo[i], "request {i} differs from its solo result");
        assert_eq!(
            vector(&b["data"][i]["embedding"]),
            solo[i],
            "input {i} of the big request"
        );
    }
    let steps = metric(
        &server,
        &format!("kindling_batch_steps{{model=\"{EMBED}\"}}"),
    )
    .await
        - steps_before;
    // 41 requests and 80 inputs took far fewer passes than requests.
    assert!(
        (1.0..20.0).contains(&steps),
        "{steps} passes for {} requests",
        count + 1
    );
}

#[tokio::test]
async fn a_large_request_does_not_starve_small_ones() {
    let server = Server::start();
    one(&server, json!("warm up")).await;
    // ~2000 inputs of ~100 tokens: many passes.
    let big: Vec<String> = (0..2000)
        .map(|i| format!("{} {}", sentence(i), sentence(i + 1).repeat(3)))
        .collect();
    let started = Instant::now();
    let big_done = async {
        let (status, b) = embed(&server, json!({"model": EMBED, "input": big})).await;
        assert_eq!(status, 200, "{b}");
        started.elapsed()
    };
    let small_done = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        one(&server, json!("a small request")).await;
        (started.elapsed(), t.elapsed())
    };
    let (big_at, (small_at, small_took)) = tokio::join!(big_done, small_done);
    assert!(
        small_at < big_at / 2,
        "the small request finished at {small_at:?} (took {small_took:?}), the big one at {big_at:?}"
    );
}

#[tokio::test]
async fn deadlines_and_cancellation() {
    let server = Server::start();
    one(&server, json!("warm up")).await;
    let big: Vec<String> = (0..2000).map(|i| sentence(i).repeat(4)).collect();
    let (status, b) = embed(
        &server,
        json!({"model": EMBED, "input": big, "timeout": 0.2}),
    )
    .await;
    assert_eq!(status, 504, "{b}");
    assert_eq!(b["error"]["param"], "timeout");
    // A client that goes away: its request is dropped at the next batch.
    let body = json!({"model": EMBED, "input": (0..2000).map(sentence).collect::<Vec<_>>()});
    let stream = raw_post(&server, "/v1/embeddings", &body).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stream);
    assert!(
        server.wait_for_log("embedding request cancelled", Duration::from_secs(30)),
        "{}",
        server.logs()
    );
    // The model still serves.
    assert_eq!(one(&server, json!("still here")).await.len(), 384);
}

#[tokio::test]
async fn declared_shorter_dimensions_are_cut_and_renormalized() {
    let manifest = std::fs::read_to_string(repo().join("configs/models/all-minilm-l6-v2.toml"))
        .unwrap()
        .replace("[weights]", "dimensions = [128, 64]\n[weights]");
    let config = config_with_manifests("", &[("embed.toml", &manifest)]);
    let server = Server::spawn(&config, &[]);
    let full = one(&server, json!("The quick brown fox")).await;
    for d in [128usize, 64] {
        let (status, b) = embed(
            &server,
            json!({"model": EMBED, "input": "The quick brown fox", "dimensions": d}),
        )
        .await;
        assert_eq!(status, 200, "{b}");
        let short = vector(&b["data"][0]["embedding"]);
        assert_eq!(short.len(), d);
        let norm: f32 = full[..d].iter().map(|x| x * x).sum::<f32>().sqrt();
        for (s, f) in short.iter().zip(&full[..d]) {
            assert!((s - f / norm).abs() < 1e-6, "{s} vs {}", f / norm);
        }
    }
    // Widths the manifest does not list are still refused.
    let (status, b) = embed(
        &server,
        json!({"model": EMBED, "input": "x", "dimensions": 100}),
    )
    .await;
    assert_eq!(status, 400, "{b}");
    assert_eq!(b["error"]["param"], "dimensions");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("[128, 64]"),
        "{b}"
    );
}
