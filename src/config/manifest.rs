//! Model manifests: one `*.toml` per model, declaring what it is, where its
//! weights come from and how it lives (keep-alive, pinning, preloading).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use kindling_models::tools::ToolFormat;

use super::defaults::{check_defaults, GenerationDefaults};
use super::units::KeepAlive;

/// What a model is served for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Chat and text completions.
    Chat,
    /// Text completions only (no chat template).
    Completion,
    /// Embeddings (`/v1/embeddings`).
    Embedding,
    /// Image generation (`/v1/images/generations`).
    Image,
}

impl ModelKind {
    /// The name used in manifests and the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "completion",
            Self::Embedding => "embedding",
            Self::Image => "image",
        }
    }
}

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// A single GGUF file (quantized or not).
    Gguf,
    /// A Hugging Face model folder: `config.json`, `tokenizer.json`,
    /// `*.safetensors` (f32, f16 or bf16; sharded with an index or not);
    /// for images, a diffusers pipeline folder (`model_index.json`).
    Safetensors,
}

impl WeightFormat {
    /// The file that marks a complete folder of this format and `kind`.
    pub fn folder_marker(self, kind: ModelKind) -> &'static str {
        match (self, kind) {
            (Self::Gguf, _) => ".gguf",
            (Self::Safetensors, ModelKind::Image) => "model_index.json",
            (Self::Safetensors, _) => "config.json",
        }
    }
}

/// The network's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama-family decoders (Llama 2/3, SmolLM2, Mistral, Qwen2/3, Phi-3,
    /// Gemma 2/3).
    Llama,
    /// BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa), for embeddings.
    Bert,
    /// Stable Diffusion pipelines (1.x, 2.x, SDXL, Turbo), for images.
    #[serde(rename = "stable-diffusion")]
    StableDiffusion,
}

/// `[image]` in a manifest: defaults and limits of an image model.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageDefaults {
    /// Denoising steps when the request names none (default 20; Turbo: 1–4).
    pub steps: Option<usize>,
    /// Classifier-free guidance scale when the request names none (default
    /// 7.5; Turbo models: 0).
    pub guidance_scale: Option<f32>,
    /// Sampler when the request names none (default: the pipeline's
    /// scheduler class).
    pub sampler: Option<String>,
    /// Image size when the request names none, `WxH` (default: native).
    pub size: Option<String>,
    /// Largest side in pixels (default: the native size, since the memory
    /// estimate grows with the square of the pixel count).
    pub max_size: Option<usize>,
    /// Most steps a request may ask for (default 150).
    pub max_steps: Option<usize>,
}

/// `[weights]` as written: a local `path`, or a Hugging Face `repo` with
/// `files`, a `revision` and optional `sha256` sums.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsFile {
    path: Option<PathBuf>,
    repo: Option<String>,
    revision: Option<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    sha256: BTreeMap<String, String>,
}

/// Where a model's weights come from, resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightSource {
    /// A file on this machine (relative paths resolved against the store).
    Local(PathBuf),
    /// Files of a Hugging Face repository, downloaded into the store on
    /// first use.
    Hub {
        /// `owner/name`.
        repo: String,
        /// Branch, tag or commit.
        revision: String,
        /// Files to fetch; the first `.gguf` is the weight file.
        files: Vec<String>,
        /// Expected SHA-256 per file, lowercase hex, where known.
        sha256: BTreeMap<String, String>,
    },
}

/// A float type for a model on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bfloat16 (the default).
    Bf16,
    /// IEEE half precision.
    F16,
    /// Single precision.
    F32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    id: String,
    version: Option<String>,
    kind: ModelKind,
    format: WeightFormat,
    architecture: Architecture,
    weights: WeightsFile,
    context_length: Option<usize>,
    kv_cache_tokens: Option<usize>,
    #[serde(default)]
    dimensions: Vec<usize>,
    tool_format: Option<String>,
    #[serde(default)]
    defaults: GenerationDefaults,
    image: Option<ImageDefaults>,
    #[serde(default = "default_owner")]
    owned_by: String,
    device: Option<String>,
    dtype: Option<Precision>,
    keep_alive: Option<KeepAlive>,
    #[serde(default)]
    pin: bool,
    #[serde(default)]
    preload: bool,
}

/// One model manifest, validated, with its weight source resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelManifest {
    /// The id clients use in `model`.
    pub id: String,
    /// The version, when several manifests share the id
    /// (`<id>@<version>` addresses it exactly).
    pub version: Option<String>,
    /// What it is served for.
    pub kind: ModelKind,
    /// The weights' format.
    pub format: WeightFormat,
    /// The network's architecture.
    pub architecture: Architecture,
    /// Where the weights come from.
    pub weights: WeightSource,
    /// Positions per sequence (default: what the model was trained for).
    pub context_length: Option<usize>,
    /// Positions of its paged KV cache (default: `engine.kv_cache_tokens`).
    pub kv_cache_tokens: Option<usize>,
    /// Embedding models: shorter widths clients may ask for with
    /// `dimensions` (Matryoshka-trained models); empty = only the full one.
    pub dimensions: Vec<usize>,
    /// Chat models: how the model writes tool calls (default: read from
    /// its chat template).
    pub tool_format: Option<ToolFormat>,
    /// Sampling defaults.
    pub defaults: GenerationDefaults,
    /// Image models' defaults and limits.
    pub image: ImageDefaults,
    /// Free-form owner shown in `/v1/models`.
    pub owned_by: String,
    /// The device to load onto (default: the registry's choice).
    pub device: Option<String>,
    /// Float type of weights, activations (and KV cache) on a GPU (default
    /// bf16). On the CPU, weights run as f32 or as quantized in their file.
    pub dtype: Option<Precision>,
    /// Overrides the daemon's default keep-alive.
    pub keep_alive: Option<KeepAlive>,
    /// Never evicted or expired once loaded.
    pub pin: bool,
    /// Loaded in the background at start-up.
    pub preload: bool,
    /// The manifest file.
    pub source: PathBuf,
}

fn default_owner() -> String {
    "kindling".to_string()
}

/// Every `*.toml` in `dir`, sorted by name, each read and validated on its
/// own (hot reload keeps the good ones and refuses the rest).
pub fn scan_manifests(dir: &Path, store: &Path) -> Result<Vec<(PathBuf, Result<ModelManifest>)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read manifest directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|f| {
            let m = load_manifest(&f, store);
            (f, m)
        })
        .collect())
}

/// Why `manifest` cannot join `models` (keyed by instance name): the same
/// id and version declared twice, or an id with versions and without.
pub fn conflict(
    models: &BTreeMap<String, ModelManifest>,
    manifest: &ModelManifest,
) -> Option<String> {
    let f = manifest.source.display();
    if let Some(other) = models.get(&manifest.name()) {
        return Some(format!(
            "{f}: id: `{}` is already declared by {}",
            manifest.name(),
            other.source.display()
        ));
    }
    if let Some(other) = models
        .values()
        .find(|m| m.id == manifest.id && m.version.is_some() && m.kind != manifest.kind)
    {
        return Some(format!(
            "{f}: kind: versions of `{}` must be of one kind; {} declares `{}`",
            manifest.id,
            other.source.display(),
            other.kind.name()
        ));
    }
    let other = models
        .values()
        .find(|m| m.id == manifest.id && m.version.is_some() != manifest.version.is_some())?;
    Some(format!(
        "{f}: version: `{}` is declared {} a version by {}; every manifest of one id names a version, or only one manifest declares it",
        manifest.id,
        if other.version.is_some() { "with" } else { "without" },
        other.source.display()
    ))
}

pub(super) fn load_manifests(dir: &Path, store: &Path) -> Result<BTreeMap<String, ModelManifest>> {
    let mut models = BTreeMap::new();
    for (_, manifest) in scan_manifests(dir, store)? {
        let manifest = manifest?;
        if let Some(why) = conflict(&models, &manifest) {
            bail!(why);
        }
        models.insert(manifest.name(), manifest);
    }
    Ok(models)
}

impl ModelManifest {
    /// The name of this one instance: `<id>@<version>`, or the id of an
    /// unversioned model. Lifecycle, loads and memory are kept per name.
    pub fn name(&self) -> String {
        match &self.version {
            Some(v) => format!("{}@{v}", self.id),
            None => self.id.clone(),
        }
    }

    /// Whether serving `other` instead needs a fresh load (weights, shapes,
    /// device or engine settings differ); other fields apply at once.
    pub fn needs_reload(&self, other: &Self) -> bool {
        self.kind != other.kind
            || self.format != other.format
            || self.architecture != other.architecture
            || self.weights != other.weights
            || self.context_length != other.context_length
            || self.kv_cache_tokens != other.kv_cache_tokens
            || self.dimensions != other.dimensions
            || self.tool_format != other.tool_format
            || self.image != other.image
            || self.device != other.device
            || self.dtype != other.dtype
    }
}

/// Orders versions naturally: digit runs compare as numbers, so `v2` comes
/// before `v10` and `1.9` before `1.10`.
pub fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u128, &str>> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest
                .find(|ch: char| ch.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            let (head, tail) = rest.split_at(end);
            out.push(if digit {
                head.parse::<u128>().map_err(|_| head)
            } else {
                Err(head)
            });
            rest = tail;
        }
        out
    }
    parts(a).cmp(&parts(b)).then_with(|| a.cmp(b))
}

/// Reads and validates one manifest; a local weight path comes back
/// resolved against `store`. Whether the weights exist is checked when the
/// model loads, so one missing file never stops the daemon.
pub fn load_manifest(file: &Path, store: &Path) -> Result<ModelManifest> {
    let f = file.display();
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read manifest {f}"))?;
    let m: ManifestFile = toml::from_str(&text).with_context(|| format!("invalid manifest {f}"))?;
    if !valid_id(&m.id) {
        bail!(
            "{f}: id: expected 1-128 characters of letters, digits and - _ . : /, got `{}`",
            m.id
        );
    }
    if let Some(v) = m.version.as_deref().filter(|v| !valid_version(v)) {
        bail!("{f}: version: expected 1-64 characters of letters, digits and - _ . + :, got `{v}`");
    }
    match (m.kind, m.architecture, m.format) {
        (ModelKind::Embedding, Architecture::Bert, WeightFormat::Safetensors) => {}
        (ModelKind::Embedding, Architecture::Bert, _) => {
            bail!("{f}: format: embedding models load from a safetensors folder (`format = \"safetensors\"`)")
        }
        (ModelKind::Embedding, _, _) | (_, Architecture::Bert, _) => {
            bail!("{f}: kind: embedding models use `architecture = \"bert\"`, and bert models `kind = \"embedding\"`")
        }
        (ModelKind::Image, Architecture::StableDiffusion, WeightFormat::Safetensors) => {}
        (ModelKind::Image, Architecture::StableDiffusion, _) => {
            bail!("{f}: format: image models load from a diffusers folder (`format = \"safetensors\"`)")
        }
        (ModelKind::Image, _, _) | (_, Architecture::StableDiffusion, _) => {
            bail!("{f}: kind: image models use `architecture = \"stable-diffusion\"`, and stable-diffusion models `kind = \"image\"`")
        }
        _ => {}
    }
    if m.image.is_some() && m.kind != ModelKind::Image {
        bail!("{f}: image: only image models have an [image] table");
    }
    let image = m.image.unwrap_or_default();
    check_image(&image).map_err(|e| anyhow::anyhow!("{f}: image.{e}"))?;
    if !m.dimensions.is_empty() && m.kind != ModelKind::Embedding {
        bail!("{f}: dimensions: only embedding models have dimensions");
    }
    if m.dimensions.contains(&0) {
        bail!("{f}: dimensions: expected positive widths");
    }
    let tool_format = match m.tool_format.as_deref() {
        None => None,
        Some(_) if m.kind != ModelKind::Chat => {
            bail!("{f}: tool_format: only chat models call tools")
        }
        Some(name) => Some(ToolFormat::parse(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{f}: tool_format: `{name}` is not one of {}",
                ToolFormat::NAMES
            )
        })?),
    };
    let weights = weight_source(m.weights, m.format.folder_marker(m.kind), store)
        .map_err(|e| anyhow::anyhow!("{f}: weights.{e}"))?;
    if let Some(ctx) = m.context_length {
        if ctx < 16 {
            bail!("{f}: context_length: expected at least 16, got {ctx}");
        }
    }
    if m.kv_cache_tokens == Some(0) {
        bail!("{f}: kv_cache_tokens: expected at least 1");
    }
    check_defaults(&m.defaults).map_err(|e| anyhow::anyhow!("{f}: defaults.{e}"))?;
    Ok(ModelManifest {
        id: m.id,
        version: m.version,
        kind: m.kind,
        format: m.format,
        architecture: m.architecture,
        weights,
        context_length: m.context_length,
        kv_cache_tokens: m.kv_cache_tokens,
        dimensions: m.dimensions,
        tool_format,
        defaults: m.defaults,
        image,
        owned_by: m.owned_by,
        device: m.device,
        dtype: m.dtype,
        keep_alive: m.keep_alive,
        pin: m.pin,
        preload: m.preload,
        source: file.to_path_buf(),
    })
}

fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+:".contains(c))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
}

fn weight_source(
    w: WeightsFile,
    marker: &str,
    store: &Path,
) -> std::result::Result<WeightSource, String> {
    match (w.path, w.repo) {
        (Some(path), None) => {
            if w.revision.is_some() || !w.files.is_empty() || !w.sha256.is_empty() {
                return Err(
                    "path: `revision`, `files` and `sha256` go with `repo`, not `path`".into(),
                );
            }
            Ok(WeightSource::Local(store.join(path)))
        }
        (None, Some(repo)) => {
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| !valid_id(p) || p.starts_with('.')) {
                return Err(format!("repo: expected `owner/name`, got `{repo}`"));
            }
            let (found, want) = if marker == ".gguf" {
                (
                    w.files.iter().any(|f| f.ends_with(".gguf")),
                    "one `.gguf`".to_string(),
                )
            } else {
                (
                    w.files.iter().any(|f| f == marker),
                    format!("`{marker}` and the `.safetensors` files"),
                )
            };
            if !found {
                return Err(format!(
                    "files: expected the list of files to fetch, with {want}"
                ));
            }
            if let Some(f) = w
                .files
                .iter()
                .find(|f| f.is_empty() || f.split('/').any(|c| c == ".." || c.is_empty()))
            {
                return Err(format!(
                    "files: `{f}` is not a plain path inside the repository"
                ));
            }
            let mut sha256 = BTreeMap::new();
            for (file, sum) in w.sha256 {
                if !w.files.contains(&file) {
                    return Err(format!("sha256: `{file}` is not in `files`"));
                }
                if sum.len() != 64 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(format!("sha256.{file}: expected 64 hex digits"));
                }
                sha256.insert(file, sum.to_ascii_lowercase());
            }
            Ok(WeightSource::Hub {
                repo,
                revision: w.revision.unwrap_or_else(|| "main".into()),
                files: w.files,
                sha256,
            })
        }
        (Some(_), Some(_)) => Err("path: give either `path` or `repo`, not both".into()),
        (None, None) => Err("path: expected `path` (a local file) or `repo` (Hugging Face)".into()),
    }
}

fn check_image(d: &ImageDefaults) -> std::result::Result<(), String> {
    if d.steps == Some(0) || d.max_steps == Some(0) {
        return Err("steps: expected at least 1".into());
    }
    if let (Some(s), Some(m)) = (d.steps, d.max_steps) {
        if s > m {
            return Err(format!("steps: {s} is over max_steps {m}"));
        }
    }
    if let Some(g) = d.guidance_scale.filter(|g| !(0.0..=50.0).contains(g)) {
        return Err(format!("guidance_scale: expected 0 to 50, got {g}"));
    }
    if let Some(s) = d.sampler.as_deref() {
        if kindling_models::diffusion::SamplerKind::parse(s).is_none() {
            return Err(format!(
                "sampler: expected one of {}, got `{s}`",
                kindling_models::diffusion::SamplerKind::NAMES.join(", ")
            ));
        }
    }
    if let Some(size) = d.size.as_deref() {
        if parse_size(size).is_none() {
            return Err(format!("size: expected `WIDTHxHEIGHT`, got `{size}`"));
        }
    }
    if d.max_size.is_some_and(|m| m < 8) {
        return Err("max_size: expected at least 8".into());
    }
    Ok(())
}

/// Parses `WIDTHxHEIGHT`.
pub fn parse_size(size: &str) -> Option<(usize, usize)> {
    let (w, h) = size.split_once(['x', 'X'])?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}
