use super::*;
use crate::quant::check::put_f16;

crate::quant::check::format_tests!(
    BlockQ6K,
    Q6K,
    768,
    1e-3,
    |b: &mut [u8], rng: &mut StdRng| {
        put_f16(b, BLOCK_BYTES - 2, rng, 0.0001..0.001);
        // The extreme scale, whose products need all 16 bits.
        b[BLOCK_BYTES - 18] = 0x80;
    }
);
