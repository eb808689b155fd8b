//! The devices the daemon really has: the configured ones, checked against
//! the machine at start-up. A CUDA device that cannot be used (no GPU, no
//! driver, a build without CUDA) is dropped with a log line, and models
//! meant for it run on the CPU.

use std::collections::BTreeMap;

use kindling_models::gpu;

use super::lifecycle::DeviceBudget;
use super::memory;
use crate::config::{Config, DeviceName, ModelKind, ModelManifest};

/// The usable devices and where each configured name ends up.
pub struct Devices {
    /// Budgets of the devices models may use, by name.
    pub budgets: BTreeMap<String, DeviceBudget>,
    /// Configured names that could not be used, and the device standing in
    /// for them (`cpu`).
    pub fallback: BTreeMap<String, String>,
}

impl Devices {
    /// Probes the configured devices.
    pub fn probe(config: &Config) -> Self {
        let mut budgets = BTreeMap::new();
        let mut fallback = BTreeMap::new();
        let cpu_total = memory::cpu_total();
        let mut add_gpu = |name: String, ordinal: usize, budget: crate::config::Budget| -> bool {
            match gpu::memory(ordinal) {
                Ok(mem) => {
                    let model = gpu::name(ordinal).unwrap_or_else(|_| "a GPU".into());
                    let b = budget.resolve(mem.total);
                    tracing::info!(
                        device = %name,
                        gpu = %model,
                        total_bytes = mem.total,
                        free_bytes = mem.free,
                        budget_bytes = b,
                        "CUDA device ready"
                    );
                    budgets.insert(
                        name,
                        DeviceBudget {
                            budget: b,
                            total: Some(mem.total),
                        },
                    );
                    true
                }
                Err(why) => {
                    tracing::warn!(device = %name, "{why}; models placed on {name} run on the CPU");
                    fallback.insert(name, "cpu".to_string());
                    false
                }
            }
        };
        for (name, d) in &config.devices {
            match DeviceName::parse(name) {
                Some(DeviceName::Cuda(n)) => {
                    add_gpu(name.clone(), n, d.budget_or_default(&DeviceName::Cuda(n)));
                }
                Some(DeviceName::Auto) => match gpu::device_count() {
                    Ok(count) => {
                        for n in 0..count {
                            let name = DeviceName::Cuda(n).to_string();
                            if !config.devices.contains_key(&name) {
                                add_gpu(name, n, d.budget_or_default(&DeviceName::Auto));
                            }
                        }
                    }
                    Err(why) => {
                        tracing::warn!("devices.auto: no CUDA device ({why}); serving on the CPU");
                    }
                },
                Some(DeviceName::Cpu) | None => {}
            }
        }
        let cpu = config.devices.get("cpu").cloned().unwrap_or_default();
        budgets.insert(
            "cpu".to_string(),
            DeviceBudget {
                budget: cpu
                    .budget_or_default(&DeviceName::Cpu)
                    .resolve(cpu_total.unwrap_or(0)),
                total: cpu_total,
            },
        );
        Self { budgets, fallback }
    }

    /// Where a model must go: its manifest's device (or the CPU standing in
    /// for it), the CPU for embedding models (they run only there), else
    /// `None` (the registry picks at load time).
    pub fn pin(&self, m: &ModelManifest) -> Option<String> {
        if m.kind == ModelKind::Embedding {
            return Some("cpu".to_string());
        }
        let d = m.device.as_deref()?;
        if let Some(stand_in) = self.fallback.get(d) {
            return Some(stand_in.clone());
        }
        if !self.budgets.contains_key(d) {
            // Covered by `auto`, but the machine has no such GPU.
            tracing::warn!(model = %m.id, "device {d} is not on this machine; the model runs on the CPU");
            return Some("cpu".to_string());
        }
        Some(d.to_string())
    }
}
