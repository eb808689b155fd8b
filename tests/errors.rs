//! Every client mistake gets the right status and an OpenAI-shaped error,
//! and none of them disturbs the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

async fn raw(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let resp = client()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn chat(extra: Value) -> Value {
    let mut body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_400() {
    let server = Server::start();
    for body in [
        "{not json",
        "",
        "[]",
        r#"{"model": "smollm2-135m"}"#,
        r#"{"model": 5, "messages": []}"#,
        r#"{"model": "smollm2-135m", "messages": "hello"}"#,
        r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
        r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
        r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], "stop": 7}"#,
    ] {
        let (status, b) = raw(&server, "/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{body} -> {b}");
        assert_eq!(error_of(&b)["type"], "invalid_request_error");
    }
    let resp = client()
        .post(server.url("/v1/completions"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "missing content-type");
    let (status, b) = raw(
        &server,
        "/v1/completions",
        r#"{"model": "smollm2-135m", "prompt": {"a": 1}}"#,
    )
    .await;
    assert_eq!(status, 400, "{b}");
}

#[tokio::test]
async fn invalid_values_are_400_naming_the_parameter() {
    let server = Server::start();
    for (extra, param) in [
        (json!({"temperature": -1}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.01}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"stop": ""}), "stop"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"max_completion_tokens": -5}),
            "max_completion_tokens",
        ),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (json!({"min_p": 2}), "min_p"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}),
            "tools[0].type",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            "tools[0].function.name",
        ),
        (json!({"tools": {"a": 1}}), "tools"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "tool", "content": "42"}]}),
            "messages[0].tool_call_id",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                   "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}),
            "response_format",
        ),
        (json!({"guided_regex": "(["}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
        ),
        (
            json!({"guided_regex": "a", "response_format": {"type": "json_object"}}),
            "guided_regex",
        ),
        (json!({"logit_bias": {"forty-two": 5}}), "logit_bias"),
        (json!({"logit_bias": {"42": 500}}), "logit_bias"),
        (json!({"logit_bias": [42]}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"min_tokens": -1}), "min_tokens"),
        (json!({"min_tokens": 9, "max_tokens": 2}), "min_tokens"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
    ] {
        let (status, _, b) = post(&server, "/v1/chat/completions", &chat(extra.clone())).await;
        assert_eq!(status, 400, "{extra} -> {b}");
        assert_eq!(error_of(&b)["param"], param, "{extra} -> {b}");
    }
    for (body, param) in [
        (
            json!({"model": MODEL, "prompt": "x", "logprobs": 9}),
            "logprobs",
        ),
        (json!({"model": MODEL, "prompt": []}), "prompt"),
        (
            json!({"model": MODEL, "prompt": "x", "suffix": "y"}),
            "suffix",
        ),
        (json!({"model": MODEL, "prompt": [999999]}), "prompt"),
        (
            json!({"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}}),
            "logit_bias",
        ),
        (json!({"model": MODEL, "prompt": ""}), "prompt"),
        (
            json!({"model": MODEL, "prompt": ["a", "b", "c"], "n": 50}),
            "n",
        ),
        (
            json!({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
    ] {
        let (status, _, b) = post(&server, "/v1/completions", &body).await;
        assert_eq!(status, 400, "{body} -> {b}");
        assert_eq!(error_of(&b)["param"], param, "{body} -> {b}");
    }
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let server = Server::start();
    let (status, _, b) = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"model": "gpt-9"})),
    )
    .await;
    assert_eq!(status, 404);
    let e = error_of(&b);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    let (status, _, b) = post(
        &server,
        "/v1/completions",
        &json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        (status, &error_of(&b)["code"]),
        (404, &json!("model_not_found"))
    );
    let resp = client()
        .get(server.url("/v1/models/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        error_of(&resp.json().await.unwrap())["code"],
        "model_not_found"
    );
}

#[tokio::test]
async fn over_the_context_is_400_context_length_exceeded() {
    let server = Server::start();
    let (status, _, b) = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 9000})),
    )
    .await;
    assert_eq!(status, 400, "{b}");
    assert_eq!(error_of(&b)["code"], "context_length_exceeded");
    assert!(b["error"]["message"].as_str().unwrap().contains("8192"));
    let long = "word ".repeat(9000);
    let (status, _, b) = post(
        &server,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": long, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 400, "{b}");
    assert_eq!(error_of(&b)["code"], "context_length_exceeded");
    assert_eq!(b["error"]["param"], "prompt");
    // Streaming requests fail the same way, before the stream starts.
    let (status, _, b) = post(
        &server,
        "/v1/chat/completions",
        &chat(json!({"max_tokens": 9000, "stream": true})),
    )
    .await;
    assert_eq!(
        (status, &error_of(&b)["code"]),
        (400, &json!("context_length_exceeded"))
    );
}

#[tokio::test]
async fn a_default_max_tokens_shrinks_to_fit_the_context() {
    // A 256-position context with a default of 512 tokens: a prompt that
    // leaves room for fewer is served, not refused; an explicit limit is not.
    let manifest = format!(
        "id = \"tiny-context\"\nkind = \"chat\"\nformat = \"gguf\"\narchitecture = \"llama\"\ncontext_length = 256\n[weights]\npath = {:?}\n[defaults]\nmax_tokens = 512\n",
        store().join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    let server = Server::spawn(&config_with_manifest(&manifest), &[]);
    let messages = json!([{"role": "user", "content": "word ".repeat(200)}]);
    let body = json!({"model": "tiny-context", "messages": messages, "ignore_eos": true});
    let (status, _, b) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["usage"]["total_tokens"], 256);
    assert_eq!(b["choices"][0]["finish_reason"], "length");
    let body = json!({"model": "tiny-context", "messages": messages, "max_tokens": 100});
    let (status, _, b) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(
        (status, &error_of(&b)["code"]),
        (400, &json!("context_length_exceeded"))
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let server = Server::with_config("[server]\nmax_body_size = \"16KiB\"\n");
    let big = "x".repeat(20 * 1024);
    let (status, _, b) = post(
        &server,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": big}),
    )
    .await;
    assert_eq!(status, 413, "{b}");
    assert_eq!(error_of(&b)["code"], "request_too_large");
    let (status, _, _) = post(
        &server,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "ok", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_openai_errors() {
    let server = Server::start();
    let resp = client()
        .get(server.url("/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    error_of(&resp.json().await.unwrap());
    let resp = client()
        .get(server.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    error_of(&resp.json().await.unwrap());
}

#[tokio::test]
async fn a_storm_of_bad_requests_leaves_good_ones_untouched() {
    let server = Server::start();
    let good = json!({"model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8, "ignore_eos": true});
    let (_, _, before) = post(&server, "/v1/completions", &good).await;
    let bad_bodies = [
        "{",
        "null",
        "1e999",
        r#"{"model": null}"#,
        "\u{0}",
        r#"{"model": "smollm2-135m", "prompt": [[1, -2]]}"#,
        r#"{"model": "smollm2-135m", "prompt": "x", "n": 1e30}"#,
        r#"{"model": "smollm2-135m", "prompt": "x", "max_tokens": 1.5}"#,
        r#"{"model": "smollm2-135m", "prompt": [[]]}"#,
        r#"{"model": "smollm2-135m", "prompt": "x", "seed": -1, "max_tokens": 1}"#,
    ];
    let mut tasks = Vec::new();
    for body in bad_bodies {
        let url = server.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            let resp = client()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (body, resp.status().as_u16())
        }));
    }
    let good_during = post(&server, "/v1/completions", &good);
    let (_, _, during) = good_during.await;
    for t in tasks {
        let (body, status) = t.await.unwrap();
        assert!(status == 400 || status == 200, "{body:?} -> {status}");
    }
    let (_, _, after) = post(&server, "/v1/completions", &good).await;
    assert_eq!(before["choices"][0]["text"], during["choices"][0]["text"]);
    assert_eq!(before["choices"][0]["text"], after["choices"][0]["text"]);
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}
