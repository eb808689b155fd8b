//! Kindling's fused tensor operations. Each op has a plain reference
//! implementation beside it (built from stock candle ops) and tests
//! comparing the two on random inputs. [`fused`] holds the ops that also run
//! on CUDA (`cuda` feature, kernels in `kernels/cuda/`). Which optional CPU
//! instruction sets the kernels may use is set through [`cpu`], never read
//! from the environment.

pub mod activation;
pub mod attention;
pub mod cpu;
pub mod dense;
pub mod encoder_attention;
pub mod fused;
pub mod gpu;
pub mod group_norm;
pub mod kquant;
pub mod q4_0;
pub mod q4_1;
pub mod q4_k;
pub mod q5_0;
pub mod q5_1;
pub mod q5_k;
pub mod q6_k;
pub mod q8_0;
pub mod quant;
pub mod rope;
pub mod silu_mul;

pub use attention::{paged_attention, PagedLayout, QueryRow, Scoring};
pub use cpu::{configure_cpu, cpu_features, CpuFeatures, CpuFeaturesFixed};
pub use dense::{dense_isa, DenseIsa, DenseMatrix, DenseScratch, Epilogue};
pub use encoder_attention::{encoder_attention, encoder_attention_into};
pub use fused::{
    add_rms_norm, cache_write, group_norm_silu, paged_decode_attention, rms_norm, rope_in_place,
    AttentionShape,
};
pub use group_norm::{group_norm, group_norm_reference, GroupNorm};
pub use q4_0::Q4_0Matrix;
pub use q4_1::Q4_1Matrix;
pub use q4_k::Q4KMatrix;
pub use q5_0::Q5_0Matrix;
pub use q5_1::Q5_1Matrix;
pub use q5_k::Q5KMatrix;
pub use q6_k::Q6KMatrix;
pub use q8_0::Q8_0Matrix;
pub use quant::{QuantLinear, QuantMatrix};
pub use rope::RopeTables;
pub use silu_mul::{silu_mul, silu_mul_reference};
