//! `retarget SRC.gguf DST.gguf qwen2|qwen3`: writes SRC's Llama model as
//! that architecture, with seeded values for what it adds (Qwen2's q/k/v
//! biases, Qwen3's q/k norms): the fixtures of the architectures'
//! known-answer tests against llama.cpp.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst, arch] = args.as_slice() else {
        eprintln!("usage: retarget SRC.gguf DST.gguf qwen2|qwen3");
        return ExitCode::from(2);
    };
    match kindling_models::retarget::retarget(&PathBuf::from(src), &PathBuf::from(dst), arch) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("retarget: {e}");
            ExitCode::FAILURE
        }
    }
}
