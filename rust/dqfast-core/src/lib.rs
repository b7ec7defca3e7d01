//! dqfast-core: the pure-Rust engine behind dqfast.
//!
//! It reads (possibly sharded) safetensors checkpoints through memory maps, converts tensors
//! (FP8 / NVFP4 quantization, nibble swaps, row slices) and streams the result into new shards.
//! Python decides *what* to write (a [`plan::Plan`]); this crate decides *how*, with bounded
//! memory and all cores. It has no Python dependency and is tested with `cargo test`.

pub mod checkpoint;
pub mod direct;
pub mod dtype;
pub mod error;
pub mod fp8;
pub mod header;
pub mod mxfp8;
pub mod nvfp4;
pub mod plan;
pub mod rss;
pub mod writer;

pub use error::{Error, Result};
