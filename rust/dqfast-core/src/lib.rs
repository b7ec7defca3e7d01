//! dqfast-core: the pure-Rust engine behind dqfast.
//!
//! It reads (possibly sharded) safetensors checkpoints through memory maps, converts tensors
//! (FP8 / NVFP4 quantization, nibble swaps, row slices) and streams the result into new shards.
//! Python decides *what* to write (a [`plan::Plan`]); this crate decides *how*, with bounded
//! memory and all cores. It has no Python dependency and is tested with `cargo test`.

pub mod dtype;
pub mod error;
pub mod formats;
pub mod io;
pub mod plan;
pub mod rss;

// The paths the pyo3 crate, the tests and the benches use.
pub use formats::{e4m3, fp8, mxfp8, nvfp4};
pub use io::{checkpoint, direct, header};
/// The output side as one module (was `writer.rs`): shards, index, staging, the overlap guard.
pub mod writer {
    pub use crate::io::shards::*;
    pub use crate::io::staging::*;
}

pub use error::{Error, Result};
