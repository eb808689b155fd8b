//! With the `cuda` feature, the daemon finds `libcudart.so.13` beside itself
//! (scripts/build-cuda.sh copies it there), so a GPU host needs only its
//! driver; the test binaries, one folder down, find it one folder up.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
        // Cargo refuses test link arguments for a package without tests, as
        // in a container build, whose context leaves tests/ out.
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
        if std::path::Path::new(&dir).join("tests").is_dir() {
            println!("cargo:rustc-link-arg-tests=-Wl,-rpath,$ORIGIN/..");
        }
    }
}
