//! Configuration: the daemon's settings file (`kindling.toml`), the model
//! manifests (`models/*.toml`) and the environment. This is the only module
//! that reads environment variables. Every problem fails start-up with a
//! message naming the file, the field and what was expected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

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
    /// The model catalog, by id.
    pub models: BTreeMap<String, ModelManifest>,
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
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_size: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// `[engine]` in `kindling.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Requests that may wait per model before new ones get 429.
    pub queue_size: usize,
    /// How long a streaming client may stop reading (its buffer full, the
    /// connection open) before its request is cancelled (`"30s"`).
    #[serde(with = "humantime_serde_compat")]
    pub stall_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_size: 64,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ModelsSection {
    manifests: PathBuf,
    store: PathBuf,
}

impl Default for ModelsSection {
    fn default() -> Self {
        Self {
            manifests: PathBuf::from("models"),
            store: PathBuf::from("../store"),
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
}

/// What a model is served for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Chat and text completions.
    Chat,
    /// Text completions only (no chat template).
    Completion,
}

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// A single GGUF file (quantized or not).
    Gguf,
}

/// The network's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama-family decoders (Llama, SmolLM2, Mistral).
    Llama,
}

/// `[weights]` in a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsConfig {
    /// The weight file, relative to the model store (or absolute).
    pub path: PathBuf,
}

/// `[defaults]` in a manifest: sampling defaults for requests that leave them out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Tokens to generate when the request names no limit.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k cut (0 = off).
    pub top_k: Option<u32>,
    /// Min-p cut (0 = off).
    pub min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    pub repetition_penalty: Option<f32>,
}

/// One model manifest, validated, with its weight path resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// The id clients use in `model`.
    pub id: String,
    /// What it is served for.
    pub kind: ModelKind,
    /// The weights' format.
    pub format: WeightFormat,
    /// The network's architecture.
    pub architecture: Architecture,
    /// Where the weights are.
    pub weights: WeightsConfig,
    /// Positions per sequence (default: what the model was trained for).
    pub context_length: Option<usize>,
    /// Sampling defaults.
    #[serde(default)]
    pub defaults: GenerationDefaults,
    /// Free-form owner shown in `/v1/models`.
    #[serde(default = "default_owner")]
    pub owned_by: String,
    /// The manifest file (filled in after parsing).
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_owner() -> String {
    "kindling".to_string()
}

/// Values taken from the process environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// `PORT`, as set by Knative and most container platforms.
    pub port: Option<String>,
    /// `RUST_LOG`, the log filter.
    pub rust_log: Option<String>,
}

impl Environment {
    /// Reads the variables Kindling honours.
    pub fn from_process() -> Self {
        Self {
            port: std::env::var("PORT").ok().filter(|p| !p.is_empty()),
            rust_log: std::env::var("RUST_LOG").ok().filter(|p| !p.is_empty()),
        }
    }
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
        if file.engine.queue_size == 0 {
            bail!("{}: engine.queue_size: expected at least 1", path.display());
        }
        let store = base.join(&file.models.store);
        let manifests = base.join(&file.models.manifests);
        let models = load_manifests(&manifests, &store)
            .with_context(|| format!("{}: models.manifests", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            server,
            engine: file.engine,
            store,
            models,
        })
    }
}

fn load_manifests(dir: &Path, store: &Path) -> Result<BTreeMap<String, ModelManifest>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read manifest directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut models = BTreeMap::new();
    for file in files {
        let manifest = load_manifest(&file, store)?;
        if let Some(other) = models.get(&manifest.id) {
            let other: &ModelManifest = other;
            bail!(
                "{}: id: `{}` is already declared by {}",
                file.display(),
                manifest.id,
                other.source.display()
            );
        }
        models.insert(manifest.id.clone(), manifest);
    }
    Ok(models)
}

/// Reads and validates one manifest; its weight path comes back resolved.
pub fn load_manifest(file: &Path, store: &Path) -> Result<ModelManifest> {
    let f = file.display();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read manifest {f}"))?;
    let mut m: ModelManifest =
        toml::from_str(&text).with_context(|| format!("invalid manifest {f}"))?;
    m.source = file.to_path_buf();
    let valid_id = !m.id.is_empty()
        && m.id.len() <= 128
        && m.id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if !valid_id {
        bail!(
            "{f}: id: expected 1-128 characters of letters, digits and - _ . : /, got `{}`",
            m.id
        );
    }
    m.weights.path = store.join(&m.weights.path);
    if !m.weights.path.is_file() {
        bail!(
            "{f}: weights.path: file not found: {} (run scripts/fetch-models.sh for the demo models)",
            m.weights.path.display()
        );
    }
    if let Some(ctx) = m.context_length {
        if ctx < 16 {
            bail!("{f}: context_length: expected at least 16, got {ctx}");
        }
    }
    check_defaults(&m.defaults).map_err(|e| anyhow::anyhow!("{f}: defaults.{e}"))?;
    Ok(m)
}

fn check_defaults(d: &GenerationDefaults) -> std::result::Result<(), String> {
    let check = |name: &str, v: Option<f32>, ok: fn(f32) -> bool, want: &str| match v {
        Some(x) if !ok(x) => Err(format!("{name}: expected {want}, got {x}")),
        _ => Ok(()),
    };
    check(
        "temperature",
        d.temperature,
        |x| (0.0..=2.0).contains(&x),
        "a number in [0, 2]",
    )?;
    check(
        "top_p",
        d.top_p,
        |x| x > 0.0 && x <= 1.0,
        "a number in (0, 1]",
    )?;
    check(
        "min_p",
        d.min_p,
        |x| (0.0..=1.0).contains(&x),
        "a number in [0, 1]",
    )?;
    check(
        "repetition_penalty",
        d.repetition_penalty,
        |x| x > 0.0 && x <= 10.0,
        "a number in (0, 10]",
    )?;
    if d.max_tokens == Some(0) {
        return Err("max_tokens: expected at least 1".into());
    }
    Ok(())
}

/// Parses sizes like `4096`, `"512KiB"`, `"4MiB"`, `"6GiB"`, `"2GB"`.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("expected a size like \"4MiB\", got \"{s}\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit \"{other}\" in \"{s}\" (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    Ok((num * mult as f64).round() as u64)
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

/// Durations written as `"30s"`, `"5m"`, `"1h 30m"`.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("expected a duration like \"30s\": {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
    }

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
        let cfg = write(&d, "k.toml", "[models]\nstore = \"store\"\n[server]\nmax_body_size = \"1MiB\"\nshutdown_timeout = \"5s\"\n");
        let c = Config::load(&cfg, None, &Environment::default()).unwrap();
        assert_eq!(c.server.max_body_size, 1 << 20);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.models["m"].weights.path, d.join("store/w.gguf"));
        let env = Environment {
            port: Some("9000".into()),
            rust_log: None,
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
        let e = err(&MANIFEST.replace("w.gguf", "missing.gguf"));
        assert!(
            e.contains("weights.path") && e.contains("missing.gguf"),
            "{e}"
        );
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
