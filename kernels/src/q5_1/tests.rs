use super::*;
use crate::quant::check::put_f16;

crate::quant::check::format_tests!(
    BlockQ5_1,
    Q5_1,
    576,
    1e-3,
    |b: &mut [u8], rng: &mut StdRng| {
        put_f16(b, 0, rng, 0.001..0.05);
        put_f16(b, 2, rng, -0.5..0.5);
    },
    tiled_layout_matches_the_row_kernels
);
