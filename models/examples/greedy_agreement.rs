//! Greedy agreement with llama.cpp on prompts outside the tests: for each
//! case of a reference file (`scripts/llama_cpp_reference.py` with a prompt
//! file, e.g. benches/unseen_prompts.json), decodes greedily on the same
//! prompt ids, past end-of-turn tokens as the reference does, and reports
//! where the two first part ways: both sides' top-2 margins there, and how
//! far llama.cpp's token is below ours in our logits. A divergence where
//! llama.cpp's own margin is small and its token sits just under ours is a
//! near-tie (two correct sums in different orders); a wide margin is a
//! defect to chase.
//!
//! ```sh
//! cargo run --release -p kindling-models --example greedy_agreement -- \
//!     store/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/unseen.json
//! ```

use std::path::Path;

use kindling_models::{BatchItem, BlockTable, KvCache, TextModel};

/// Margins (logits) under which a divergence counts as a near-tie.
const NEAR_TIE: f32 = 1.0;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn top2(logits: &[f32]) -> (u32, f32) {
    let (mut best, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.1 {
            second = best.1;
            best = (i, l);
        } else if l > second {
            second = l;
        }
    }
    (best.0 as u32, best.1 - second)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gguf, reference] = &args[..] else {
        return Err("usage: greedy_agreement MODEL.gguf REFERENCE.json".into());
    };
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(reference)?)?;
    let model = TextModel::load(Path::new(gguf), Some(2048))?;
    let piece = |id: u32| format!("{:?}", model.tokenizer.decode(&[id]).unwrap_or_default());
    let cases = doc["cases"].as_array().ok_or("no cases")?;
    println!("| prompt | exact | diverges at | llama.cpp's token (margin) | ours (margin) | its gap under ours | verdict |");
    println!("|---|---|---:|---|---|---:|---|");
    let mut exact = 0;
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let theirs = ids(&case["greedy_ids"]);
        let margins: Vec<f32> = case["greedy_margins"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| x as f32)
                    .collect()
            })
            .unwrap_or_default();
        let mut kv = model.new_cache(KvCache::blocks_for(prompt.len() + theirs.len()) + 4)?;
        let mut table = BlockTable::default();
        let mut len = 0;
        let mut feed =
            |tokens: &[u32], kv: &mut KvCache| -> Result<Vec<f32>, Box<dyn std::error::Error>> {
                if !kv.grow(&mut table, len + tokens.len()) {
                    return Err("cache too small".into());
                }
                let item = BatchItem {
                    tokens,
                    start: len,
                    blocks: table.blocks(),
                    logits: 1,
                };
                let mut out = model.forward(&[item], kv)?;
                len += tokens.len();
                out.pop().ok_or_else(|| "no logits".into())
            };
        let mut logits = feed(&prompt, &mut kv)?;
        let mut divergence = None;
        for (step, &want) in theirs.iter().enumerate() {
            let (ours, our_margin) = top2(&logits);
            if ours != want {
                let gap = logits[ours as usize] - logits[want as usize];
                divergence = Some((step, want, ours, our_margin, gap));
                break;
            }
            logits = feed(&[ours], &mut kv)?;
        }
        let name = case["prompt"].as_str().unwrap_or_default();
        let name: String = name
            .chars()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        match divergence {
            None => {
                exact += 1;
                println!("| {name:?} | yes | | | | | |");
            }
            Some((step, want, ours, our_margin, gap)) => {
                let their_margin = margins.get(step).copied().unwrap_or(f32::NAN);
                let verdict = if their_margin < NEAR_TIE && gap < NEAR_TIE {
                    "near-tie"
                } else {
                    "CHECK"
                };
                println!(
                    "| {name:?} | no | {step} | {} ({their_margin:.3}) | {} ({our_margin:.3}) | {gap:.3} | {verdict} |",
                    piece(want),
                    piece(ours)
                );
            }
        }
    }
    println!("\n{exact} of {} cases match exactly", cases.len());
    Ok(())
}
