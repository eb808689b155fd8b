//! Reading GGUF files: typed metadata access and tensor loading. The file
//! is memory-mapped: tensors are read straight from the mapping, with no
//! read buffer between the page cache and the weights' final layout.

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// An open GGUF file: its parsed header (metadata and tensor infos), the
/// file mapped read-only, and a reader (for rewriting it).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    map: Arc<Mmap>,
}

/// Bytes that `elements` values of `dtype` take in a GGML file.
pub(crate) fn ggml_bytes(dtype: GgmlDType, elements: usize) -> usize {
    elements / dtype.block_size() * dtype.type_size()
}

/// One tensor's bytes in the mapped file.
#[derive(Debug)]
pub struct RawTensor<'a> {
    /// Its GGML type.
    pub dtype: GgmlDType,
    /// Its shape, row-major (`[rows, cols]` for a matrix).
    pub dims: Vec<usize>,
    /// Its blocks.
    pub bytes: &'a [u8],
    /// Where they start in the file.
    pub offset: usize,
}

impl GgufFile {
    /// Opens `path` and parses its header; tensors are read later, on demand.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: mapped read-only; Kindling never writes a model file while
        // it is open (downloads land under new names, then are renamed).
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let reader = BufReader::new(file);
        // The header is parsed from the mapping: candle asks the reader's
        // position before every length-prefixed value, which on a file is a
        // system call per vocabulary string (about 100,000 for a 49k-token
        // vocabulary with its merges).
        let content =
            Content::read(&mut Cursor::new(&map[..])).map_err(|e| ModelError::BadFormat {
                path: path.to_path_buf(),
                format: "GGUF",
                message: e.to_string(),
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
            map: Arc::new(map),
        })
    }

    /// The mapped file (weights that read their blocks in place hold it).
    pub(crate) fn mapping(&self) -> Arc<Mmap> {
        self.map.clone()
    }

    /// Asks the kernel to read the whole file ahead (before a load).
    pub(crate) fn prefetch(&self) {
        let _ = self.map.advise(memmap2::Advice::WillNeed);
    }

    /// Drops the mapping's pages from this process's resident set once the
    /// weights are laid out (they stay in the page cache; the few that are
    /// read in place, token-embedding rows, come back as they are touched).
    pub(crate) fn release_pages(&self) {
        // SAFETY: the mapping is shared, read-only and file-backed: dropping
        // its pages loses nothing, later reads fault them in from the file.
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// Tensor `name`'s bytes in the mapping.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::Tensor {
                name: name.to_string(),
                message: "missing from the weight file".into(),
            })?;
        let dtype = info.ggml_dtype;
        let len = ggml_bytes(dtype, info.shape.elem_count());
        let offset = (self.content.tensor_data_offset + info.offset) as usize;
        let bytes = offset
            .checked_add(len)
            .and_then(|end| self.map.get(offset..end))
            .ok_or_else(|| ModelError::BadFormat {
                path: self.path.clone(),
                format: "GGUF",
                message: format!("truncated: tensor `{name}` runs past the end of the file"),
            })?;
        Ok(RawTensor {
            dtype,
            dims: info.shape.dims().to_vec(),
            bytes,
            offset,
        })
    }

    /// The parsed header and the reader, for rewriting the file.
    pub(crate) fn into_parts(self) -> (BufReader<File>, Content) {
        (self.reader, self.content)
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Total bytes of tensor data, as declared by the tensor infos.
    pub fn tensor_bytes(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| {
                let elems = t.shape.elem_count();
                ggml_bytes(t.ggml_dtype, elems) as u64
            })
            .sum()
    }

    /// Total elements of every tensor (what they take expanded).
    pub fn tensor_elements(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum()
    }

    /// Checks that the file is long enough for every tensor its header
    /// declares (a truncated download fails here, not halfway through a load).
    pub fn check_complete(&self) -> Result<()> {
        let needed = self
            .content
            .tensor_infos
            .values()
            .map(|t| {
                let elems = t.shape.elem_count();
                self.content.tensor_data_offset + t.offset + ggml_bytes(t.ggml_dtype, elems) as u64
            })
            .max()
            .unwrap_or(0);
        let len = std::fs::metadata(&self.path)
            .map_err(|source| ModelError::Io {
                path: self.path.clone(),
                source,
            })?
            .len();
        if len < needed {
            return Err(ModelError::BadFormat {
                path: self.path.clone(),
                format: "GGUF",
                message: format!("truncated: its tensors need {needed} bytes, the file has {len}"),
            });
        }
        Ok(())
    }

    /// The names of every tensor in the file, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether the file has a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name` onto `device`, keeping its quantized type.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let raw = self.raw(name)?;
        Ok(qtensor_from_ggml(raw.dtype, raw.bytes, raw.dims, device)?)
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::Metadata {
                key: key.to_string(),
                message: "missing".into(),
            })
    }

    fn typed<T>(&self, key: &str, f: impl FnOnce(&Value) -> candle_core::Result<T>) -> Result<T> {
        f(self.value(key)?).map_err(|e| ModelError::Metadata {
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    /// Whether a metadata key is present.
    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Result<String> {
        self.typed(key, |v| v.to_string().cloned())
    }

    /// An unsigned integer value of any width.
    pub fn u32(&self, key: &str) -> Result<u32> {
        self.typed(key, |v| match v {
            Value::U64(x) => u32::try_from(*x)
                .map_err(|_| candle_core::Error::Msg(format!("{x} does not fit in u32"))),
            Value::I32(x) => {
                u32::try_from(*x).map_err(|_| candle_core::Error::Msg(format!("{x} is negative")))
            }
            v => v.to_u32(),
        })
    }

    /// An optional unsigned integer value.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        if self.has(key) {
            self.u32(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A float value.
    pub fn f32(&self, key: &str) -> Result<f32> {
        self.typed(key, |v| v.to_f32())
    }

    /// An optional float value.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        if self.has(key) {
            self.f32(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Whether a key holds an array.
    pub fn is_array(&self, key: &str) -> bool {
        matches!(self.content.metadata.get(key), Some(Value::Array(_)))
    }

    /// An array of booleans.
    pub fn bools(&self, key: &str) -> Result<Vec<bool>> {
        self.typed(key, |v| v.to_vec()?.iter().map(|x| x.to_bool()).collect())
    }

    /// A boolean value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        if self.has(key) {
            self.typed(key, |v| v.to_bool()).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.typed(key, |v| {
            v.to_vec()?.iter().map(|x| x.to_string().cloned()).collect()
        })
    }

    /// An array of integers (token types and the like).
    pub fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        self.typed(key, |v| v.to_vec()?.iter().map(|x| x.to_i32()).collect())
    }

    /// An array of floats (token scores and the like).
    pub fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        self.typed(key, |v| v.to_vec()?.iter().map(|x| x.to_f32()).collect())
    }
}
