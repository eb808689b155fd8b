//! The models room's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A weight file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is not what its format promises (bad magic, truncated header, …).
    #[error("{path}: not a valid {format} file: {message}")]
    BadFormat {
        /// The file that failed.
        path: PathBuf,
        /// The format it was read as.
        format: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The file declares an architecture this build cannot run.
    #[error("unsupported architecture `{0}`")]
    UnsupportedArchitecture(String),
    /// A metadata key the architecture needs is missing or has the wrong type.
    #[error("metadata `{key}`: {message}")]
    Metadata {
        /// The GGUF metadata key.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A tensor the architecture needs is missing or malformed.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor's name in the weight file.
        name: String,
        /// What was wrong.
        message: String,
    },
    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The device the model was placed on cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A grammar (JSON Schema, regex, Lark, tool call) could not be compiled
    /// or followed.
    #[error("grammar: {0}")]
    Grammar(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results in this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
