//! Where a Llama's weights come from: a GGUF file (quantized projections)
//! or a Hugging Face safetensors folder (f32/f16/bf16, sharded or not). The
//! model is built the same way from either, through [`Source`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::gguf::{ggml_bytes, GgufFile, RawTensor};

/// A projection `x · Wᵀ (+ b)`. On the CPU, Q4_0, Q4_1, Q5_K, Q4_K, Q6_K
/// and Q8_0 weights run our kernels (four activation rows per weight pass,
/// integer dot products as llama.cpp takes them); other quantized types run
/// candle's; dense weights run candle's matmul.
pub(crate) enum Linear {
    Candle(QMatMul),
    Quant(Box<dyn kindling_kernels::QuantLinear>),
    Dense(Tensor),
}

impl Linear {
    fn from_raw(name: &str, raw: &RawTensor<'_>) -> Result<Self> {
        let [rows, cols] = raw.dims[..] else {
            return Err(ModelError::Tensor {
                name: name.into(),
                message: format!("expected a matrix, got shape {:?}", raw.dims),
            });
        };
        Self::from_bytes(raw.dtype, raw.bytes, rows, cols)
    }

    /// A projection from GGML bytes of `dtype` (`rows × cols`, row-major).
    fn from_bytes(dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if let Some(m) = kindling_kernels::quant::from_ggml(dtype, bytes, rows, cols) {
            return Ok(Self::Quant(m?));
        }
        let q = qtensor_from_ggml(dtype, bytes, vec![rows, cols], &Device::Cpu)?;
        Ok(Self::Candle(QMatMul::from_qtensor(q)?))
    }

    /// The output width (the weight's rows).
    pub(crate) fn rows(&self) -> Result<usize> {
        Ok(match self {
            Self::Candle(QMatMul::QTensor(q)) => q.shape().dims2()?.0,
            Self::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) | Self::Dense(w) => {
                w.dims2()?.0
            }
            Self::Quant(m) => m.dims().0,
        })
    }

    /// `x` is `[rows, in]`; the result `[rows, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Candle(m) => m.forward(x)?,
            Self::Quant(m) => m.forward(x)?,
            Self::Dense(w) => x.matmul(&w.t()?)?,
        })
    }
}

/// The token-embedding table. From a GGUF whose table our kernels read,
/// the rows a pass needs are expanded from the mapped file (no f32 copy of
/// the table: for a 128k-token vocabulary of width 4096 that is 2 GiB);
/// otherwise an f32 table.
pub(crate) enum TokenTable {
    Dense(Tensor),
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    },
}

impl TokenTable {
    /// The mapped table of `raw`, if our kernels read its type.
    fn mapped(raw: &RawTensor<'_>, map: Arc<memmap2::Mmap>) -> Option<Self> {
        let [rows, cols] = raw.dims[..] else {
            return None;
        };
        let probe = raw.bytes.get(..ggml_bytes(raw.dtype, cols))?;
        kindling_kernels::quant::dequantize_ggml(raw.dtype, probe, &mut vec![0f32; cols])?.ok()?;
        Some(Self::Mapped {
            map,
            offset: raw.offset,
            dtype: raw.dtype,
            rows,
            cols,
        })
    }

    /// The rows of `ids`, `[ids, width]` f32.
    pub(crate) fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Dense(table) => {
                let n = ids.len();
                let ids = Tensor::from_vec(ids.to_vec(), n, table.device())?;
                Ok(table.index_select(&ids, 0)?)
            }
            Self::Mapped {
                map,
                offset,
                dtype,
                rows,
                cols,
            } => {
                let row_bytes = ggml_bytes(*dtype, *cols);
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, o) in ids.iter().zip(out.chunks_exact_mut(*cols)) {
                    if id as usize >= *rows {
                        return Err(ModelError::Tensor {
                            name: "token_embd.weight".into(),
                            message: format!("token id {id} is outside the {rows}-token table"),
                        });
                    }
                    let at = offset + id as usize * row_bytes;
                    let bytes = &map[at..at + row_bytes];
                    if let Some(done) = kindling_kernels::quant::dequantize_ggml(*dtype, bytes, o) {
                        done?;
                    }
                }
                Ok(Tensor::from_vec(out, (ids.len(), *cols), &Device::Cpu)?)
            }
        }
    }
}

/// The parts of one transformer block.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    AttnNorm,
    /// Qwen3's per-head query norm.
    QNorm,
    /// Qwen3's per-head key norm.
    KNorm,
    /// Phi-3's fused query, key and value projection.
    Qkv,
    Q,
    K,
    V,
    O,
    /// Gemma's norm of the attention output, before the residual add.
    PostAttnNorm,
    FfnNorm,
    /// Gemma's norm of the MLP output, before the residual add.
    PostFfnNorm,
    Gate,
    Up,
    Down,
}

/// Whole-model tensors.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Global {
    Embedding,
    Output,
    OutputNorm,
}

/// Weights by role, whatever the file format calls them.
pub(crate) trait Source {
    /// The name of a block's tensor (`bias`: the bias rather than the weight).
    fn block_name(&self, layer: usize, part: Part, bias: bool) -> String;
    /// The name of a whole-model tensor.
    fn global_name(&self, global: Global) -> &'static str;
    /// Whether the file has `name`.
    fn contains(&self, name: &str) -> bool;
    /// A projection weight, kept in its storage format where we can compute on it.
    fn linear(&mut self, name: &str) -> Result<Linear>;
    /// The projections `names` as one, their output rows in order, with
    /// each one's width; `None` where they cannot be one (different
    /// storage formats or input widths).
    fn linear_fused(&mut self, names: &[String]) -> Result<Option<(Linear, Vec<usize>)>>;
    /// A tensor as f32 (norms, biases).
    fn dense(&mut self, name: &str) -> Result<Tensor>;
    /// A norm's weights as f32, as they multiply.
    fn norm(&mut self, name: &str) -> Result<Tensor> {
        self.dense(name)
    }
    /// The token-embedding table; with `tied`, also the output projection
    /// that reuses it (kept quantized where it is).
    fn embedding(&mut self, tied: bool) -> Result<(TokenTable, Option<Linear>)>;
    /// A tensor on `device` as `dtype`, converted there.
    fn on_device(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor>;
}

fn missing(name: &str) -> ModelError {
    ModelError::Tensor {
        name: name.into(),
        message: "missing from the weight files".into(),
    }
}

impl Source for GgufFile {
    fn block_name(&self, layer: usize, part: Part, bias: bool) -> String {
        let p = match part {
            Part::AttnNorm => "attn_norm",
            Part::QNorm => "attn_q_norm",
            Part::KNorm => "attn_k_norm",
            Part::Qkv => "attn_qkv",
            Part::Q => "attn_q",
            Part::K => "attn_k",
            Part::V => "attn_v",
            Part::O => "attn_output",
            Part::PostAttnNorm => "post_attention_norm",
            Part::FfnNorm => "ffn_norm",
            Part::PostFfnNorm => "post_ffw_norm",
            Part::Gate => "ffn_gate",
            Part::Up => "ffn_up",
            Part::Down => "ffn_down",
        };
        format!("blk.{layer}.{p}.{}", if bias { "bias" } else { "weight" })
    }

    fn global_name(&self, global: Global) -> &'static str {
        match global {
            Global::Embedding => "token_embd.weight",
            Global::Output => "output.weight",
            Global::OutputNorm => "output_norm.weight",
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.has_tensor(name)
    }

    fn linear(&mut self, name: &str) -> Result<Linear> {
        Linear::from_raw(name, &self.raw(name)?)
    }

    fn linear_fused(&mut self, names: &[String]) -> Result<Option<(Linear, Vec<usize>)>> {
        let mut bytes = Vec::new();
        let mut widths = Vec::with_capacity(names.len());
        let mut format = None;
        for name in names {
            let raw = self.raw(name)?;
            let [rows, cols] = raw.dims[..] else {
                return Ok(None);
            };
            if *format.get_or_insert((raw.dtype, cols)) != (raw.dtype, cols) {
                return Ok(None);
            }
            // Row-major blocks: the rows of one after the rows of the other.
            bytes.extend_from_slice(raw.bytes);
            widths.push(rows);
        }
        let Some((dtype, cols)) = format else {
            return Ok(None);
        };
        let rows = widths.iter().sum();
        Ok(Some((
            Linear::from_bytes(dtype, &bytes, rows, cols)?,
            widths,
        )))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.tensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?)
    }

    fn embedding(&mut self, tied: bool) -> Result<(TokenTable, Option<Linear>)> {
        let name = self.global_name(Global::Embedding);
        let raw = self.raw(name)?;
        let output = tied.then(|| Linear::from_raw(name, &raw)).transpose()?;
        let table = match TokenTable::mapped(&raw, self.mapping()) {
            Some(table) => table,
            // Types our kernels do not read: an f32 copy for lookups.
            None => TokenTable::Dense(self.tensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?),
        };
        Ok((table, output))
    }

    fn on_device(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        // Quantized blocks are expanded on the host, one tensor at a time.
        let t = self.tensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// A Hugging Face model folder's safetensors, memory-mapped.
pub(crate) struct Safetensors {
    files: MmapedSafetensors,
    names: HashSet<String>,
    /// Gemma's names, and norm weights stored as offsets from one.
    gemma: bool,
}

impl Safetensors {
    /// Opens the weights in `dir`: the files `model.safetensors.index.json`
    /// names, else every `*.safetensors` file. `gemma`: the folder holds a
    /// Gemma checkpoint.
    pub(crate) fn open(dir: &Path, gemma: bool) -> Result<Self> {
        let (files, names) = map_folder(dir)?;
        Ok(Self {
            files,
            names,
            gemma,
        })
    }
}

/// Memory-maps a model folder's safetensors files; returns them with the
/// names of every tensor they hold.
pub(crate) fn map_folder(dir: &Path) -> Result<(MmapedSafetensors, HashSet<String>)> {
    let paths = weight_files(dir)?;
    // SAFETY: the files are mapped read-only; Kindling never writes model
    // files while they are loaded (downloads land under new names).
    let files = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| ModelError::BadFormat {
        path: dir.to_path_buf(),
        format: "safetensors",
        message: e.to_string(),
    })?;
    let names = files.tensors().into_iter().map(|(n, _)| n).collect();
    Ok((files, names))
}

/// The shard files a `*.safetensors.index.json` names (in its folder,
/// sorted, each once); empty when its `weight_map` names none.
pub(crate) fn index_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::BadFormat {
            path: index.to_path_buf(),
            format: "safetensors index",
            message: e.to_string(),
        })?;
    let mut files: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new(""));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The safetensors files of a model folder, in a stable order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let files = index_files(&index)?;
        if files.is_empty() {
            return Err(ModelError::BadFormat {
                path: index,
                format: "safetensors index",
                message: "`weight_map` names no files".into(),
            });
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Io {
            path: dir.join("model.safetensors"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors files"),
        });
    }
    Ok(files)
}

impl Source for Safetensors {
    fn block_name(&self, layer: usize, part: Part, bias: bool) -> String {
        let p = match part {
            Part::AttnNorm => "input_layernorm",
            Part::QNorm => "self_attn.q_norm",
            Part::KNorm => "self_attn.k_norm",
            Part::Qkv => "self_attn.qkv_proj",
            Part::Q => "self_attn.q_proj",
            Part::K => "self_attn.k_proj",
            Part::V => "self_attn.v_proj",
            Part::O => "self_attn.o_proj",
            Part::PostAttnNorm if self.gemma => "post_attention_layernorm",
            Part::PostFfnNorm if self.gemma => "post_feedforward_layernorm",
            // No other family has these (Llama's `post_attention_layernorm`
            // is its MLP's pre-norm): a name no file holds.
            Part::PostAttnNorm | Part::PostFfnNorm => return String::new(),
            Part::FfnNorm if self.gemma => "pre_feedforward_layernorm",
            Part::FfnNorm => "post_attention_layernorm",
            Part::Gate => "mlp.gate_proj",
            Part::Up => "mlp.up_proj",
            Part::Down => "mlp.down_proj",
        };
        format!(
            "model.layers.{layer}.{p}.{}",
            if bias { "bias" } else { "weight" }
        )
    }

    fn global_name(&self, global: Global) -> &'static str {
        match global {
            Global::Embedding => "model.embed_tokens.weight",
            Global::Output => "lm_head.weight",
            Global::OutputNorm => "model.norm.weight",
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn linear(&mut self, name: &str) -> Result<Linear> {
        Ok(Linear::Dense(self.dense(name)?))
    }

    fn linear_fused(&mut self, names: &[String]) -> Result<Option<(Linear, Vec<usize>)>> {
        let parts = names
            .iter()
            .map(|n| self.dense(n))
            .collect::<Result<Vec<_>>>()?;
        let cols: Vec<usize> = parts
            .iter()
            .map(|w| w.dim(1))
            .collect::<candle_core::Result<_>>()?;
        if cols.windows(2).any(|c| c[0] != c[1]) {
            return Ok(None);
        }
        let widths = parts
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<_>>()?;
        Ok(Some((Linear::Dense(Tensor::cat(&parts, 0)?), widths)))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(missing(name));
        }
        // f16/bf16 checkpoints are widened to f32: candle's CPU matmul is far
        // faster in f32, and the results match the f32 reference.
        Ok(self.files.load(name, &Device::Cpu)?.to_dtype(DType::F32)?)
    }

    fn norm(&mut self, name: &str) -> Result<Tensor> {
        let w = self.dense(name)?;
        Ok(if self.gemma { (w + 1.0)? } else { w })
    }

    fn embedding(&mut self, tied: bool) -> Result<(TokenTable, Option<Linear>)> {
        let table = self.dense(self.global_name(Global::Embedding))?;
        let output = tied.then(|| Linear::Dense(table.clone()));
        Ok((TokenTable::Dense(table), output))
    }

    fn on_device(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(missing(name));
        }
        // The mapped bytes are copied to the device as they are in the file
        // (no host copy when aligned, as safetensors data is), then
        // converted on the device.
        Ok(self.files.load(name, device)?.to_dtype(dtype)?)
    }
}
