//! `/v1/chat/completions` over HTTP against the real daemon and model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn non_streaming_chat_has_the_openai_shape() {
    let server = Server::start();
    let (status, headers, body) = post(
        &server,
        "/v1/chat/completions",
        &chat(
            "What is 2 + 2?",
            json!({"temperature": 0, "max_tokens": 40}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(content.contains('4'), "{content}");
    assert_eq!(choice["finish_reason"], "stop");
    let usage = &body["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    // The template adds SmolLM's default system prompt: the prompt is far longer than the question.
    assert!(p > 20, "{usage}");
    assert!((1..=40).contains(&c));
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
}

#[tokio::test]
async fn streaming_chat_sends_role_content_finish_usage_and_done() {
    let server = Server::start();
    let params = json!({"temperature": 0, "max_tokens": 12, "ignore_eos": true});
    let (_, _, whole) = post(
        &server,
        "/v1/chat/completions",
        &chat("Tell me about the sea.", params.clone()),
    )
    .await;
    let mut stream_params = params;
    stream_params["stream"] = json!(true);
    stream_params["stream_options"] = json!({"include_usage": true});
    let data = post_stream(
        &server,
        "/v1/chat/completions",
        &chat("Tell me about the sea.", stream_params),
    )
    .await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter_map(|ch| ch["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|ch| &ch["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("length")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 12);
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][field], whole["usage"][field], "{field}");
    }
    // The same prompt again: its whole 16-token blocks come from the prefix cache.
    let prompt = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(whole["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        (prompt - 1) / 16 * 16
    );
}

#[tokio::test]
async fn streaming_without_include_usage_sends_no_usage() {
    let server = Server::start();
    let data = post_stream(
        &server,
        "/v1/chat/completions",
        &chat("Hi", json!({"max_tokens": 4, "stream": true})),
    )
    .await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("usage").is_none_or(Value::is_null), "{v}");
    }
}

#[tokio::test]
async fn same_seed_same_output_and_other_seeds_differ() {
    let server = Server::start();
    let run = |seed: u64| {
        let body = chat(
            "Write a short poem about rivers.",
            json!({"temperature": 1.0, "seed": seed, "max_tokens": 24, "ignore_eos": true}),
        );
        let server = &server;
        async move {
            let (s, _, b) = post(server, "/v1/chat/completions", &body).await;
            assert_eq!(s, 200, "{b}");
            b["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let a = run(1234).await;
    assert_eq!(a, run(1234).await);
    let others = [run(1).await, run(2).await, run(3).await];
    assert!(
        others.iter().any(|o| *o != a),
        "three other seeds all gave {a:?}"
    );
}

#[tokio::test]
async fn stop_sequences_cut_the_output_before_them() {
    let server = Server::start();
    let params = json!({"temperature": 0, "max_tokens": 30, "ignore_eos": true});
    let (_, _, full) = post(
        &server,
        "/v1/chat/completions",
        &chat("Count from one to ten in words.", params.clone()),
    )
    .await;
    let full = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop on a word from the middle of the greedy answer.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() > 4, "{full:?}");
    let stop = words[words.len() / 2];
    let cut = &full[..full.find(stop).unwrap()];
    for stop_value in [json!(stop), json!(["@@never@@", stop])] {
        let mut p = params.clone();
        p["stop"] = stop_value;
        let (_, _, b) = post(
            &server,
            "/v1/chat/completions",
            &chat("Count from one to ten in words.", p.clone()),
        )
        .await;
        assert_eq!(
            b["choices"][0]["message"]["content"], cut,
            "stop {stop:?} in {full:?}"
        );
        assert_eq!(b["choices"][0]["finish_reason"], "stop");
        p["stream"] = json!(true);
        let data = post_stream(
            &server,
            "/v1/chat/completions",
            &chat("Count from one to ten in words.", p),
        )
        .await;
        let text: String = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(text, cut);
    }
}

#[tokio::test]
async fn n_choices_and_logprobs() {
    let server = Server::start();
    let body = chat(
        "Say something.",
        json!({"n": 3, "seed": 7, "max_tokens": 6, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
    );
    let (status, _, b) = post(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{b}");
    let choices = b["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 6);
        let text: String = content
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(text, c["message"]["content"].as_str().unwrap());
        for t in content {
            let lp = t["logprob"].as_f64().unwrap();
            assert!(lp <= 0.0);
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            assert!(top[0]["logprob"].as_f64().unwrap() >= lp - 1e-6);
            assert!(t["bytes"].as_array().is_some());
        }
    }
    assert_eq!(b["usage"]["completion_tokens"], 18);
}

fn tokens_of(choice: &Value) -> Vec<String> {
    choice["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn logit_bias_steers_greedy_decoding_and_min_tokens_holds_off_the_end() {
    let server = Server::start();
    let ask = |extra: Value| {
        let mut base = json!({"temperature": 0, "max_tokens": 4, "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        chat("Name a colour.", base)
    };
    let (_, _, plain) = post(&server, "/v1/chat/completions", &ask(json!({}))).await;
    let plain = tokens_of(&plain["choices"][0]);
    // +100 on one token: greedy decoding picks it at every step.
    let (status, _, forced) = post(
        &server,
        "/v1/chat/completions",
        &ask(json!({"logit_bias": {"1000": 100}})),
    )
    .await;
    assert_eq!(status, 200, "{forced}");
    let forced = tokens_of(&forced["choices"][0]);
    assert_eq!(forced.len(), 4);
    assert!(forced.iter().all(|t| *t == forced[0]), "{forced:?}");
    assert_ne!(forced, plain);
    // -100 on that token leaves the greedy path alone, and the banned token
    // is nowhere near the top alternatives.
    let (_, _, banned) = post(
        &server,
        "/v1/chat/completions",
        &ask(json!({"logit_bias": {"1000": -100}})),
    )
    .await;
    assert_eq!(tokens_of(&banned["choices"][0]), plain);
    for step in banned["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
    {
        for alt in step["top_logprobs"].as_array().unwrap() {
            assert_ne!(alt["token"], forced[0].as_str());
        }
    }

    // min_tokens: the end-of-turn token waits until the minimum.
    let short = chat("Say hi.", json!({"temperature": 0, "max_tokens": 64}));
    let (_, _, natural) = post(&server, "/v1/chat/completions", &short).await;
    assert_eq!(natural["choices"][0]["finish_reason"], "stop", "{natural}");
    let n = natural["usage"]["completion_tokens"].as_u64().unwrap();
    let longer = chat(
        "Say hi.",
        json!({"temperature": 0, "max_tokens": 64, "min_tokens": n + 5}),
    );
    let (status, _, held) = post(&server, "/v1/chat/completions", &longer).await;
    assert_eq!(status, 200, "{held}");
    assert!(
        held["usage"]["completion_tokens"].as_u64().unwrap() >= n + 5,
        "{held}"
    );
    // Same text up to where the plain answer ended.
    let plain_text = natural["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(held["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with(plain_text));
}
