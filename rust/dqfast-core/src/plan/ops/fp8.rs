//! `fp8`: `e4m3(w / scale)` of a BF16/FP16/FP32 tensor, per tensor or per output row, with scales
//! given, from calibrated maxima, or from the weight's own max |w|.

use std::sync::Arc;

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{OpKind, Resolve};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::fp8::{self, Rounding, Saturation};
use crate::plan::pipeline::Emit;
use crate::plan::resolve::{Cx, Out, Src};
use crate::plan::schema::SrcRef;

fn exact() -> Rounding {
    Rounding::Exact
}
fn clamp() -> Saturation {
    Saturation::Clamp
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fp8Op {
    pub src: SrcRef,
    pub scale: ScaleSpec,
    #[serde(default = "exact")]
    pub rounding: Rounding,
    #[serde(default = "clamp")]
    pub saturation: Saturation,
}

/// Where an FP8 scale comes from.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScaleSpec {
    /// Calibrated maxima (one, or one per output row): scale = amax / 448.
    Amax { amax: Vec<f32> },
    /// Scales given directly.
    Values { values: Vec<f32> },
    /// Max |w| of the weight itself, per tensor or per output row.
    WeightAmax { per_row: bool },
}

enum FpScale {
    Fixed(Arc<Vec<f32>>),
    WeightAmax { per_row: bool },
}

impl Resolve for Fp8Op {
    fn resolve<'a>(&self, cx: &Cx<'a, '_>) -> Result<Out<'a>> {
        let s = cx.float_src(&self.src)?;
        // Real row count: a [0, K] weight has no rows and so no per-row scales.
        let rows = s.info.shape.first().copied().unwrap_or(1);
        let numel = s.info.numel();
        let row_len = if numel == 0 { 1 } else { numel / rows };
        let scale = match &self.scale {
            ScaleSpec::Amax { amax } => FpScale::Fixed(Arc::new(
                fp8::scales_from_amax("calibrated amax", amax, fp8::E4M3_MAX)
                    .map_err(|m| s.err(m))?,
            )),
            // Checked with every other fixed scale just below.
            ScaleSpec::Values { values } => FpScale::Fixed(Arc::new(values.clone())),
            ScaleSpec::WeightAmax { per_row } => FpScale::WeightAmax { per_row: *per_row },
        };
        if let FpScale::Fixed(v) = &scale {
            if v.len() != 1 && v.len() != rows {
                return Err(s.err(format!(
                    "{} scale values for a tensor of shape {:?} (expected 1 or {rows})",
                    v.len(),
                    s.info.shape
                )));
            }
            fp8::check_scales("weight scale", v).map_err(|m| s.err(m))?;
        }
        Ok(Out::new(
            Dtype::F8_E4M3,
            s.info.shape.clone(),
            Fp8 {
                src: s,
                scale,
                rounding: self.rounding,
                saturation: self.saturation,
                row_len,
            },
        ))
    }
}

struct Fp8<'a> {
    src: Src<'a>,
    scale: FpScale,
    rounding: Rounding,
    saturation: Saturation,
    row_len: usize,
}

/// Scales of a weight from its own maxima (per tensor or per row).
fn weight_scales(src: &Src, data: &[u8], per_row: bool) -> Result<Vec<f32>> {
    let d = src.info.dtype;
    let amax: Vec<f32> = if per_row {
        // One scale per real row: none for a [0, K] weight (its scale tensor is [0]).
        let rows = src.info.shape.first().copied().unwrap_or(1);
        let rb = src.info.nbytes().checked_div(rows).unwrap_or(0);
        if rows == 0 {
            Vec::new()
        } else if rb == 0 {
            vec![0.0; rows]
        } else {
            data.par_chunks(rb).map(|r| fp8::amax(r, d)).collect()
        }
    } else {
        vec![fp8::par_amax(data, d)]
    };
    amax.iter()
        .enumerate()
        .map(|(i, &a)| {
            fp8::weight_scale_from_amax(a, &format!(" (row {i})")).map_err(|m| src.err(m))
        })
        .collect()
}

impl<'a> OpKind<'a> for Fp8<'a> {
    fn name(&self) -> &'static str {
        "fp8"
    }
    fn sources(&self) -> Vec<Src<'a>> {
        vec![self.src]
    }
    fn source_bytes(&self, _out: usize) -> usize {
        self.src.info.nbytes()
    }
    fn fp8_scale_count(&self) -> Option<usize> {
        let rows = self.src.info.shape.first().copied().unwrap_or(1);
        Some(match &self.scale {
            FpScale::Fixed(v) => v.len(),
            FpScale::WeightAmax { per_row: true } => rows,
            FpScale::WeightAmax { per_row: false } => 1,
        })
    }
    fn fp8_scales(&self, cx: &Emit<'a, '_>, idx: usize) -> Option<Result<Arc<Vec<f32>>>> {
        Some(match &self.scale {
            FpScale::Fixed(v) => Ok(v.clone()),
            FpScale::WeightAmax { per_row } => {
                if let Some(v) = cx.memo.fp8.lock().unwrap().get(&idx) {
                    return Some(Ok(v.clone()));
                }
                weight_scales(&self.src, cx.data(&self.src), *per_row).map(|v| {
                    let v = Arc::new(v);
                    cx.memo.fp8.lock().unwrap().insert(idx, v.clone());
                    v
                })
            }
        })
    }
    fn emit(&self, cx: &Emit<'a, '_>) -> Result<Option<Vec<f32>>> {
        let scales = cx.fp8_scales(cx.idx)?;
        let (src, ld) = (&self.src, cx.ld);
        let d = src.info.dtype;
        // Per-tensor scale on a 16-bit source: one 64 KiB table per tensor replaces the arithmetic.
        let lut = (scales.len() == 1 && d.size() == 2 && cx.nbytes >= fp8::E4m3Lut::MIN_ELEMS)
            .then(|| fp8::E4m3Lut::new(d, scales[0], self.rounding, self.saturation));
        cx.computed(
            1,
            &|at, out| {
                let s = &ld.data(src)[at * d.size()..(at + out.len()) * d.size()];
                match &lut {
                    Some(t) => t.apply(s, out),
                    None => fp8::quantize_e4m3(
                        s,
                        d,
                        &scales,
                        self.row_len,
                        at,
                        self.rounding,
                        self.saturation,
                        out,
                    ),
                }
                Ok(())
            },
            &|from, to| cx.release_range(src, from * d.size(), to * d.size()),
        )?;
        cx.release(src)?;
        Ok(Some(scales.iter().take(8).copied().collect()))
    }
}
