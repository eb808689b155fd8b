//! `/v1/completions` over HTTP, including the known answer from llama.cpp.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

fn reference() -> Value {
    let text = std::fs::read_to_string(repo().join("tests/data/llama_cpp_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Over HTTP, greedy output follows llama.cpp's up to its first near-tie
/// (see models/tests/known_answer.rs for the step-by-step comparison).
#[tokio::test]
async fn greedy_completions_follow_llama_cpp() {
    let server = Server::start();
    let reference = reference();
    let mut compared = 0;
    for case in reference["cases"].as_array().unwrap() {
        let (path, mut body) = if case["kind"] == "chat" {
            (
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": case["messages"]}),
            )
        } else {
            (
                "/v1/completions",
                json!({"model": MODEL, "prompt": case["prompt"]}),
            )
        };
        body["temperature"] = json!(0);
        body["max_tokens"] = json!(32);
        body["ignore_eos"] = json!(true);
        let (status, _, b) = post(&server, path, &body).await;
        assert_eq!(status, 200, "{b}");
        let choice = &b["choices"][0];
        let text = choice["text"]
            .as_str()
            .or(choice["message"]["content"].as_str())
            .unwrap();
        assert_eq!(
            b["usage"]["prompt_tokens"],
            case["prompt_ids"].as_array().unwrap().len()
        );
        // Empty when llama.cpp's very first choice is a near-tie.
        let clear = case["clear_text"].as_str().unwrap();
        if !clear.is_empty() {
            assert!(
                text.starts_with(clear),
                "{:?}: ours {text:?}, llama.cpp {clear:?}",
                case["prompt"]
            );
            compared += 1;
        }
    }
    assert!(
        compared >= 4,
        "only {compared} reference cases have a clear prefix"
    );
}

#[tokio::test]
async fn list_of_prompts_gives_a_choice_each_and_default_max_tokens_is_16() {
    let server = Server::start();
    let body = json!({"model": MODEL, "prompt": ["Hello, my name is", "The sky is"], "n": 2, "seed": 3, "ignore_eos": true});
    let (status, _, b) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["object"], "text_completion");
    assert!(b["id"].as_str().unwrap().starts_with("cmpl-"));
    let choices = b["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "length");
    }
    assert_eq!(b["usage"]["completion_tokens"], 4 * 16);
}

#[tokio::test]
async fn token_prompts_echo_and_logprobs() {
    let server = Server::start();
    let case = &reference()["cases"][0];
    let body = json!({"model": MODEL, "prompt": case["prompt_ids"], "temperature": 0, "max_tokens": 5, "ignore_eos": true, "logprobs": 2});
    let (status, _, b) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{b}");
    let text = b["choices"][0]["text"].as_str().unwrap();
    assert!(case["greedy_text"].as_str().unwrap().starts_with(text));
    let lp = &b["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);

    let body = json!({"model": MODEL, "prompt": "Roses are red,", "temperature": 0, "max_tokens": 4, "echo": true});
    let (_, _, b) = post(&server, "/v1/completions", &body).await;
    assert!(b["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Roses are red,"));
}

#[tokio::test]
async fn streaming_completion_matches_non_streaming() {
    let server = Server::start();
    let body = json!({"model": MODEL, "prompt": "def fibonacci(n):", "temperature": 0, "max_tokens": 20, "ignore_eos": true});
    let (_, _, whole) = post(&server, "/v1/completions", &body).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let data = post_stream(&server, "/v1/completions", &sbody).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter_map(|c| c["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let usage = &chunks.last().unwrap()["usage"];
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage[field], whole["usage"][field], "{field}");
    }
}

/// Prompt-lookup speculative decoding: on a prompt whose answer repeats
/// text it holds, drafts are accepted (counted in `/metrics`), and the
/// output — greedy or seeded sampling — is exactly what one token per pass
/// gives.
#[tokio::test]
async fn prompt_lookup_keeps_the_output_and_reports_acceptance() {
    let server = Server::start();
    let prompt =
        "Copy the list.\nList: apples, pears, plums, cherries, grapes, figs, dates, limes, \
                  lemons, melons.\nCopy: apples, pears,";
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 0.9, "seed": 11}),
    ] {
        let mut texts = Vec::new();
        for lookup in [json!(false), json!(8), json!(true)] {
            let mut body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 40,
                                  "ignore_eos": true, "prompt_lookup": lookup});
            body.as_object_mut()
                .unwrap()
                .extend(sampling.as_object().unwrap().clone());
            let (status, _, b) = post(&server, "/v1/completions", &body).await;
            assert_eq!(status, 200, "{b}");
            assert_eq!(b["usage"]["completion_tokens"], 40);
            texts.push(b["choices"][0]["text"].as_str().unwrap().to_string());
        }
        assert!(
            texts.iter().all(|t| t == &texts[0]),
            "{sampling}: {texts:?}"
        );
    }
    let drafted = metric(
        &server,
        "kindling_spec_draft_tokens{model=\"smollm2-135m\"}",
    )
    .await;
    let accepted = metric(
        &server,
        "kindling_spec_accepted_tokens{model=\"smollm2-135m\"}",
    )
    .await;
    assert!(
        drafted > 0.0 && accepted > 0.0,
        "{drafted} drafted, {accepted} accepted"
    );
    let rate = metric(
        &server,
        "kindling_spec_acceptance_rate{model=\"smollm2-135m\"}",
    )
    .await;
    assert!((rate - accepted / drafted).abs() < 1e-9);
    assert!(metrics_text(&server)
        .await
        .contains("vllm:spec_decode_num_accepted_tokens{model_name=\"smollm2-135m\"}"));

    let body = json!({"model": MODEL, "prompt": prompt, "prompt_lookup": 99});
    let (status, _, b) = post(&server, "/v1/completions", &body).await;
    assert_eq!(status, 400);
    assert_eq!(error_of(&b)["param"], "prompt_lookup");
}
