//! Which optional instruction sets the CPU kernels may use: by default every
//! one the CPU has. The daemon's configuration can rule some out, to compare
//! kernels or to step around a platform problem; kernels never read the
//! environment themselves.
//!
//! The settings are read once, when the first kernel family is picked (the
//! first model load or product), and are fixed from then on: call
//! [`configure_cpu`] at start-up, before anything runs a kernel.

use std::sync::OnceLock;

/// Optional instruction sets the kernels may use where the CPU has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AMX-BF16 tiles for dense products (otherwise the AVX-512 or AVX2 f32
    /// kernels run).
    pub amx: bool,
    /// AVX-VNNI for the quantized dot products (otherwise AVX2 runs them,
    /// with the same results, bit for bit).
    pub vnni: bool,
}

impl Default for CpuFeatures {
    /// Everything allowed: each set is used where the CPU has it.
    fn default() -> Self {
        Self {
            amx: true,
            vnni: true,
        }
    }
}

/// [`configure_cpu`] asked for other settings than those already fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeaturesFixed {
    /// The settings in force, which stay.
    pub in_use: CpuFeatures,
}

impl std::fmt::Display for CpuFeaturesFixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the CPU kernel settings are already fixed ({:?}): configure_cpu must come before the first kernel runs",
            self.in_use
        )
    }
}

impl std::error::Error for CpuFeaturesFixed {}

static SETTINGS: OnceLock<CpuFeatures> = OnceLock::new();

/// Sets which instruction sets the kernels may use, once, before any kernel
/// runs. A later call that repeats the settings in force succeeds; one that
/// asks for others (after an earlier call, or after a kernel family was
/// picked with the defaults) fails and changes nothing.
pub fn configure_cpu(features: CpuFeatures) -> Result<(), CpuFeaturesFixed> {
    let in_use = *SETTINGS.get_or_init(|| features);
    if in_use == features {
        Ok(())
    } else {
        Err(CpuFeaturesFixed { in_use })
    }
}

/// The settings in force. This fixes them (at the defaults, if
/// [`configure_cpu`] was not called): kernel detection goes through here.
pub fn cpu_features() -> CpuFeatures {
    *SETTINGS.get_or_init(CpuFeatures::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_fixed_at_first_use() {
        // Tests share the process: whatever ran first fixed the settings.
        let now = cpu_features();
        assert_eq!(configure_cpu(now), Ok(()));
        let other = CpuFeatures {
            amx: !now.amx,
            ..now
        };
        assert_eq!(configure_cpu(other), Err(CpuFeaturesFixed { in_use: now }));
        let other = CpuFeatures {
            vnni: !now.vnni,
            ..now
        };
        let e = configure_cpu(other).unwrap_err();
        assert!(e.to_string().contains("before the first kernel"), "{e}");
        assert_eq!(cpu_features(), now);
    }
}
