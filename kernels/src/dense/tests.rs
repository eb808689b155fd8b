use super::*;
use rand::{Rng, SeedableRng};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn reference(w: &[f32], b: &[f32], x: &[f32], rows: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows * n];
    for r in 0..rows {
        for c in 0..n {
            let dot: f64 = (0..k)
                .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                .sum();
            out[r * n + c] = dot + f64::from(b[c]);
        }
    }
    out
}

fn isas() -> Vec<DenseIsa> {
    let mut isas = vec![DenseIsa::Reference];
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && dense_isa() != DenseIsa::Avx2
    {
        isas.push(DenseIsa::Avx2);
    }
    match dense_isa() {
        DenseIsa::Amx => isas.extend([DenseIsa::Avx512, DenseIsa::Amx]),
        DenseIsa::Avx512 => isas.push(DenseIsa::Avx512),
        DenseIsa::Avx2 => isas.push(DenseIsa::Avx2),
        DenseIsa::Reference => {}
    }
    isas
}

#[test]
fn products_match_the_reference_on_odd_shapes() {
    for (rows, n, k) in [
        (1, 32, 32),
        (7, 64, 96),
        (33, 96, 64),
        (70, 32, 384),
        (5, 17, 13),
        (9, 48, 40),
    ] {
        let w = random(n * k, 1);
        let b = random(n, 2);
        let x = random(rows * k, 3);
        let want = reference(&w, &b, &x, rows, n, k);
        for isa in isas() {
            let m = DenseMatrix::for_isa(&w, Some(&b), n, k, isa);
            let got = m.forward(&x, rows, Epilogue::None);
            for (g, w) in got.iter().zip(&want) {
                let err = (f64::from(*g) - w).abs();
                assert!(
                    err < 2e-5 * (k as f64).sqrt(),
                    "{isa:?} {rows}x{n}x{k}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn epilogues_apply_after_the_bias() {
    let (rows, n, k) = (3, 32, 64);
    let (w, b, x, res) = (
        random(n * k, 4),
        random(n, 5),
        random(rows * k, 6),
        random(rows * n, 7),
    );
    let m = DenseMatrix::new(&w, Some(&b), n, k);
    let plain = m.forward(&x, rows, Epilogue::None);
    let gelu_out = m.forward(&x, rows, Epilogue::Gelu);
    let added = m.forward(&x, rows, Epilogue::Residual(&res));
    for i in 0..rows * n {
        assert_eq!(gelu_out[i], gelu(plain[i]));
        assert_eq!(added[i], plain[i] + res[i]);
    }
}

#[test]
fn a_row_is_the_same_alone_and_in_any_batch() {
    let (n, k) = (80, 384);
    let w = random(n * k, 8);
    let x = random(77 * k, 9);
    for isa in isas() {
        let m = DenseMatrix::for_isa(&w, None, n, k, isa);
        let all = m.forward(&x, 77, Epilogue::None);
        for (r, rows) in [(0, 1), (40, 1), (76, 1), (3, 5), (30, 40)] {
            let part = m.forward(&x[r * k..(r + rows) * k], rows, Epilogue::None);
            assert_eq!(
                part,
                all[r * n..(r + rows) * n],
                "{isa:?} rows {r}..{}",
                r + rows
            );
        }
    }
}

#[test]
fn detection_follows_the_settings() {
    let all = detect(CpuFeatures::default());
    let no_amx = detect(CpuFeatures {
        amx: false,
        ..CpuFeatures::default()
    });
    assert_ne!(no_amx, DenseIsa::Amx);
    if all == DenseIsa::Amx {
        // What a CPU without AMX runs: still a SIMD kernel.
        assert!(
            matches!(no_amx, DenseIsa::Avx512 | DenseIsa::Avx2),
            "{no_amx:?}"
        );
    } else {
        assert_eq!(no_amx, all);
    }
    // VNNI is the quantized kernels' business, not this module's.
    let no_vnni = CpuFeatures {
        vnni: false,
        ..CpuFeatures::default()
    };
    assert_eq!(detect(no_vnni), all);
    // The family in use is the one the settings in force give.
    assert_eq!(dense_isa(), detect(crate::cpu::cpu_features()));
    assert!(isas().contains(&dense_isa()) && isas().contains(&no_amx));
    eprintln!("dense products: {:?}", dense_isa());
}
