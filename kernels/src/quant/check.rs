//! Checks every weight format's tests run: SIMD variants against the
//! reference and each other, the product against the dequantized weights,
//! and agreement with candle's GGML quantizer and product.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{runnable, ActBlock, Dot4Fn, DotFn, Isa, Kernels, QuantBlock, QuantMatrix};

/// A tensor's values, flattened.
fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Random activations in ±3.
pub(crate) fn random_rows(m: usize, cols: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..m * cols)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect()
}

/// A matrix of random bytes, each block passed through `fix` (which sets
/// its float fields to sane values).
pub(crate) fn random_bytes<B: QuantBlock>(
    rows: usize,
    cols: usize,
    rng: &mut StdRng,
    fix: impl Fn(&mut [u8], &mut StdRng),
) -> QuantMatrix<B> {
    let blocks = rows * cols / B::Act::VALUES;
    let mut bytes: Vec<u8> = (0..blocks * B::BYTES).map(|_| rng.random()).collect();
    for block in bytes.chunks_exact_mut(B::BYTES) {
        fix(block, rng);
    }
    QuantMatrix::from_ggml_bytes(&bytes, rows, cols).unwrap()
}

/// Writes a random f16 in `range` at `at`.
pub(crate) fn put_f16(block: &mut [u8], at: usize, rng: &mut StdRng, range: std::ops::Range<f32>) {
    let v = half::f16::from_f32(rng.random_range(range));
    block[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Every variant this CPU runs gives the reference's results (within
/// float-summation order), the SIMD variants give each other's bits, and a
/// lone row gives the bits it gets among four.
pub(crate) fn variants_agree<B: QuantBlock>(
    w: &QuantMatrix<B>,
    x: &[f32],
    reference: (DotFn<B>, Dot4Fn<B>),
    kernels_for: unsafe fn(Isa) -> Kernels<B>,
) {
    let want = w.matmul(x, reference);
    let mut simd: Option<Vec<f32>> = None;
    for isa in runnable() {
        // SAFETY: `runnable` lists only variants this CPU runs.
        let kernels = unsafe { kernels_for(isa) };
        let got = w.matmul(x, kernels);
        for (p, q) in got.iter().zip(&want) {
            assert!(
                (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                "{isa:?}: {p} vs {q}"
            );
        }
        if isa == Isa::Reference {
            assert_eq!(got, want);
        } else if let Some(first) = &simd {
            assert_eq!(&got, first, "{isa:?}");
        } else {
            simd = Some(got.clone());
        }
        let (rows, cols) = w.dims();
        for r in 0..x.len() / cols {
            let alone = w.matmul(&x[r * cols..(r + 1) * cols], kernels);
            assert_eq!(alone, got[r * rows..(r + 1) * rows], "{isa:?} row {r}");
        }
    }
}

/// The product against `x · dequantized(W)ᵀ`: the only difference is the
/// 8-bit activations, so the error is bounded by a share of the terms'
/// magnitudes.
pub(crate) fn matches_dequantized<B: QuantBlock>(w: &QuantMatrix<B>, x: &[f32], share: f32) {
    let (rows, cols) = w.dims();
    let m = x.len() / cols;
    let got = w.matmul(x, B::kernels());
    let dense = w.dequantize();
    for r in 0..m {
        for c in 0..rows {
            let terms = (0..cols).map(|k| x[r * cols + k] * dense[c * cols + k]);
            let want: f32 = terms.clone().sum();
            let size: f32 = terms.map(f32::abs).sum();
            let g = got[r * rows + c];
            assert!(
                (g - want).abs() <= share * size,
                "{}: {r},{c}: {g} vs {want} (terms {size})",
                B::NAME
            );
        }
    }
}

/// Quantizes random weights with candle's GGML quantizer, reads the bytes
/// as ours, and compares our product with candle's on the same blocks.
pub(crate) fn agrees_with_candle<B: QuantBlock>(dtype: GgmlDType, seed: u64, tolerance: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (rows, cols, m) = (96, 512, 5);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&wt, dtype).unwrap();
    let ours = QuantMatrix::<B>::from_ggml_bytes(&q.data().unwrap(), rows, cols).unwrap();
    // Our reading of the blocks is candle's.
    let theirs = flat(&q.dequantize(&Device::Cpu).unwrap());
    assert_eq!(ours.dequantize(), theirs, "{}", B::NAME);
    // Row by row from the raw bytes (token-embedding lookups), the same.
    let row_bytes = q.data().unwrap()[..cols / B::Act::VALUES * B::BYTES].to_vec();
    let mut row = vec![0f32; cols];
    super::dequantize_ggml(dtype, &row_bytes, &mut row)
        .unwrap()
        .unwrap();
    assert_eq!(row, theirs[..cols], "{}", B::NAME);
    assert!(super::dequantize_ggml(dtype, &row_bytes, &mut row[1..])
        .unwrap()
        .is_err());
    let x = Tensor::from_vec(random_rows(m, cols, &mut rng), (m, cols), &Device::Cpu).unwrap();
    let want = flat(&QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap());
    let got = flat(&ours.forward(&x).unwrap());
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (a, b) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() <= tolerance * scale,
            "{}: {a} vs {b}",
            B::NAME
        );
    }
}

/// The shape checks every format shares: byte counts, an input of the
/// wrong width, and no rows at all.
pub(crate) fn bad_shapes_are_errors<B: QuantBlock>() {
    let n = B::Act::VALUES;
    assert!(QuantMatrix::<B>::from_ggml_bytes(&vec![0; B::BYTES], 1, n + 1).is_err());
    assert!(QuantMatrix::<B>::from_ggml_bytes(&vec![0; B::BYTES - 1], 1, n).is_err());
    let w = QuantMatrix::<B>::from_ggml_bytes(&vec![0; 2 * B::BYTES], 1, 2 * n).unwrap();
    let x = Tensor::zeros((2, n), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(w.forward(&x).is_err());
    assert!(w.matmul(&[], B::kernels()).is_empty());
}

/// The tiled layout's product equals the row kernels' up to the order of
/// float additions, for batches that fill the four-row passes or not and a
/// row count that leaves the last tile part empty. Skipped (with a note)
/// where the CPU does not run it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn tiled_matches_rows<B: super::tiled::Tileable>(w: &QuantMatrix<B>, rng: &mut StdRng) {
    if !super::tiled::available(super::isa()) {
        eprintln!("{}: this CPU does not run the tiled product", B::NAME);
        return;
    }
    let (rows, cols) = w.dims();
    let tiled = super::tiled::TiledMatrix::new(&w.blocks, rows, cols);
    for m in [1, 3, 4, 9] {
        let x = random_rows(m, cols, rng);
        let want = w.matmul(&x, B::kernels());
        let got = tiled.matmul(&x);
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{} m={m} [{i}]: tiled {a}, rows {b}",
                B::NAME
            );
        }
        // Through the op as the models call it.
        let xt = Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap();
        assert_eq!(flat(&tiled.forward(&xt).unwrap()), got);
    }
}

/// The tests every weight format runs, for `$block` (GGML type `$dtype`):
/// a `random(rows, cols, rng)` matrix of random bytes passed through `$fix`
/// (which sets each block's float fields), every variant against the
/// reference (`$cols` columns), the dequantized product, candle's reading
/// and product (within `$candle` of the largest output), shape errors, and
/// (`tiled`) the interleaved layout.
macro_rules! format_tests {
    ($block:ty, $dtype:ident, $cols:literal, $candle:literal, $fix:expr $(, $tiled:ident)?) => {
        use candle_core::quantized::GgmlDType;
        use rand::rngs::StdRng;
        use rand::SeedableRng;

        use crate::quant::check::{self, random_rows};
        use crate::quant::{Dot4Fn, DotFn, QuantMatrix};

        fn random(rows: usize, cols: usize, rng: &mut StdRng) -> QuantMatrix<$block> {
            check::random_bytes(rows, cols, rng, $fix)
        }

        #[test]
        fn every_variant_matches_the_reference_and_each_other() {
            let mut rng = StdRng::seed_from_u64(31);
            let w = random(37, $cols, &mut rng);
            let x = random_rows(7, $cols, &mut rng);
            let reference = (dot_reference as DotFn<$block>, dot4_reference as Dot4Fn<$block>);
            check::variants_agree(&w, &x, reference, kernels_for);
        }

        #[test]
        fn matmul_matches_the_dequantized_product() {
            let mut rng = StdRng::seed_from_u64(32);
            for (m, rows, cols) in [(1, 64, 256), (5, 19, 512)] {
                let w = random(rows, cols, &mut rng);
                check::matches_dequantized(&w, &random_rows(m, cols, &mut rng), 0.01);
            }
        }

        #[test]
        fn reads_ggml_blocks_as_candle_does_and_agrees_with_its_product() {
            check::agrees_with_candle::<$block>(GgmlDType::$dtype, 33, $candle);
        }

        #[test]
        fn bad_shapes_are_errors() {
            check::bad_shapes_are_errors::<$block>();
        }

        $(
            #[cfg(target_arch = "x86_64")]
            #[test]
            fn $tiled() {
                let mut rng = StdRng::seed_from_u64(34);
                let w = random(37, $cols, &mut rng);
                check::tiled_matches_rows(&w, &mut rng);
            }
        )?
    };
}
pub(crate) use format_tests;
