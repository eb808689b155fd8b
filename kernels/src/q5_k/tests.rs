use super::*;
use crate::quant::check::put_f16;

crate::quant::check::format_tests!(
    BlockQ5K,
    Q5K,
    768,
    1e-3,
    |b: &mut [u8], rng: &mut StdRng| {
        put_f16(b, 0, rng, 0.001..0.01);
        put_f16(b, 2, rng, 0.001..0.01);
    }
);
