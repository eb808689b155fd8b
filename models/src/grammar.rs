//! Grammar-constrained decoding: JSON Schemas, regular expressions, Lark
//! grammars and fixed choices, compiled by llguidance against the model's
//! vocabulary. At every step a [`Constraint`] says which tokens may come
//! next; the sampler picks only among them, so the output always parses.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON value valid against this JSON Schema (`{"type": "object"}`
    /// for OpenAI's `json_object`).
    JsonSchema(Value),
    /// A regular expression over the whole output.
    Regex(String),
    /// One of these strings, exactly.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect (`%json {…}` embeds a schema).
    Lark(String),
}

/// Separators of the JSON that constrained decoding writes: the common
/// `", "` / `": "` style, with no free whitespace (a small model left free
/// to add whitespace can pad until `max_tokens` runs out).
const JSON_STYLE: &str =
    r#"{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}"#;

impl Grammar {
    /// The schema with Kindling's JSON style applied (a schema's own
    /// `x-guidance` options win).
    pub fn styled_schema(schema: &Value) -> Value {
        let mut schema = schema.clone();
        if let Value::Object(map) = &mut schema {
            if !map.contains_key("x-guidance") {
                if let Ok(style) = serde_json::from_str(JSON_STYLE) {
                    map.insert("x-guidance".into(), style);
                }
            }
        }
        schema
    }

    /// A JSON string literal for a Lark grammar (Lark strings are JSON strings).
    pub fn lark_string(text: &str) -> String {
        serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
    }

    /// `%json {…}` for a Lark grammar, in Kindling's JSON style.
    pub fn lark_json(schema: &Value) -> String {
        format!("%json {}", Self::styled_schema(schema))
    }

    fn top_level(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Self::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ModelError::Grammar(
                        "a JSON Schema must be an object".into(),
                    ));
                }
                TopLevelGrammar::from_json_schema(Self::styled_schema(schema))
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(options) => {
                if options.is_empty() {
                    return Err(ModelError::Grammar("the choice list is empty".into()));
                }
                let alts: Vec<String> = options.iter().map(|o| Self::lark_string(o)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            Self::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        })
    }
}

/// Compiles grammars for one model's vocabulary; built once per loaded
/// model, on its first constrained request.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

/// The model's vocabulary as llguidance sees it: control tokens are marked
/// so that no text can produce them, and text is tokenized as the model
/// tokenizes it.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode_fast(text.as_ref(), false) {
            Ok(enc) => enc.get_ids().to_vec(),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl GrammarCompiler {
    /// Builds the token trie and mask tables for `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let eog = tokenizer.end_of_generation();
        let eos = eog.first().copied().unwrap_or(0);
        let words: Vec<Vec<u8>> = (0..tokenizer.vocab_size() as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(bytes);
                    marked
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eog);
        let env: TokEnv = Arc::new(Vocabulary {
            trie,
            tokenizer: tokenizer.inner().clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(grammar_error)?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// Compiles `grammar` into a fresh constraint.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(grammar.top_level()?)
            .map_err(grammar_error)?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ModelError::Grammar(e));
        }
        Ok(Constraint { matcher })
    }
}

fn grammar_error(e: impl std::fmt::Display) -> ModelError {
    ModelError::Grammar(e.to_string())
}

/// One choice's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
}

/// The tokens allowed at one step.
pub struct TokenMask(SimpleVob);

impl TokenMask {
    /// Whether `token` may come next.
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Sets every disallowed logit to minus infinity.
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if !self.allows(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Whether any token outside `banned` is allowed.
    pub fn allows_any_but(&self, banned: &[u32]) -> bool {
        let mut any = false;
        self.0
            .iter_set_entries(|i| any |= !banned.contains(&(i as u32)));
        any
    }
}

impl Constraint {
    /// A copy in the same state (for the `n` choices of one prompt).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }

    /// The tokens that may come next (end-of-generation tokens once the
    /// output is complete).
    pub fn mask(&mut self) -> Result<TokenMask> {
        self.matcher
            .compute_mask_or_eos()
            .map(TokenMask)
            .map_err(grammar_error)
    }

    /// Records that `token` was generated.
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(grammar_error)
    }

    /// Whether the output is complete: nothing more may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
