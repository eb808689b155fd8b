//! Rewrites a GGUF file with its projections requantized, to one format or
//! to a mix that puts every format our kernels run into one model: the
//! known-answer tests compare such a file with llama.cpp running the same
//! bytes. Quantization is candle's port of GGML's reference quantizers, so
//! the output is the same bytes on every machine.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{ModelError, Result};

/// The formats of the mix for tensors of any width (32-value blocks).
const MIX_32: [GgmlDType; 5] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
];
/// The formats of the mix for tensors whose rows are a multiple of 256.
const MIX_256: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

/// The layer of a block tensor (`blk.N.…`).
fn layer(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The mix: in block `N`, tensors whose rows are a multiple of 256 values
/// rotate through Q4_K, Q5_K and Q6_K, the others through Q4_0, Q4_1,
/// Q5_0, Q5_1 and Q8_0 (shifted per tensor, so every format meets every
/// role). Embeddings, the output projection and norms keep their format.
pub fn mixed(name: &str, dims: &[usize], index_in_layer: usize) -> Option<GgmlDType> {
    let n = layer(name)?;
    let cols = *dims.last()?;
    if dims.len() != 2 {
        return None;
    }
    if cols.is_multiple_of(256) {
        Some(MIX_256[(n + index_in_layer) % MIX_256.len()])
    } else {
        Some(MIX_32[(n + index_in_layer) % MIX_32.len()])
    }
}

/// Reads `src`, requantizes each 2-D block tensor to what `plan` gives
/// (`None`: kept as it is) and writes `dst` with the same metadata.
/// Tensors are written in their order in `src`; metadata sorted by key.
pub fn requantize(
    src: &Path,
    dst: &Path,
    plan: impl Fn(&str, &[usize], usize) -> Option<GgmlDType>,
) -> Result<()> {
    let (mut reader, content) = open(src)?;
    let mut seen_in_layer: std::collections::HashMap<usize, usize> = Default::default();
    let mut tensors = Vec::new();
    for (name, tensor) in read_all(&mut reader, &content)? {
        let dims = tensor.shape().dims().to_vec();
        let index = layer(&name).map_or(0, |n| {
            let seen = seen_in_layer.entry(n).or_default();
            *seen += 1;
            *seen - 1
        });
        let tensor = match plan(&name, &dims, index) {
            Some(dtype) if dtype != tensor.dtype() => {
                let dense = tensor.dequantize(&Device::Cpu)?;
                QTensor::quantize(&dense, dtype)?
            }
            _ => tensor,
        };
        tensors.push((name, tensor));
    }
    let mut metadata: Vec<(String, Value)> = content.metadata.into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    write_file(metadata, tensors, dst)
}

/// Opens a GGUF file and reads its header.
pub(crate) fn open(src: &Path) -> Result<(BufReader<File>, Content)> {
    Ok(crate::gguf::GgufFile::open(src)?.into_parts())
}

/// Every tensor of `content`, in file order.
pub(crate) fn read_all(
    reader: &mut BufReader<File>,
    content: &Content,
) -> Result<Vec<(String, QTensor)>> {
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, _) in infos {
        tensors.push((name.clone(), content.tensor(reader, name, &Device::Cpu)?));
    }
    Ok(tensors)
}

/// Writes a GGUF file: `metadata` in its order, then `tensors`.
pub(crate) fn write_file(
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
    dst: &Path,
) -> Result<()> {
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let io = |source| ModelError::Io {
        path: dst.to_path_buf(),
        source,
    };
    let mut out = BufWriter::new(File::create(dst).map_err(io)?);
    gguf_file::write(&mut out, &metadata, &tensors)?;
    std::io::Write::flush(&mut out).map_err(io)?;
    Ok(())
}
