//! Random-weight checkpoints shaped like real ones (GGUF or safetensors),
//! for tests and benchmarks on machines the real weights cannot reach.
//!
//! ```text
//! random-weights shape SRC SHAPE            keep only SRC's header (metadata, tokenizer, tensor shapes)
//! random-weights fill SHAPE DEST [--seed N] write a checkpoint like SHAPE with random values
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use kindling_models::synthetic::{fill_like, write_shape};

const USAGE: &str = "usage: random-weights shape SRC SHAPE | fill SHAPE DEST [--seed N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match strs.as_slice() {
        ["shape", src, dest] => write_shape(&PathBuf::from(src), &PathBuf::from(dest))
            .map(|bytes| format!("wrote {dest} ({bytes} bytes of header)")),
        ["fill", shape, dest, rest @ ..] => {
            let seed = match rest {
                [] => Ok(0),
                ["--seed", n] => n.parse::<u64>().map_err(|_| "--seed takes a number"),
                _ => Err(USAGE),
            };
            match seed {
                Ok(seed) => fill_like(&PathBuf::from(shape), &PathBuf::from(dest), seed).map(|f| {
                    format!(
                        "wrote {dest}: {:?}, {} tensors, {} elements",
                        f.format, f.tensors, f.elements
                    )
                }),
                Err(why) => {
                    eprintln!("random-weights: {why}");
                    return ExitCode::from(2);
                }
            }
        }
        ["-h" | "--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("random-weights: {e}");
            ExitCode::FAILURE
        }
    }
}
