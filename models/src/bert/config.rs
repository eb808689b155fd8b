//! A BERT-family encoder's `config.json` (BERT, RoBERTa, XLM-RoBERTa).

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// How positions are numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// BERT: 0, 1, 2, …
    Absolute,
    /// RoBERTa / XLM-R: `pad_token_id + 1`, `+ 2`, … (the padding index
    /// and those before it are never used by real tokens).
    AfterPadding,
}

/// The hyperparameters the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// `bert`, `roberta` or `xlm-roberta`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary entries.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Rows of the position table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    /// The feed-forward activation (`gelu` is the erf form).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Only `absolute` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
    /// Padding id (RoBERTa numbers positions after it).
    #[serde(default)]
    pub pad_token_id: usize,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f32 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::BadFormat {
            path: path.clone(),
            format: "config.json",
            message: e.to_string(),
        })?;
        config.check().map_err(|message| ModelError::BadFormat {
            path,
            format: "config.json",
            message,
        })?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if !matches!(self.model_type.as_str(), "bert" | "roberta" | "xlm-roberta") {
            return Err(format!(
                "model_type `{}` is not a BERT-family encoder (bert, roberta, xlm-roberta)",
                self.model_type
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act `{}` is not supported (gelu is)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (absolute is)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return Err(
                "vocab_size, num_hidden_layers and intermediate_size must be positive".into(),
            );
        }
        if self.max_positions() == 0 {
            return Err("max_position_embeddings leaves no positions".into());
        }
        Ok(())
    }

    /// How positions are numbered.
    pub fn positions(&self) -> Positions {
        if self.model_type == "bert" {
            Positions::Absolute
        } else {
            Positions::AfterPadding
        }
    }

    /// The first position id real tokens use.
    pub fn first_position(&self) -> usize {
        match self.positions() {
            Positions::Absolute => 0,
            Positions::AfterPadding => self.pad_token_id + 1,
        }
    }

    /// The longest input, in tokens, the position table allows.
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.first_position())
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}
