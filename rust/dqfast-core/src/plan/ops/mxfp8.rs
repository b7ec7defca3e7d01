//! `mxfp8_weight` / `mxfp8_scales`: the MXFP8 e4m3 values `[N, K]` and E8M0 block scales
//! (U8 `[N, K/32]`) of one float weight `[N, K]` (see [`crate::mxfp8`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::mxfp8::{self, MxError};
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{Cx, Out, Src};
use crate::plan::schedule::Loaded;
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mxfp8WeightOp {
    pub src: SrcRef,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mxfp8ScalesOp {
    pub src: SrcRef,
}

impl Resolve for Mxfp8WeightOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let m = Mx::new(cx.float_src(&self.src)?, false)?;
        Ok(Out::new(m.dtype(), m.shape(), m))
    }
}

impl Resolve for Mxfp8ScalesOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let m = Mx::new(cx.float_src(&self.src)?, true)?;
        Ok(Out::new(m.dtype(), m.shape(), m))
    }
}

/// An MXFP8 output of one float weight `[N, K]`, values (`[N, K]` e4m3) or scales (`[N, K/32]`
/// U8): the op's shape, fill, reads and release rule in one place.
#[derive(Clone, Copy)]
struct Mx<'a> {
    src: Src<'a>,
    scales: bool,
    k: usize,
}

impl<'a> Mx<'a> {
    fn new(src: Src<'a>, scales: bool) -> Result<Self> {
        let shape = &src.info.shape;
        if shape.len() != 2 || !shape[1].is_multiple_of(mxfp8::BLOCK) {
            return Err(src.err(format!(
                "MXFP8 needs a 2-D weight whose last dimension is a multiple of {}, found {shape:?}",
                mxfp8::BLOCK
            )));
        }
        Ok(Mx {
            src,
            scales,
            k: shape[1],
        })
    }

    fn dtype(&self) -> Dtype {
        if self.scales {
            Dtype::U8
        } else {
            Dtype::F8_E4M3
        }
    }

    fn shape(&self) -> Vec<usize> {
        vec![self.src.info.shape[0], self.row_out()]
    }

    fn op_name(&self) -> &'static str {
        if self.scales {
            "mxfp8_scales"
        } else {
            "mxfp8_weight"
        }
    }

    /// Output bytes per source row: the unit of work, since a block never straddles rows.
    fn row_out(&self) -> usize {
        if self.scales {
            self.k / mxfp8::BLOCK
        } else {
            self.k
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
        let r = if self.scales {
            mxfp8::block_scales(s, d, self.k, out)
        } else {
            mxfp8::quantize_values(s, d, self.k, out)
        };
        r.map_err(|e| {
            let e = match e {
                MxError::NonFinite { row, col, value } => MxError::NonFinite {
                    row: at / self.row_out() + row,
                    col,
                    value,
                },
                e => e,
            };
            self.src.err(e.to_string())
        })
    }

    /// Drop the mapped source rows behind output bytes `from..to` (the other MXFP8 op of this
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

impl<'a> OpKind<'a> for Mx<'a> {
    fn name(&self) -> &'static str {
        self.op_name()
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn source_bytes(&self, _out: usize) -> usize {
        Mx::source_bytes(self)
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
