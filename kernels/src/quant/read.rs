//! From GGML's bytes: a projection in the layout this CPU runs fastest
//! ([`from_ggml`]), and rows expanded to f32 ([`dequantize_ggml`]).

use candle_core::quantized::GgmlDType;
use candle_core::Result;

#[cfg(target_arch = "x86_64")]
use super::{isa, tiled, tiled_k};
use super::{ActBlock, QuantBlock, QuantLinear, QuantMatrix};

/// Reads GGML's bytes of a `rows × cols` matrix of `dtype` into the matrix
/// type whose kernels run it: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K
/// and Q6_K. `None`
/// for other types.
pub fn from_ggml(
    dtype: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Option<Result<Box<dyn QuantLinear>>> {
    fn read<B: QuantBlock>(bytes: &[u8], rows: usize, cols: usize) -> Result<Box<dyn QuantLinear>> {
        Ok(Box::new(QuantMatrix::<B>::from_ggml_bytes(
            bytes, rows, cols,
        )?))
    }
    /// The tiled layout where this CPU runs it, else the row kernels'.
    #[cfg(target_arch = "x86_64")]
    fn read32<B: tiled::Tileable>(
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Box<dyn QuantLinear>> {
        if tiled::available(isa()) {
            let m = QuantMatrix::<B>::from_ggml_bytes(bytes, rows, cols)?;
            return Ok(Box::new(tiled::TiledMatrix::new(&m.blocks, rows, cols)));
        }
        read::<B>(bytes, rows, cols)
    }
    #[cfg(not(target_arch = "x86_64"))]
    fn read32<B: QuantBlock>(
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Box<dyn QuantLinear>> {
        read::<B>(bytes, rows, cols)
    }
    /// Q4_K: tiled where this CPU runs it.
    fn read_q4_k(bytes: &[u8], rows: usize, cols: usize) -> Result<Box<dyn QuantLinear>> {
        #[cfg(target_arch = "x86_64")]
        if tiled::available(isa()) {
            let m = QuantMatrix::<crate::q4_k::BlockQ4K>::from_ggml_bytes(bytes, rows, cols)?;
            return Ok(Box::new(tiled_k::TiledQ4K::new(&m.blocks, rows, cols)));
        }
        read::<crate::q4_k::BlockQ4K>(bytes, rows, cols)
    }
    /// Q6_K: tiled where this CPU runs it.
    fn read_q6_k(bytes: &[u8], rows: usize, cols: usize) -> Result<Box<dyn QuantLinear>> {
        #[cfg(target_arch = "x86_64")]
        if tiled::available(isa()) {
            let m = QuantMatrix::<crate::q6_k::BlockQ6K>::from_ggml_bytes(bytes, rows, cols)?;
            return Ok(Box::new(tiled_k::TiledQ6K::new(&m.blocks, rows, cols)));
        }
        read::<crate::q6_k::BlockQ6K>(bytes, rows, cols)
    }
    Some(match dtype {
        GgmlDType::Q4_0 => read32::<crate::q4_0::BlockQ4_0>(bytes, rows, cols),
        GgmlDType::Q4_1 => read32::<crate::q4_1::BlockQ4_1>(bytes, rows, cols),
        GgmlDType::Q5_0 => read32::<crate::q5_0::BlockQ5_0>(bytes, rows, cols),
        GgmlDType::Q5_1 => read32::<crate::q5_1::BlockQ5_1>(bytes, rows, cols),
        GgmlDType::Q8_0 => read32::<crate::q8_0::BlockQ8_0>(bytes, rows, cols),
        GgmlDType::Q4K => read_q4_k(bytes, rows, cols),
        GgmlDType::Q5K => read::<crate::q5_k::BlockQ5K>(bytes, rows, cols),
        GgmlDType::Q6K => read_q6_k(bytes, rows, cols),
        _ => return None,
    })
}

/// Whether [`dequantize_ggml`] reads `dtype`.
pub fn dequantizes(dtype: GgmlDType) -> bool {
    dequantize_ggml(dtype, &[], &mut []).is_some()
}

/// Expands GGML blocks of `dtype` (`bytes`, whole blocks) into `out`, one
/// value per element, exactly as GGML (and candle) dequantize them. `None`
/// for types our kernels do not read; an error if the lengths disagree.
pub fn dequantize_ggml(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Option<Result<()>> {
    fn expand<B: QuantBlock>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
        let values = B::Act::VALUES;
        if !bytes.len().is_multiple_of(B::BYTES) || bytes.len() / B::BYTES * values != out.len() {
            candle_core::bail!(
                "{}: {} bytes do not hold {} values",
                B::NAME,
                bytes.len(),
                out.len()
            );
        }
        for (b, o) in bytes
            .chunks_exact(B::BYTES)
            .zip(out.chunks_exact_mut(values))
        {
            B::parse(b).dequantize(o);
        }
        Ok(())
    }
    Some(match dtype {
        GgmlDType::Q4_0 => expand::<crate::q4_0::BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => expand::<crate::q4_1::BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => expand::<crate::q5_0::BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => expand::<crate::q5_1::BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => expand::<crate::q8_0::BlockQ8_0>(bytes, out),
        GgmlDType::Q4K => expand::<crate::q4_k::BlockQ4K>(bytes, out),
        GgmlDType::Q5K => expand::<crate::q5_k::BlockQ5K>(bytes, out),
        GgmlDType::Q6K => expand::<crate::q6_k::BlockQ6K>(bytes, out),
        _ => return None,
    })
}
