//! `copy`: a source tensor byte for byte (e4m3 NaN bytes refused).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::error::Result;
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{Cx, Out, Src};
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyOp {
    pub src: SrcRef,
}

impl Resolve for CopyOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = cx.get(&self.src)?;
        Ok(Out::new(s.info.dtype, s.info.shape.clone(), Copy(s)))
    }
}

struct Copy<'a>(Src<'a>);

impl<'a> OpKind<'a> for Copy<'a> {
    fn name(&self) -> &'static str {
        "copy"
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.0]
    }
    fn source_bytes(&self, _out: usize) -> usize {
        self.0.info.nbytes()
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        cx.pass_through(&self.0, 0..self.0.info.nbytes())?;
        Ok(None)
    }
}
