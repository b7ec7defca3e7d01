//! `slice_rows`: rows `start..stop` of the first dimension (q, k, v of a fused projection).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::error::Result;
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{row_slice, Cx, Out, Src};
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SliceRowsOp {
    pub src: SrcRef,
    pub start: usize,
    pub stop: usize,
}

impl Resolve for SliceRowsOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let src = cx.get(&self.src)?;
        let (shape, byte_start) = row_slice(&src, self.start, self.stop)?;
        Ok(Out::new(src.info.dtype, shape, Rows { src, byte_start }))
    }
}

struct Rows<'a> {
    src: Src<'a>,
    byte_start: usize,
}

impl<'a> OpKind<'a> for Rows<'a> {
    fn name(&self) -> &'static str {
        "slice_rows"
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn source_bytes(&self, out: usize) -> usize {
        out
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        cx.pass_through(&self.src, self.byte_start..self.byte_start + cx.nbytes)?;
        Ok(None)
    }
}
