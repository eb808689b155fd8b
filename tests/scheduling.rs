//! Continuous batching over HTTP: many concurrent streams, each producing
//! exactly what it produces alone; preemption when the KV cache runs out;
//! `n > 1` as parallel sequences; deadlines; batch metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};

const PROMPTS: [&str; 8] = [
    "The history of the lighthouse",
    "Ten facts about volcanoes: 1.",
    "def quicksort(items):",
    "Dear diary, today I",
    "The recipe calls for two cups of",
    "In 1969, the first people to walk on the Moon",
    "A haiku about winter:",
    "The three laws of motion are",
];

fn completion(prompt: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true, "stream": stream})
}

/// The text of a streamed completion, and how many content chunks it had.
async fn streamed_text(server: &Server, body: &Value) -> (String, usize) {
    let mut text = String::new();
    let mut chunks = 0;
    for data in post_stream(server, "/v1/completions", body).await {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if let Some(t) = v["choices"][0]["text"].as_str() {
            if !t.is_empty() {
                chunks += 1;
            }
            text.push_str(t);
        }
    }
    (text, chunks)
}

async fn solo_text(server: &Server, prompt: &str, max_tokens: usize) -> String {
    let (status, _, b) = post(
        server,
        "/v1/completions",
        &completion(prompt, max_tokens, false),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    b["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn thirty_two_concurrent_streams_each_match_their_solo_run() {
    let server = Server::start();
    let mut solo = Vec::new();
    for p in PROMPTS {
        solo.push(solo_text(&server, p, 12).await);
    }
    let runs = (0..32).map(|i| {
        let body = completion(PROMPTS[i % PROMPTS.len()], 12, true);
        let server = &server;
        async move { streamed_text(server, &body).await }
    });
    let results = join_all(runs).await;
    for (i, (text, _)) in results.iter().enumerate() {
        assert_eq!(text, &solo[i % PROMPTS.len()], "stream {i}");
    }
    // They ran together: the scheduler's batches held several sequences.
    let logs = server.logs();
    assert!(!logs.contains("ERROR"), "{logs}");
}

#[tokio::test]
async fn sequences_preempted_for_kv_space_continue_exactly() {
    // 16 blocks of 16 positions: four 100-token generations cannot all fit,
    // so the newest are preempted and recomputed as others finish.
    let m = demo_manifest(MODEL, None, "context_length = 256\nkv_cache_tokens = 256");
    let server = Server::spawn(
        &config_with_manifests("", &[("m.toml", &m)]),
        &[("RUST_LOG", "kindling=debug")],
    );
    let prompts = &PROMPTS[..4];
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(solo_text(&server, p, 100).await);
    }
    let runs = prompts.iter().map(|p| {
        let body = completion(p, 100, true);
        let server = &server;
        async move { streamed_text(server, &body).await.0 }
    });
    let results = join_all(runs).await;
    assert_eq!(results, solo);
    assert!(
        server.logs().contains("sequence preempted"),
        "no preemption happened"
    );
}

#[tokio::test]
async fn n_choices_run_as_parallel_sequences_sharing_the_prompt() {
    let server = Server::start();
    let body = json!({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 10, "n": 3,
                      "temperature": 0.9, "seed": 40, "ignore_eos": true});
    let (status, _, b) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{b}");
    assert!(b["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // Choice i samples with seed + i: the same as three separate requests.
    for i in 0..3 {
        let one = json!({"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 10,
                         "temperature": 0.9, "seed": 40 + i, "ignore_eos": true});
        let (_, _, single) = post(&server, "/v1/completions", &one).await;
        assert_eq!(
            b["choices"][i as usize]["text"], single["choices"][0]["text"],
            "choice {i}"
        );
    }
}

#[tokio::test]
async fn deadlines_fail_the_request_and_free_its_place() {
    let server = Server::with_config("[engine]\nmax_sequences = 1\nmax_batch_tokens = 64\n");
    // Loaded first, so the two requests below do not race out of one load.
    let warm = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1});
    assert_eq!(post(&server, "/v1/completions", &warm).await.0, 200);
    let long = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000,
                      "ignore_eos": true, "timeout": 1.5});
    let waiting = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4, "timeout": "500ms"});
    let (a, b) = tokio::join!(post(&server, "/v1/completions", &long), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        post(&server, "/v1/completions", &waiting).await
    });
    // The running one hits its deadline mid-generation; the one behind it
    // expires while waiting for the single place in the batch.
    for (status, _, body) in [&a, &b] {
        assert_eq!(*status, 504, "{body}");
        assert_eq!(error_of(body)["code"], "deadline_exceeded");
        assert_eq!(error_of(body)["param"], "timeout");
    }
    // The place is free again.
    let ok = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4});
    assert_eq!(post(&server, "/v1/completions", &ok).await.0, 200);
    // A bad timeout is the client's mistake.
    let bad = json!({"model": MODEL, "prompt": "Hello", "timeout": -1});
    let (status, _, body) = post(&server, "/v1/completions", &bad).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["param"], "timeout");
}

#[tokio::test]
async fn batch_metrics_use_the_names_autoscalers_know() {
    let server = Server::start();
    let mut stream = client()
        .post(server.url("/v1/completions"))
        .json(&completion(PROMPTS[0], 400, true))
        .send()
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        seen.extend(stream.chunk().await.unwrap().unwrap());
    }
    let label = format!("{{model_name=\"{MODEL}\"}}");
    assert_eq!(
        metric(&server, &format!("vllm:num_requests_running{label}")).await,
        1.0
    );
    assert_eq!(
        metric(&server, &format!("vllm:num_requests_waiting{label}")).await,
        0.0
    );
    let usage = metric(&server, &format!("vllm:kv_cache_usage_perc{label}")).await;
    assert!(usage > 0.0 && usage < 1.0, "{usage}");
    let blocks = metric(
        &server,
        &format!("kindling_kv_cache_blocks{{model=\"{MODEL}\"}}"),
    )
    .await;
    assert_eq!(blocks, 1024.0, "16384 positions in blocks of 16");
    drop(stream);
    let ok = completion(PROMPTS[1], 8, false);
    assert_eq!(post(&server, "/v1/completions", &ok).await.0, 200);
    let text = metrics_text(&server).await;
    for series in [
        "kindling_inter_token_latency_seconds_count",
        "kindling_time_to_first_token_seconds_count",
        "kindling_generation_tokens_total",
        "kindling_prompt_tokens_total",
        "kindling_generation_tokens_per_second",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    let generated = metric(
        &server,
        &format!("kindling_generation_tokens_total{{model=\"{MODEL}\"}}"),
    )
    .await;
    assert!(generated >= 8.0, "{generated}");
}
