use candle_core::quantized::GgmlDType;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::quant::check::{self, put_f16, random_bytes, random_rows};
use crate::quant::{Dot4Fn, DotFn};

fn random(rows: usize, cols: usize, rng: &mut StdRng) -> QuantMatrix<BlockQ5_0> {
    random_bytes(rows, cols, rng, |b, rng| {
        put_f16(b, 0, rng, 0.001..0.05);
    })
}

#[test]
fn every_variant_matches_the_reference_and_each_other() {
    let mut rng = StdRng::seed_from_u64(31);
    let w = random(37, 576, &mut rng);
    let x = random_rows(7, 576, &mut rng);
    let reference = (
        dot_reference as DotFn<BlockQ5_0>,
        dot4_reference as Dot4Fn<BlockQ5_0>,
    );
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
    check::agrees_with_candle::<BlockQ5_0>(GgmlDType::Q5_0, 33, 1e-3);
}

#[test]
fn bad_shapes_are_errors() {
    check::bad_shapes_are_errors::<BlockQ5_0>();
}

#[cfg(target_arch = "x86_64")]
#[test]
fn tiled_layout_matches_the_row_kernels() {
    let mut rng = StdRng::seed_from_u64(34);
    let w = random(37, 576, &mut rng);
    check::tiled_matches_rows(&w, &mut rng);
}
