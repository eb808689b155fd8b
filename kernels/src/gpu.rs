//! CUDA devices as the driver reports them. A binary built with the `cuda`
//! feature opens the driver and CUDA libraries at run time: where they are
//! missing, these functions say why instead of failing, and callers fall
//! back to the CPU.

use candle_core::Device;

/// Why CUDA is unusable here, in words for a log line.
pub type Unavailable = String;

/// Free and total memory of one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Bytes free now (all processes counted).
    pub free: u64,
    /// Bytes in all.
    pub total: u64,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::{Device, MemoryInfo, Unavailable};

    const NO_CUDA: &str = "this build has no CUDA support (build with --features cuda)";

    pub fn device_count() -> Result<usize, Unavailable> {
        Err(NO_CUDA.into())
    }

    pub fn memory(_ordinal: usize) -> Result<MemoryInfo, Unavailable> {
        Err(NO_CUDA.into())
    }

    pub fn device(_ordinal: usize) -> Result<Device, Unavailable> {
        Err(NO_CUDA.into())
    }

    pub fn name(_ordinal: usize) -> Result<String, Unavailable> {
        Err(NO_CUDA.into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    use candle_core::cuda_backend::cudarc::{cublas, cublaslt, curand, driver, nvrtc};

    use super::{Device, MemoryInfo, Unavailable};

    /// Whether the driver and the libraries candle opens are all present,
    /// checked once (loading a missing one would abort the process).
    fn libraries() -> Result<(), Unavailable> {
        static CHECK: OnceLock<Result<(), Unavailable>> = OnceLock::new();
        CHECK
            .get_or_init(|| {
                // SAFETY: each probe only tries to open a shared library.
                let present = unsafe {
                    [
                        (
                            "the NVIDIA driver (libcuda.so.1)",
                            driver::sys::is_culib_present(),
                        ),
                        ("cuBLAS (libcublas.so.13)", cublas::sys::is_culib_present()),
                        (
                            "cuBLASLt (libcublasLt.so.13)",
                            cublaslt::sys::is_culib_present(),
                        ),
                        ("cuRAND (libcurand.so.10)", curand::sys::is_culib_present()),
                        ("NVRTC (libnvrtc.so.13)", nvrtc::sys::is_culib_present()),
                    ]
                };
                if let Some((name, _)) = present.iter().find(|(_, ok)| !ok) {
                    return Err(format!(
                        "{name} is not installed or not on the library path"
                    ));
                }
                driver::result::init().map_err(|e| format!("the CUDA driver failed to start: {e}"))
            })
            .clone()
    }

    pub fn device_count() -> Result<usize, Unavailable> {
        libraries()?;
        let n = CudaContext::device_count().map_err(|e| format!("counting devices: {e}"))?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| "the driver reports no CUDA device".to_string())
    }

    fn context(ordinal: usize) -> Result<Arc<CudaContext>, Unavailable> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(format!("cuda:{ordinal} does not exist ({count} device(s))"));
        }
        CudaContext::new(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))
    }

    pub fn memory(ordinal: usize) -> Result<MemoryInfo, Unavailable> {
        let ctx = context(ordinal)?;
        let (free, total) = ctx
            .mem_get_info()
            .map_err(|e| format!("cuda:{ordinal}: memory info: {e}"))?;
        Ok(MemoryInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    pub fn name(ordinal: usize) -> Result<String, Unavailable> {
        context(ordinal)?
            .name()
            .map_err(|e| format!("cuda:{ordinal}: {e}"))
    }

    pub fn device(ordinal: usize) -> Result<Device, Unavailable> {
        // One candle device per GPU: tensors made on two `Device` values
        // for the same GPU count as different devices.
        static DEVICES: OnceLock<Mutex<BTreeMap<usize, Device>>> = OnceLock::new();
        context(ordinal)?;
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| "device table poisoned".to_string())?;
        if let Some(d) = devices.get(&ordinal) {
            return Ok(d.clone());
        }
        let d = Device::new_cuda(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        devices.insert(ordinal, d.clone());
        Ok(d)
    }
}

/// CUDA devices the driver reports, or why there are none.
pub fn device_count() -> Result<usize, Unavailable> {
    imp::device_count()
}

/// Free and total memory of `cuda:ordinal`, from the driver.
pub fn memory(ordinal: usize) -> Result<MemoryInfo, Unavailable> {
    imp::memory(ordinal)
}

/// The device's name (e.g. "NVIDIA H100 80GB HBM3").
pub fn name(ordinal: usize) -> Result<String, Unavailable> {
    imp::name(ordinal)
}

/// The candle device for `cuda:ordinal` (one per GPU for the process).
pub fn device(ordinal: usize) -> Result<Device, Unavailable> {
    imp::device(ordinal)
}
