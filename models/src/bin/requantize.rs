//! `requantize SRC.gguf DST.gguf FORMAT`: writes SRC's model with its block
//! projections requantized. FORMAT is `mixed` (every format Kindling's
//! kernels run, rotating over the layers; what the known-answer tests use)
//! or one of q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k (tensors whose
//! rows do not fit a K-quant's 256 values keep their format).

use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::quantized::GgmlDType;
use kindling_models::requantize::{mixed, requantize};

fn format(name: &str) -> Option<GgmlDType> {
    Some(match name {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        _ => return None,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst, fmt] = args.as_slice() else {
        eprintln!(
            "usage: requantize SRC.gguf DST.gguf mixed|q4_0|q4_1|q5_0|q5_1|q8_0|q4_k|q5_k|q6_k"
        );
        return ExitCode::from(2);
    };
    let (src, dst) = (PathBuf::from(src), PathBuf::from(dst));
    let result = if fmt == "mixed" {
        requantize(&src, &dst, mixed)
    } else if let Some(dtype) = format(fmt) {
        let block = dtype.block_size();
        requantize(&src, &dst, |name, dims, _| {
            let fits = dims.len() == 2 && dims[1] % block == 0 && name.starts_with("blk.");
            fits.then_some(dtype)
        })
    } else {
        eprintln!("requantize: unknown format {fmt}");
        return ExitCode::from(2);
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("requantize: {e}");
            ExitCode::FAILURE
        }
    }
}
