//! `block_values` / `block_scales`: the values `[N, K / elements_per_byte]` and the block scales
//! `[N, K / block]` of one float weight `[N, K]` in a weight-only block format (`format`: a
//! [`crate::formats::BlockFormat`] by name, e.g. `mxfp8`). One op pair serves every such format:
//! a new one is a kernel file in `formats/` and its line in `BLOCK_FORMATS`, nothing here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::formats::{block_format, BlockError, BlockFormat, BLOCK_FORMATS};
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{Cx, Out, Src};
use crate::plan::schedule::Loaded;
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockValuesOp {
    /// The block format (`formats::BLOCK_FORMATS`), e.g. `mxfp8`.
    pub format: String,
    pub src: SrcRef,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockScalesOp {
    /// The block format (`formats::BLOCK_FORMATS`), e.g. `mxfp8`.
    pub format: String,
    pub src: SrcRef,
}

impl Resolve for BlockValuesOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let m = Block::new(cx.float_src(&self.src)?, &self.format, false)?;
        Ok(Out::new(m.dtype(), m.shape(), m))
    }
}

impl Resolve for BlockScalesOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let m = Block::new(cx.float_src(&self.src)?, &self.format, true)?;
        Ok(Out::new(m.dtype(), m.shape(), m))
    }
}

/// A block-format output of one float weight `[N, K]`, values or scales: the op's shape, fill,
/// reads and release rule in one place.
#[derive(Clone, Copy)]
struct Block<'a> {
    src: Src<'a>,
    format: &'static BlockFormat,
    scales: bool,
    k: usize,
}

impl<'a> Block<'a> {
    fn new(src: Src<'a>, format: &str, scales: bool) -> Result<Self> {
        let Some(format) = block_format(format) else {
            let known: Vec<_> = BLOCK_FORMATS.iter().map(|f| f.name).collect();
            return Err(src.err(format!(
                "unknown block format '{format}' (known: {})",
                known.join(", ")
            )));
        };
        let shape = &src.info.shape;
        // Whole blocks give whole values bytes too (every block is a multiple of elements_per_byte:
        // formats::tests).
        if shape.len() != 2 || !shape[1].is_multiple_of(format.block) {
            return Err(src.err(format!(
                "{} needs a 2-D weight whose last dimension is a multiple of {}, found {shape:?}",
                format.label, format.block
            )));
        }
        Ok(Block {
            src,
            format,
            scales,
            k: shape[1],
        })
    }

    fn dtype(&self) -> Dtype {
        if self.scales {
            self.format.scales_dtype
        } else {
            self.format.values_dtype
        }
    }

    fn shape(&self) -> Vec<usize> {
        vec![self.src.info.shape[0], self.row_out()]
    }

    fn op_name(&self) -> &'static str {
        if self.scales {
            "block_scales"
        } else {
            "block_values"
        }
    }

    /// Output bytes per source row: the unit of work, since a block never straddles rows.
    fn row_out(&self) -> usize {
        if self.scales {
            self.k / self.format.block
        } else {
            self.k / self.format.elements_per_byte
        }
    }

    /// Source bytes behind output bytes `from..to` (whole rows; never called when K = 0, as the
    /// output is then empty).
    fn src_range(&self, from: usize, to: usize) -> std::ops::Range<usize> {
        let (row_out, row_in) = (self.row_out(), self.k * self.src.info.dtype.size());
        from / row_out * row_in..to / row_out * row_in
    }

    /// Output bytes `at..at + out.len()`. A non-finite weight is refused naming the source tensor
    /// and the row counted from the tensor's start (the kernel counts from the piece's).
    fn fill(&self, ld: &Loaded, at: usize, out: &mut [u8]) -> Result<()> {
        let d = self.src.info.dtype;
        let s = &ld.data(&self.src)[self.src_range(at, at + out.len())];
        let kernel = if self.scales {
            self.format.scales
        } else {
            self.format.values
        };
        kernel(s, d, self.k, out).map_err(|e| {
            let e = match e {
                BlockError::NonFinite { row, col, value } => BlockError::NonFinite {
                    row: at / self.row_out() + row,
                    col,
                    value,
                },
                e => e,
            };
            self.src.err(e.to_string())
        })
    }

    /// Drop the mapped source rows behind output bytes `from..to` (the other block op of this
    /// weight faults them back in from the page cache, which keeps RSS at one batch).
    fn release(&self, ld: &Loaded, from: usize, to: usize) {
        let r = self.src_range(from, to);
        ld.release_range(&self.src, r.start, r.end);
    }

    /// Source bytes read, counted once per weight (on the values; the scales re-read them).
    fn source_bytes(&self) -> usize {
        if self.scales {
            0
        } else {
            self.src.info.nbytes()
        }
    }
}

impl<'a> OpKind<'a> for Block<'a> {
    fn name(&self) -> &'static str {
        self.op_name()
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn source_bytes(&self, _out: usize) -> usize {
        Block::source_bytes(self)
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let ld = cx.ld;
        cx.computed(
            self.row_out().max(1),
            &|at, out| self.fill(ld, at, out),
            &|from, to| self.release(ld, from, to),
        )?;
        Ok(None)
    }
}
