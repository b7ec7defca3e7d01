//! The plan's ops: how each output tensor is made. One file per op (or per family of ops that
//! share their fields or their emit: the three NVFP4 outputs of one weight, the bytewise ops):
//! its plan fields (the JSON the planner writes), how it resolves against the sources, and
//! everything the engine asks of it — the tensors it reads, the bytes it reports, how it emits
//! its bytes and releases its input.
//!
//! Adding an op: a new file with its plan struct (`impl Resolve`) and its resolved form
//! (`impl OpKind`), then its `pub mod` line and one line in `registry!` below.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::pipeline::Emit;
use super::resolve::{Cx, Out, Src};
use crate::error::Result;

pub mod block;
pub mod bytewise;
pub mod concat_rows;
pub mod copy;
pub mod fp8;
pub mod literal;
pub mod nvfp4;
pub mod rescale;
pub mod scale_of;
pub mod slice_rows;

/// An op as written in the plan: resolves against the sources into an [`OpKind`].
pub(crate) trait Resolve {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>>;
}

/// A resolved op: what the engine asks of it. Only [`OpKind::name`] and [`OpKind::emit`] are
/// required; the rest describe ops that read sources or relate to other outputs.
pub(crate) trait OpKind<'a>: Send + Sync {
    /// The op's name in the build report.
    fn name(&self) -> &'static str;

    /// The source tensors it reads (direct-read scheduling, prefetch, the output layout).
    fn sources(&self) -> Vec<Src<'a>> {
        Vec::new()
    }

    /// Tensors read once, the first time any op of the group needs them (an NVFP4 global scale
    /// shared by fused q/k/v weights).
    fn group(&self) -> Option<&[Src<'a>]> {
        None
    }

    /// Source bytes read, for the report (`out`: the output's bytes).
    fn source_bytes(&self, _out: usize) -> usize {
        0
    }

    /// Reads no tensor at all: a synthesized value (placed beside its module's weight).
    fn synthesized(&self) -> bool {
        false
    }

    /// An earlier output (by position) this one must be written beside and after (`scale_of`).
    fn beside(&self) -> Option<usize> {
        None
    }

    /// The outputs were reordered: `new_pos[old]` is each one's new position.
    fn renumber(&mut self, _new_pos: &[usize]) {}

    /// The number of FP8 scales, for an op that quantizes to FP8 (checked by `scale_of`).
    fn fp8_scale_count(&self) -> Option<usize> {
        None
    }

    /// The FP8 scales the op uses (computed once, memoized by position `idx`).
    fn fp8_scales(&self, _cx: &Emit<'a, '_>, _idx: usize) -> Option<Result<Arc<Vec<f32>>>> {
        None
    }

    /// Send the output's bytes (exactly its header's count) to the writer; returns the scale(s)
    /// the report shows (first 8).
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>>;
}

/// Values computed while the build runs and shared between outputs: FP8 weight scales (with the
/// `scale_of` tensor that records them), NVFP4 global scales (the three outputs of a weight).
#[derive(Default)]
pub(crate) struct Memo {
    pub fp8: Mutex<HashMap<usize, Arc<Vec<f32>>>>,
    pub nv: Mutex<HashMap<Vec<(usize, String)>, f32>>,
}

/// The op registry: the plan's `Op` enum (tag `op`, snake_case names) and its dispatch.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($spec:ty),)*) => {
        /// How an output tensor is made (the plan's `"op"` field and that op's fields).
        #[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
        #[serde(tag = "op", rename_all = "snake_case")]
        pub enum Op {
            $($(#[$doc])* $variant($spec),)*
        }

        impl Op {
            pub(crate) fn spec(&self) -> &dyn Resolve {
                match self {
                    $(Op::$variant(s) => s,)*
                }
            }
        }
    };
}

registry! {
    /// Byte-for-byte copy.
    Copy(copy::CopyOp),
    /// `e4m3(w / scale)` of a BF16/FP16/FP32 tensor.
    Fp8(fp8::Fp8Op),
    /// The float32 scale(s) the `fp8` op that writes tensor `of` used.
    ScaleOf(scale_of::ScaleOfOp),
    /// `amax / bound` in float32 (e.g. an FP8 input_scale: bound 448; NVFP4: 2688).
    ScaleFromAmax(literal::ScaleFromAmaxOp),
    /// A literal float32 tensor.
    F32(literal::F32Op),
    /// Swap the two nibbles of every byte of a U8 tensor (FP4 element order).
    SwapNibbles(bytewise::SwapNibblesOp),
    /// Copy an e4m3 tensor, replacing NaN bytes (0x7F/0xFF) by 448 (0x7E).
    RepairNanE4m3(bytewise::RepairNanE4m3Op),
    /// Rows `start..stop` of the first dimension (e.g. q, k, v of a fused projection).
    SliceRows(slice_rows::SliceRowsOp),
    /// Concatenate tensors along the first dimension (same dtype and trailing shape).
    ConcatRows(concat_rows::ConcatRowsOp),
    /// Block scales of an e4m3 tensor re-expressed for a new global scale.
    RescaleE4m3(rescale::RescaleE4m3Op),
    /// NVFP4 packed E2M1 codes `[N, K/2]` of a float tensor `[N, K]`.
    Nvfp4Weight(nvfp4::Nvfp4WeightOp),
    /// NVFP4 e4m3 block scales `[N, K/16]` of a float tensor `[N, K]`.
    Nvfp4BlockScales(nvfp4::Nvfp4BlockScalesOp),
    /// NVFP4 `weight_scale_2` (float32) of a float tensor; `shape` is `[]` or `[1]`.
    Nvfp4GlobalScale(nvfp4::Nvfp4GlobalScaleOp),
    /// The values of a float tensor `[N, K]` in a weight-only block format (e.g. MXFP8's e4m3).
    BlockValues(block::BlockValuesOp),
    /// Its block scales, `[N, K / block]` (e.g. MXFP8's E8M0 bytes, U8 `[N, K/32]`).
    BlockScales(block::BlockScalesOp),
}
