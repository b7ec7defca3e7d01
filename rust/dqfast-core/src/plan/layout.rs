//! The output layout: which shard each output tensor goes to and the order they are written in —
//! the source's shards by default ([`source_shards`]), or greedy by size (`max_shard_bytes`).

use std::collections::HashMap;
use std::path::Path;

use super::resolve::Resolved;
use super::schema::Plan;
use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::header::serialize_header;
use crate::writer::{assign_shards, shard_file_name, source_shards, Placement, SourceLayout};

/// One output shard: its file name, the range of the (write-ordered) resolved tensors it holds
/// and its serialized header.
pub(crate) struct ShardPlan {
    pub file: String,
    pub range: std::ops::Range<usize>,
    pub header: Vec<u8>,
}

/// The output layout: `resolved` reordered into write order (shard by shard), the shards and the
/// index file name. By default the source's sharding is kept ([`source_shards`]); with
/// `max_shard_bytes` the tensors are re-sharded greedily in plan order.
pub(crate) fn layout<'a>(
    plan: &Plan,
    sources: &'a [Checkpoint],
    resolved: Vec<Resolved<'a>>,
) -> Result<(Vec<Resolved<'a>>, Vec<ShardPlan>, String)> {
    let prefix_index = format!("{}.safetensors.index.json", plan.file_prefix);
    let (resolved, groups, index) = match (plan.max_shard_bytes, sources.first()) {
        (None, Some(ck)) => {
            let lay = SourceLayout::of(ck);
            let ours: HashMap<&Path, String> = ck
                .files
                .iter()
                .map(|f| {
                    let n = f.path.file_name().unwrap_or_default();
                    (f.path.as_path(), n.to_string_lossy().to_string())
                })
                .collect();
            let places: Vec<Placement> = resolved
                .iter()
                .map(|r| Placement {
                    name: &r.name,
                    source_files: r
                        .op
                        .sources()
                        .iter()
                        .filter_map(|s| ours.get(s.file.path.as_path()).cloned())
                        .collect(),
                    synthesized: r.op.synthesized(),
                    beside: r.op.beside(),
                })
                .collect();
            let shards = source_shards(&lay, &places, &format!("{}.safetensors", plan.file_prefix));
            let order: Vec<usize> = shards.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            let mut groups = Vec::with_capacity(shards.len());
            let mut start = 0;
            for (file, v) in shards {
                groups.push((file, start..start + v.len()));
                start += v.len();
            }
            (reorder(resolved, &order), groups, lay.index_name)
        }
        (max, _) => {
            let sizes: Vec<u64> = resolved.iter().map(|r| r.nbytes as u64).collect();
            let ranges = assign_shards(&sizes, max.unwrap_or(u64::MAX));
            let n = ranges.len();
            let groups = ranges
                .into_iter()
                .enumerate()
                .map(|(i, r)| (shard_file_name(&plan.file_prefix, i, n), r))
                .collect();
            (resolved, groups, prefix_index)
        }
    };
    let shards = groups
        .into_iter()
        .map(|(file, range)| {
            let entries: Vec<(String, Dtype, Vec<usize>)> = resolved[range.clone()]
                .iter()
                .map(|r| (r.name.clone(), r.dtype, r.shape.clone()))
                .collect();
            let (header, _) = serialize_header(&plan.shard_metadata, &entries)?;
            Ok(ShardPlan {
                file,
                range,
                header,
            })
        })
        .collect::<Result<_>>()?;
    Ok((resolved, shards, index))
}

/// `resolved` in the given order (a permutation), `scale_of` references renumbered.
fn reorder<'a>(resolved: Vec<Resolved<'a>>, order: &[usize]) -> Vec<Resolved<'a>> {
    let mut new_pos = vec![0; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_pos[old] = new;
    }
    let mut slots: Vec<Option<Resolved<'a>>> = resolved.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&old| {
            let mut r = slots[old].take().expect("a permutation");
            r.op.renumber(&new_pos);
            r
        })
        .collect()
}
