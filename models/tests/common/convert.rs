//! Test fixtures in the Hugging Face layout: the demo GGUF converted to a
//! safetensors folder (dequantized weights, `config.json`, and a
//! `tokenizer.json` built from the GGUF vocabulary), and tiny random-weight
//! models written from a config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kindling_models::gguf::GgufFile;
use kindling_models::llama::LlamaConfig;
use kindling_models::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// A fresh, empty folder under the temp dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kindling-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The Hugging Face name of a GGUF tensor (`gemma`: Gemma's names).
fn hf_name(gguf: &str, gemma: bool) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.into());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (part, kind) = part.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes the row permutation GGUF converters apply to query/key weights so
/// rotary pairs sit side by side: rows `(head, i, pair)` go back to
/// `(head, pair, i)`.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let hd = rows / heads;
    w.reshape((heads, hd / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes `tensors` as `shards` safetensors files (with an index when more
/// than one), converted to `dtype`.
pub fn write_weights(dir: &Path, tensors: HashMap<String, Tensor>, dtype: DType, shards: usize) {
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
        };
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| (n.clone(), tensors[n].to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), json!(file));
        }
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// Converts the GGUF at `gguf_path` (Llama, Gemma 2 or Gemma 3) into a
/// Hugging Face folder at `out`.
pub fn gguf_to_hf(gguf_path: &Path, out: &Path, dtype: DType, shards: usize) {
    let mut gguf = GgufFile::open(gguf_path).unwrap();
    let cfg = LlamaConfig::from_gguf(&gguf).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let arch = gguf.string("general.architecture").unwrap();
    let gemma = arch.starts_with("gemma");
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.trained_context,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": format!("{dtype:?}").to_lowercase(),
    });
    if gemma {
        gemma_config(&mut config, &cfg, &arch);
    }
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    let mut tensors = HashMap::new();
    for name in gguf.tensor_names() {
        let Some(hf) = hf_name(&name, gemma) else {
            continue;
        };
        let mut w = gguf
            .tensor(&name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        if gemma && name.ends_with("norm.weight") {
            // Gemma's checkpoints store norm weights as offsets from one.
            w = (w - 1.0).unwrap();
        } else if gemma {
            // Gemma's GGUF q/k rows are as trained (NeoX-style halves).
        } else if name.ends_with("attn_q.weight") {
            w = unpermute(&w, cfg.heads);
        } else if name.ends_with("attn_k.weight") {
            w = unpermute(&w, cfg.kv_heads);
        }
        tensors.insert(hf, w);
    }
    write_weights(out, tensors, dtype, shards);
    std::fs::write(out.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let template = gguf.string("tokenizer.chat_template").ok();
    let tok_config = json!({
        "bos_token": tok.bos_text(),
        "eos_token": tok.eos_text(),
        "add_bos_token": tok.adds_bos(),
        "chat_template": template,
    });
    std::fs::write(out.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
}

/// Gemma's fields of a Hugging Face `config.json`, from what Kindling read
/// in the GGUF. Gemma 2 leaves its layer pattern to the default.
fn gemma_config(config: &mut serde_json::Value, cfg: &LlamaConfig, arch: &str) {
    let v = &cfg.variant;
    let sliding = v.sliding.as_ref().unwrap();
    let gemma3 = arch == "gemma3";
    config["model_type"] = json!(if gemma3 { "gemma3_text" } else { "gemma2" });
    config["hidden_activation"] = json!("gelu_pytorch_tanh");
    config["query_pre_attn_scalar"] = json!(cfg.head_dim);
    config["sliding_window"] = json!(sliding.window);
    config["attn_logit_softcapping"] = json!(v.attn_softcap);
    config["final_logit_softcapping"] = json!(v.final_softcap);
    if gemma3 {
        let types: Vec<&str> = sliding
            .layers
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        config["layer_types"] = json!(types);
        config["rope_local_base_freq"] = json!(sliding.rope_theta);
        if let Some(kindling_models::llama::RopeScaling::Linear { factor }) = cfg.rope_scaling {
            config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
    }
}

/// Writes a random-weight model for the Hugging Face `config` (a JSON
/// object) into `out`, with `tokenizer.json` and `tokenizer_config.json`
/// copied from `tokenizer_from`. Qwen2 configs get q/k/v biases.
pub fn random_model(
    config: &serde_json::Value,
    tokenizer_from: &Path,
    out: &Path,
    dtype: DType,
    shards: usize,
    seed: u64,
) {
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_from.join(f), out.join(f)).unwrap();
    }
    let cfg = LlamaConfig::from_hf_json(&config.to_string()).unwrap();
    let qwen = config["model_type"] == "qwen2";
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.heads * d, cfg.kv_heads * d);
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rand(&[cfg.vocab_size, h], 0.5),
    );
    t.insert(
        "model.norm.weight".to_string(),
        (rand(&[h], 0.2) + 1.0).unwrap(),
    );
    if !cfg.tie_embeddings {
        t.insert(
            "lm_head.weight".to_string(),
            rand(&[cfg.vocab_size, h], 0.2),
        );
    }
    for l in 0..cfg.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let w = 1.0 / (h as f32).sqrt();
        for (name, shape, scale) in [
            ("input_layernorm.weight", vec![h], 0.0),
            ("post_attention_layernorm.weight", vec![h], 0.0),
            ("self_attn.q_proj.weight", vec![q, h], w),
            ("self_attn.k_proj.weight", vec![kv, h], w),
            ("self_attn.v_proj.weight", vec![kv, h], w),
            ("self_attn.o_proj.weight", vec![h, q], w),
            ("mlp.gate_proj.weight", vec![i, h], w),
            ("mlp.up_proj.weight", vec![i, h], w),
            ("mlp.down_proj.weight", vec![h, i], 1.0 / (i as f32).sqrt()),
        ] {
            let tensor = if scale == 0.0 {
                (rand(&shape, 0.2) + 1.0).unwrap()
            } else {
                rand(&shape, scale)
            };
            t.insert(p(name), tensor);
        }
        if qwen {
            for (name, n) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                t.insert(p(&format!("self_attn.{name}.bias")), rand(&[n], 0.5));
            }
        }
    }
    write_weights(out, t, dtype, shards);
}
