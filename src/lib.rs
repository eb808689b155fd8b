//! Kindling: a self-hosted model-serving daemon with an OpenAI-compatible API.
//!
//! Rooms, each depending only on those to its right:
//! `http` → `tenancy` → `registry` → `engine` → `kindling_models` →
//! `kindling_kernels`.
//! `config` and `metrics` are shared leaves that every room may use.

pub mod config;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod tenancy;
