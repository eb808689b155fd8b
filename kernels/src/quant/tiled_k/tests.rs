use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::q6_k::BlockQ6K;
use crate::quant::check::{put_f16, random_bytes, random_rows};
use crate::quant::QuantBlock;

/// The tiled product equals the row kernels' up to the order of float
/// additions, for every pass width and a part-empty last tile.
#[test]
fn tiled_q4_k_matches_the_row_kernels() {
    if !super::super::tiled::available(super::super::isa()) {
        eprintln!("q4_k: this CPU does not run the tiled product");
        return;
    }
    let mut rng = StdRng::seed_from_u64(41);
    for (rows, cols) in [(19, 512), (64, 768)] {
        let w = random_bytes::<BlockQ4K>(rows, cols, &mut rng, |b, rng| {
            put_f16(b, 0, rng, 0.001..0.01);
            put_f16(b, 2, rng, 0.001..0.01);
        });
        let tiled = TiledQ4K::new(&w.blocks, rows, cols);
        for m in [1, 2, 3, 4, 7, 8, 9, 17] {
            let x = random_rows(m, cols, &mut rng);
            let want = w.matmul(&x, BlockQ4K::kernels());
            let got = tiled.matmul(&x);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{rows}x{cols} m={m} [{i}]: tiled {a}, rows {b}"
                );
            }
        }
    }
}

/// The same for Q6_K, with the extreme scale (−128) in some blocks.
#[test]
fn tiled_q6_k_matches_the_row_kernels() {
    if !super::super::tiled::available(super::super::isa()) {
        eprintln!("q6_k: this CPU does not run the tiled product");
        return;
    }
    let mut rng = StdRng::seed_from_u64(42);
    let bytes = crate::q6_k::BLOCK_BYTES;
    for (rows, cols) in [(19, 512), (64, 768)] {
        let w = random_bytes::<BlockQ6K>(rows, cols, &mut rng, |b, rng| {
            put_f16(b, bytes - 2, rng, 0.0001..0.001);
            b[bytes - 18] = 0x80;
        });
        let tiled = TiledQ6K::new(&w.blocks, rows, cols);
        for m in [1, 2, 3, 4, 7, 8, 9, 17] {
            let x = random_rows(m, cols, &mut rng);
            let want = w.matmul(&x, BlockQ6K::kernels());
            let got = tiled.matmul(&x);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{rows}x{cols} m={m} [{i}]: tiled {a}, rows {b}"
                );
            }
        }
    }
}
