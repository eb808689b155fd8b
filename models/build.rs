//! With the `cuda` feature, the tools, examples and tests find
//! `libcudart.so.13` where scripts/build-cuda.sh copies it (`target/release`):
//! beside the tools, one folder up from the examples and test binaries.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
        println!("cargo:rustc-link-arg-examples=-Wl,-rpath,$ORIGIN/..");
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,$ORIGIN/..");
    }
}
