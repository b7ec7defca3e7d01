//! Resolving a plan against its sources: every output tensor's source tensors located, its dtype,
//! shape and byte count known and checked, before anything is written. Each op resolves itself
//! ([`super::ops::Resolve`]); this module holds what they share.

use std::collections::HashMap;

use super::ops::OpKind;
use super::schema::{Plan, SrcRef};
use crate::checkpoint::{Checkpoint, SafeFile};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::header::{checked_nbytes, TensorInfo};

/// A source tensor located in its file.
#[derive(Clone, Copy)]
pub(crate) struct Src<'a> {
    pub file: &'a SafeFile,
    pub info: &'a TensorInfo,
}

impl<'a> Src<'a> {
    pub fn data(&self) -> &'a [u8] {
        self.file.data(self.info)
    }
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::tensor(&self.file.path, &self.info.name, msg)
    }
}

/// Identity of a source tensor (its file and header entry).
pub(crate) type SrcKey = (usize, usize);

pub(crate) fn key(s: &Src) -> SrcKey {
    (
        s.file as *const SafeFile as usize,
        s.info as *const TensorInfo as usize,
    )
}

/// One output tensor, resolved: its header entry and the op that makes its bytes.
pub(crate) struct Resolved<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub nbytes: usize,
    pub op: Box<dyn OpKind<'a> + 'a>,
}

/// What an op's [`Resolve::resolve`] gives: the output's dtype and shape, and the op.
pub(crate) struct Out<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub op: Box<dyn OpKind<'a> + 'a>,
}

impl<'a> Out<'a> {
    pub fn new(dtype: Dtype, shape: Vec<usize>, op: impl OpKind<'a> + 'a) -> Out<'a> {
        Out {
            dtype,
            shape,
            op: Box::new(op),
        }
    }
}

/// What an op sees while it resolves: the sources, the outputs resolved before it, its name.
pub(crate) struct Cx<'a, 'p> {
    sources: &'a [Checkpoint],
    index: &'p HashMap<&'p str, usize>,
    out: &'p [Resolved<'a>],
    /// The output tensor's name.
    pub name: &'p str,
}

impl<'a> Cx<'a, '_> {
    /// The source tensor a plan reference names.
    pub fn get(&self, r: &SrcRef) -> Result<Src<'a>> {
        let ck = self.sources.get(r.source).ok_or_else(|| {
            Error::Plan(format!(
                "source index {} out of range ({} sources)",
                r.source,
                self.sources.len()
            ))
        })?;
        let (file, info) = ck.require(&r.tensor)?;
        Ok(Src { file, info })
    }

    /// [`Cx::get`] of a tensor that will be quantized: BF16, F16 or F32.
    pub fn float_src(&self, r: &SrcRef) -> Result<Src<'a>> {
        let s = self.get(r)?;
        float_src(&s)?;
        Ok(s)
    }

    /// An output resolved before this one, by name.
    pub fn earlier(&self, name: &str) -> Option<(usize, &Resolved<'a>)> {
        let &j = self.index.get(name)?;
        self.out.get(j).map(|r| (j, r))
    }
}

/// A quantizer's input must be a float tensor.
pub(crate) fn float_src(s: &Src) -> Result<()> {
    if s.info.dtype.is_float_source() {
        Ok(())
    } else {
        Err(s.err(format!(
            "dtype {} cannot be quantized (expected BF16, F16 or F32)",
            s.info.dtype
        )))
    }
}

/// `s` when its dtype is `want` (the byte-wise ops keep dtype and shape), else the error
/// "`needs` data, found <dtype>" naming the tensor.
pub(crate) fn same_dtype_src<'a>(s: Src<'a>, want: Dtype, needs: &str) -> Result<Src<'a>> {
    if s.info.dtype != want {
        return Err(s.err(format!("{needs} data, found {}", s.info.dtype)));
    }
    Ok(s)
}

/// Rows `start..stop` of `s`: the output shape and the first byte.
pub(crate) fn row_slice(s: &Src, start: usize, stop: usize) -> Result<(Vec<usize>, usize)> {
    let rows = *s
        .info
        .shape
        .first()
        .ok_or_else(|| s.err("cannot slice rows of a 0-d tensor"))?;
    // An empty range is a valid [0, ...] tensor (e.g. a zero-row weight rescaled whole).
    if start > stop || stop > rows {
        return Err(s.err(format!("row range {start}..{stop} is not inside 0..{rows}")));
    }
    let row_bytes = s.info.nbytes().checked_div(rows).unwrap_or(0);
    let mut shape = s.info.shape.clone();
    shape[0] = stop - start;
    Ok((shape, start * row_bytes))
}

/// Elements of a plan-given shape, refusing overflow (a plan is input too).
pub(crate) fn numel_of(name: &str, shape: &[usize]) -> Result<usize> {
    checked_nbytes(shape, 1)
        .ok_or_else(|| Error::Plan(format!("'{name}': shape {shape:?} overflows")))
}

/// Every output of the plan resolved, in plan order.
pub(crate) fn resolve<'a>(plan: &Plan, sources: &'a [Checkpoint]) -> Result<Vec<Resolved<'a>>> {
    let mut out: Vec<Resolved<'a>> = Vec::with_capacity(plan.tensors.len());
    let mut index: HashMap<&str, usize> = HashMap::new();
    for t in &plan.tensors {
        if index.contains_key(t.name.as_str()) {
            return Err(Error::Plan(format!(
                "output tensor '{}' appears twice",
                t.name
            )));
        }
        let Out { dtype, shape, op } = {
            let cx = Cx {
                sources,
                index: &index,
                out: &out,
                name: &t.name,
            };
            t.op.spec().resolve(&cx)?
        };
        index.insert(t.name.as_str(), out.len());
        let nbytes = checked_nbytes(&shape, dtype.size())
            .ok_or_else(|| Error::Plan(format!("'{}': shape {shape:?} overflows", t.name)))?;
        out.push(Resolved {
            name: t.name.clone(),
            dtype,
            shape,
            nbytes,
            op,
        });
    }
    Ok(out)
}
