//! Bytes in and out: safetensors headers, checkpoints (one file or shards + index) read through
//! memory maps, direct (`O_DIRECT`) reads and writes, the output shards and index, and the staging
//! directory that makes an output appear atomically.

pub mod checkpoint;
pub mod direct;
pub mod header;
pub mod shards;
pub mod staging;
