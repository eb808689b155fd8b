//! Fused operations on candle tensors, for models running on any device:
//! each is a candle custom op with a CPU implementation (f32, f16, bf16;
//! arithmetic in f32) and, with the `cuda` feature, a CUDA kernel from
//! `kernels/cuda/*.cu`. Each has a plain reference beside it, built from
//! stock candle ops or simple loops, that the tests compare it with.
//!
//! - [`rms_norm`] and [`add_rms_norm`]: RMSNorm, fused with the residual add.
//! - [`crate::silu_mul`]: SwiGLU's gate (row-strided inputs allowed).
//! - [`rope_in_place`]: rotary embedding on the query and key heads of fused
//!   q|k|v rows, in place.
//! - [`cache_write`] and [`paged_decode_attention`]: keys and values into the
//!   paged cache, and attention reading the cache blocks directly with the
//!   softmax fused.
//! - [`group_norm_silu`]: GroupNorm fused with SiLU.

mod attention;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod norm;

pub use attention::{
    cache_write, cache_write_reference, paged_decode_attention, paged_decode_attention_reference,
    rope_in_place, rope_reference, AttentionShape,
};
pub use norm::{
    add_rms_norm, add_rms_norm_reference, group_norm_silu, group_norm_silu_reference, rms_norm,
    rms_norm_reference,
};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType};

/// A 2-D operand's elements from its first row, and its row stride. Rows
/// must be contiguous; rows may be spaced apart (a column slice of a wider
/// tensor).
pub(crate) fn rows_of<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<(&'a [T], usize)> {
    let dims = layout.dims();
    let stride = layout.stride();
    let (n, c) = match dims {
        [n, c] => (*n, *c),
        _ => candle_core::bail!("{op}: expected a 2-D tensor, got {dims:?}"),
    };
    if c > 1 && stride[1] != 1 {
        candle_core::bail!("{op}: rows must be contiguous (strides {stride:?})");
    }
    let row_stride = if n > 1 { stride[0] } else { c };
    if row_stride < c {
        candle_core::bail!("{op}: overlapping rows (strides {stride:?})");
    }
    let start = layout.start_offset();
    let len = if n == 0 { 0 } else { (n - 1) * row_stride + c };
    let data = data
        .get(start..start + len)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: storage shorter than its layout")))?;
    Ok((data, row_stride))
}

/// A contiguous operand's elements.
pub(crate) fn contiguous_of<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// Widens any float storage to f32 values (the CPU paths compute in f32).
pub(crate) fn widen<T: WithDType>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f64() as f32).collect()
}

/// Narrows f32 results to `T`.
pub(crate) fn narrow<T: WithDType>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(f64::from(x))).collect()
}

/// The float types the fused ops take; arithmetic is in f32 whatever the
/// storage type.
pub(crate) trait Float: WithDType {
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}

macro_rules! float_type {
    ($t:ty, $variant:ident) => {
        impl Float for $t {
            fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Ok(v),
                    other => candle_core::bail!(
                        "expected {:?} storage, got {:?}",
                        <$t as WithDType>::DTYPE,
                        other.dtype()
                    ),
                }
            }
        }
    };
}
float_type!(f32, F32);
float_type!(half::f16, F16);
float_type!(half::bf16, BF16);

/// Calls the generic function `$f::<T>(args)` for the float type `T` of
/// `$dtype`; other dtypes are an error naming `$op`.
macro_rules! by_float_type {
    ($dtype:expr, $op:expr, $($f:ident)::+ ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            candle_core::DType::F32 => $($f)::+::<f32>($($arg),*),
            candle_core::DType::F16 => $($f)::+::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $($f)::+::<half::bf16>($($arg),*),
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $op),
        }
    };
}
pub(crate) use by_float_type;
