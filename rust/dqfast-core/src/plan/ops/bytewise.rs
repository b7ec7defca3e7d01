//! Byte-for-byte transforms of one source tensor that keep its dtype and shape:
//! `swap_nibbles` (the two nibbles of every U8 byte swapped: FP4 element order) and
//! `repair_nan_e4m3` (an e4m3 tensor with its NaN bytes 0x7F/0xFF replaced by 448).

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

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepairNanE4m3Op {
    pub src: SrcRef,
}

impl Resolve for SwapNibblesOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = same_dtype_src(cx.get(&self.src)?, Dtype::U8, "nibble swap needs packed U8")?;
        let op = Bytewise {
            src: s,
            name: "swap_nibbles",
            map: nvfp4::swap_nibbles,
        };
        Ok(Out::new(Dtype::U8, s.info.shape.clone(), op))
    }
}

fn repair(src: &[u8], out: &mut [u8]) {
    out.copy_from_slice(src);
    nvfp4::repair_nan_e4m3(out);
}

impl Resolve for RepairNanE4m3Op {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = same_dtype_src(
            cx.get(&self.src)?,
            Dtype::F8_E4M3,
            "NaN repair needs F8_E4M3",
        )?;
        let op = Bytewise {
            src: s,
            name: "repair_nan",
            map: repair,
        };
        Ok(Out::new(Dtype::F8_E4M3, s.info.shape.clone(), op))
    }
}

/// Output byte `i` is a function of source byte `i` alone (`map` on any aligned piece).
struct Bytewise<'a> {
    src: Src<'a>,
    name: &'static str,
    map: fn(&[u8], &mut [u8]),
}

impl<'a> OpKind<'a> for Bytewise<'a> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn source_bytes(&self, _out: usize) -> usize {
        self.src.info.nbytes()
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let (src, ld) = (&self.src, cx.ld);
        cx.computed(
            1,
            &|at, out| {
                (self.map)(&ld.data(src)[at..at + out.len()], out);
                Ok(())
            },
            &|from, to| cx.release_range(src, from, to),
        )?;
        cx.release(src)?;
        Ok(None)
    }
}
