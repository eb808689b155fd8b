//! Kindling's fused tensor operations, as candle custom ops. Each op has a
//! plain reference implementation beside it (built from stock candle ops)
//! and tests comparing the two on random inputs.

pub mod q4_1;
pub mod silu_mul;

pub use q4_1::Q4_1Matrix;
pub use silu_mul::{silu_mul, silu_mul_reference};
