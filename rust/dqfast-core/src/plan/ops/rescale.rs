//! `rescale_e4m3`: e4m3 block scales re-expressed for a new global scale, `e4m3(f32(s) * factor)`,
//! rows `start..stop` (the whole tensor when both are 0).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::nvfp4;
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{row_slice, Cx, Out, Src};
use crate::plan::schema::SrcRef;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RescaleE4m3Op {
    pub src: SrcRef,
    pub factor: f32,
    #[serde(default)]
    pub start: usize,
    #[serde(default)]
    pub stop: usize,
    /// Replace NaN bytes by 448 before rescaling.
    #[serde(default)]
    pub repair_nan: bool,
}

impl Resolve for RescaleE4m3Op {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = cx.get(&self.src)?;
        if s.info.dtype != Dtype::F8_E4M3 {
            return Err(s.err(format!(
                "rescale needs F8_E4M3 data, found {}",
                s.info.dtype
            )));
        }
        let factor = self.factor;
        if !(factor.is_finite() && factor > 0.0) {
            return Err(s.err(format!("rescale factor {factor} must be finite and > 0")));
        }
        let (a, b) = if self.start == 0 && self.stop == 0 {
            (0, s.info.shape.first().copied().unwrap_or(1))
        } else {
            (self.start, self.stop)
        };
        let (shape, byte_start) = row_slice(&s, a, b)?;
        Ok(Out::new(
            Dtype::F8_E4M3,
            shape,
            Rescale {
                src: s,
                factor,
                byte_start,
                repair_nan: self.repair_nan,
            },
        ))
    }
}

struct Rescale<'a> {
    src: Src<'a>,
    factor: f32,
    byte_start: usize,
    repair_nan: bool,
}

impl<'a> OpKind<'a> for Rescale<'a> {
    fn name(&self) -> &'static str {
        "rescale_e4m3"
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn source_bytes(&self, out: usize) -> usize {
        out
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let (src, ld, b0) = (&self.src, cx.ld, self.byte_start);
        if !self.repair_nan {
            cx.refuse_nan_e4m3(src, b0..b0 + cx.nbytes)?;
        }
        cx.computed(
            1,
            &|at, out| {
                let s = &ld.data(src)[b0 + at..b0 + at + out.len()];
                if self.repair_nan {
                    let mut tmp = s.to_vec();
                    nvfp4::repair_nan_e4m3(&mut tmp);
                    nvfp4::rescale_block_scales(&tmp, self.factor, out);
                } else {
                    nvfp4::rescale_block_scales(s, self.factor, out);
                }
                Ok(())
            },
            &|from, to| cx.release_range(src, b0 + from, b0 + to),
        )?;
        Ok(None)
    }
}
