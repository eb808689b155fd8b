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
pub mod grammar;
pub mod kv_cache;
pub mod llama;
mod prefix_cache;
pub mod requantize;
pub mod retarget;
pub mod sampling;
pub mod synthetic;
pub mod text;
pub mod tokenizer;
pub mod tools;

pub use candle_core::{DType, Device};
pub use chat_template::{ChatMessage, FunctionCall, MessageToolCall};
pub use embedding::{EmbeddingModel, Pooling, TooLong};
pub use error::{ModelError, Result};
pub use footprint::Footprint;
pub use grammar::{Constraint, Grammar, GrammarCompiler, TokenMask};
pub use kindling_kernels::gpu;
pub use kindling_kernels::{configure_cpu, CpuFeatures};
pub use kv_cache::{BlockTable, CacheShape, KvCache};
pub use llama::BatchItem;
pub use sampling::{Sampled, Sampler, SamplingParams, TokenLogprobs};
pub use text::{Detokenizer, Network, Placement, StopMatcher, StopOutcome, TextModel};

/// Runs `f` on one of rayon's worker threads and waits for it.
///
/// A forward pass is a few hundred small parallel operations. Called from
/// a thread outside the pool, each of them is handed to the pool and the
/// caller sleeps until it is done: two context switches per operation,
/// which at one decode token a step cost as much as the arithmetic. Run
/// from inside the pool, the operations split among the workers directly,
/// and the caller waits once for the whole pass.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
