//! Token ids identical to llama.cpp's for the same text, for each kind of
//! GGUF vocabulary: byte-level BPE (the demo model) and SentencePiece (the
//! demo model's vocabulary recast by `retarget … spm`, the same bytes
//! llama.cpp tokenized). The corpus (scripts/llama_cpp_tokens.py) has code,
//! emoji, CJK, combining marks, odd whitespace and special tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::convert::scratch_dir;
use common::{json_ids, repo};
use kindling_models::gguf::GgufFile;
use kindling_models::retarget::retarget;
use kindling_models::tokenizer::Tokenizer;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("tests/data").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(tokenizer: &Tokenizer, reference: &Value) {
    let cases = reference["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            json_ids(&case["ids"]),
            "{text:?}"
        );
    }
    assert!(cases.len() >= 16);
}

#[test]
fn byte_level_bpe_ids_match_llama_cpp() {
    let gguf = GgufFile::open(&common::demo_gguf()).unwrap();
    check(
        &Tokenizer::from_gguf(&gguf).unwrap(),
        &reference("llama_cpp_tokens.json"),
    );
}

#[test]
fn sentencepiece_ids_match_llama_cpp() {
    let tokenizer = spm_fixture("spm", "llama_cpp_tokens.spm.json");
    // Pieces map back to their bytes: `▁` is a space, `<0xNN>` a byte.
    let ids = tokenizer.encode("naïve 🦀 code").unwrap();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&id| tokenizer.token_bytes(id).to_vec())
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), " naïve 🦀 code");
    assert_eq!(tokenizer.decode(&ids).unwrap(), "naïve 🦀 code");
}

/// Gemma's vocabularies: SentencePiece without the space before the text.
#[test]
fn sentencepiece_without_a_space_prefix_matches_llama_cpp() {
    let tokenizer = spm_fixture("spm-no-prefix", "llama_cpp_tokens.spm-no-prefix.json");
    let ids = tokenizer.encode("naïve 🦀 code").unwrap();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&id| tokenizer.token_bytes(id).to_vec())
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), "naïve 🦀 code");
    assert_eq!(tokenizer.decode(&ids).unwrap(), "naïve 🦀 code");
}

/// Writes the `target` vocabulary fixture, checks it is the file llama.cpp
/// tokenized for `name` and holds its tokenizer to llama.cpp's ids.
fn spm_fixture(target: &str, name: &str) -> Tokenizer {
    let reference = reference(name);
    let dir = scratch_dir(target);
    let path = dir.join("spm.gguf");
    retarget(&common::demo_gguf(), &path, target).unwrap();
    let digest: String = Sha256::digest(std::fs::read(&path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, reference["sha256"], "regenerate the reference");
    let gguf = GgufFile::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
    check(&tokenizer, &reference);
    let _ = std::fs::remove_dir_all(dir);
    tokenizer
}
