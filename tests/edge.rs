//! The connection edge, over raw sockets: oversized bodies refused from
//! their declared length, slow bodies timed out, a drain that does not wait
//! for idle or stalled connections, and a stalled streaming client that
//! costs the daemon no CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Sends a POST's headers, declaring `length` bytes, and `sent` of them.
async fn start_upload(server: &Server, path: &str, length: u64, sent: &[u8]) -> TcpStream {
    let mut s = connect(server).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: kindling\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(sent).await.unwrap();
    s
}

/// Reads until the server closes the connection or `limit` passes, and
/// returns what came.
async fn read_response(s: &mut TcpStream, limit: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn status_of(response: &str) -> &str {
    response.split_whitespace().nth(1).unwrap_or("")
}

#[tokio::test]
async fn an_oversized_declared_body_is_refused_before_it_is_sent() {
    // A long read timeout: only refusing from the header answers in time.
    let server = Server::with_config("[server]\nmax_body_size = \"1MiB\"\nread_timeout = \"5m\"\n");
    let mut s = start_upload(&server, "/v1/chat/completions", 64 << 20, b"{").await;
    let response = read_response(&mut s, Duration::from_secs(20)).await;
    assert_eq!(status_of(&response), "413", "{response}");
    assert!(response.contains("request_too_large"), "{response}");
    assert!(response.to_ascii_lowercase().contains("connection: close"));
}

#[tokio::test]
async fn a_body_slower_than_the_read_timeout_gets_408() {
    let server = Server::with_config("[server]\nread_timeout = \"1s\"\n");
    let mut s = start_upload(&server, "/v1/embeddings", 100, b"{\"model\":").await;
    let response = read_response(&mut s, Duration::from_secs(20)).await;
    assert_eq!(status_of(&response), "408", "{response}");
    assert!(response.contains("request_timeout"), "{response}");
}

#[tokio::test]
async fn the_drain_closes_idle_and_stalled_uploads_and_exits_at_once() {
    let mut server =
        Server::with_config("[server]\nshutdown_timeout = \"60s\"\nread_timeout = \"5m\"\n");
    // An idle keep-alive connection, after one request.
    let mut idle = connect(&server).await;
    idle.write_all(b"GET /health/live HTTP/1.1\r\nhost: kindling\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // An upload that stalls after its first bytes.
    let mut stalled = start_upload(&server, "/v1/embeddings", 1000, b"{\"model\":").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(50))
        .expect("did not exit");
    assert!(status.success(), "exit status {status}");
    // Far inside the 60 s grace period: nothing was waited for.
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "the drain waited {:?} for connections that serve nothing",
        began.elapsed()
    );
    let response = read_response(&mut stalled, Duration::from_secs(5)).await;
    assert_eq!(status_of(&response), "503", "{response}");
    assert_eq!(read_response(&mut idle, Duration::from_secs(5)).await, "");
}

/// User and system CPU time of a process so far, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((fields[0] + fields[1]) * 1000 / ticks)
}

#[tokio::test]
async fn a_stalled_streaming_client_costs_no_cpu() {
    let server = Server::start();
    // Eight choices with twenty alternatives per token: kilobytes per step,
    // so the socket's buffers fill within a few hundred steps.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
                      "max_tokens": 4000, "n": 8, "logprobs": true, "top_logprobs": 20,
                      "ignore_eos": true, "stream": true, "seed": 1});
    // A small receive buffer, and nothing read: the stream backs up.
    let socket = raw_post(&server, "/v1/chat/completions", &body).await;
    // Wait until the daemon stops working: its buffers for this client are
    // full and the worker sits the request out.
    let pid = server.pid();
    let mut last = cpu_time(pid);
    let end = Instant::now() + Duration::from_secs(240);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_time(pid);
        if now - last < Duration::from_millis(20) {
            break;
        }
        last = now;
        assert!(Instant::now() < end, "the daemon never stopped working");
    }
    // The request is still in hand (the stall timeout is 30 s)...
    let state = model_state(&server, MODEL).await;
    assert_eq!(state["state"], "busy", "{state}");
    // ...and over three seconds the daemon uses (almost) no CPU.
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_time(pid) - before;
    eprintln!("CPU time over 3 s with a stalled client: {used:?}");
    assert!(
        used <= Duration::from_millis(30),
        "a daemon waiting on a stalled client used {used:?} of CPU in 3 s"
    );
    drop(socket);
}
