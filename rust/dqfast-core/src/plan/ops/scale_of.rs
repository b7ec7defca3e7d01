//! `scale_of`: the float32 scale(s) the earlier `fp8` op writing tensor `of` used (weight-derived
//! scales are known only while that weight is written; they are memoized for this op).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{numel_of, Cx, Out};

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleOfOp {
    pub of: String,
    pub shape: Vec<usize>,
}

impl Resolve for ScaleOfOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let (of, shape) = (&self.of, &self.shape);
        let (j, weight) = cx.earlier(of).ok_or_else(|| {
            Error::Plan(format!(
                "'{}': scale_of '{of}' must name an earlier fp8 tensor",
                cx.name
            ))
        })?;
        let want = weight.op.fp8_scale_count().ok_or_else(|| {
            Error::Plan(format!(
                "'{}': scale_of '{of}' is not an fp8 tensor",
                cx.name
            ))
        })?;
        let numel = numel_of(cx.name, shape)?;
        if numel != want {
            return Err(Error::Plan(format!(
                "'{}': shape {shape:?} holds {numel} values but '{of}' has {want} scale(s)",
                cx.name
            )));
        }
        Ok(Out::new(Dtype::F32, shape.clone(), ScaleOf(j)))
    }
}

/// The position of the fp8 output whose scales this is.
struct ScaleOf(usize);

impl<'a> OpKind<'a> for ScaleOf {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn beside(&self) -> Option<usize> {
        Some(self.0)
    }
    fn renumber(&mut self, new_pos: &[usize]) {
        self.0 = new_pos[self.0];
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let v = cx.fp8_scales(self.0)?;
        cx.owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())?;
        Ok(Some(v.iter().take(8).copied().collect()))
    }
}
