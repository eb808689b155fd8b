//! GPU devices in `kindling.toml` and manifests. Where CUDA cannot be used
//! (a build without it, or no driver or GPU), the daemon starts anyway, says
//! why, and serves those models on the CPU; where a GPU is present, a model
//! placed on it loads there, serves, and gives its memory back on unload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{chat, client, config_with_manifests, demo_manifest, get_json, post, Server};

fn devices_config() -> std::path::PathBuf {
    let on_gpu = demo_manifest("on-gpu", None, "device = \"cuda:0\"\ndtype = \"bf16\"");
    let anywhere = demo_manifest("anywhere", None, "");
    let images = "id = \"images\"\nkind = \"image\"\nformat = \"safetensors\"\narchitecture = \"stable-diffusion\"\ndevice = \"cuda:0\"\n[weights]\npath = \"sd-tiny\"\n[image]\nsteps = 2\n";
    config_with_manifests(
        "[devices.auto]\n[devices.\"cuda:0\"]\nbudget = \"90%\"\n",
        &[
            ("on-gpu.toml", &on_gpu),
            ("anywhere.toml", &anywhere),
            ("images.toml", images),
        ],
    )
}

async fn load(server: &Server, id: &str) -> serde_json::Value {
    let resp = client()
        .post(server.url(&format!("/admin/models/{id}/load")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn gpu_devices_fall_back_to_the_cpu_or_serve_on_the_gpu() {
    let server = Server::spawn(&devices_config(), &[]);
    let status = get_json(&server, "/admin/status").await;
    let names: Vec<&str> = status["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    if let Err(why) = kindling_models::gpu::device_count() {
        common::skip_cuda("serving on a GPU", &why);
        // No usable GPU: the configured ones are dropped, with the reason.
        assert_eq!(names, ["cpu"], "{status}");
        assert!(
            server.wait_for_log(
                "models placed on cuda:0 run on the CPU",
                Duration::from_secs(5)
            ),
            "{}",
            server.logs()
        );
        assert!(server.logs().contains(&why), "{}", server.logs());
        assert!(server.logs().contains("devices.auto: no CUDA device"));
        let m = load(&server, "on-gpu").await;
        assert_eq!(m["device"], "cpu", "{m}");
    } else {
        assert!(names.contains(&"cuda:0"), "{status}");
        let gpu = |s: &serde_json::Value| {
            s["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == "cuda:0")
                .unwrap()["driver_free_bytes"]
                .as_u64()
                .unwrap()
        };
        let before = gpu(&status);
        let m = load(&server, "on-gpu").await;
        assert_eq!(m["device"], "cuda:0", "{m}");
        let loaded = gpu(&get_json(&server, "/admin/status").await);
        assert!(loaded < before, "{before} -> {loaded}");
        let resp = client()
            .post(server.url("/admin/models/on-gpu/unload"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let after = gpu(&get_json(&server, "/admin/status").await);
        // What the load took came back (a little may stay with the driver).
        assert!(
            after + (before - loaded) / 10 >= before,
            "{before} -> {loaded} -> {after}"
        );
        load(&server, "on-gpu").await;
    }
    // Either way, both models answer.
    for id in ["on-gpu", "anywhere"] {
        let body = chat(id, serde_json::json!({"max_tokens": 4}));
        let (status, _, reply) = post(&server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{id}: {reply}");
        assert_eq!(reply["usage"]["completion_tokens"], 4, "{reply}");
    }
    let body =
        serde_json::json!({"model": "images", "prompt": "a red fox", "size": "64x64", "seed": 3});
    let (status, _, reply) = post(&server, "/v1/images/generations", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply["data"][0]["b64_json"]
        .as_str()
        .is_some_and(|b| b.len() > 100));
    let expected = if kindling_models::gpu::device_count().is_ok() {
        "cuda:0"
    } else {
        "cpu"
    };
    let m = get_json(&server, "/v1/models/images").await;
    let status = get_json(&server, "/admin/status").await;
    let placed = status["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "images")
        .unwrap();
    assert_eq!(placed["device"], expected, "{m} {placed}");
}
