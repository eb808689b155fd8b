//! SentencePiece-style vocabularies from GGUF (`tokenizer.ggml.model =
//! "llama"`: Llama 1/2, Mistral, TinyLlama, Phi-3, Gemma), as llama.cpp
//! tokenizes them: a space is put before the text (and before the text
//! after each special token), spaces become `▁`, adjacent pieces merge
//! highest-scoring result first, and characters outside the vocabulary fall
//! back to `<0xNN>` byte tokens.
//!
//! The merges are derived from the scores as Hugging Face's converter
//! derives them (every split of a piece into two pieces of the vocabulary,
//! ordered by the merged piece's score), so the byte-pair model applies
//! them in llama.cpp's order.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper};

use crate::error::{ModelError, Result};

/// GGUF token types a merge may produce or consume.
const TOKEN_NORMAL: i32 = 1;

const SPACE: &str = "\u{2581}";

/// The tokenizer for `tokens` with their `scores` and `types`.
pub(super) fn build(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let bad = |e: String| ModelError::Tokenizer(e);
    if scores.len() != tokens.len() || types.len() != tokens.len() {
        return Err(bad(format!(
            "{} tokens, {} scores, {} types",
            tokens.len(),
            scores.len(),
            types.len()
        )));
    }
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // Only normal pieces take part in merges (not bytes, controls or unused).
    let mergeable = |id: u32| types[id as usize] == TOKEN_NORMAL;
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(id as u32) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                if mergeable(a) && mergeable(b) {
                    merges.push((scores[id], a, b, l, r));
                }
            }
        }
    }
    // Highest merged score first; for one piece, by the halves' ids.
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .byte_fallback(true)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new(SPACE.into())));
    }
    let spaces = Replace::new(" ", SPACE).map_err(|e| bad(e.to_string()))?;
    normalizers.push(NormalizerWrapper::Replace(spaces));
    inner.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    let unspace =
        tokenizers::normalizers::Replace::new(SPACE, " ").map_err(|e| bad(e.to_string()))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(unspace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}
