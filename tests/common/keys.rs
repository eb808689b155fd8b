//! Keys and requests for the tenancy tests: configs with a keys file,
//! `kindling keys` from the command line, calls with a key.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::{client, write_config, Server};

pub const CHAT: &str = "smollm2-135m";
pub const EMBED: &str = "all-minilm-l6-v2";
pub const IMAGE: &str = "sd-tiny";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_kindling")
}

/// A config with a keys file and its own usage database; `auth` and
/// `usage` add settings to their sections, `daemon` other sections.
pub fn tenancy_config(auth: &str, usage: &str, daemon: &str) -> PathBuf {
    write_config(&format!(
        "[auth]\nkeys_file = \"keys.toml\"\n{auth}\n[usage]\npath = \"usage.sqlite\"\n{usage}\n{daemon}"
    ))
}

/// Runs `kindling keys …` against `config`; returns stdout.
pub fn keys(config: &Path, args: &[&str]) -> String {
    kindling("keys", config, args)
}

/// Runs `kindling COMMAND --config CONFIG ARGS…`, which must succeed;
/// returns its stdout.
pub fn kindling(command: &str, config: &Path, args: &[&str]) -> String {
    kindling_with(command, config, args, &[])
}

/// [`kindling`] with more environment variables.
pub fn kindling_with(command: &str, config: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(bin())
        .args([command, "--config"])
        .arg(config)
        .args(args)
        .env_remove("KINDLING_STORE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn create(config: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "--name", name];
    args.extend_from_slice(extra);
    keys(config, &args)
}

pub async fn call(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let c = client();
    let mut req = match method {
        "GET" => c.get(server.url(path)),
        _ => c.post(server.url(path)),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A chat request for `max_tokens` tokens, as `key`.
pub async fn chat_as(
    server: &Server,
    key: &str,
    max_tokens: u32,
) -> (u16, reqwest::header::HeaderMap, Value) {
    call(
        server,
        "POST",
        "/v1/chat/completions",
        Some(key),
        Some(chat_body(max_tokens)),
    )
    .await
}

pub fn chat_body(max_tokens: u32) -> Value {
    json!({"model": CHAT, "messages": [{"role": "user", "content": "Tell me about the sea."}],
           "max_tokens": max_tokens, "temperature": 0})
}
