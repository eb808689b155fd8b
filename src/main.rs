//! The `kindling` binary: parse the command line, read the config, wire the
//! rooms together, serve.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kindling::config::{Config, Environment, WeightSource};
use kindling::http::{self, AppState};
use kindling::metrics::Metrics;
use kindling::registry::Registry;
use kindling::tenancy::Tenancy;
use tracing_subscriber::EnvFilter;

mod cli;

/// Kindling: a self-hosted model-serving daemon with an OpenAI-compatible API.
///
/// Models are declared in manifests and loaded on the first request for them.
#[derive(Parser)]
#[command(name = "kindling", version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// The daemon's settings file.
    #[arg(
        long,
        short,
        value_name = "PATH",
        default_value = "configs/kindling.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start the daemon and serve the OpenAI-compatible API.
    ///
    /// The listen address is, in order of precedence: --listen, then
    /// 0.0.0.0:$PORT when the PORT environment variable is set (as Knative
    /// does), then `server.listen` in the config file, then 127.0.0.1:8080.
    /// Logs go to stdout; RUST_LOG sets the filter (default: info).
    /// SIGTERM or Ctrl-C stops accepting requests, lets in-flight ones finish
    /// for up to `server.shutdown_timeout`, and exits 0.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address and port to listen on, e.g. 127.0.0.1:8080 or 0.0.0.0:80
        /// (port 0 picks a free one).
        #[arg(long, short, value_name = "ADDR:PORT")]
        listen: Option<SocketAddr>,
        /// A key every request must carry (`Authorization: Bearer KEY`),
        /// with full access; repeatable. Also KINDLING_API_KEY
        /// (comma-separated). Managed keys: `[auth] keys_file`.
        #[arg(long = "api-key", value_name = "KEY")]
        api_keys: Vec<String>,
        /// Listen beyond loopback with no API key (anyone who can reach the
        /// port may use it).
        #[arg(long)]
        insecure_public: bool,
        /// Log lines as text (default) or as one JSON object per line
        /// (time, level, target, request id, model, fields).
        #[arg(long, value_enum, env = "KINDLING_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
        /// Check the config, the model manifests and the keys file, say
        /// what would be served, and exit (1 if anything is wrong).
        #[arg(long)]
        check_config: bool,
    },
    /// Manage API keys in the keys file (`[auth] keys_file`).
    Keys {
        #[command(flatten)]
        config: ConfigArgs,
        /// The keys file (instead of the config's `[auth] keys_file`).
        #[arg(long, value_name = "PATH", global = true)]
        keys_file: Option<PathBuf>,
        #[command(subcommand)]
        command: cli::KeysCommand,
    },
    /// Report metered usage from the usage store, as a table, CSV or JSON.
    Usage {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        args: cli::UsageArgs,
    },
    /// Check the config and manifests, and list the models they declare.
    Models {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Route an id's traffic over its versions on a running daemon: show,
    /// set weights, promote, roll back, history, canary comparison.
    Route {
        #[command(flatten)]
        daemon: cli::route::Daemon,
        #[command(subcommand)]
        command: cli::route::RouteCommand,
    },
    /// Download a model's weights into the store ahead of its first load
    /// (models whose manifest names a Hugging Face repo).
    Pull {
        #[command(flatten)]
        config: ConfigArgs,
        /// The model id, as in its manifest.
        model: String,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

fn init_logging(env: &Environment, format: LogFormat) {
    let filter = env
        .rust_log
        .as_deref()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Refuses to serve beyond loopback with no key, unless told to.
fn check_exposure(config: &Config, insecure_public: bool) -> Result<()> {
    let ip = config.server.listen.ip();
    if ip.is_loopback() || config.auth.enabled() || insecure_public {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {} with no API key: anyone who can reach it could use it. \
         Add a key (`--api-key KEY`, the KINDLING_API_KEY variable, or `[auth] keys_file` \
         with `kindling keys create`), listen on 127.0.0.1, or pass --insecure-public \
         if an open server is what you want",
        config.server.listen
    )
}

async fn serve(config: Config, env: Environment) -> Result<()> {
    let metrics = Arc::new(Metrics::with_labels(&env.platform_labels));
    let tenancy = Arc::new(Tenancy::new(&config, metrics.clone())?);
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let registry = Arc::new(Registry::new(&config, metrics));
    registry.start_background();
    if let Some(every) = config.watch_interval {
        registry.watch_manifests(every);
    }
    reload_on_hangup(&registry);
    tenancy.start_background();
    let state = AppState::new(
        registry.clone(),
        tenancy.clone(),
        config.server.max_body_size,
        config.admin.enabled,
    )
    .with_request_timeout(config.engine.request_timeout)
    .with_read_timeout(config.server.read_timeout)
    .with_cors(config.server.cors_origins.clone())
    .with_sleep(config.sleep.clone());
    tracing::info!(
        config = %config.path.display(),
        models = config.models.len(),
        keys = config.auth.enabled(),
        "listening on http://{addr}"
    );
    http::serve(
        listener,
        state,
        shutdown_signal(),
        config.server.shutdown_timeout,
    )
    .await?;
    // Every request has ended: its usage record is queued. Commit them all.
    tenancy.close().await;
    registry.unload_all();
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP reads the model manifests again.
fn reload_on_hangup(registry: &Arc<Registry>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        };
        let registry = Arc::downgrade(registry);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(r) = registry.upgrade() else { return };
                tracing::info!("SIGHUP: reloading the model manifests");
                r.reload().await;
            }
        });
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Loads the config and applies its process-wide settings before any model
/// loads: which optional instruction sets the CPU kernels may use.
fn load_config(path: &Path, listen: Option<SocketAddr>, env: &Environment) -> Result<Config> {
    let config = Config::load(path, listen, env)?;
    let features = config.cpu_features();
    kindling_models::configure_cpu(features)
        .with_context(|| format!("{}: devices.cpu.disable", path.display()))?;
    if features != kindling_models::CpuFeatures::default() {
        tracing::info!(
            amx = features.amx,
            vnni = features.vnni,
            "CPU kernels limited by devices.cpu.disable"
        );
    }
    Ok(config)
}

fn run(args: Args) -> Result<()> {
    let env = Environment::from_process();
    match args.command {
        Command::Serve {
            config,
            listen,
            api_keys,
            insecure_public,
            log_format,
            check_config,
        } => {
            init_logging(&env, log_format);
            let mut config = load_config(&config.config, listen, &env)?;
            config.auth.api_keys.extend(api_keys);
            check_exposure(&config, insecure_public)?;
            if check_config {
                return cli::check_config(&config);
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(config, env))
        }
        Command::Models { config } => {
            let config = load_config(&config.config, None, &env)?;
            for m in config.models.values() {
                let source = match &m.weights {
                    WeightSource::Local(p) => p.display().to_string(),
                    WeightSource::Hub { repo, revision, .. } => format!("hf:{repo}@{revision}"),
                };
                println!("{}\t{}\t{source}", m.name(), m.kind.name());
            }
            Ok(())
        }
        Command::Keys {
            config,
            keys_file,
            command,
        } => {
            let path = cli::keys_file(&config.config, keys_file, &env)?;
            cli::keys(&path, command)
        }
        Command::Usage { config, args } => cli::usage(&config.config, &env, args),
        Command::Route { daemon, command } => cli::route::run(daemon, command),
        Command::Pull { config, model } => {
            init_logging(&env, LogFormat::Text);
            let config = load_config(&config.config, None, &env)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let registry = Registry::new(&config, Arc::new(Metrics::new()));
            let path = runtime.block_on(registry.pull(&model))?;
            println!("{model}: {}", path.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    kindling::registry::tune_allocator();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kindling: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
