//! Configuration: the daemon's settings file (`kindling.toml`), the model
//! manifests (`models/*.toml`) and the environment. This is the only module
//! that reads environment variables. Every problem fails start-up with a
//! message naming the file, the field and what was expected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

mod defaults;
mod devices;
mod engine;
mod env;
mod manifest;
mod routes;
mod sleep;
mod tenancy;
mod units;

pub use defaults::{GenerationDefaults, MAX_PROMPT_LOOKUP};
pub use devices::check_model_device;
pub use devices::{CpuFeature, DeviceConfig, DeviceName};
pub use engine::EngineConfig;
pub use env::Environment;
pub use manifest::{
    conflict, load_manifest, parse_size, scan_manifests, version_order, Architecture,
    ImageDefaults, ModelKind, ModelManifest, Precision, WeightFormat, WeightSource,
};
pub use routes::{check_route, GuardSpec, RouteSpec, ShadowSpec};
pub use sleep::SleepConfig;
pub use tenancy::{AuthConfig, UsageConfig, UsageTarget};
use units::{de_bytes, duration};
pub use units::{parse_bytes, Budget, KeepAlive};

/// Everything the daemon needs to start, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The settings file this came from.
    pub path: PathBuf,
    /// HTTP server settings.
    pub server: ServerConfig,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Where model weights live.
    pub store: PathBuf,
    /// Model lifecycle settings.
    pub lifecycle: LifecycleConfig,
    /// Devices models may be placed on, by name (`cpu`, `cuda:N`, `auto`).
    pub devices: BTreeMap<String, DeviceConfig>,
    /// The admin API.
    pub admin: AdminConfig,
    /// Where Hugging Face downloads come from.
    pub hub: HubConfig,
    /// The model catalog, by instance name (`id`, or `id@version`).
    pub models: BTreeMap<String, ModelManifest>,
    /// The folder of model manifests.
    pub manifests: PathBuf,
    /// How often the manifest folder is checked for changes (`None`: only
    /// on SIGHUP and `POST /admin/reload`).
    pub watch_interval: Option<Duration>,
    /// Routes over versions, by id, as the config file declares them.
    pub routes: BTreeMap<String, RouteSpec>,
    /// Where routes changed at run time and their history are saved.
    pub routes_state: PathBuf,
    /// API keys.
    pub auth: AuthConfig,
    /// Usage records.
    pub usage: UsageConfig,
    /// Sleep and wake.
    pub sleep: SleepConfig,
}

/// `[server]` in `kindling.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted (bytes or a size like `"4MiB"`).
    #[serde(deserialize_with = "de_bytes")]
    pub max_body_size: u64,
    /// How long in-flight requests may run after SIGTERM (`"30s"`).
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Time allowed for a request's headers, and again for its body
    /// (`"30s"`); a client that sends them slower is cut off (408).
    #[serde(with = "duration")]
    pub read_timeout: Duration,
    /// Origins browsers may call the API from (`["https://app.example"]`,
    /// or `["*"]`); CORS is off when empty.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_size: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
        }
    }
}

/// `[lifecycle]` in `kindling.toml`: how models come and go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// How long a model stays loaded after its last request, unless its
    /// manifest or the request says otherwise.
    pub keep_alive: KeepAlive,
    /// How long a load may wait for memory to come free (idle models to be
    /// evicted, busy ones to finish) before it fails with 503.
    #[serde(with = "duration")]
    pub load_timeout: Duration,
    /// Wait before retrying a model whose load failed; doubles with each
    /// further failure.
    #[serde(with = "duration")]
    pub retry_backoff: Duration,
    /// The longest wait between retries.
    #[serde(with = "duration")]
    pub max_retry_backoff: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            keep_alive: KeepAlive::For(Duration::from_secs(300)),
            load_timeout: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(5),
            max_retry_backoff: Duration::from_secs(300),
        }
    }
}

/// `[admin]` in `kindling.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/admin/*` (load, unload, status).
    pub enabled: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// `[hub]` in `kindling.toml`: the Hugging Face Hub client.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Base URL of the Hub or a mirror (default: the public Hub).
    pub endpoint: Option<String>,
    /// Access token for gated or private repositories (also `HF_TOKEN`).
    #[serde(skip)]
    pub token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ModelsSection {
    manifests: PathBuf,
    store: PathBuf,
    #[serde(with = "duration::optional")]
    watch_interval: Option<Duration>,
    routes_state: Option<PathBuf>,
}

impl Default for ModelsSection {
    fn default() -> Self {
        Self {
            manifests: PathBuf::from("models"),
            store: PathBuf::from("../store"),
            watch_interval: Some(Duration::from_secs(2)),
            routes_state: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonFile {
    #[serde(default)]
    server: ServerConfig,
    #[serde(default)]
    engine: EngineConfig,
    #[serde(default)]
    models: ModelsSection,
    #[serde(default)]
    lifecycle: LifecycleConfig,
    #[serde(default)]
    devices: BTreeMap<String, DeviceConfig>,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    hub: HubConfig,
    #[serde(default)]
    auth: AuthConfig,
    #[serde(default)]
    usage: UsageConfig,
    #[serde(default)]
    sleep: SleepConfig,
    #[serde(default)]
    routes: BTreeMap<String, RouteSpec>,
}

impl Config {
    /// Loads `path` and the manifests it points at. `listen` (from the
    /// command line) wins over `PORT`, which wins over the file.
    pub fn load(path: &Path, listen: Option<SocketAddr>, env: &Environment) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let file: DaemonFile = toml::from_str(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut server = file.server;
        if let Some(port) = &env.port {
            let port: u16 = port.parse().with_context(|| {
                format!("environment variable PORT: expected a port number, got `{port}`")
            })?;
            server.listen = SocketAddr::from(([0, 0, 0, 0], port));
        }
        if let Some(listen) = listen {
            server.listen = listen;
        }
        if server.max_body_size < 1024 {
            bail!(
                "{}: server.max_body_size: expected at least 1KiB, got {} bytes",
                path.display(),
                server.max_body_size
            );
        }
        let engine = &file.engine;
        for (key, value) in [
            ("queue_size", engine.queue_size),
            ("max_sequences", engine.max_sequences),
            ("max_batch_tokens", engine.max_batch_tokens),
            ("kv_cache_tokens", engine.kv_cache_tokens),
            ("embedding_batch_tokens", engine.embedding_batch_tokens),
            ("image_batch", engine.image_batch),
        ] {
            if value == 0 {
                bail!("{}: engine.{key}: expected at least 1", path.display());
            }
        }
        if engine.max_batch_tokens < engine.max_sequences {
            bail!(
                "{}: engine.max_batch_tokens ({}) must be at least engine.max_sequences ({}): every running sequence needs a token per step",
                path.display(),
                engine.max_batch_tokens,
                engine.max_sequences
            );
        }
        let store = env
            .store
            .clone()
            .unwrap_or_else(|| base.join(&file.models.store));
        let manifests = base.join(&file.models.manifests);
        let models = manifest::load_manifests(&manifests, &store)
            .with_context(|| format!("{}: models.manifests", path.display()))?;
        let mut devices = file.devices;
        devices::check(path, &mut devices, &models)?;
        let mut hub = file.hub;
        hub.token = env.hf_token.clone();
        let mut auth = file.auth;
        auth.keys_file = auth.keys_file.map(|f| base.join(f));
        auth.api_keys = env.api_keys.clone();
        let mut usage = file.usage;
        if let Some(url) = &env.usage_database_url {
            usage.database_url = Some(url.clone());
        }
        usage.resolve(path, base, &store)?;
        for (id, route) in &file.routes {
            check_route(&models, id, route)
                .map_err(|e| anyhow::anyhow!("{}: routes.\"{id}\".{e}", path.display()))?;
        }
        let routes_state = file
            .models
            .routes_state
            .map_or_else(|| store.join("routes.json"), |p| base.join(p));
        Ok(Self {
            path: path.to_path_buf(),
            server,
            engine: file.engine,
            store,
            models,
            manifests,
            watch_interval: file.models.watch_interval,
            routes_state,
            routes: file.routes,
            lifecycle: file.lifecycle,
            devices,
            admin: file.admin,
            hub,
            auth,
            usage,
            sleep: file.sleep,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kindling-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("models")).unwrap();
        std::fs::create_dir_all(d.join("store")).unwrap();
        std::fs::write(d.join("store/w.gguf"), b"x").unwrap();
        d
    }

    const MANIFEST: &str = "id = \"m\"\nkind = \"chat\"\nformat = \"gguf\"\narchitecture = \"llama\"\n[weights]\npath = \"w.gguf\"\n";

    #[test]
    fn valid_config_loads_and_resolves_paths() {
        let d = temp_dir("ok");
        write(&d.join("models"), "m.toml", MANIFEST);
        let cfg = write(&d, "k.toml", "[models]\nstore = \"store\"\n[server]\nmax_body_size = \"1MiB\"\nshutdown_timeout = \"5s\"\nread_timeout = \"10s\"\n");
        let c = Config::load(&cfg, None, &Environment::default()).unwrap();
        assert_eq!(c.server.max_body_size, 1 << 20);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.server.read_timeout, Duration::from_secs(10));
        assert_eq!(
            c.models["m"].weights,
            WeightSource::Local(d.join("store/w.gguf"))
        );
        let env = Environment {
            port: Some("9000".into()),
            ..Environment::default()
        };
        assert_eq!(
            Config::load(&cfg, None, &env).unwrap().server.listen.port(),
            9000
        );
        let cli = "127.0.0.1:7000".parse().ok();
        assert_eq!(
            Config::load(&cfg, cli, &env).unwrap().server.listen.port(),
            7000
        );
    }

    #[test]
    fn lifecycle_devices_and_hub_sections_load() {
        let d = temp_dir("life");
        write(
            &d.join("models"),
            "m.toml",
            &format!("keep_alive = -1\npin = true\n{MANIFEST}"),
        );
        let cfg = write(
            &d,
            "k.toml",
            "[models]\nstore = \"store\"\n[lifecycle]\nkeep_alive = \"90s\"\nload_timeout = \"5s\"\n[devices.cpu]\nbudget = \"2GiB\"\n[admin]\nenabled = false\n[hub]\nendpoint = \"http://127.0.0.1:1\"\n",
        );
        let env = Environment {
            hf_token: Some("t".into()),
            ..Environment::default()
        };
        let c = Config::load(&cfg, None, &env).unwrap();
        assert_eq!(
            c.lifecycle.keep_alive,
            KeepAlive::For(Duration::from_secs(90))
        );
        assert_eq!(c.lifecycle.load_timeout, Duration::from_secs(5));
        assert_eq!(c.devices["cpu"].budget, Some(Budget::Bytes(2 << 30)));
        assert!(!c.admin.enabled);
        assert_eq!(c.hub.token.as_deref(), Some("t"));
        assert_eq!(c.models["m"].keep_alive, Some(KeepAlive::Forever));
        assert!(c.models["m"].pin);
        let bad = write(
            &d,
            "k2.toml",
            "[models]\nstore = \"store\"\n[devices.gpu7]\nbudget = \"1GiB\"\n",
        );
        let e = format!("{:#}", Config::load(&bad, None, &env).unwrap_err());
        assert!(e.contains("k2.toml") && e.contains("devices.gpu7"), "{e}");
        let bad = write(
            &d,
            "k3.toml",
            "[models]\nstore = \"store\"\n[devices.cpu]\nbudget = \"150%\"\n",
        );
        let e = format!("{:#}", Config::load(&bad, None, &env).unwrap_err());
        assert!(e.contains("k3.toml") && e.contains("150"), "{e}");
        // GPUs by ordinal or `auto`; budgets default per kind of device.
        let gpus = write(
            &d,
            "k4.toml",
            "[models]\nstore = \"store\"\n[devices.\"cuda:0\"]\nbudget = \"70%\"\n[devices.auto]\n",
        );
        let c = Config::load(&gpus, None, &env).unwrap();
        assert_eq!(c.devices["cuda:0"].budget, Some(Budget::Fraction(0.7)));
        let auto = &c.devices["auto"];
        assert_eq!(
            auto.budget_or_default(&DeviceName::Auto),
            Budget::Fraction(0.9)
        );
        assert_eq!(
            c.devices["cpu"].budget_or_default(&DeviceName::Cpu),
            Budget::Fraction(0.8)
        );
        let bad = write(
            &d,
            "k5.toml",
            "[models]\nstore = \"store\"\n[devices.\"cuda:x\"]\n",
        );
        let e = format!("{:#}", Config::load(&bad, None, &env).unwrap_err());
        assert!(e.contains("devices.cuda:x") && e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn manifests_name_declared_devices_and_gpu_dtypes() {
        let d = temp_dir("gpu-manifests");
        let cfg = |devices: &str| {
            write(
                &d,
                "k.toml",
                &format!("[models]\nstore = \"store\"\n{devices}"),
            )
        };
        let load = |path: &Path| Config::load(path, None, &Environment::default());
        write(
            &d.join("models"),
            "m.toml",
            &format!("device = \"cuda:1\"\ndtype = \"f16\"\n{MANIFEST}"),
        );
        // `auto` covers every ordinal; one declared GPU covers only itself.
        let c = load(&cfg("[devices.auto]\n")).unwrap();
        assert_eq!(c.models["m"].dtype, Some(Precision::F16));
        let e = format!("{:#}", load(&cfg("[devices.\"cuda:0\"]\n")).unwrap_err());
        assert!(
            e.contains("m.toml") && e.contains("cuda:1") && e.contains("not declared"),
            "{e}"
        );
        write(
            &d.join("models"),
            "m.toml",
            &format!("dtype = \"f8\"\n{MANIFEST}"),
        );
        let e = format!("{:#}", load(&cfg("")).unwrap_err());
        assert!(e.contains("m.toml"), "{e}");
        let embedding = MANIFEST
            .replace("kind = \"chat\"", "kind = \"embedding\"")
            .replace("gguf\"\narch", "safetensors\"\narch")
            .replace("llama", "bert");
        write(
            &d.join("models"),
            "m.toml",
            &format!("device = \"cuda:0\"\n{embedding}"),
        );
        let e = format!("{:#}", load(&cfg("[devices.auto]\n")).unwrap_err());
        assert!(e.contains("embedding models run on `cpu` only"), "{e}");
    }

    #[test]
    fn batching_settings_load_and_are_checked() {
        let d = temp_dir("engine");
        write(
            &d.join("models"),
            "m.toml",
            &format!(
                "kv_cache_tokens = 4096\n{}",
                MANIFEST.replace("gguf\"\narch", "safetensors\"\narch")
            ),
        );
        let cfg = write(
            &d,
            "k.toml",
            "[models]\nstore = \"store\"\n[engine]\nmax_sequences = 8\nmax_batch_tokens = 256\nkv_cache_tokens = 2048\nrequest_timeout = \"2m\"\n",
        );
        let c = Config::load(&cfg, None, &Environment::default()).unwrap();
        assert_eq!(
            (c.engine.max_sequences, c.engine.max_batch_tokens),
            (8, 256)
        );
        assert_eq!(c.engine.request_timeout, Some(Duration::from_secs(120)));
        assert_eq!(c.models["m"].kv_cache_tokens, Some(4096));
        assert_eq!(c.models["m"].format, WeightFormat::Safetensors);
        let bad = write(
            &d,
            "k2.toml",
            "[models]\nstore = \"store\"\n[engine]\nmax_sequences = 64\nmax_batch_tokens = 32\n",
        );
        let e = format!(
            "{:#}",
            Config::load(&bad, None, &Environment::default()).unwrap_err()
        );
        assert!(
            e.contains("k2.toml") && e.contains("max_batch_tokens"),
            "{e}"
        );
        let bad = write(
            &d,
            "k3.toml",
            "[models]\nstore = \"store\"\n[engine]\nkv_cache_tokens = 0\n",
        );
        let e = format!(
            "{:#}",
            Config::load(&bad, None, &Environment::default()).unwrap_err()
        );
        assert!(e.contains("engine.kv_cache_tokens"), "{e}");
    }

    #[test]
    fn errors_name_file_field_and_expectation() {
        let d = temp_dir("bad");
        let cfg = write(&d, "k.toml", "[models]\nstore = \"store\"\n");
        let err = |manifest: &str| {
            write(&d.join("models"), "m.toml", manifest);
            format!(
                "{:#}",
                Config::load(&cfg, None, &Environment::default()).unwrap_err()
            )
        };
        let e = err(&format!("{MANIFEST}colour = \"red\"\n"));
        assert!(e.contains("m.toml") && e.contains("colour"), "{e}");
        let e = err(&MANIFEST.replace("\"chat\"", "\"poetry\""));
        assert!(
            e.contains("m.toml") && e.contains("poetry") && e.contains("`chat`"),
            "{e}"
        );
        let e = err(&MANIFEST.replace("path = \"w.gguf\"", "repo = \"org\"\nfiles = [\"a.gguf\"]"));
        assert!(
            e.contains("weights.repo") && e.contains("owner/name"),
            "{e}"
        );
        let e = err(&format!("{MANIFEST}files = [\"a.gguf\"]\n"));
        assert!(e.contains("weights.path") && e.contains("`repo`"), "{e}");
        let e = err(&format!("device = \"cuda:0\"\n{MANIFEST}"));
        assert!(e.contains("m.toml") && e.contains("cuda:0"), "{e}");
        let e = err(&format!("keep_alive = \"soon\"\n{MANIFEST}"));
        assert!(e.contains("m.toml") && e.contains("keep_alive"), "{e}");
        let e = err(&format!("{MANIFEST}[defaults]\ntemperature = 9.0\n"));
        assert!(
            e.contains("defaults.temperature") && e.contains("[0, 2]"),
            "{e}"
        );
        write(&d.join("models"), "m.toml", MANIFEST);
        let bad = write(&d, "k2.toml", "[server]\nlisten = \"nowhere\"\n");
        let e = format!(
            "{:#}",
            Config::load(&bad, None, &Environment::default()).unwrap_err()
        );
        assert!(e.contains("k2.toml") && e.contains("listen"), "{e}");
    }
}
