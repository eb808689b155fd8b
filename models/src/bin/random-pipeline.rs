//! Writes a random-weight Stable Diffusion pipeline in the diffusers
//! layout: `sd-tiny` for the demo and tests, full-size architectures for
//! benchmarks.
//!
//! `random-pipeline [--preset tiny|tiny-xl|sd15] [--dtype f32|f16] [--seed N] DIR`

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::DType;
use kindling_models::diffusion::random::{write_pipeline, Preset};

fn main() -> ExitCode {
    let mut preset = Preset::Tiny;
    let mut dtype = DType::F32;
    let mut seed = 0u64;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = |args: &mut dyn Iterator<Item = String>| args.next().unwrap_or_default();
        match arg.as_str() {
            "--preset" => match Preset::parse(&value(&mut args)) {
                Some(p) => preset = p,
                None => return usage("--preset is tiny, tiny-xl or sd15"),
            },
            "--dtype" => match value(&mut args).as_str() {
                "f32" => dtype = DType::F32,
                "f16" => dtype = DType::F16,
                _ => return usage("--dtype is f32 or f16"),
            },
            "--seed" => match value(&mut args).parse() {
                Ok(s) => seed = s,
                Err(_) => return usage("--seed takes a number"),
            },
            "-h" | "--help" => return usage(""),
            other if dir.is_none() && !other.starts_with('-') => dir = Some(PathBuf::from(other)),
            other => return usage(&format!("unexpected argument `{other}`")),
        }
    }
    let Some(dir) = dir else {
        return usage("missing the output folder");
    };
    match write_pipeline(&dir, preset, dtype, seed) {
        Ok(()) => {
            println!("wrote {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("random-pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("random-pipeline: {problem}");
    }
    eprintln!(
        "usage: random-pipeline [--preset tiny|tiny-xl|sd15] [--dtype f32|f16] [--seed N] DIR"
    );
    if problem.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
