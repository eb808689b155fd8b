//! Metering and limits end to end: usage records equal to what the
//! responses said, across a restart and a SIGTERM, in SQLite and in a real
//! PostgreSQL; rate limits and quotas answering 429 with OpenAI's headers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::keys::*;
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

async fn usage_by_key(server: &Server, admin: &str) -> Value {
    let (status, _, body) = call(
        server,
        "GET",
        "/admin/usage?group_by=key",
        Some(admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut out = json!({});
    for row in body["data"].as_array().unwrap() {
        out[row["key"].as_str().unwrap()] = row.clone();
    }
    out
}

fn add(sum: &mut [u64; 3], usage: &Value) {
    sum[0] += usage["prompt_tokens"].as_u64().unwrap_or(0);
    sum[1] += usage["completion_tokens"].as_u64().unwrap_or(0);
}

#[tokio::test]
async fn metered_usage_equals_the_responses_and_survives_a_restart() {
    let config = tenancy_config("", "flush_interval = \"200ms\"", "");
    let admin = create(&config, "admin", &["--scope", "admin"]);
    let a = create(&config, "tenant-a", &[]);
    let b = create(&config, "tenant-b", &[]);
    let mut server = Server::spawn(&config, &[]);
    // [prompt, completion, embedding] as the responses report them.
    let mut want = [[0u64; 3]; 2];
    let mut requests = [0u64; 2];
    for (i, key) in [&a, &b].into_iter().enumerate() {
        let (s, _, r) = chat_as(&server, key, 8).await;
        assert_eq!(s, 200, "{r}");
        add(&mut want[i], &r["usage"]);
        let body = json!({"model": CHAT, "prompt": "Once upon a time", "max_tokens": 6, "n": 2});
        let (s, _, r) = call(&server, "POST", "/v1/completions", Some(key), Some(body)).await;
        assert_eq!(s, 200, "{r}");
        add(&mut want[i], &r["usage"]);
        let mut body = chat_body(10);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let data = sse_data(&resp.text().await.unwrap());
        let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        add(&mut want[i], &last["usage"]);
        let body = json!({"model": EMBED, "input": ["one sentence", "and another one"]});
        let (s, _, r) = call(&server, "POST", "/v1/embeddings", Some(key), Some(body)).await;
        assert_eq!(s, 200, "{r}");
        want[i][2] += r["usage"]["prompt_tokens"].as_u64().unwrap();
        requests[i] += 4;
    }
    // Images for a: its text tokens are prompt tokens; 2 images of 64×48, 3 steps.
    let body = json!({"model": IMAGE, "prompt": "a red cat", "n": 2, "size": "64x48", "steps": 3, "seed": 1});
    let (s, _, r) = call(
        &server,
        "POST",
        "/v1/images/generations",
        Some(&a),
        Some(body),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    want[0][0] += r["usage"]["input_tokens"].as_u64().unwrap();
    requests[0] += 1;
    // b streams and hangs up after a few chunks: billed for what it got.
    let mut body = chat_body(200);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let resp = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&b)
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = resp.bytes_stream();
    let mut seen = 0;
    while seen < 6 {
        let chunk = chunks.next().await.unwrap().unwrap();
        seen += String::from_utf8_lossy(&chunk).matches("data: ").count();
    }
    drop(chunks);
    requests[1] += 1;
    // Give the daemon a moment to see the hang-up and record it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let totals = usage_by_key(&server, &admin).await;
    let cancelled = {
        let (_, _, body) = call(
            &server,
            "GET",
            "/admin/usage?key=tenant-b&group_by=status",
            Some(&admin),
            None,
        )
        .await;
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["status"] == "499")
            .cloned()
            .expect("a 499 record")
    };
    let got = cancelled["completion_tokens"].as_u64().unwrap();
    assert!(
        (4..200).contains(&got),
        "billed {got} tokens for a stream cut after 6 chunks"
    );
    want[1][0] += cancelled["prompt_tokens"].as_u64().unwrap();
    want[1][1] += got;
    for (i, name) in ["tenant-a", "tenant-b"].into_iter().enumerate() {
        let t = &totals[name];
        assert_eq!(t["requests"], requests[i], "{name}: {t}");
        assert_eq!(
            [
                t["prompt_tokens"].as_u64().unwrap(),
                t["completion_tokens"].as_u64().unwrap(),
                t["embedding_tokens"].as_u64().unwrap()
            ],
            want[i],
            "{name}: {t}"
        );
        assert!(t["compute_seconds"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(totals["tenant-a"]["images"], 2);
    let px = totals["tenant-a"]["pixel_steps"].as_f64().unwrap();
    assert!((px - 2.0 * 64.0 * 48.0 * 3.0 / 1e6).abs() < 1e-9, "{px}");
    // Per-key counters in /metrics carry names, not secrets.
    let (_, _, metrics) = call(&server, "GET", "/metrics", None, None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(&format!(
            "kindling_key_requests_total{{key=\"tenant-a\",model=\"{CHAT}\"}}"
        )),
        "{metrics}"
    );
    // A graceful stop, a restart: the same totals, read by the CLI as well.
    server.sigterm();
    assert!(server.wait_exit(Duration::from_secs(30)).unwrap().success());
    let server = Server::spawn(&config, &[]);
    assert_eq!(usage_by_key(&server, &admin).await, totals);
    let csv = kindling("usage", &config, &["--group-by", "key", "--format", "csv"]);
    let line = csv
        .lines()
        .find(|l| l.starts_with("tenant-a,"))
        .unwrap_or_else(|| panic!("{csv}"));
    assert!(
        line.starts_with(&format!(
            "tenant-a,{},{},{}",
            requests[0], want[0][0], want[0][1]
        )),
        "{line}"
    );
}

#[tokio::test]
async fn sigterm_during_a_workload_loses_no_record() {
    // Records are committed only at the stop: nothing is flushed before.
    let config = tenancy_config(
        "",
        "flush_interval = \"1h\"\nquota_sync_interval = \"1h\"",
        "[server]\nshutdown_timeout = \"60s\"",
    );
    let admin = create(&config, "admin", &["--scope", "admin"]);
    let mut server = Server::spawn(&config, &[]);
    assert_eq!(chat_as(&server, &admin, 2).await.0, 200);
    let mut running = Vec::new();
    for _ in 0..6 {
        let req = client()
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&admin)
            .json(&chat_body(24))
            .send();
        running.push(tokio::spawn(req));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.sigterm();
    for r in running {
        let resp = r.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(server.wait_exit(Duration::from_secs(60)).unwrap().success());
    let out = kindling("usage", &config, &["--group-by", "key", "--format", "json"]);
    let rows: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["requests"], 7, "{rows}");
}

#[tokio::test]
async fn rate_limits_and_quotas_answer_429_with_openais_headers() {
    let config = tenancy_config("", "flush_interval = \"200ms\"", "");
    let rpm = create(&config, "rpm", &["--rpm", "2"]);
    let tpm = create(&config, "tpm", &["--tpm", "30"]);
    let quota = create(
        &config,
        "quota",
        &["--quota-tokens", "20", "--quota-period", "day"],
    );
    let server = Server::spawn(&config, &[]);
    let body = json!({"model": EMBED, "input": "a sentence of a few tokens"});
    for left in [1, 0] {
        let (s, h, _) = call(
            &server,
            "POST",
            "/v1/embeddings",
            Some(&rpm),
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(
            h["x-ratelimit-remaining-requests"],
            left.to_string().as_str()
        );
        assert!(h.contains_key("x-ratelimit-reset-requests"));
    }
    let (s, h, e) = call(
        &server,
        "POST",
        "/v1/embeddings",
        Some(&rpm),
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, 429, "{e}");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    // 40 tokens of chat against 30 a minute: the next request waits.
    let (s, h, r) = chat_as(&server, &tpm, 8).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(h["x-ratelimit-limit-tokens"], "30");
    let (s, h, e) = chat_as(&server, &tpm, 8).await;
    assert_eq!(s, 429, "{e}");
    assert!(h.contains_key("retry-after") && h.contains_key("x-ratelimit-remaining-tokens"));
    // The quota lets the request that crosses it finish, then closes for the day.
    let (s, _, _) = chat_as(&server, &quota, 8).await;
    assert_eq!(s, 200);
    let (s, h, e) = chat_as(&server, &quota, 8).await;
    assert_eq!(s, 429, "{e}");
    assert_eq!(e["error"]["code"], "insufficient_quota");
    assert_eq!(e["error"]["type"], "insufficient_quota");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(wait <= 86_400);
}

#[tokio::test]
async fn usage_goes_to_postgresql_when_configured() {
    let Ok(url) = std::env::var("KINDLING_TEST_PG_URL") else {
        assert!(
            std::env::var("KINDLING_REQUIRE_PG").is_err(),
            "KINDLING_REQUIRE_PG is set but KINDLING_TEST_PG_URL is not"
        );
        eprintln!("skipped: no KINDLING_TEST_PG_URL (scripts/test.sh starts a PostgreSQL server)");
        return;
    };
    // The URL comes from the environment (as from a Kubernetes Secret) and
    // wins over the file's, which points at nothing.
    let config = tenancy_config(
        "",
        "database_url = \"postgres://nobody@127.0.0.1:1/none\"",
        "",
    );
    let env = [("KINDLING_USAGE_DATABASE_URL", url.as_str())];
    // The database outlives the test: a fresh key name keeps its rows apart.
    let name = format!(
        "pg-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let admin = create(&config, &name, &["--scope", "admin"]);
    let mut server = Server::spawn(&config, &env);
    let (s, _, r) = chat_as(&server, &admin, 5).await;
    assert_eq!(s, 200, "{r}");
    let body = json!({"model": EMBED, "input": "hello"});
    let (s, _, e) = call(&server, "POST", "/v1/embeddings", Some(&admin), Some(body)).await;
    assert_eq!(s, 200);
    server.sigterm();
    assert!(server.wait_exit(Duration::from_secs(30)).unwrap().success());
    // Read back through the CLI, which connects to the same database.
    let out = kindling_with(
        "usage",
        &config,
        &[
            "--key",
            &name,
            "--group-by",
            "key,endpoint",
            "--format",
            "json",
        ],
        &env,
    );
    let rows: Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let chat_row = rows
        .iter()
        .find(|r| r["endpoint"] == "/v1/chat/completions")
        .unwrap();
    assert_eq!(chat_row["prompt_tokens"], r["usage"]["prompt_tokens"]);
    assert_eq!(
        chat_row["completion_tokens"],
        r["usage"]["completion_tokens"]
    );
    let embed_row = rows
        .iter()
        .find(|r| r["endpoint"] == "/v1/embeddings")
        .unwrap();
    assert_eq!(embed_row["embedding_tokens"], e["usage"]["prompt_tokens"]);
    assert!(!config.parent().unwrap().join("usage.sqlite").exists());
}

#[tokio::test]
async fn an_unreachable_database_neither_stops_serving_nor_loses_the_error() {
    // Nothing listens on port 1: the writer keeps records in memory.
    let config = tenancy_config(
        "",
        "database_url = \"postgres://kindling@127.0.0.1:1/kindling\"",
        "",
    );
    let admin = create(&config, "admin", &["--scope", "admin"]);
    let server = Server::spawn(&config, &[]);
    assert!(
        server.logs().contains("usage database unreachable"),
        "{}",
        server.logs()
    );
    let (s, _, r) = chat_as(&server, &admin, 2).await;
    assert_eq!(s, 200, "{r}");
    let (s, h, e) = call(&server, "GET", "/admin/usage", Some(&admin), None).await;
    assert_eq!(s, 503, "{e}");
    assert_eq!(e["error"]["code"], "service_unavailable");
    assert!(h.contains_key("retry-after"));
    assert!(
        !e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "{e}"
    );
}
