//! The three NVFP4 outputs of one float weight `[N, K]`: `nvfp4_weight` (packed E2M1 codes
//! `[N, K/2]`), `nvfp4_block_scales` (e4m3 `[N, K/16]`) and `nvfp4_global_scale`
//! (`weight_scale_2`, float32). They share one global scale, computed once (memoized), from a
//! given amax, the weight's own, or the max over a fused q/k/v group.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fp8;
use crate::nvfp4;
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{float_src, numel_of, Cx, Out, Src};
use crate::plan::schema::SrcRef;

/// Where an NVFP4 global amax comes from.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NvAmax {
    Given {
        amax: f32,
    },
    /// max |w| of the tensor itself.
    Weight,
    /// max |w| over several tensors (q/k/v shards that a loader fuses must share one global
    /// scale, since vLLM keeps only the max).
    MaxOf {
        srcs: Vec<SrcRef>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nvfp4WeightOp {
    pub src: SrcRef,
    pub amax: NvAmax,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nvfp4BlockScalesOp {
    pub src: SrcRef,
    pub amax: NvAmax,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nvfp4GlobalScaleOp {
    pub src: SrcRef,
    pub amax: NvAmax,
    pub shape: Vec<usize>,
}

impl Resolve for Nvfp4WeightOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let nv = Nv::new(cx, &self.src, &self.amax, Part::Weight)?;
        Ok(Out::new(Dtype::U8, vec![nv.n, nv.k / 2], nv))
    }
}

impl Resolve for Nvfp4BlockScalesOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let nv = Nv::new(cx, &self.src, &self.amax, Part::Scales)?;
        Ok(Out::new(Dtype::F8_E4M3, vec![nv.n, nv.k / 16], nv))
    }
}

impl Resolve for Nvfp4GlobalScaleOp {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let nv = Nv::new(cx, &self.src, &self.amax, Part::Global)?;
        let shape = &self.shape;
        if numel_of(cx.name, shape)? != 1 {
            return Err(Error::Plan(format!(
                "'{}': global scale shape {shape:?} is not a scalar",
                cx.name
            )));
        }
        Ok(Out::new(Dtype::F32, shape.clone(), nv))
    }
}

/// NVFP4 global scale of a given (calibrated) amax: [`fp8::scales_from_amax`] with the NVFP4
/// bound, so a given amax of 0 is refused (only a weight's own all-zero amax gets 1).
fn nv_global_checked(amax: f32) -> std::result::Result<f32, String> {
    fp8::scales_from_amax("NVFP4 weight amax", &[amax], nvfp4::GLOBAL_BOUND).map(|v| v[0])
}

#[derive(Clone)]
enum AmaxOf<'a> {
    Given(f32),
    Of(Vec<Src<'a>>),
}

#[derive(Clone, Copy, PartialEq)]
enum Part {
    Weight,
    Scales,
    Global,
}

struct Nv<'a> {
    src: Src<'a>,
    amax: AmaxOf<'a>,
    part: Part,
    n: usize,
    k: usize,
}

impl<'a> Nv<'a> {
    fn new(cx: &Cx<'a, '_>, src: &SrcRef, amax: &NvAmax, part: Part) -> Result<Nv<'a>> {
        let s = cx.float_src(src)?;
        if s.info.shape.len() != 2 || s.info.shape[1] % 16 != 0 {
            return Err(s.err(format!(
                "NVFP4 needs a 2-D weight whose last dimension is a multiple of 16, found {:?}",
                s.info.shape
            )));
        }
        let amax = match amax {
            NvAmax::Given { amax } => {
                nv_global_checked(*amax).map_err(|m| s.err(m))?;
                AmaxOf::Given(*amax)
            }
            NvAmax::Weight => AmaxOf::Of(vec![s]),
            NvAmax::MaxOf { srcs } => {
                let v: Vec<Src> = srcs.iter().map(|r| cx.get(r)).collect::<Result<_>>()?;
                for x in &v {
                    float_src(x)?;
                }
                if v.is_empty() {
                    return Err(Error::Plan(format!(
                        "'{}': max_of needs at least one tensor",
                        cx.name
                    )));
                }
                AmaxOf::Of(v)
            }
        };
        let (n, k) = (s.info.shape[0], s.info.shape[1]);
        Ok(Nv {
            src: s,
            amax,
            part,
            n,
            k,
        })
    }

    /// The global scale (`weight_scale_2`), computed once per weight group.
    fn global(&self, cx: &Emit<'a, '_>) -> Result<f32> {
        let srcs = match &self.amax {
            AmaxOf::Given(a) => return nv_global_checked(*a).map_err(Error::Internal),
            AmaxOf::Of(srcs) => srcs,
        };
        let key: Vec<(usize, String)> = srcs
            .iter()
            .map(|s| (s.file as *const _ as usize, s.info.name.clone()))
            .collect();
        if let Some(&g) = cx.memo.nv.lock().unwrap().get(&key) {
            return Ok(g);
        }
        let mut a = 0.0f32;
        for s in srcs {
            let x = fp8::par_amax(cx.data(s), s.info.dtype);
            cx.release_range(s, 0, s.info.nbytes());
            if !x.is_finite() {
                return Err(s.err(format!("weight amax is {x}; refusing to quantize")));
            }
            a = a.max(x);
        }
        let g = nvfp4::global_scale_for_weight_amax(a, "").map_err(|m| srcs[0].err(m))?;
        cx.memo.nv.lock().unwrap().insert(key, g);
        Ok(g)
    }

    /// Output bytes per source row (codes or block scales of one row): the unit of work.
    fn row_out(&self) -> usize {
        if self.part == Part::Weight {
            self.k / 2
        } else {
            self.k / 16
        }
    }
}

impl<'a> OpKind<'a> for Nv<'a> {
    fn name(&self) -> &'static str {
        match self.part {
            Part::Weight => "nvfp4_weight",
            Part::Scales => "nvfp4_block_scales",
            Part::Global => "nvfp4_global_scale",
        }
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn group(&self) -> Option<&[Src<'a>]> {
        match &self.amax {
            AmaxOf::Of(srcs) => Some(srcs),
            AmaxOf::Given(_) => None,
        }
    }
    fn source_bytes(&self, _out: usize) -> usize {
        // Counted once per weight, on the codes (the other two re-read it).
        if self.part == Part::Weight {
            self.src.info.nbytes()
        } else {
            0
        }
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let gs = self.global(cx)?;
        if self.part == Part::Global {
            cx.owned(gs.to_le_bytes().to_vec())?;
            return Ok(Some(vec![gs]));
        }
        let (src, ld, k, part) = (&self.src, cx.ld, self.k, self.part);
        let d = src.info.dtype;
        let (row_out, row_in) = (self.row_out(), k * d.size());
        cx.computed(
            row_out.max(1),
            &|at, out| {
                let (r0, r1) = (at / row_out, (at + out.len()) / row_out);
                let s = &ld.data(src)[r0 * row_in..r1 * row_in];
                match part {
                    Part::Weight => nvfp4::quantize_packed(s, d, k, gs, out),
                    _ => nvfp4::block_scales(s, d, k, gs, out),
                }
                Ok(())
            },
            // Whole rows were read: release them (the next NVFP4 op of this weight faults them
            // back in from the page cache, which keeps RSS at one batch).
            &|from, to| cx.release_range(src, from / row_out * row_in, to / row_out * row_in),
        )?;
        Ok(Some(vec![gs]))
    }
}
