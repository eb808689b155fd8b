//! The engine room's errors.

/// The engine room's errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The model's waiting queue is full.
    #[error("model `{model}` has {queue} requests waiting; try again shortly")]
    QueueFull {
        /// The model.
        model: String,
        /// The queue's capacity.
        queue: usize,
    },
    /// Prompt plus requested tokens exceed what a sequence may hold.
    #[error("this model's maximum context length is {context} tokens; the prompt has {prompt_tokens} tokens and {max_tokens} more were requested")]
    ContextLengthExceeded {
        /// The model's context length.
        context: usize,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens requested (at least 1 when left open).
        max_tokens: usize,
    },
    /// The input itself is unusable (empty prompt, token id out of range, …).
    #[error("{message}")]
    InvalidInput {
        /// The request parameter at fault.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The model could not be loaded.
    #[error("model `{model}` failed to load: {reason}")]
    LoadFailed {
        /// The model.
        model: String,
        /// Why.
        reason: String,
        /// Seconds until the next attempt is allowed, if it is held back.
        retry_after: Option<u64>,
    },
    /// The model failed while computing.
    #[error("model computation failed: {0}")]
    Compute(String),
    /// The request's deadline passed before it finished.
    #[error("the request did not finish within its {seconds:.1}s deadline")]
    DeadlineExceeded {
        /// The time it was given.
        seconds: f64,
    },
    /// The worker is gone (shutting down).
    #[error("model `{0}` is shutting down")]
    Stopped(String),
}
