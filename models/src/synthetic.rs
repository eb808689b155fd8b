//! Random-weight checkpoints shaped like real ones, for tests and
//! benchmarks where the real weights cannot travel (a GPU host with no
//! network, say): speed and device-versus-host agreement do not depend on
//! the weights' values, only on their shapes and types.
//!
//! A *shape file* is a checkpoint's header alone: a GGUF file cut where its
//! tensor data begins (metadata, tokenizer and chat template included), or
//! a safetensors file's length and JSON header. [`fill_like`] writes a full
//! checkpoint of the same format, names, shapes and types from one, with
//! values drawn from a seed (GGUF tensors quantized to their own types).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::diffusion::Noise;
use crate::error::{ModelError, Result};

/// The normal distribution a freshly initialised tensor's values come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    /// Mean.
    pub mean: f32,
    /// Standard deviation.
    pub std: f32,
}

/// How a tensor named `name` of shape `dims` starts: norm gains near one,
/// other vectors (biases) small, learned embeddings of images' sizes
/// moderate, matrices and kernels scaled by their fan-in.
pub fn init_for(name: &str, dims: &[usize]) -> Init {
    let leaf = name.rsplit('.').nth(1).unwrap_or("");
    if dims.len() <= 1 && leaf.contains("norm") && name.ends_with("weight") {
        Init {
            mean: 1.0,
            std: 0.1,
        }
    } else if dims.len() <= 1 {
        Init {
            mean: 0.0,
            std: 0.02,
        }
    } else if name.contains("embedding.weight") && !name.contains("time") {
        Init {
            mean: 0.0,
            std: 0.5,
        }
    } else {
        let fan_in: usize = dims[1..].iter().product();
        Init {
            mean: 0.0,
            std: 1.0 / (fan_in.max(1) as f32).sqrt(),
        }
    }
}

impl Init {
    /// One value from `noise`.
    pub fn draw(&self, noise: &mut Noise) -> f32 {
        if self.mean == 0.0 {
            self.std * noise.normal()
        } else {
            self.mean + self.std * noise.normal()
        }
    }

    /// `n` values drawn in parallel, chunk `c` from its own stream of
    /// `seed`: the same values on every machine and thread count.
    pub fn sample(&self, n: usize, seed: u64) -> Vec<f32> {
        self.sample_as(n, seed, |x| x)
    }

    /// As [`Init::sample`], each value converted by `conv` (to bf16, say,
    /// without a full f32 copy).
    pub fn sample_as<T: Copy + Default + Send>(
        &self,
        n: usize,
        seed: u64,
        conv: impl Fn(f32) -> T + Sync,
    ) -> Vec<T> {
        const CHUNK: usize = 1 << 16;
        let mut out = vec![T::default(); n];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut noise =
                    Noise::new(seed ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                for v in chunk {
                    *v = conv(self.draw(&mut noise));
                }
            });
        out
    }
}

/// Maps an I/O error on `path` to a [`ModelError::Io`].
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, format: &'static str, message: impl ToString) -> ModelError {
    ModelError::BadFormat {
        path: path.to_path_buf(),
        format,
        message: message.to_string(),
    }
}

/// A checkpoint format [`fill_like`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// llama.cpp's GGUF.
    Gguf,
    /// Hugging Face safetensors.
    Safetensors,
}

fn format_of(path: &Path) -> Result<Format> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(io(path))?;
    Ok(if &magic == b"GGUF" {
        Format::Gguf
    } else {
        Format::Safetensors
    })
}

/// The safetensors header: its JSON length and the parsed JSON.
fn safetensors_header(path: &Path) -> Result<(u64, serde_json::Map<String, serde_json::Value>)> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io(path))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(path, "safetensors", format!("header of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    f.read_exact(&mut json).map_err(io(path))?;
    let header = serde_json::from_slice(&json).map_err(|e| bad(path, "safetensors", e))?;
    Ok((len, header))
}

/// Writes the shape file of the checkpoint at `src` (GGUF or safetensors)
/// to `dest`; returns its size in bytes.
pub fn write_shape(src: &Path, dest: &Path) -> Result<u64> {
    let keep = match format_of(src)? {
        Format::Gguf => {
            let mut reader = BufReader::new(File::open(src).map_err(io(src))?);
            Content::read(&mut reader)
                .map_err(|e| bad(src, "GGUF", e))?
                .tensor_data_offset
        }
        Format::Safetensors => 8 + safetensors_header(src)?.0,
    };
    let mut head = Vec::new();
    File::open(src)
        .map_err(io(src))?
        .take(keep)
        .read_to_end(&mut head)
        .map_err(io(src))?;
    std::fs::write(dest, &head).map_err(io(dest))?;
    Ok(keep)
}

/// What [`fill_like`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filled {
    /// The checkpoint's format.
    pub format: Format,
    /// Tensors written.
    pub tensors: usize,
    /// Elements over all tensors.
    pub elements: u64,
}

/// Writes to `dest` a checkpoint with the format, metadata, tensor names,
/// shapes and types of the shape file (or full checkpoint) at `shape`, and
/// random values from `seed` (see [`init_for`]; integer tensors count up
/// from zero, as position ids do).
pub fn fill_like(shape: &Path, dest: &Path, seed: u64) -> Result<Filled> {
    match format_of(shape)? {
        Format::Gguf => fill_gguf(shape, dest, seed),
        Format::Safetensors => fill_safetensors(shape, dest, seed),
    }
}

fn fill_gguf(shape: &Path, dest: &Path, seed: u64) -> Result<Filled> {
    let mut reader = BufReader::new(File::open(shape).map_err(io(shape))?);
    let content = Content::read(&mut reader).map_err(|e| bad(shape, "GGUF", e))?;
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut tensors = Vec::with_capacity(infos.len());
    let mut elements = 0u64;
    for (i, (name, info)) in infos.iter().enumerate() {
        let dims = info.shape.dims();
        let n = info.shape.elem_count();
        let values = init_for(name, dims).sample(n, seed.wrapping_add(i as u64));
        let t = Tensor::from_vec(values, dims, &Device::Cpu)?;
        let q = QTensor::quantize(&t, info.ggml_dtype).map_err(|e| ModelError::Tensor {
            name: (*name).clone(),
            message: format!("cannot quantize to {:?}: {e}", info.ggml_dtype),
        })?;
        elements += n as u64;
        tensors.push(((*name).clone(), q));
    }
    // The writer aligns tensor data to 32 bytes; another declared alignment
    // would no longer hold.
    let mut metadata: Vec<(&String, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, v)| k.as_str() != "general.alignment" || matches!(v.to_u32(), Ok(32)))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(b.0));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut out = BufWriter::new(File::create(dest).map_err(io(dest))?);
    gguf_file::write(&mut out, &metadata, &refs)?;
    out.flush().map_err(io(dest))?;
    Ok(Filled {
        format: Format::Gguf,
        tensors: tensors.len(),
        elements,
    })
}

fn dtype_of(name: &str, dtype: &str, path: &Path) -> Result<DType> {
    Ok(match dtype {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        other => {
            return Err(bad(
                path,
                "safetensors",
                format!("tensor {name}: dtype {other} is not supported here"),
            ))
        }
    })
}

fn fill_safetensors(shape: &Path, dest: &Path, seed: u64) -> Result<Filled> {
    let (_, header) = safetensors_header(shape)?;
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    let mut tensors = HashMap::new();
    let mut elements = 0u64;
    for (i, name) in names.into_iter().enumerate() {
        let entry = &header[name];
        let dims: Vec<usize> = entry["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_u64())
                    .map(|d| d as usize)
                    .collect()
            })
            .ok_or_else(|| bad(shape, "safetensors", format!("tensor {name}: no shape")))?;
        let dtype = dtype_of(name, entry["dtype"].as_str().unwrap_or(""), shape)?;
        let n: usize = dims.iter().product();
        let values = if dtype.is_float() {
            init_for(name, &dims).sample(n, seed.wrapping_add(i as u64))
        } else {
            (0..n).map(|j| j as f32).collect()
        };
        let t = Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?.to_dtype(dtype)?;
        elements += n as u64;
        tensors.insert(name.clone(), t);
    }
    candle_core::safetensors::save(&tensors, dest)?;
    Ok(Filled {
        format: Format::Safetensors,
        tensors: tensors.len(),
        elements,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kindling-synth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn parallel_samples_are_the_same_on_every_call_and_follow_the_init() {
        let init = Init {
            mean: 1.0,
            std: 0.5,
        };
        let a = init.sample(300_000, 7);
        assert_eq!(a, init.sample(300_000, 7));
        assert_ne!(a, init.sample(300_000, 8));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "{var}");
    }

    #[test]
    fn a_safetensors_shape_file_fills_with_the_same_names_shapes_and_types() {
        let dir = scratch("st");
        let mut src = HashMap::new();
        src.insert(
            "encoder.layer.0.LayerNorm.weight".to_string(),
            Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        );
        src.insert(
            "encoder.layer.0.dense.weight".to_string(),
            Tensor::zeros((4, 8), DType::F16, &Device::Cpu).unwrap(),
        );
        src.insert(
            "embeddings.position_ids".to_string(),
            Tensor::zeros((1, 5), DType::I64, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&src, dir.join("src.safetensors")).unwrap();
        let kept = write_shape(&dir.join("src.safetensors"), &dir.join("shape")).unwrap();
        assert_eq!(std::fs::metadata(dir.join("shape")).unwrap().len(), kept);
        let filled = fill_like(&dir.join("shape"), &dir.join("out.safetensors"), 1).unwrap();
        assert_eq!(filled.tensors, 3);
        assert_eq!(filled.elements, 8 + 32 + 5);
        let out =
            candle_core::safetensors::load(dir.join("out.safetensors"), &Device::Cpu).unwrap();
        for (name, t) in &src {
            assert_eq!(out[name].dims(), t.dims(), "{name}");
            assert_eq!(out[name].dtype(), t.dtype(), "{name}");
        }
        let w = out["encoder.layer.0.dense.weight"]
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(w.iter().all(|x| x.is_finite()) && w.iter().any(|x| *x != 0.0));
        let ids = out["embeddings.position_ids"]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(ids, [0, 1, 2, 3, 4]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_gguf_shape_file_keeps_its_metadata_and_quantized_types() {
        use candle_core::quantized::GgmlDType;
        let dir = scratch("gguf");
        let w = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
        let norm = Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
        let q = [
            (
                "blk.0.ffn_up.weight",
                QTensor::quantize(&w, GgmlDType::Q4_1).unwrap(),
            ),
            (
                "blk.0.ffn_down.weight",
                QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(),
            ),
            (
                "blk.0.attn_norm.weight",
                QTensor::quantize(&norm, GgmlDType::F32).unwrap(),
            ),
        ];
        let arch = Value::String("llama".into());
        let tokens = Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
        let meta = [
            ("general.architecture", &arch),
            ("tokenizer.ggml.tokens", &tokens),
        ];
        let refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (*n, t)).collect();
        let mut f = File::create(dir.join("src.gguf")).unwrap();
        gguf_file::write(&mut f, &meta, &refs).unwrap();
        drop(f);
        write_shape(&dir.join("src.gguf"), &dir.join("shape.gguf")).unwrap();
        assert!(
            std::fs::metadata(dir.join("shape.gguf")).unwrap().len()
                < std::fs::metadata(dir.join("src.gguf")).unwrap().len()
        );
        let filled = fill_like(&dir.join("shape.gguf"), &dir.join("out.gguf"), 3).unwrap();
        assert_eq!((filled.format, filled.tensors), (Format::Gguf, 3));
        let mut r = BufReader::new(File::open(dir.join("out.gguf")).unwrap());
        let c = Content::read(&mut r).unwrap();
        assert_eq!(
            c.metadata["general.architecture"].to_string().unwrap(),
            "llama"
        );
        assert_eq!(
            c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap().len(),
            2
        );
        assert_eq!(
            c.tensor_infos["blk.0.ffn_up.weight"].ggml_dtype,
            GgmlDType::Q4_1
        );
        assert_eq!(
            c.tensor_infos["blk.0.ffn_down.weight"].ggml_dtype,
            GgmlDType::Q8_0
        );
        let gain = c
            .tensor(&mut r, "blk.0.attn_norm.weight", &Device::Cpu)
            .unwrap();
        let gain = gain
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mean = gain.iter().sum::<f32>() / gain.len() as f32;
        assert!(
            (mean - 1.0).abs() < 0.1,
            "norm gains start near one: {mean}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
