//! `[devices.<name>]` in `kindling.toml`: where models may run. Names are
//! `cpu`, `cuda:N` (one GPU), or `auto` (every GPU the driver reports).
//! Whether a GPU is really there is found out at start-up, not here: a
//! configuration written for a GPU host also starts where there is none,
//! and its models run on the CPU. `[devices.cpu]` also says which optional
//! instruction sets the CPU kernels may use.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{Budget, Config, ModelKind, ModelManifest};

/// `[devices.<name>]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Memory models may use on this device: bytes (`"6GiB"`) or a share
    /// of what the device reports (`"80%"`). Default: 80% of the machine's
    /// memory for `cpu`, 90% of a GPU's.
    pub budget: Option<Budget>,
    /// Optional instruction sets the CPU kernels must not use even where
    /// the CPU has them (`cpu` only): `amx`, `vnni`.
    #[serde(default)]
    pub disable: Vec<CpuFeature>,
}

/// An optional CPU instruction set the kernels use where the CPU has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuFeature {
    /// AMX-BF16 tiles for the dense products of embedding and image models
    /// (without them, AVX-512 or AVX2 f32 kernels).
    Amx,
    /// AVX-VNNI for the quantized dot products of GGUF models (without it,
    /// AVX2, with the same results).
    Vnni,
}

impl DeviceConfig {
    /// The budget, or the device's default.
    pub fn budget_or_default(&self, device: &DeviceName) -> Budget {
        self.budget.unwrap_or(match device {
            DeviceName::Cpu => Budget::Fraction(0.8),
            DeviceName::Cuda(_) | DeviceName::Auto => Budget::Fraction(0.9),
        })
    }
}

impl Config {
    /// The optional instruction sets the CPU kernels may use: every one but
    /// those `[devices.cpu] disable` names. For
    /// `kindling_models::configure_cpu`, before any model loads.
    pub fn cpu_features(&self) -> kindling_models::CpuFeatures {
        let disabled = self.devices.get("cpu").map_or(&[][..], |d| &d.disable[..]);
        kindling_models::CpuFeatures {
            amx: !disabled.contains(&CpuFeature::Amx),
            vnni: !disabled.contains(&CpuFeature::Vnni),
        }
    }
}

/// A device name, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceName {
    /// The host's CPU and memory.
    Cpu,
    /// One CUDA GPU, by the driver's ordinal.
    Cuda(usize),
    /// Every CUDA GPU found at start-up.
    Auto,
}

impl DeviceName {
    /// Parses `cpu`, `cuda:N` or `auto`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "auto" => Some(Self::Auto),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda),
        }
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// Checks device names and the manifests' `device` and `dtype`, and adds
/// the `cpu` device when it is not declared.
pub(super) fn check(
    path: &Path,
    devices: &mut BTreeMap<String, DeviceConfig>,
    models: &BTreeMap<String, ModelManifest>,
) -> Result<()> {
    for (name, device) in devices.iter() {
        let Some(parsed) = DeviceName::parse(name) else {
            bail!(
                "{}: devices.{name}: expected `cpu`, `cuda:N` or `auto`",
                path.display()
            );
        };
        if parsed != DeviceName::Cpu && !device.disable.is_empty() {
            bail!(
                "{}: devices.{name}.disable: only `[devices.cpu]` takes CPU instruction sets to disable",
                path.display()
            );
        }
    }
    devices.entry("cpu".into()).or_default();
    for m in models.values() {
        check_model_device(path, devices, m)?;
    }
    Ok(())
}

/// Checks that a manifest names a device the config declares, and one its
/// kind of model can run on.
pub fn check_model_device(
    path: &Path,
    devices: &BTreeMap<String, DeviceConfig>,
    m: &ModelManifest,
) -> Result<()> {
    let f = m.source.display();
    let auto = devices.contains_key("auto");
    if let Some(d) = m.device.as_deref() {
        let Some(name) = DeviceName::parse(d).filter(|n| *n != DeviceName::Auto) else {
            bail!("{f}: device: expected `cpu` or `cuda:N`, got `{d}`");
        };
        let declared = devices.contains_key(d) || (auto && matches!(name, DeviceName::Cuda(_)));
        if !declared {
            bail!(
                "{f}: device: `{d}` is not declared in {} (known: {})",
                path.display(),
                devices.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if name != DeviceName::Cpu && m.kind == ModelKind::Embedding {
            bail!("{f}: device: embedding models run on `cpu` only");
        }
    }
    if m.dtype.is_some() && m.kind == ModelKind::Embedding {
        bail!("{f}: dtype: embedding models run in f32 on the CPU; only text and image models take a dtype");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Environment;

    fn load(tag: &str, devices: &str) -> Result<Config> {
        let d =
            std::env::temp_dir().join(format!("kindling-config-cpu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("models")).unwrap();
        let path: PathBuf = d.join("kindling.toml");
        std::fs::write(&path, format!("[models]\nstore = \"store\"\n{devices}")).unwrap();
        Config::load(&path, None, &Environment::default())
    }

    #[test]
    fn cpu_instruction_sets_can_be_disabled() {
        let all = kindling_models::CpuFeatures::default();
        assert_eq!(load("none", "").unwrap().cpu_features(), all);
        let c = load("budget", "[devices.cpu]\nbudget = \"50%\"\n").unwrap();
        assert_eq!(c.cpu_features(), all);
        let c = load("amx", "[devices.cpu]\ndisable = [\"amx\"]\n").unwrap();
        assert_eq!(c.devices["cpu"].disable, [CpuFeature::Amx]);
        assert_eq!(
            c.cpu_features(),
            kindling_models::CpuFeatures {
                amx: false,
                vnni: true
            }
        );
        let c = load("both", "[devices.cpu]\ndisable = [\"vnni\", \"amx\"]\n").unwrap();
        assert_eq!(
            c.cpu_features(),
            kindling_models::CpuFeatures {
                amx: false,
                vnni: false
            }
        );
        let c = load("empty", "[devices.cpu]\ndisable = []\n").unwrap();
        assert_eq!(c.cpu_features(), all);
    }

    #[test]
    fn unknown_or_misplaced_instruction_sets_are_errors() {
        let e = format!(
            "{:#}",
            load("unknown", "[devices.cpu]\ndisable = [\"avx512\"]\n").unwrap_err()
        );
        assert!(
            e.contains("kindling.toml") && e.contains("avx512") && e.contains("`amx`"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            load("string", "[devices.cpu]\ndisable = \"amx\"\n").unwrap_err()
        );
        assert!(e.contains("kindling.toml") && e.contains("disable"), "{e}");
        let e = format!(
            "{:#}",
            load("gpu", "[devices.auto]\ndisable = [\"amx\"]\n").unwrap_err()
        );
        assert!(
            e.contains("devices.auto.disable") && e.contains("[devices.cpu]"),
            "{e}"
        );
    }
}
