//! The plan: what the Python planner asks for, deserialized from JSON. The ops themselves (what an
//! output tensor is made of) are in [`super::ops`], one file each.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ops::Op;
use crate::error::Result;
use crate::writer::OutputGuard;

/// How the engine moves bytes between disk and memory.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// Direct reads of source tensors that are not already in the page cache, direct writes;
    /// the page cache wherever the file system refuses `O_DIRECT`.
    #[default]
    Auto,
    /// Direct reads and writes wherever the file system allows, cached or not.
    Direct,
    /// Memory map and page cache only.
    Buffered,
}

fn default_read_buffer() -> u64 {
    512 << 20
}

fn default_prefix() -> String {
    "diffusion_pytorch_model".into()
}
fn yes() -> bool {
    true
}

/// What to build. Produced by the Python planner, serialized as JSON.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Checkpoints (files or directories) that ops refer to by position.
    pub sources: Vec<PathBuf>,
    pub output_dir: PathBuf,
    #[serde(default)]
    pub overwrite: bool,
    /// `None` (the default): keep the sharding of the first source, the checkpoint being converted
    /// (file names, which tensor in which file, the index name; see
    /// [`source_shards`](crate::writer::source_shards)). `Some(n)`: re-shard greedily into files
    /// of at most `n` bytes named `<file_prefix>-0000i-of-0000k.safetensors` (`--max-shard-size`).
    #[serde(default)]
    pub max_shard_bytes: Option<u64>,
    /// Shard and index names when re-sharding by size (or when the plan has no source).
    #[serde(default = "default_prefix")]
    pub file_prefix: String,
    /// `__metadata__` of every output shard.
    #[serde(default)]
    pub shard_metadata: BTreeMap<String, String>,
    /// Non-tensor files of the output directory (config.json, copied sidecars).
    #[serde(default)]
    pub files: Vec<ExtraFile>,
    pub tensors: Vec<OutTensor>,
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub threads: usize,
    /// fsync every file before the output is moved into place.
    #[serde(default = "yes")]
    pub fsync: bool,
    /// Write the index json even for a single shard.
    #[serde(default)]
    pub always_index: bool,
    #[serde(default)]
    pub io: IoMode,
    /// Budget of the aligned buffers direct reads go into (source tensors larger than half of
    /// it are read through the map).
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: u64,
    /// Inputs the planner read that are not sources (export root, backbone.pt / amax sidecar,
    /// policy file): like the sources, the output may never be, contain or lie inside one.
    #[serde(default)]
    pub guard_inputs: Vec<PathBuf>,
    /// Tests only: sleep this long before each output tensor, so that a small build runs long
    /// enough to be interrupted.
    #[serde(default, rename = "_test_delay_ms", skip_serializing_if = "is_zero")]
    pub test_delay_ms: u64,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl Plan {
    /// Every path the output must stay clear of: sources, copied files and guard inputs.
    pub fn inputs(&self) -> Vec<PathBuf> {
        let copied = self.files.iter().filter_map(|f| f.copy_from.clone());
        self.sources
            .iter()
            .cloned()
            .chain(copied)
            .chain(self.guard_inputs.iter().cloned())
            .collect()
    }

    /// The output refused if it is, contains or lies inside any input (see [`OutputGuard`]).
    pub fn output_guard(&self) -> Result<OutputGuard> {
        OutputGuard::new("--output-dir", &self.output_dir, &self.inputs())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtraFile {
    pub name: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub copy_from: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SrcRef {
    pub source: usize,
    pub tensor: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct OutTensor {
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
}

/// The plan's JSON Schema (draft 2020-12), derived by `schemars` from the same types and serde
/// attributes the engine deserializes with, so it cannot drift from what [`Plan`] accepts. The
/// Python planner's ops are tested against it (`_core.plan_schema()`).
pub fn plan_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Plan)).expect("a schema serializes")
}
