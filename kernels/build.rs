//! With the `cuda` feature, compiles `cuda/*.cu` to PTX with nvcc (one
//! module per file, embedded in the library and loaded by the driver's JIT
//! on first use). Without it, does nothing: the CPU build needs no toolkit.

// A build script reports failure by panicking.
#![allow(clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    // The test binaries find libcudart.so.13 where scripts/build-cuda.sh
    // copies it, one folder up from them.
    println!("cargo:rustc-link-arg-tests=-Wl,-rpath,$ORIGIN/..");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|r| PathBuf::from(r).join("bin/nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
    // Every module src/fused/cuda.rs embeds.
    let sources: Vec<PathBuf> = ["norm", "swiglu", "attention"]
        .iter()
        .map(|m| PathBuf::from(format!("cuda/{m}.cu")))
        .collect();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().expect("a file name").to_string_lossy();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-Icuda")
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} failed ({e}); set up a toolkit with scripts/cuda-toolkit.sh",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
