//! The pipeline folder itself: `model_index.json`, the scheduler's config
//! and where each component's weight files are.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::config::{bad, read_json};
use crate::error::{ModelError, Result};

fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}

/// The noise schedule and its defaults, from `scheduler/scheduler_config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "linear")]
    pub beta_schedule: String,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// `None`: the scheduler class's own default (DDIM `leading`; Euler,
    /// Euler ancestral and DPM `linspace`), as diffusers' `from_config` gives.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "one_f")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
}

fn train_steps() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}

impl SchedulerConfig {
    /// Reads and checks `scheduler/scheduler_config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        let refuse = |what: &str| Err(bad(path, format!("{what} is not supported")));
        if !["linear", "scaled_linear", "squaredcos_cap_v2"].contains(&cfg.beta_schedule.as_str()) {
            return refuse(&format!("`beta_schedule` = \"{}\"", cfg.beta_schedule));
        }
        if !["epsilon", "v_prediction", "sample"].contains(&cfg.prediction_type.as_str()) {
            return refuse(&format!("`prediction_type` = \"{}\"", cfg.prediction_type));
        }
        if let Some(spacing) = cfg
            .timestep_spacing
            .as_deref()
            .filter(|s| !["leading", "trailing", "linspace"].contains(s))
        {
            return refuse(&format!("`timestep_spacing` = \"{}\"", spacing));
        }
        if cfg.thresholding {
            return refuse("dynamic thresholding");
        }
        if cfg.rescale_betas_zero_snr {
            return refuse("`rescale_betas_zero_snr`");
        }
        if cfg.num_train_timesteps < 2 {
            return refuse("fewer than 2 training timesteps");
        }
        Ok(cfg)
    }
}

/// The folder's layout, from `model_index.json`.
#[derive(Debug, Clone)]
pub struct PipelineIndex {
    pub class_name: String,
    /// SDXL's second text encoder and tokenizer are present.
    pub dual_text_encoder: bool,
    /// SDXL: an empty negative prompt means zero conditioning.
    pub force_zeros_for_empty_prompt: bool,
}

impl PipelineIndex {
    /// Reads `model_index.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let json: Value = read_json(&path)?;
        let class_name = json
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let known = ["StableDiffusionPipeline", "StableDiffusionXLPipeline"];
        if !known.contains(&class_name.as_str()) {
            return Err(bad(
                &path,
                format!("pipeline `{class_name}` is not supported"),
            ));
        }
        let present = |key: &str| {
            json.get(key)
                .and_then(Value::as_array)
                .is_some_and(|v| v.first().is_some_and(|c| !c.is_null()))
        };
        for key in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !present(key) {
                return Err(bad(&path, format!("component `{key}` is missing")));
            }
        }
        Ok(Self {
            dual_text_encoder: present("text_encoder_2") && present("tokenizer_2"),
            force_zeros_for_empty_prompt: json
                .get("force_zeros_for_empty_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            class_name,
        })
    }
}

/// A component's safetensors files: the shards an index names, else the
/// plain files, else a variant (`*.fp16.safetensors`) when only it exists.
pub fn component_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let name = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    if let Some(index) = entries
        .iter()
        .find(|p| name(p).ends_with(".safetensors.index.json"))
    {
        let files = crate::llama::index_files(index)?;
        if !files.is_empty() {
            return Ok(files);
        }
    }
    let mut plain: Vec<PathBuf> = Vec::new();
    let mut variants: Vec<PathBuf> = Vec::new();
    for p in entries
        .into_iter()
        .filter(|p| name(p).ends_with(".safetensors"))
    {
        let stem = name(&p).trim_end_matches(".safetensors").to_string();
        if stem.contains('.') {
            variants.push(p);
        } else {
            plain.push(p);
        }
    }
    let mut files = if plain.is_empty() { variants } else { plain };
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors files"),
        });
    }
    Ok(files)
}
