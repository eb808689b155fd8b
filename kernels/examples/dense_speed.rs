//! Times one encoder-sized product per kernel family: `cargo run --release
//! -p kindling-kernels --example dense_speed`.
use kindling_kernels::dense::{dense_isa, DenseIsa, DenseMatrix, Epilogue};

fn main() {
    let rows: usize = std::env::args()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or(8192);
    let (n, k) = (1536, 384);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut isas = vec![DenseIsa::Reference];
    match dense_isa() {
        DenseIsa::Amx => isas.extend([DenseIsa::Avx512, DenseIsa::Amx]),
        other => isas.push(other),
    }
    let only = std::env::args().nth(1);
    for isa in isas {
        if only.as_ref().is_some_and(|o| *o != format!("{isa:?}")) {
            continue;
        }
        let m = DenseMatrix::for_isa(&w, None, n, k, isa);
        let _ = m.forward(&x, rows, Epilogue::None);
        let t = std::time::Instant::now();
        let reps = 20;
        for _ in 0..reps {
            std::hint::black_box(m.forward(&x, rows, Epilogue::None));
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{isa:?}: {:.1} ms, {:.0} GFLOP/s",
            s * 1e3,
            2.0 * (rows * n * k) as f64 / s / 1e9
        );
    }
}
