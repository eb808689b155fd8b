use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::quant::runnable;

fn random_matrix(rows: usize, cols: usize, rng: &mut StdRng) -> Q4_0Matrix {
    let mut bytes = Vec::with_capacity(rows * cols / BLOCK * BLOCK_BYTES);
    for _ in 0..rows * cols / BLOCK {
        bytes.extend_from_slice(&f16::from_f32(rng.random_range(-0.05f32..0.05)).to_le_bytes());
        bytes.extend((0..16).map(|_| rng.random::<u8>()));
    }
    Q4_0Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap()
}

fn random_rows(m: usize, cols: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..m * cols)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect()
}

#[test]
fn every_variant_matches_the_reference_and_each_other() {
    let mut rng = StdRng::seed_from_u64(21);
    let w = random_matrix(130, 576, &mut rng);
    let x = random_rows(7, 576, &mut rng);
    let reference = w.matmul(
        &x,
        (
            dot_reference as crate::quant::DotFn<BlockQ4_0>,
            dot4_reference as crate::quant::Dot4Fn<BlockQ4_0>,
        ),
    );
    let mut simd: Option<Vec<f32>> = None;
    for isa in runnable() {
        // SAFETY: `runnable` lists only variants this CPU runs.
        let got = w.matmul(&x, unsafe { kernels_for(isa) });
        for (p, q) in got.iter().zip(&reference) {
            assert!(
                (p - q).abs() <= 1e-4 * q.abs().max(1.0),
                "{isa:?}: {p} vs {q}"
            );
        }
        if isa == Isa::Reference {
            assert_eq!(got, reference);
        } else if let Some(first) = &simd {
            assert_eq!(&got, first, "{isa:?}");
        } else {
            simd = Some(got);
        }
    }
    // A lone row gives the same bits as the same row among four.
    let all = w.matmul(&x, kernels());
    for r in 0..7 {
        let alone = w.matmul(&x[r * 576..(r + 1) * 576], kernels());
        assert_eq!(alone, all[r * 130..(r + 1) * 130], "row {r}");
    }
}

#[test]
fn matmul_matches_the_dequantized_product() {
    let mut rng = StdRng::seed_from_u64(22);
    for (m, rows, cols) in [(1, 576, 576), (3, 37, 64), (17, 192, 1536)] {
        let w = random_matrix(rows, cols, &mut rng);
        let x = random_rows(m, cols, &mut rng);
        let got: Vec<f32> = w
            .forward(&Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let dense = Tensor::from_vec(w.dequantize(), (rows, cols), &Device::Cpu).unwrap();
        let want: Vec<f32> = Tensor::from_vec(x, (m, cols), &Device::Cpu)
            .unwrap()
            .matmul(&dense.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The only difference is 8-bit activations.
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 0.02 * scale,
            "{m}x{rows}x{cols}: worst {worst}, scale {scale}"
        );
    }
}

#[test]
fn agrees_with_ggml_quantization_and_candles_q4_0_product() {
    // candle quantizes with GGML's reference quantizer and multiplies with
    // Q8_0 activations: the same integers as ours, so the same sums up to
    // the order of the float additions.
    let mut rng = StdRng::seed_from_u64(23);
    let (rows, cols, m) = (96, 512, 5);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&wt, GgmlDType::Q4_0).unwrap();
    let ours = Q4_0Matrix::from_ggml_bytes(&q.data().unwrap(), rows, cols).unwrap();
    let x = Tensor::from_vec(random_rows(m, cols, &mut rng), (m, cols), &Device::Cpu).unwrap();
    let want: Vec<f32> = QMatMul::from_qtensor(q)
        .unwrap()
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got: Vec<f32> = ours
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(Q4_0Matrix::from_ggml_bytes(&[0; 18], 1, 33).is_err());
    assert!(Q4_0Matrix::from_ggml_bytes(&[0; 17], 1, 32).is_err());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn tiled_layout_matches_the_row_kernels() {
    let mut rng = StdRng::seed_from_u64(34);
    let w = random_matrix(37, 576, &mut rng);
    crate::quant::check::tiled_matches_rows(&w, &mut rng);
}
