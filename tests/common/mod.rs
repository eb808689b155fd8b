//! Starts the real `kindling` binary on 127.0.0.1:0 with the real demo model
//! and talks to it over HTTP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MODEL: &str = "smollm2-135m";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn store() -> PathBuf {
    std::env::var_os("KINDLING_STORE").map_or_else(|| repo().join("store"), PathBuf::from)
}

pub mod keys;

#[path = "../../kernels/tests/support/cuda.rs"]
mod cuda;
#[allow(unused_imports)] // not every test binary has a GPU half
pub use cuda::skip_cuda;

/// A fresh, empty directory for one test.
pub fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "kindling-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `kindling.toml` using the repo's manifests and store, plus `extra`.
pub fn write_config(extra: &str) -> PathBuf {
    let dir = temp_dir();
    let path = dir.join("kindling.toml");
    let text = format!(
        "{extra}\n[models]\nmanifests = {:?}\nstore = {:?}\n",
        repo().join("configs/models"),
        store()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A `kindling.toml` serving only the model `manifest` declares.
pub fn config_with_manifest(manifest: &str) -> PathBuf {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("models")).unwrap();
    std::fs::write(dir.join("models/model.toml"), manifest).unwrap();
    let path = dir.join("kindling.toml");
    std::fs::write(
        &path,
        format!("[models]\nmanifests = \"models\"\nstore = {:?}\n", store()),
    )
    .unwrap();
    path
}

/// A `kindling.toml` with `daemon` settings serving `manifests` (file
/// name, text); the store is the repo's.
pub fn config_with_manifests(daemon: &str, manifests: &[(&str, &str)]) -> PathBuf {
    config_with_models(daemon, manifests, "")
}

/// Like [`config_with_manifests`], with `models` settings added to the
/// `[models]` table; the manifests are in `models/` next to the config.
pub fn config_with_models(daemon: &str, manifests: &[(&str, &str)], models: &str) -> PathBuf {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("models")).unwrap();
    for (name, text) in manifests {
        std::fs::write(dir.join("models").join(name), text).unwrap();
    }
    let path = dir.join("kindling.toml");
    std::fs::write(
        &path,
        format!(
            "{daemon}\n[models]\nmanifests = \"models\"\nstore = {:?}\n{models}\n",
            store()
        ),
    )
    .unwrap();
    path
}

/// A manifest serving the demo GGUF (or `path`) as `id`, plus `extra` keys.
pub fn demo_manifest(id: &str, path: Option<&Path>, extra: &str) -> String {
    let path = path.map_or_else(
        || "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf".to_string(),
        |p| p.display().to_string(),
    );
    format!(
        "id = \"{id}\"\nkind = \"chat\"\nformat = \"gguf\"\narchitecture = \"llama\"\n{extra}\n[weights]\npath = {path:?}\n"
    )
}

pub struct Server {
    child: Child,
    pub base: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// The daemon with the repo's default config.
    pub fn start() -> Self {
        Self::spawn(&repo().join("configs/kindling.toml"), &[])
    }

    /// The daemon with the default settings plus `extra` TOML sections.
    pub fn with_config(extra: &str) -> Self {
        Self::spawn(&write_config(extra), &[])
    }

    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kindling"));
        cmd.args(["serve", "--config"]).arg(config);
        if !env.iter().any(|(k, _)| *k == "PORT") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        // The config names the store; a KINDLING_STORE in the test's own
        // environment (where its models are) must not override it.
        cmd.env("RUST_LOG", "info")
            .env_remove("PORT")
            .env_remove("KINDLING_STORE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let addr = line
                        .split("listening on http://")
                        .nth(1)
                        // Text lines end the address at a space, JSON ones at a quote.
                        .map(|a| {
                            a.split(|c: char| c.is_whitespace() || c == '"')
                                .next()
                                .unwrap_or("")
                                .to_string()
                        });
                    // Store the line before announcing it, so logs() has it.
                    lines.lock().unwrap().push(line);
                    if let Some(addr) = addr {
                        let _ = tx.send(addr);
                    }
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kindling did not start:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
        };
        let addr = addr.replace("0.0.0.0", "127.0.0.1");
        Self {
            child,
            base: format!("http://{addr}"),
            lines,
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's resident memory, read from /proc.
    pub fn resident_bytes(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid())).unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a POST over a raw connection with a small receive buffer and
/// returns the socket: closing or not reading it is up to the test.
pub async fn raw_post(server: &Server, path: &str, body: &Value) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;

    let addr = server.base.trim_start_matches("http://").to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// POSTs `body` and returns the status, headers and parsed JSON body.
pub async fn post(
    server: &Server,
    path: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let json =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, headers, json)
}

/// POSTs a streaming request and returns every SSE `data:` payload, in order.
pub async fn post_stream(server: &Server, path: &str, body: &Value) -> Vec<String> {
    let resp = client()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "stream request failed");
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    sse_data(&resp.text().await.unwrap())
}

pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// GETs `path` as JSON.
pub async fn get_json(server: &Server, path: &str) -> Value {
    client()
        .get(server.url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// One model's object from `/v1/models/{id}`.
pub async fn model_state(server: &Server, id: &str) -> Value {
    get_json(server, &format!("/v1/models/{id}")).await
}

/// Polls until the model reaches `state`, or panics after `timeout`.
pub async fn wait_state(server: &Server, id: &str, state: &str, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let m = model_state(server, id).await;
        if m["state"] == state {
            return m;
        }
        assert!(start.elapsed() < timeout, "{id} never became {state}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of `/metrics`.
pub async fn metrics_text(server: &Server) -> String {
    client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one series in `/metrics` (0 when absent).
pub async fn metric(server: &Server, series: &str) -> f64 {
    metrics_text(server)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A short chat request body for `model`.
pub fn chat(model: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 2,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// Asserts the OpenAI error shape and returns the error object.
pub fn error_of(body: &Value) -> &Value {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {body}"
    );
    assert!(e["type"].is_string(), "no type: {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "missing param/code: {body}"
    );
    e
}
