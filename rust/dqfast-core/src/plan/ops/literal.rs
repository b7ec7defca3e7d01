//! Float32 tensors the planner gives: `f32` (literal values) and `scale_from_amax`
//! (`amax / bound`). Both are scales, so the scale rule (finite, > 0, normal) applies.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fp8;
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{numel_of, Cx, Out};

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleFromAmaxOp {
    pub amax: Vec<f32>,
    pub bound: f32,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct F32Op {
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

impl Resolve for ScaleFromAmaxOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let vals = fp8::scales_from_amax("amax", &self.amax, self.bound)
            .map_err(|m| Error::Plan(format!("tensor '{}': {m}", cx.name)))?;
        literal(cx.name, &vals, &self.shape, "scale")
    }
}

impl Resolve for F32Op {
    // Every literal float32 tensor a planner writes is a scale: the scale rule applies.
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        fp8::check_scales("scale", &self.values)
            .map_err(|m| Error::Plan(format!("tensor '{}': {m}", cx.name)))?;
        literal(cx.name, &self.values, &self.shape, "f32")
    }
}

fn literal<'a>(name: &str, values: &[f32], shape: &[usize], op: &'static str) -> Result<Out<'a>> {
    let numel = numel_of(name, shape)?;
    if numel != values.len() {
        return Err(Error::Plan(format!(
            "'{name}': {} values for shape {shape:?}",
            values.len()
        )));
    }
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(Out::new(Dtype::F32, shape.to_vec(), Literal { bytes, op }))
}

struct Literal {
    bytes: Vec<u8>,
    op: &'static str,
}

impl<'a> OpKind<'a> for Literal {
    fn name(&self) -> &'static str {
        self.op
    }
    fn synthesized(&self) -> bool {
        true
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        cx.owned(self.bytes.clone())?;
        Ok(None)
    }
}
