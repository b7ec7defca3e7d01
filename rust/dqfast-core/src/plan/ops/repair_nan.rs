//! `repair_nan_e4m3`: an e4m3 tensor copied with its NaN bytes (0x7F/0xFF) replaced by 448.

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
pub struct RepairNanE4m3Op {
    pub src: SrcRef,
}

impl Resolve for RepairNanE4m3Op {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = same_dtype_src(
            cx.get(&self.src)?,
            Dtype::F8_E4M3,
            "NaN repair needs F8_E4M3",
        )?;
        Ok(Out::new(Dtype::F8_E4M3, s.info.shape.clone(), Repair(s)))
    }
}

struct Repair<'a>(Src<'a>);

impl<'a> OpKind<'a> for Repair<'a> {
    fn name(&self) -> &'static str {
        "repair_nan"
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
                out.copy_from_slice(&ld.data(src)[at..at + out.len()]);
                nvfp4::repair_nan_e4m3(out);
                Ok(())
            },
            &|from, to| cx.release_range(src, from, to),
        )?;
        cx.release(src)?;
        Ok(None)
    }
}
