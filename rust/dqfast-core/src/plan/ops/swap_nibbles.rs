//! `swap_nibbles`: the two nibbles of every byte of a U8 tensor swapped (FP4 element order).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::nvfp4;
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{same_dtype_src, Cx, Out, Src};
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwapNibblesOp {
    pub src: SrcRef,
}

impl Resolve for SwapNibblesOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = same_dtype_src(cx.get(&self.src)?, Dtype::U8, "nibble swap needs packed U8")?;
        Ok(Out::new(Dtype::U8, s.info.shape.clone(), Swap(s)))
    }
}

struct Swap<'a>(Src<'a>);

impl<'a> OpKind<'a> for Swap<'a> {
    fn name(&self) -> &'static str {
        "swap_nibbles"
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.0]
    }
    fn source_bytes(&self, _out: usize) -> usize {
        self.0.info.nbytes()
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let (src, ld) = (&self.0, cx.ld);
        cx.computed(
            1,
            &|at, out| {
                nvfp4::swap_nibbles(&ld.data(src)[at..at + out.len()], out);
                Ok(())
            },
            &|from, to| cx.release_range(src, from, to),
        )?;
        cx.release(src)?;
        Ok(None)
    }
}
