//! Shared by the kernel, model and daemon tests (included by path).

/// Notes that the CUDA part of a test did not run; where
/// `KINDLING_TEST_REQUIRE_CUDA` is set (scripts/gpu-check.sh sets it) that
/// fails the test instead, so a GPU run cannot pass by skipping.
pub fn skip_cuda(what: &str, why: &str) {
    let required = std::env::var_os("KINDLING_TEST_REQUIRE_CUDA").is_some();
    assert!(
        !required,
        "{what}: CUDA is required here but unusable: {why}"
    );
    eprintln!("{what} is not tested here: {why}");
}
