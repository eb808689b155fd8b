//! `kindling keys …` and `kindling usage …`: managing API keys and reading
//! metered usage from the command line, without a running daemon.

use std::path::{Path, PathBuf};

pub mod route;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use kindling::config::{Config, Environment, UsageTarget, WeightSource};
use kindling::tenancy::{self, KeysFile, NewKey, Period, Scope, UsageQuery};

/// `kindling keys`.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a key and print its secret (once: only a hash is kept).
    Create {
        /// The key's name, as usage records and metrics show it.
        #[arg(long)]
        name: String,
        /// Models it may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// `inference` (the API) or `admin` (the API and `/admin/*`).
        #[arg(long, default_value = "inference")]
        scope: Scope,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens (prompt, completion, embedding) per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// Tokens per quota period.
        #[arg(long, requires = "quota_period")]
        quota_tokens: Option<u64>,
        /// The quota's period: `day` or `month` (UTC calendar).
        #[arg(long, requires = "quota_tokens")]
        quota_period: Option<Period>,
    },
    /// List keys (names, scopes, limits; never secrets).
    List,
    /// Revoke a key: the daemon stops taking it within seconds.
    Revoke {
        /// The key's name.
        name: String,
    },
}

/// Output formats of `kindling usage`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// `kindling usage`'s options.
#[derive(clap::Args)]
pub struct UsageArgs {
    /// From (RFC 3339, a date, or Unix seconds); default: this month.
    #[arg(long)]
    since: Option<String>,
    /// Until (exclusive).
    #[arg(long)]
    until: Option<String>,
    /// Only this key.
    #[arg(long)]
    key: Option<String>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Group by: key, model, version, endpoint, day, status (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "key,model")]
    group_by: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

/// The keys file named by `--keys-file`, else by the config's `[auth] keys_file`.
pub fn keys_file(config: &Path, explicit: Option<PathBuf>, env: &Environment) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let config = Config::load(config, None, env)?;
    config.auth.keys_file.with_context(|| {
        format!(
            "{} has no `[auth] keys_file`: add one, or pass --keys-file",
            config.path.display()
        )
    })
}

pub fn keys(path: &Path, command: KeysCommand) -> Result<()> {
    let mut file = KeysFile::read(path)?;
    let now = tenancy::rfc3339(tenancy::now_ms());
    match command {
        KeysCommand::Create {
            name,
            models,
            scope,
            rpm,
            tpm,
            quota_tokens,
            quota_period,
        } => {
            if rpm == Some(0) || tpm == Some(0) {
                bail!("--rpm and --tpm must be at least 1");
            }
            let secret = file.create(
                NewKey {
                    name: name.clone(),
                    scope,
                    models,
                    rpm,
                    tpm,
                    quota_tokens,
                    quota_period,
                },
                &now,
            )?;
            file.write(path)?;
            eprintln!(
                "created key `{name}` in {}; its secret (shown only now):",
                path.display()
            );
            println!("{secret}");
        }
        KeysCommand::List => {
            println!("NAME\tSCOPE\tMODELS\tRPM\tTPM\tQUOTA\tCREATED\tSTATUS\tHINT");
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            for k in &file.keys {
                let quota = match (k.quota_tokens, k.quota_period) {
                    (Some(t), Some(p)) => {
                        format!("{t}/{}", if p == Period::Day { "day" } else { "month" })
                    }
                    _ => "-".into(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{quota}\t{}\t{}\t{}…",
                    k.name,
                    if k.scope == Scope::Admin {
                        "admin"
                    } else {
                        "inference"
                    },
                    k.models.as_ref().map_or("*".into(), |m| m.join(",")),
                    opt(k.rpm),
                    opt(k.tpm),
                    k.created,
                    k.revoked
                        .as_ref()
                        .map_or("active".into(), |t| format!("revoked {t}")),
                    k.hint,
                );
            }
        }
        KeysCommand::Revoke { name } => {
            file.revoke(&name, &now)?;
            file.write(path)?;
            eprintln!("revoked key `{name}`");
        }
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn usage(config: &Path, env: &Environment, args: UsageArgs) -> Result<()> {
    let config = Config::load(config, None, env)?;
    let Some(target) = config.usage.target() else {
        bail!("usage metering is off in {}", config.path.display());
    };
    let time = |v: &Option<String>| -> Result<Option<i64>> {
        v.as_deref()
            .map(|t| tenancy::parse_time(t).map_err(anyhow::Error::msg))
            .transpose()
    };
    let q = UsageQuery {
        since_ms: Some(
            time(&args.since)?.unwrap_or_else(|| Period::Month.bounds(tenancy::now_ms()).0),
        ),
        until_ms: time(&args.until)?,
        key: args.key,
        model: args.model,
        group_by: args.group_by,
    };
    q.check().map_err(anyhow::Error::msg)?;
    let rows = tenancy::usage::open(&target)?.query(&q)?;
    if let Format::Json = args.format {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let totals = [
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "embedding_tokens",
        "images",
        "pixel_steps",
        "compute_seconds",
        "queue_seconds",
    ];
    let sep = if let Format::Csv = args.format {
        ","
    } else {
        "\t"
    };
    let header: Vec<&str> = q
        .group_by
        .iter()
        .map(String::as_str)
        .chain(totals)
        .collect();
    println!("{}", header.join(sep));
    for r in rows {
        let mut cells: Vec<String> = q
            .group_by
            .iter()
            .map(|g| r.group.get(g).cloned().unwrap_or_default())
            .collect();
        cells.extend([
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
            r.cached_tokens.to_string(),
            r.embedding_tokens.to_string(),
            r.images.to_string(),
            format!("{:.3}", r.pixel_steps),
            format!("{:.3}", r.compute_seconds),
            format!("{:.3}", r.queue_seconds),
        ]);
        if let Format::Csv = args.format {
            cells = cells.iter().map(|c| csv_field(c)).collect();
        }
        println!("{}", cells.join(sep));
    }
    Ok(())
}

/// `kindling serve --check-config`: the config and manifests have loaded
/// (or we would not be here); check what they point at and say what would
/// be served. Local weights that are missing are an error: their model
/// could never load.
pub fn check_config(config: &Config) -> Result<()> {
    println!("config: {}", config.path.display());
    println!("listen: {}", config.server.listen);
    let mut missing = Vec::new();
    for m in config.models.values() {
        let (source, present) = match &m.weights {
            WeightSource::Local(p) => (p.display().to_string(), p.exists()),
            WeightSource::Hub { repo, revision, .. } => (format!("hf:{repo}@{revision}"), true),
        };
        let note = if present { "" } else { " (missing)" };
        println!("model: {}\t{}\t{source}{note}", m.name(), m.kind.name());
        if !present {
            missing.push(format!("{}: {source}", m.id));
        }
    }
    match &config.auth.keys_file {
        Some(path) => {
            let file = KeysFile::read(path)?;
            let live = file.keys.iter().filter(|k| k.revoked.is_none()).count();
            println!("keys: {} ({live} in force)", path.display());
        }
        None if config.auth.api_keys.is_empty() => println!("keys: none (open API)"),
        None => println!(
            "keys: {} from the command line or environment",
            config.auth.api_keys.len()
        ),
    }
    match config.usage.target() {
        Some(UsageTarget::Sqlite(path)) => println!("usage: sqlite {}", path.display()),
        // The URL may hold a password: only say which kind of store.
        Some(UsageTarget::Postgres(_)) => println!("usage: postgresql"),
        None => println!("usage: off"),
    }
    if !missing.is_empty() {
        bail!(
            "weights missing for {} model(s): {} (scripts/fetch-models.sh fetches the demo models)",
            missing.len(),
            missing.join(", ")
        );
    }
    println!("ok");
    Ok(())
}
