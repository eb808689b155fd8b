use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::quant::{quantize_q8_1, runnable};

fn random_matrix(rows: usize, cols: usize, rng: &mut StdRng) -> (Q4_1Matrix, Vec<u8>) {
    let mut bytes = Vec::with_capacity(rows * cols / BLOCK * BLOCK_BYTES);
    for _ in 0..rows * cols / BLOCK {
        bytes.extend_from_slice(&f16::from_f32(rng.random_range(0.001f32..0.05)).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(rng.random_range(-0.4f32..0.0)).to_le_bytes());
        bytes.extend((0..16).map(|_| rng.random::<u8>()));
    }
    (
        Q4_1Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap(),
        bytes,
    )
}

fn random_rows(m: usize, cols: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..m * cols)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect()
}

#[test]
fn simd_dot_matches_reference() {
    let mut rng = StdRng::seed_from_u64(5);
    for cols in [32, 64, 576, 1536] {
        let (w, _) = random_matrix(1, cols, &mut rng);
        let x = random_rows(1, cols, &mut rng);
        let mut xq = vec![BlockQ8_1::default(); cols / BLOCK];
        quantize_q8_1(&x, &mut xq);
        let want = dot_reference(&w.blocks, &xq);
        let got = dot_fn()(&w.blocks, &xq);
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{cols}: {got} vs {want}"
        );
    }
    eprintln!("SIMD dot product in use: {}", simd_available());
}

#[test]
fn matmul_matches_dequantized_reference() {
    let mut rng = StdRng::seed_from_u64(9);
    for (m, rows, cols) in [
        (1, 576, 576),
        (1, 37, 64),
        (3, 130, 96),
        (17, 192, 576),
        (128, 64, 1536),
    ] {
        let (w, _) = random_matrix(rows, cols, &mut rng);
        let x = random_rows(m, cols, &mut rng);
        let xt = Tensor::from_vec(x.clone(), (1, m, cols), &Device::Cpu).unwrap();
        let got = w.forward(&xt).unwrap();
        assert_eq!(got.dims(), &[1, m, rows]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let dense = Tensor::from_vec(w.dequantize(), (rows, cols), &Device::Cpu).unwrap();
        let want: Vec<f32> = Tensor::from_vec(x, (m, cols), &Device::Cpu)
            .unwrap()
            .matmul(&dense.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The only difference is 8-bit activations: error grows with sqrt(cols).
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
    let (w, _) = random_matrix(8, 64, &mut rng);
    assert!(w.matmul(&[], kernels()).is_empty());
}

#[test]
fn simd_and_reference_matmuls_agree() {
    // Every variant this CPU runs, whatever the settings pick: the SIMD ones
    // give the same bits as each other, and close to the reference.
    let mut rng = StdRng::seed_from_u64(11);
    let (w, _) = random_matrix(200, 576, &mut rng);
    let x = random_rows(7, 576, &mut rng);
    let reference = w.matmul(
        &x,
        (
            dot_reference as crate::quant::DotFn<BlockQ4_1>,
            dot4_reference as crate::quant::Dot4Fn<BlockQ4_1>,
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
}

#[test]
fn rows_give_the_same_bits_alone_and_in_fours() {
    // Batched rows go through the four-row kernel, a lone row through the
    // one-row kernel: a sequence's numbers must not depend on its batch.
    let mut rng = StdRng::seed_from_u64(12);
    let (w, _) = random_matrix(70, 576, &mut rng);
    let x = random_rows(9, 576, &mut rng);
    let all = w.matmul(&x, kernels());
    for r in 0..9 {
        let alone = w.matmul(&x[r * 576..(r + 1) * 576], kernels());
        assert_eq!(alone, all[r * 70..(r + 1) * 70], "row {r}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(Q4_1Matrix::from_ggml_bytes(&[0; 20], 1, 33).is_err());
    assert!(Q4_1Matrix::from_ggml_bytes(&[0; 19], 1, 32).is_err());
    let mut rng = StdRng::seed_from_u64(1);
    let (w, _) = random_matrix(4, 64, &mut rng);
    let x = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(w.forward(&x).is_err());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vnni_and_avx2_dot_products_agree_bit_for_bit() {
    if !(is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2")) {
        eprintln!("skipped: this CPU has no AVX-VNNI");
        return;
    }
    let mut rng = StdRng::seed_from_u64(14);
    let (w, _) = random_matrix(3, 576, &mut rng);
    let x = random_rows(4, 576, &mut rng);
    let mut xq = vec![BlockQ8_1::default(); 4 * 18];
    quantize_q8_1(&x, &mut xq);
    let rows: [&[BlockQ8_1]; 4] = std::array::from_fn(|r| &xq[r * 18..(r + 1) * 18]);
    let row = &w.blocks[..18];
    // SAFETY: both feature sets were checked above.
    let (a, b) = unsafe { (avx2::dot4(row, rows), avx2::dot4_vnni(row, rows)) };
    assert_eq!(a, b);
    assert_eq!(unsafe { avx2::dot(row, rows[2]) }, unsafe {
        avx2::dot_vnni(row, rows[2])
    });
}

#[cfg(target_arch = "x86_64")]
#[test]
fn tiled_layout_matches_the_row_kernels() {
    let mut rng = StdRng::seed_from_u64(34);
    let (w, _) = random_matrix(37, 576, &mut rng);
    crate::quant::check::tiled_matches_rows(&w, &mut rng);
}
