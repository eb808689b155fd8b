//! The PTX modules built from `kernels/cuda/*.cu` (see `build.rs`) and what
//! every launch needs: the kernel for a dtype, operand slices at their
//! layout's offset, and launch shapes.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, DriverError, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

/// One compiled `.cu` file.
#[derive(Clone, Copy)]
pub(crate) struct Module {
    name: &'static str,
    ptx: &'static str,
}

pub(crate) const NORM: Module = Module {
    name: "kindling-norm",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/norm.ptx")),
};
pub(crate) const SWIGLU: Module = Module {
    name: "kindling-swiglu",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx")),
};
pub(crate) const ATTENTION: Module = Module {
    name: "kindling-attention",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
};

/// The kernel `{base}_{f32|f16|bf16}` for `dtype` (launch it on
/// `dev.cuda_stream()`, the stream candle orders the device's work on).
pub(crate) fn kernel(
    dev: &CudaDevice,
    module: Module,
    base: &str,
    dtype: DType,
) -> Result<CudaFunction> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => candle_core::bail!("{base}: unsupported dtype {d:?} on CUDA"),
    };
    let func = dev.get_or_load_custom_func(&format!("{base}_{suffix}"), module.name, module.ptx)?;
    Ok((*func).clone())
}

/// An operand from its layout's start (its strides are checked by the op).
pub(crate) fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// A fresh output buffer of `n` elements.
pub(crate) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it.
    unsafe { dev.alloc::<T>(n.max(1)) }
}

/// A grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a block-per-row reduction over `len` elements.
pub(crate) fn row_threads(len: usize) -> u32 {
    (len.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

/// Converts a count for a kernel's `int` parameter.
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} is too large")))
}

/// Maps a driver error into candle's.
pub(crate) fn launched(r: std::result::Result<(), DriverError>) -> Result<()> {
    r.w()
}
