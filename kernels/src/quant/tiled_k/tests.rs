use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::q6_k::BlockQ6K;
use crate::quant::check::{put_f16, random_bytes, random_rows};
use crate::quant::{QuantBlock, QuantMatrix};

/// The tiled product (`tile` makes it from the row layout) equals the row
/// kernels' up to the order of float additions, for every pass width and a
/// part-empty last tile. Skipped (with a note) where the CPU does not run it.
fn matches_rows<B: QuantBlock>(
    seed: u64,
    fix: impl Fn(&mut [u8], &mut StdRng) + Copy,
    tile: impl Fn(&QuantMatrix<B>) -> Box<dyn Fn(&[f32]) -> Vec<f32> + '_>,
) {
    if !super::super::tiled::available(super::super::isa()) {
        eprintln!("{}: this CPU does not run the tiled product", B::NAME);
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for (rows, cols) in [(19, 512), (64, 768)] {
        let w = random_bytes::<B>(rows, cols, &mut rng, fix);
        let tiled = tile(&w);
        for m in [1, 2, 3, 4, 7, 8, 9, 17] {
            let x = random_rows(m, cols, &mut rng);
            let want = w.matmul(&x, B::kernels());
            let got = tiled(&x);
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "{} {rows}x{cols} m={m} [{i}]: tiled {a}, rows {b}",
                    B::NAME
                );
            }
        }
    }
}

#[test]
fn tiled_q4_k_matches_the_row_kernels() {
    let fix = |b: &mut [u8], rng: &mut StdRng| {
        put_f16(b, 0, rng, 0.001..0.01);
        put_f16(b, 2, rng, 0.001..0.01);
    };
    matches_rows::<BlockQ4K>(41, fix, |w| {
        let (rows, cols) = w.dims();
        let t = TiledQ4K::new(&w.blocks, rows, cols);
        Box::new(move |x| t.matmul(x))
    });
}

/// With the extreme scale (−128) in every block.
#[test]
fn tiled_q6_k_matches_the_row_kernels() {
    let bytes = crate::q6_k::BLOCK_BYTES;
    let fix = move |b: &mut [u8], rng: &mut StdRng| {
        put_f16(b, bytes - 2, rng, 0.0001..0.001);
        b[bytes - 18] = 0x80;
    };
    matches_rows::<BlockQ6K>(42, fix, |w| {
        let (rows, cols) = w.dims();
        let t = TiledQ6K::new(&w.blocks, rows, cols);
        Box::new(move |x| t.matmul(x))
    });
}
