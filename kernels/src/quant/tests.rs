use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn random_rows(m: usize, cols: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..m * cols)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect()
}

#[test]
fn q8_1_quantization_follows_ggml() {
    let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.25).collect();
    let mut q = [BlockQ8_1::default()];
    quantize_q8_1(&x, &mut q);
    // amax = 4.0: d = 4/127, values scale by 127/4 = 31.75 and round half to even.
    assert_eq!(q[0].d, f16::from_f32(4.0 / 127.0).to_f32());
    assert_eq!(q[0].qs[0], -127);
    assert_eq!(q[0].qs[2], -111); // -3.5 * 31.75 = -111.125
    assert_eq!(q[0].qs[18], 16); // 0.5 * 31.75 = 15.875
    let sum: i32 = q[0].qs.iter().map(|&v| i32::from(v)).sum();
    assert_eq!(q[0].s, f16::from_f32(4.0 / 127.0 * sum as f32).to_f32());
    let zeros = [0f32; 32];
    quantize_q8_1(&zeros, &mut q);
    assert_eq!((q[0].d, q[0].s, q[0].qs), (0.0, 0.0, [0; 32]));
}

#[test]
fn simd_quantization_is_bit_exact() {
    let mut rng = StdRng::seed_from_u64(13);
    for scale in [1e-3f32, 1.0, 300.0] {
        let mut x = random_rows(3, 576, &mut rng);
        x.iter_mut().for_each(|v| *v *= scale);
        // Ties at .5 after scaling, and an all-zero block.
        x[5] = x.iter().take(32).fold(0f32, |m, v| m.max(v.abs())) * 0.5 / 127.0 * 3.0;
        x[32..64].fill(0.0);
        let mut a = vec![BlockQ8_1::default(); x.len() / BLOCK];
        let mut b = a.clone();
        quantize_q8_1(&x, &mut a);
        quantize_q8_1_reference(&x, &mut b);
        assert_eq!(a, b);
    }
}

#[test]
fn detection_follows_the_settings() {
    let all = detect(CpuFeatures::default());
    let no_vnni = detect(CpuFeatures {
        vnni: false,
        ..CpuFeatures::default()
    });
    assert!(!matches!(no_vnni, Isa::Vnni | Isa::Vnni512));
    if matches!(all, Isa::Vnni | Isa::Vnni512) {
        assert_eq!(no_vnni, Isa::Avx2);
    } else {
        assert_eq!(no_vnni, all);
    }
    // AMX is the dense kernels' business, not this module's.
    let no_amx = CpuFeatures {
        amx: false,
        ..CpuFeatures::default()
    };
    assert_eq!(detect(no_amx), all);
    // The variant in use is the one the settings in force give.
    assert_eq!(isa(), detect(cpu_features()));
    let variants = runnable();
    assert_eq!(variants[0], Isa::Reference);
    assert!(variants.contains(&isa()) && variants.contains(&no_vnni));
    eprintln!("quantized dot products: {:?} of {variants:?}", isa());
}
