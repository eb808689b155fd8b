//! Kindling's models room: architectures, weight loading (GGUF), tokenizers
//! and chat templates from the weight files, sampling, and the paged KV
//! cache. Knows nothing of the engine, registry or HTTP above it.

pub mod bert;
pub mod chat_template;
pub mod diffusion;
pub mod embedding;
pub mod error;
pub mod footprint;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod sampling;
pub mod synthetic;
pub mod text;
pub mod tokenizer;

pub use candle_core::{DType, Device};
pub use chat_template::ChatMessage;
pub use embedding::{EmbeddingModel, Pooling, TooLong};
pub use error::{ModelError, Result};
pub use footprint::Footprint;
pub use kindling_kernels::gpu;
pub use kindling_kernels::{configure_cpu, CpuFeatures};
pub use kv_cache::{BlockTable, CacheShape, KvCache};
pub use llama::BatchItem;
pub use sampling::{Sampled, Sampler, SamplingParams, TokenLogprobs};
pub use text::{Detokenizer, Network, Placement, StopMatcher, StopOutcome, TextModel};
