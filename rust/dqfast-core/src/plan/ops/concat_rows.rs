//! `concat_rows`: tensors of one dtype and trailing shape joined along the first dimension.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::error::{Error, Result};
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{Cx, Out, Src};
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcatRowsOp {
    pub srcs: Vec<SrcRef>,
}

impl Resolve for ConcatRowsOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        if self.srcs.is_empty() {
            return Err(Error::Plan(format!(
                "'{}': concat_rows of nothing",
                cx.name
            )));
        }
        let ss: Vec<Src> = self.srcs.iter().map(|r| cx.get(r)).collect::<Result<_>>()?;
        let first = ss[0];
        if first.info.shape.is_empty() {
            return Err(first.err("concat_rows needs tensors with at least one dimension"));
        }
        let mut rows = 0;
        for s in &ss {
            if s.info.dtype != first.info.dtype
                || s.info.shape.get(1..) != first.info.shape.get(1..)
            {
                return Err(s.err(format!(
                    "cannot concatenate {} {:?} with {} {:?}",
                    s.info.dtype, s.info.shape, first.info.dtype, first.info.shape
                )));
            }
            rows += s.info.shape[0];
        }
        let mut shape = first.info.shape.clone();
        shape[0] = rows;
        Ok(Out::new(first.info.dtype, shape, Concat(ss)))
    }
}

struct Concat<'a>(Vec<Src<'a>>);

impl<'a> OpKind<'a> for Concat<'a> {
    fn name(&self) -> &'static str {
        "concat_rows"
    }
    fn sources(&self) -> Vec<Src<'a>> {
        self.0.clone()
    }
    fn source_bytes(&self, _out: usize) -> usize {
        self.0.iter().map(|s| s.info.nbytes()).sum()
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        for s in &self.0 {
            cx.pass_through(s, 0..s.info.nbytes())?;
        }
        Ok(None)
    }
}
