//! Constrained decoding against the demo model's real vocabulary: whatever
//! token the sampler picks among those a grammar allows, the output is
//! valid once the grammar says it is complete. A random walk stands in for
//! the model (uniform over the allowed tokens, which is harsher than any
//! model: it favours odd tokens a model would rarely pick).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use kindling_models::gguf::GgufFile;
use kindling_models::tokenizer::Tokenizer;
use kindling_models::tools::{Tool, ToolFormat, ToolParser};
use kindling_models::{Grammar, GrammarCompiler};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&GgufFile::open(&common::demo_gguf()).unwrap()).unwrap()
}

/// Walks `grammar` choosing uniformly among the allowed tokens; returns the
/// text once the grammar is complete (or an end token is its only way on).
fn walk(tok: &Tokenizer, compiler: &GrammarCompiler, grammar: &Grammar, seed: u64) -> String {
    let mut c = compiler.compile(grammar).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..2000 {
        let mask = c.mask().unwrap();
        let allowed: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&t| mask.allows(t))
            .collect();
        assert!(!allowed.is_empty(), "the grammar allows nothing");
        let t = allowed[rng.random_range(0..allowed.len())];
        if tok.is_end_of_generation(t) {
            break;
        }
        c.commit(t).unwrap();
        ids.push(t);
        if c.is_finished() {
            break;
        }
    }
    tok.decode(&ids).unwrap()
}

fn person() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": false,
    })
}

#[test]
fn any_path_through_a_schema_is_valid_json_of_that_schema() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(&tok).unwrap();
    for seed in 0..12 {
        let text = walk(&tok, &compiler, &Grammar::JsonSchema(person()), seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 10, "{text}");
        assert!((0..=120).contains(&v["age"].as_i64().unwrap()), "{text}");
        assert!(
            ["admin", "user"].contains(&v["role"].as_str().unwrap()),
            "{text}"
        );
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
        assert!(
            text.contains("\": "),
            "the JSON style has `: ` separators: {text}"
        );
    }
}

#[test]
fn regexes_choices_and_bad_grammars() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(&tok).unwrap();
    for seed in 0..8 {
        let text = walk(
            &tok,
            &compiler,
            &Grammar::Regex(r"[0-9]{3}-[a-z]{2}".into()),
            seed,
        );
        assert!(text.len() == 6 && text.as_bytes()[3] == b'-', "{text:?}");
        let pick = walk(
            &tok,
            &compiler,
            &Grammar::Choice(vec!["yes".into(), "no".into(), "yes, but".into()]),
            seed,
        );
        assert!(
            ["yes", "no", "yes, but"].contains(&pick.as_str()),
            "{pick:?}"
        );
    }
    for bad in [
        Grammar::Regex("([".into()),
        Grammar::JsonSchema(json!({"type": "nope"})),
        Grammar::Lark("start: missing_rule".into()),
        Grammar::Choice(Vec::new()),
    ] {
        assert!(compiler.compile(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn forced_tool_calls_parse_back_into_valid_calls() {
    let tok = tokenizer();
    let compiler = GrammarCompiler::new(&tok).unwrap();
    let tools = [
        Tool {
            name: "lookup".into(),
            description: None,
            parameters: Some(person()),
        },
        Tool {
            name: "ping".into(),
            description: None,
            parameters: None,
        },
    ];
    for format in [
        ToolFormat::Hermes,
        ToolFormat::Generic,
        ToolFormat::Llama3,
        ToolFormat::Mistral,
    ] {
        for (seed, parallel) in [(1, false), (2, true), (3, true)] {
            let grammar = format.forced_grammar(&tools, parallel, |s| tok.control_id(s));
            let text = walk(&tok, &compiler, &grammar, seed);
            let mut parser = ToolParser::new(format);
            let mut pieces = parser.push(&text);
            pieces.extend(parser.finish());
            assert!(parser.calls() >= 1, "{format:?}: {text:?} -> {pieces:?}");
            if !parallel {
                assert_eq!(parser.calls(), 1, "{format:?}: {text:?}");
            }
            for piece in pieces {
                match piece {
                    kindling_models::tools::Piece::Call(call) => {
                        let args: Value = serde_json::from_str(&call.arguments).unwrap();
                        assert!(["lookup", "ping"].contains(&call.name.as_str()));
                        if call.name == "lookup" {
                            assert_eq!(args.as_object().unwrap().len(), 3, "{text}");
                        }
                    }
                    kindling_models::tools::Piece::Text(t) => {
                        assert!(
                            t.trim().is_empty(),
                            "{format:?}: stray text {t:?} in {text:?}"
                        )
                    }
                }
            }
        }
    }
}
