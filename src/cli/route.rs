//! `kindling route …`: the rollout admin API from the command line, against
//! a running daemon (`--url`, `--api-key` or KINDLING_URL, KINDLING_API_KEY).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

/// Where the daemon is and how to call it.
#[derive(clap::Args)]
pub struct Daemon {
    /// The daemon's base URL.
    #[arg(
        long,
        env = "KINDLING_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// An admin key (the first of KINDLING_API_KEY's if comma-separated).
    #[arg(
        long = "api-key",
        env = "KINDLING_API_KEY",
        hide_env_values = true,
        global = true
    )]
    api_key: Option<String>,
    /// Print the daemon's JSON answer instead of a summary.
    #[arg(long, global = true)]
    json: bool,
}

/// `kindling route`.
#[derive(Subcommand)]
pub enum RouteCommand {
    /// Every id with versions, and its route.
    List,
    /// One id's route.
    Show { id: String },
    /// Set an id's weights: `kindling route set chat v1=90 v2=10`.
    Set {
        id: String,
        /// `VERSION=PERCENT`, adding up to 100.
        #[arg(required = true)]
        weights: Vec<String>,
        /// Mirror a share of requests to a version: `v3` or `v3:20`.
        #[arg(long)]
        shadow: Option<String>,
        /// A guard, as JSON: `{"max_error_rate_increase":0.05,"min_requests":20}`.
        #[arg(long)]
        guard: Option<String>,
    },
    /// Send all traffic to the candidate (or `--version`).
    Promote {
        id: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Put back the route before the last change.
    Rollback { id: String },
    /// Back to the config's route (or all traffic to the newest version).
    Reset { id: String },
    /// Who changed the route, when, from what to what.
    History { id: String },
    /// Canary against baseline: requests, errors, TTFT and latency.
    Compare {
        id: String,
        /// The window, e.g. `10m` (default: the guard's, or 5m).
        #[arg(long)]
        window: Option<String>,
    },
    /// Read the model manifests again.
    Reload,
}

fn weights(pairs: &[String]) -> Result<BTreeMap<String, f64>> {
    pairs
        .iter()
        .map(|p| {
            let (v, w) = p
                .split_once('=')
                .with_context(|| format!("expected VERSION=PERCENT, got `{p}`"))?;
            let w: f64 = w
                .trim_end_matches('%')
                .parse()
                .with_context(|| format!("`{p}`: expected a percent"))?;
            Ok((v.to_string(), w))
        })
        .collect()
}

/// Runs one route command.
pub fn run(daemon: Daemon, command: RouteCommand) -> Result<()> {
    let base = daemon.url.trim_end_matches('/').to_string();
    let path = |id: &str, action: &str| format!("{base}/admin/routes/{id}{action}");
    let (method, url, body) = match &command {
        RouteCommand::List => ("GET", format!("{base}/admin/routes"), None),
        RouteCommand::Show { id } => ("GET", path(id, ""), None),
        RouteCommand::Set {
            id,
            weights: w,
            shadow,
            guard,
        } => {
            let mut body = json!({ "weights": weights(w)? });
            if let Some(s) = shadow {
                // `VERSION:PERCENT`; versions may hold `:` themselves.
                let (version, percent) = match s.rsplit_once(':') {
                    Some((v, p)) if p.trim_end_matches('%').parse::<f64>().is_ok() => {
                        (v, p.trim_end_matches('%').parse::<f64>().unwrap_or(100.0))
                    }
                    _ => (s.as_str(), 100.0),
                };
                body["shadow"] = json!({ "version": version, "percent": percent });
            }
            if let Some(g) = guard {
                body["guard"] = serde_json::from_str(g).context("--guard: expected JSON")?;
            }
            ("PUT", path(id, ""), Some(body))
        }
        RouteCommand::Promote { id, version } => (
            "POST",
            path(id, "/promote"),
            Some(json!({ "version": version })),
        ),
        RouteCommand::Rollback { id } => ("POST", path(id, "/rollback"), None),
        RouteCommand::Reset { id } => ("DELETE", path(id, ""), None),
        RouteCommand::History { id } => ("GET", path(id, "/history"), None),
        RouteCommand::Compare { id, window } => {
            let q = window
                .as_ref()
                .map(|w| format!("?window={w}"))
                .unwrap_or_default();
            ("GET", format!("{}{q}", path(id, "/compare")), None)
        }
        RouteCommand::Reload => ("POST", format!("{base}/admin/reload"), None),
    };
    let answer = call(method, &url, daemon.api_key.as_deref(), body)?;
    if daemon.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    match command {
        RouteCommand::List => {
            for r in answer["data"].as_array().into_iter().flatten() {
                print_route(r);
            }
        }
        RouteCommand::History { .. } => {
            for c in answer["data"].as_array().into_iter().flatten() {
                println!(
                    "{}  {:<9} {:<15} {} -> {}{}",
                    c["at"].as_str().unwrap_or("-"),
                    c["actor"].as_str().unwrap_or("-"),
                    c["action"].as_str().unwrap_or("-"),
                    shares(&c["from"]["weights"]),
                    shares(&c["to"]["weights"]),
                    c["reason"]
                        .as_str()
                        .map(|r| format!("  ({r})"))
                        .unwrap_or_default()
                );
            }
        }
        RouteCommand::Compare { .. } | RouteCommand::Reload => {
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        _ => print_route(&answer),
    }
    Ok(())
}

fn shares(weights: &Value) -> String {
    match weights.as_object() {
        None => "default".into(),
        Some(w) => w
            .iter()
            .map(|(v, p)| format!("{v}={}", p.as_f64().unwrap_or(0.0)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn print_route(r: &Value) {
    let shadow = r["shadow"]["version"]
        .as_str()
        .map(|v| {
            format!(
                "  shadow {v} {}%",
                r["shadow"]["percent"].as_f64().unwrap_or(0.0)
            )
        })
        .unwrap_or_default();
    let guard = if r["guard"].is_object() {
        "  guarded"
    } else {
        ""
    };
    println!(
        "{}  {}  ({}){shadow}{guard}",
        r["id"].as_str().unwrap_or("-"),
        shares(&r["weights"]),
        r["origin"].as_str().unwrap_or("-")
    );
}

fn call(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> Result<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = client.request(method, url);
        if let Some(k) = key
            .and_then(|k| k.split(',').next())
            .filter(|k| !k.is_empty())
        {
            req = req.bearer_auth(k.trim());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {url}"))?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = value["error"]["message"].as_str().unwrap_or("no message");
            bail!("{status}: {msg}");
        }
        Ok(value)
    })
}
