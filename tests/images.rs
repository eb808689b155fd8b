//! `/v1/images/generations` over HTTP against the real daemon and the
//! `sd-tiny` demo pipeline: the OpenAI shape decoding to images of the
//! asked size and format, seeds that reproduce, step-synchronous batching
//! that changes no image, streaming progress, cancellation on disconnect,
//! and errors that name their parameter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

const MODEL: &str = "sd-tiny";

fn body(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "prompt": "a red cat on a blue sky", "seed": 7, "steps": 3});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

async fn generate(server: &Server, extra: Value) -> Value {
    let (status, _, b) = post(server, "/v1/images/generations", &body(extra)).await;
    assert_eq!(status, 200, "{b}");
    b
}

fn bytes(item: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(item["b64_json"].as_str().unwrap())
        .unwrap()
}

fn decode(item: &Value) -> image::RgbImage {
    image::load_from_memory(&bytes(item)).unwrap().to_rgb8()
}

#[tokio::test]
async fn openai_shape_sizes_formats_and_seeds() {
    let server = Server::start();
    let b = generate(&server, json!({"n": 2, "size": "64x48"})).await;
    assert!(b["created"].as_u64().unwrap() > 0);
    assert_eq!(b["usage"]["input_tokens"], b["usage"]["total_tokens"]);
    assert!(b["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let data = b["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(bytes(&data[0]).starts_with(b"\x89PNG"));
    for item in data {
        let img = decode(item);
        assert_eq!((img.width(), img.height()), (64, 48));
    }
    assert_eq!(data[0]["seed"], 7);
    assert_eq!(data[1]["seed"], 8);
    assert_ne!(
        data[0]["b64_json"], data[1]["b64_json"],
        "two seeds gave one image"
    );
    // The same request again, and the second image alone from its own seed.
    let again = generate(&server, json!({"n": 2, "size": "64x48"})).await;
    assert_eq!(again["data"], b["data"]);
    let second = generate(&server, json!({"size": "64x48", "seed": 8})).await;
    assert_eq!(second["data"][0]["b64_json"], data[1]["b64_json"]);
    // The model's default size, and other formats.
    let default = generate(&server, json!({})).await;
    assert_eq!(decode(&default["data"][0]).dimensions(), (64, 64));
    assert_eq!(default["size"], "64x64");
    let jpeg = generate(
        &server,
        json!({"output_format": "jpeg", "output_compression": 80}),
    )
    .await;
    assert!(bytes(&jpeg["data"][0]).starts_with(&[0xFF, 0xD8]));
    assert_eq!(decode(&jpeg["data"][0]).dimensions(), (64, 64));
    let webp = generate(&server, json!({"output_format": "webp"})).await;
    assert_eq!(&bytes(&webp["data"][0])[..4], b"RIFF");
    // Lossless WebP holds the PNG's very pixels.
    assert_eq!(decode(&webp["data"][0]), decode(&default["data"][0]));
    // Every sampler makes an image.
    for sampler in [
        "ddim",
        "euler",
        "euler_a",
        "dpmpp_2m",
        "dpmpp_2m_karras",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
    ] {
        let b = generate(&server, json!({"sampler": sampler, "guidance_scale": 3.0})).await;
        assert_eq!(decode(&b["data"][0]).dimensions(), (64, 64), "{sampler}");
    }
    // Without `model`, the image model is picked.
    let mut no_model = body(json!({}));
    no_model.as_object_mut().unwrap().remove("model");
    let (status, _, b) = post(&server, "/v1/images/generations", &no_model).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["data"][0]["b64_json"], default["data"][0]["b64_json"]);
}

/// Requests with the same size, sampler and steps that wait together run
/// in one UNet call per step, and each image equals its solo run.
#[tokio::test]
async fn compatible_requests_batch_and_equal_their_solo_runs() {
    let server = Server::start();
    let a = json!({"prompt": "a castle at night", "seed": 1, "guidance_scale": 7.5});
    let b = json!({"prompt": "a green forest", "seed": 2, "guidance_scale": 1.0, "n": 2});
    let solo_a = generate(&server, a.clone()).await;
    let solo_b = generate(&server, b.clone()).await;
    let series = format!("kindling_batch_steps{{model=\"{MODEL}\"}}");
    let before = metric(&server, &series).await;
    // A slower request of another shape goes first, so both wait and then
    // start together.
    let blocker = body(json!({"steps": 25, "size": "128x128"}));
    let (rb, ra, rb2) = tokio::join!(
        post(&server, "/v1/images/generations", &blocker),
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            generate(&server, a.clone()).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            generate(&server, b.clone()).await
        },
    );
    assert_eq!(rb.0, 200, "{}", rb.2);
    assert_eq!(ra["data"], solo_a["data"]);
    assert_eq!(rb2["data"], solo_b["data"]);
    let steps = metric(&server, &series).await - before;
    assert_eq!(
        steps,
        25.0 + 3.0,
        "the two requests did not share their UNet calls"
    );
}

#[tokio::test]
async fn streaming_sends_progress_previews_then_images() {
    let server = Server::start();
    let events = post_stream(
        &server,
        "/v1/images/generations",
        &body(json!({"stream": true, "steps": 5, "partial_images": 2, "n": 2})),
    )
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let events: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "image_generation.progress")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
    let partial: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "image_generation.partial_image")
        .collect();
    assert_eq!(partial.len(), 4, "two previews of two images");
    assert_eq!(
        decode(partial[0]).dimensions(),
        (32, 32),
        "previews are at latent size"
    );
    let done: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "image_generation.completed")
        .collect();
    assert_eq!(done.len(), 2);
    let last_progress = events
        .iter()
        .rposition(|e| e["type"] == "image_generation.progress")
        .unwrap();
    let first_done = events
        .iter()
        .position(|e| e["type"] == "image_generation.completed")
        .unwrap();
    assert!(
        last_progress < first_done,
        "images came before the last step"
    );
    // The streamed images are the non-streamed ones.
    let plain = generate(&server, json!({"steps": 5, "n": 2})).await;
    for d in done {
        let i = d["image_index"].as_u64().unwrap() as usize;
        assert_eq!(d["b64_json"], plain["data"][i]["b64_json"]);
        assert!(d["usage"]["input_tokens"].as_u64().unwrap() > 0);
    }
}

#[tokio::test]
async fn disconnect_cancels_and_deadlines_fail() {
    let server = Server::start();
    let long = body(json!({"steps": 150, "size": "128x128"}));
    let stream = raw_post(&server, "/v1/images/generations", &long).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(stream);
    assert!(
        server.wait_for_log(
            "image request cancelled: the client went away",
            Duration::from_secs(60)
        ),
        "no cancellation in the log:\n{}",
        server.logs()
    );
    let (status, _, b) = post(
        &server,
        "/v1/images/generations",
        &body(json!({"steps": 150, "size": "128x128", "timeout": 0.5})),
    )
    .await;
    assert_eq!(status, 504, "{b}");
    assert_eq!(error_of(&b)["code"], "deadline_exceeded");
    // The model still serves.
    generate(&server, json!({})).await;
}

#[tokio::test]
async fn a_full_queue_gives_429_with_retry_after() {
    let server = Server::with_config("[engine]\nqueue_size = 1");
    let long = body(json!({"steps": 25, "size": "128x128"}));
    let (first, second, third) = tokio::join!(
        post(&server, "/v1/images/generations", &long),
        async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            post(&server, "/v1/images/generations", &body(json!({}))).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            post(&server, "/v1/images/generations", &body(json!({}))).await
        },
    );
    assert_eq!(first.0, 200, "{}", first.2);
    assert_eq!(second.0, 200, "{}", second.2);
    assert_eq!(third.0, 429, "{}", third.2);
    assert!(third.1.contains_key("retry-after"));
    assert_eq!(error_of(&third.2)["type"], "rate_limit_error");
}

#[tokio::test]
async fn bad_requests_name_their_parameter() {
    let server = Server::start();
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"size": "65x64"}), 400, "size"),
        (json!({"size": "64x60"}), 400, "size"),
        (json!({"size": "1024x1024"}), 400, "size"),
        (json!({"size": "big"}), 400, "size"),
        (json!({"n": 0}), 400, "n"),
        (json!({"n": 11}), 400, "n"),
        (json!({"sampler": "plms"}), 400, "sampler"),
        (json!({"response_format": "url"}), 400, "response_format"),
        (json!({"output_format": "bmp"}), 400, "output_format"),
        (
            json!({"output_compression": 101}),
            400,
            "output_compression",
        ),
        (json!({"steps": 0}), 400, "steps"),
        (json!({"steps": 1000}), 400, "steps"),
        (json!({"guidance_scale": 99}), 400, "guidance_scale"),
        (json!({"seed": -5}), 400, "seed"),
        (json!({"prompt": ""}), 400, "prompt"),
        (json!({"prompt": 5}), 400, "prompt"),
        (
            json!({"partial_images": 4, "stream": true}),
            400,
            "partial_images",
        ),
        (json!({"model": "all-minilm-l6-v2"}), 400, "model"),
        (json!({"timeout": -1}), 400, "timeout"),
    ];
    for (extra, status, param) in cases {
        let (got, _, b) = post(&server, "/v1/images/generations", &body(extra.clone())).await;
        assert_eq!(got, status, "{extra}: {b}");
        assert_eq!(error_of(&b)["param"], param, "{extra}: {b}");
    }
    let (got, _, b) = post(
        &server,
        "/v1/images/generations",
        &body(json!({"model": "no-such-model"})),
    )
    .await;
    assert_eq!(got, 404, "{b}");
    // The image model refuses text work the same way.
    let (got, _, b) = post(&server, "/v1/chat/completions", &chat(MODEL, json!({}))).await;
    assert_eq!(got, 400, "{b}");
    assert_eq!(error_of(&b)["param"], "model");
    let (got, _, b) = post(
        &server,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x"}),
    )
    .await;
    assert_eq!(got, 400, "{b}");
    // After all that, it serves.
    generate(&server, json!({})).await;
}

/// A request with more images than `engine.image_batch` runs whole, in
/// several UNet calls per step, and its images equal single-image runs.
#[tokio::test]
async fn more_images_than_the_batch_take_several_calls_per_step() {
    let server = Server::with_config("[engine]\nimage_batch = 2");
    let series = format!("kindling_batch_steps{{model=\"{MODEL}\"}}");
    let first = generate(&server, json!({"seed": 20})).await;
    let before = metric(&server, &series).await;
    let three = generate(&server, json!({"n": 3, "seed": 20})).await;
    assert_eq!(metric(&server, &series).await - before, 3.0 * 2.0);
    assert_eq!(three["data"][0]["b64_json"], first["data"][0]["b64_json"]);
    let third = generate(&server, json!({"seed": 22})).await;
    assert_eq!(three["data"][2]["b64_json"], third["data"][0]["b64_json"]);
}

/// An image pipeline is one registry entry with a memory estimate: under a
/// budget that holds it or a chat model but not both, each evicts the
/// other, and the reloaded pipeline makes the same image.
#[tokio::test]
async fn an_image_model_is_evicted_and_reloaded_like_any_model() {
    let sd = std::fs::read_to_string(repo().join("configs/models/sd-tiny.toml")).unwrap();
    let chat_model = demo_manifest("a", None, "context_length = 1024\nkv_cache_tokens = 2048");
    let manifests = [("sd.toml", sd.as_str()), ("a.toml", chat_model.as_str())];
    let estimates = {
        // Estimates are worked out in the background after start-up.
        let server = Server::spawn(&config_with_manifests("", &manifests), &[]);
        let mut found = (None, None);
        for _ in 0..100 {
            let est = |v: Value| v["estimated_bytes"].as_u64();
            found = (
                est(model_state(&server, MODEL).await),
                est(model_state(&server, "a").await),
            );
            if found.0.is_some() && found.1.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (
            found.0.expect("sd-tiny's estimate"),
            found.1.expect("the chat model's estimate"),
        )
    };
    let (big, small) = (estimates.0.max(estimates.1), estimates.0.min(estimates.1));
    let budget = big + small / 2;
    let daemon = format!("[devices.cpu]\nbudget = \"{budget}B\"\n");
    let server = Server::spawn(&config_with_manifests(&daemon, &manifests), &[]);
    let (status, headers, first) = post(&server, "/v1/images/generations", &body(json!({}))).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(headers["x-kindling-cold-start"], "true");
    let (status, _, b) = post(&server, "/v1/chat/completions", &chat("a", json!({}))).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(model_state(&server, MODEL).await["state"], "cold");
    let evicted =
        format!("kindling_model_evictions_total{{model=\"{MODEL}\",reason=\"memory_pressure\"}}");
    assert_eq!(metric(&server, &evicted).await, 1.0);
    let (status, headers, again) = post(&server, "/v1/images/generations", &body(json!({}))).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(headers["x-kindling-cold-start"], "true");
    assert_eq!(again["data"], first["data"]);
    assert_eq!(model_state(&server, "a").await["state"], "cold");
}

/// A manifest default outside the model's limits fails the load with a
/// clear reason, rather than blaming each request's `size`.
#[tokio::test]
async fn a_bad_default_size_fails_the_load() {
    let sd = std::fs::read_to_string(repo().join("configs/models/sd-tiny.toml"))
        .unwrap()
        .replace("max_size = 128", "max_size = 128\nsize = \"60x64\"");
    let server = Server::spawn(&config_with_manifests("", &[("sd.toml", sd.as_str())]), &[]);
    let (status, _, b) = post(&server, "/v1/images/generations", &body(json!({}))).await;
    assert_eq!(status, 503, "{b}");
    assert_eq!(error_of(&b)["code"], "model_load_failed");
    assert!(
        error_of(&b)["message"].as_str().unwrap().contains("60x64"),
        "{b}"
    );
    // A request naming its own size is still refused the same way: the
    // model never loaded.
    let (status, _, _) = post(
        &server,
        "/v1/images/generations",
        &body(json!({"size": "64x64"})),
    )
    .await;
    assert_eq!(status, 503);
}
