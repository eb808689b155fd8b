//! `[devices.<name>]` in `kindling.toml`: where models may run. Names are
//! `cpu`, `cuda:N` (one GPU), or `auto` (every GPU the driver reports).
//! Whether a GPU is really there is found out at start-up, not here: a
//! configuration written for a GPU host also starts where there is none,
//! and its models run on the CPU.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{Budget, ModelKind, ModelManifest};

/// `[devices.<name>]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Memory models may use on this device: bytes (`"6GiB"`) or a share
    /// of what the device reports (`"80%"`). Default: 80% of the machine's
    /// memory for `cpu`, 90% of a GPU's.
    pub budget: Option<Budget>,
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
    for name in devices.keys() {
        if DeviceName::parse(name).is_none() {
            bail!(
                "{}: devices.{name}: expected `cpu`, `cuda:N` or `auto`",
                path.display()
            );
        }
    }
    devices.entry("cpu".into()).or_default();
    let auto = devices.contains_key("auto");
    for m in models.values() {
        let f = m.source.display();
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
    }
    Ok(())
}
