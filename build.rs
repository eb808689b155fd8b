//! With the `cuda` feature, the daemon finds `libcudart.so.13` beside itself
//! (scripts/build-cuda.sh copies it there), so a GPU host needs only its
//! driver; the test binaries, one folder down, find it one folder up.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,$ORIGIN/..");
    }
}
