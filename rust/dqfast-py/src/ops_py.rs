//! `dqfast.ops` and `dqfast.stream` kernels on numpy arrays: inputs are borrowed in place
//! (rust-numpy's borrow checker also refuses an output that aliases an input), outputs are
//! written into arrays the caller allocated, the GIL is released and the work is spread over all
//! cores with rayon. The kernels are `dqfast_core::fp8` / `nvfp4`, the ones the build engine
//! runs, so results are the builders' bytes; `python/dqfast/ops.py` does shapes and dtypes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::dtype::Dtype;
use dqfast_core::fp8::{self, Rounding, Saturation};
use dqfast_core::nvfp4;
use dqfast_core::writer::StreamWriter;
use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::{detach_catch, run_detached, Exc};

/// Output bytes each rayon task produces (as in the build engine).
const PIECE_BYTES: usize = 1 << 20;

fn float_src(dtype: &str) -> PyResult<Dtype> {
    match Dtype::parse(dtype) {
        Some(d) if d.is_float_source() => Ok(d),
        _ => Err(Exc::Plan.new_err(format!("dtype must be BF16, F16 or F32, got '{dtype}'"))),
    }
}

fn ro<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| Exc::Plan.new_err(format!("{what} must be a contiguous array")))
}

fn rw<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArray1<'_, T>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| Exc::Plan.new_err(format!("{what} must be a contiguous array")))
}

fn expect_len(what: &str, got: usize, want: usize) -> PyResult<()> {
    if got != want {
        return Err(Exc::Plan.new_err(format!("{what} holds {got} elements, expected {want}")));
    }
    Ok(())
}

/// Scale-grid dimensions of a `[rows, cols]` tensor in blocks of `[bm, bn]`.
fn grid(rows: usize, cols: usize, bm: usize, bn: usize) -> PyResult<(usize, usize)> {
    if bm == 0 || bn == 0 {
        return Err(Exc::Plan.new_err("block sizes must be >= 1"));
    }
    Ok((rows.div_ceil(bm), cols.div_ceil(bn)))
}

/// Rows per rayon task so that a task handles about [`PIECE_BYTES`] of `row_bytes` rows.
fn rows_per_piece(row_bytes: usize) -> usize {
    (PIECE_BYTES / row_bytes.max(1)).max(1)
}

/// The scale grid of a `[rows, cols]` tensor in `[bm, bn]` blocks, checking that `scales` holds
/// one scale per block.
fn scale_grid(
    scales: &[f32],
    rows: usize,
    cols: usize,
    bm: usize,
    bn: usize,
) -> PyResult<(usize, usize)> {
    let (gr, gc) = grid(rows, cols, bm, bn)?;
    expect_len("scales", scales.len(), gr * gc)?;
    Ok((gr, gc))
}

/// Runs `f(input row, its block-row of scales, output row)` over `[rows, cols]` rows in parallel
/// (inputs of `in_row` bytes a row; `gc` scales per block-row of `bm` rows).
fn par_scaled_rows<O: Send>(
    out: &mut [O],
    input: &[u8],
    in_row: usize,
    cols: usize,
    (bm, gc, scales): (usize, usize, &[f32]),
    f: impl Fn(&[u8], &[f32], &mut [O]) + Sync,
) {
    let rpp = rows_per_piece(cols * std::mem::size_of::<O>());
    out.par_chunks_mut(rpp * cols)
        .zip(input.par_chunks(rpp * in_row))
        .enumerate()
        .for_each(|(p, (oc, ic))| {
            for (i, (orow, irow)) in oc
                .chunks_exact_mut(cols)
                .zip(ic.chunks_exact(in_row))
                .enumerate()
            {
                let g = (p * rpp + i) / bm;
                f(irow, &scales[g * gc..(g + 1) * gc], orow);
            }
        });
}

/// max |x| per `[bm, bn]` block of a `[rows, cols]` float tensor, row-major grid; NaN propagates.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn ops_block_amax(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u8>,
    dtype: &str,
    rows: usize,
    cols: usize,
    bm: usize,
    bn: usize,
) -> PyResult<Vec<f32>> {
    let d = float_src(dtype)?;
    let s = ro(&src, "input")?;
    expect_len("input bytes", s.len(), rows * cols * d.size())?;
    let (gr, gc) = grid(rows, cols, bm, bn)?;
    if gr * gc == 1 {
        return detach_catch(py, || vec![fp8::par_amax(s, d)]);
    }
    let rb = cols * d.size();
    detach_catch(py, || {
        let mut out = vec![0f32; gr * gc];
        out.par_chunks_mut(gc.max(1))
            .enumerate()
            .for_each(|(g, o)| {
                for r in g * bm..((g + 1) * bm).min(rows) {
                    let row = &s[r * rb..(r + 1) * rb];
                    for (j, m) in o.iter_mut().enumerate() {
                        let seg = &row[j * bn * d.size()..((j + 1) * bn).min(cols) * d.size()];
                        *m = fp8::nan_max(*m, fp8::amax(seg, d));
                    }
                }
            });
        out
    })
}

/// The builders' scale rule applied to maxima: `fp8` (amax/448) or `nvfp4` (weight_scale_2);
/// an all-zero weight gets 1, NaN or inf is refused.
#[pyfunction]
fn ops_weight_scales(amax: Vec<f32>, format: &str) -> PyResult<Vec<f32>> {
    let rule: fn(f32, &str) -> Result<f32, String> = match format {
        "fp8" => fp8::weight_scale_from_amax,
        "nvfp4" => nvfp4::global_scale_for_weight_amax,
        o => return Err(Exc::Plan.new_err(format!("unknown scale format '{o}'"))),
    };
    amax.iter()
        .enumerate()
        .map(|(i, &a)| {
            let at = if amax.len() > 1 {
                format!(" (block {i})")
            } else {
                String::new()
            };
            rule(a, &at).map_err(|m| Exc::Plan.new_err(format!("weight {m}")))
        })
        .collect()
}

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, v: &str) -> PyResult<T> {
    serde_json::from_value(serde_json::Value::String(v.into()))
        .map_err(|_| Exc::Plan.new_err(format!("unknown {what} '{v}'")))
}

/// `e4m3(x / scale)` of a `[rows, cols]` float tensor with one scale per `[bm, bn]` block.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn ops_quantize_e4m3(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u8>,
    dtype: &str,
    rows: usize,
    cols: usize,
    scales: PyReadonlyArray1<'_, f32>,
    bm: usize,
    bn: usize,
    rounding: &str,
    saturation: &str,
    mut out: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let d = float_src(dtype)?;
    let rounding: Rounding = parse_enum("rounding", rounding)?;
    let saturation: Saturation = parse_enum("saturation", saturation)?;
    let s = ro(&src, "input")?;
    let sc = ro(&scales, "scales")?;
    let o = rw(&mut out, "out")?;
    let n = rows * cols;
    expect_len("input bytes", s.len(), n * d.size())?;
    expect_len("out", o.len(), n)?;
    let (gr, gc) = scale_grid(sc, rows, cols, bm, bn)?;
    if n == 0 {
        return Ok(());
    }
    detach_catch(py, || {
        if gr * gc == 1 {
            // One scale: 16-bit sources go through the engine's 64 KiB table (same bytes).
            let lut = (d.size() == 2 && n >= fp8::E4m3Lut::MIN_ELEMS)
                .then(|| fp8::E4m3Lut::new(d, sc[0], rounding, saturation));
            o.par_chunks_mut(PIECE_BYTES)
                .zip(s.par_chunks(PIECE_BYTES * d.size()))
                .enumerate()
                .for_each(|(i, (oc, sc_src))| match &lut {
                    Some(t) => t.apply(sc_src, oc),
                    None => fp8::quantize_e4m3(
                        sc_src,
                        d,
                        sc,
                        n,
                        i * PIECE_BYTES,
                        rounding,
                        saturation,
                        oc,
                    ),
                });
            return;
        }
        // A row's scales are its block-row of the grid, one per segment of `bn` elements.
        par_scaled_rows(
            o,
            s,
            cols * d.size(),
            cols,
            (bm, gc, sc),
            |srow, row_scales, orow| {
                fp8::quantize_e4m3(srow, d, row_scales, bn, 0, rounding, saturation, orow)
            },
        );
    })
}

/// `f32(q) * scale` of a `[rows, cols]` e4m3 tensor with one scale per `[bm, bn]` block.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn ops_dequantize_e4m3(
    py: Python<'_>,
    q: PyReadonlyArray1<'_, u8>,
    rows: usize,
    cols: usize,
    scales: PyReadonlyArray1<'_, f32>,
    bm: usize,
    bn: usize,
    mut out: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let s = ro(&q, "input")?;
    let sc = ro(&scales, "scales")?;
    let o = rw(&mut out, "out")?;
    let n = rows * cols;
    expect_len("input", s.len(), n)?;
    expect_len("out", o.len(), n)?;
    let (gr, gc) = scale_grid(sc, rows, cols, bm, bn)?;
    if n == 0 {
        return Ok(());
    }
    detach_catch(py, || {
        let piece = PIECE_BYTES / 4;
        if gr * gc == 1 {
            o.par_chunks_mut(piece)
                .zip(s.par_chunks(piece))
                .for_each(|(oc, qc)| fp8::dequantize_e4m3(qc, sc, n, 0, oc));
            return;
        }
        par_scaled_rows(o, s, cols, cols, (bm, gc, sc), |qrow, row_scales, orow| {
            fp8::dequantize_e4m3(qrow, row_scales, bn, 0, orow)
        });
    })
}

fn check_k(k: usize) -> PyResult<()> {
    if k == 0 || !k.is_multiple_of(nvfp4::BLOCK) {
        return Err(Exc::Plan.new_err(format!(
            "NVFP4 needs the last dimension to be a positive multiple of {}, got {k}",
            nvfp4::BLOCK
        )));
    }
    Ok(())
}

/// NVFP4 packed codes `[rows, k/2]` and e4m3 block scales `[rows, k/16]` of a `[rows, k]` tensor.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn ops_quantize_nvfp4(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u8>,
    dtype: &str,
    rows: usize,
    k: usize,
    weight_scale_2: f32,
    mut packed: PyReadwriteArray1<'_, u8>,
    mut scales: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let d = float_src(dtype)?;
    check_k(k)?;
    if !(weight_scale_2.is_finite() && weight_scale_2 > 0.0) {
        return Err(Exc::Plan.new_err(format!(
            "weight_scale_2 is {weight_scale_2}; it must be finite and > 0"
        )));
    }
    let s = ro(&src, "input")?;
    let p = rw(&mut packed, "packed out")?;
    let bs = rw(&mut scales, "block scales out")?;
    expect_len("input bytes", s.len(), rows * k * d.size())?;
    expect_len("packed out", p.len(), rows * k / 2)?;
    expect_len("block scales out", bs.len(), rows * k / nvfp4::BLOCK)?;
    if rows == 0 {
        return Ok(());
    }
    detach_catch(py, || {
        let rpp = rows_per_piece(k * d.size());
        p.par_chunks_mut(rpp * k / 2)
            .zip(bs.par_chunks_mut(rpp * k / nvfp4::BLOCK))
            .zip(s.par_chunks(rpp * k * d.size()))
            .for_each(|((pc, bc), sc)| nvfp4::quantize(sc, d, k, weight_scale_2, pc, bc));
    })
}

/// f32 values of NVFP4 packed codes and block scales of rows of `k` elements.
#[pyfunction]
fn ops_dequantize_nvfp4(
    py: Python<'_>,
    packed: PyReadonlyArray1<'_, u8>,
    scales: PyReadonlyArray1<'_, u8>,
    k: usize,
    weight_scale_2: f32,
    mut out: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    check_k(k)?;
    let p = ro(&packed, "packed")?;
    let bs = ro(&scales, "block scales")?;
    let o = rw(&mut out, "out")?;
    if !(p.len() * 2).is_multiple_of(k) {
        return Err(Exc::Plan.new_err(format!(
            "packed holds {} bytes, not whole rows of {k} elements",
            p.len()
        )));
    }
    let rows = p.len() * 2 / k;
    expect_len("block scales", bs.len(), rows * k / nvfp4::BLOCK)?;
    expect_len("out", o.len(), rows * k)?;
    if rows == 0 {
        return Ok(());
    }
    detach_catch(py, || {
        let rpp = rows_per_piece(k * 4);
        o.par_chunks_mut(rpp * k)
            .zip(p.par_chunks(rpp * k / 2))
            .zip(bs.par_chunks(rpp * k / nvfp4::BLOCK))
            .for_each(|((oc, pc), bc)| nvfp4::dequantize_into(pc, bc, k, weight_scale_2, oc));
    })
}

/// Exchange the two nibbles of every byte (FP4 element order).
#[pyfunction]
fn ops_swap_nibbles(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u8>,
    mut out: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let s = ro(&src, "input")?;
    let o = rw(&mut out, "out")?;
    expect_len("out", o.len(), s.len())?;
    detach_catch(py, || {
        o.par_chunks_mut(PIECE_BYTES)
            .zip(s.par_chunks(PIECE_BYTES))
            .for_each(|(oc, sc)| nvfp4::swap_nibbles(sc, oc));
    })
}

/// Validate a checkpoint; its layout as JSON with each tensor's byte offset in its file (for
/// zero-copy views over a memory map) and each file's size.
#[pyfunction]
fn checkpoint_offsets(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    run_detached(py, move || {
        let ck = Checkpoint::open(&path)?;
        let mut files = Vec::with_capacity(ck.files.len());
        for f in &ck.files {
            let size = std::fs::metadata(&f.path)
                .map_err(|e| dqfast_core::Error::io(&f.path, "stat", e))?
                .len();
            let tensors: Vec<serde_json::Value> = f
                .header
                .tensors
                .iter()
                .map(|t| {
                    serde_json::json!({"name": t.name, "dtype": t.dtype.name(), "shape": t.shape,
                        "offset": f.file_offset(t), "nbytes": t.nbytes()})
                })
                .collect();
            files.push(serde_json::json!({"path": f.path, "size": size,
                "metadata": f.header.metadata, "tensors": tensors}));
        }
        Ok(serde_json::json!({"root": ck.root, "files": files}).to_string())
    })
}

/// `dqfast_core::writer::StreamWriter` for Python: tensors in, sharded safetensors out, atomically.
#[pyclass(module = "dqfast._core")]
struct StreamWriterCore {
    inner: Option<StreamWriter>,
}

impl StreamWriterCore {
    fn get(&mut self) -> PyResult<&mut StreamWriter> {
        self.inner
            .as_mut()
            .ok_or_else(|| Exc::Plan.new_err("the writer is closed (finished or aborted)"))
    }
}

#[pymethods]
impl StreamWriterCore {
    #[new]
    #[pyo3(signature = (output, overwrite, max_shard_bytes, prefix, metadata, always_index, fsync))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        output: PathBuf,
        overwrite: bool,
        max_shard_bytes: u64,
        prefix: String,
        metadata: BTreeMap<String, String>,
        always_index: bool,
        fsync: bool,
    ) -> PyResult<Self> {
        let w = run_detached(py, move || {
            StreamWriter::create(
                &output,
                overwrite,
                max_shard_bytes,
                &prefix,
                metadata,
                always_index,
                fsync,
            )
        })?;
        Ok(StreamWriterCore { inner: Some(w) })
    }

    #[pyo3(signature = (name, dtype, shape, data, shard=None))]
    fn write_tensor(
        &mut self,
        py: Python<'_>,
        name: String,
        dtype: &str,
        shape: Vec<usize>,
        data: PyReadonlyArray1<'_, u8>,
        shard: Option<String>,
    ) -> PyResult<()> {
        let d = Dtype::parse(dtype)
            .ok_or_else(|| Exc::Plan.new_err(format!("unknown safetensors dtype '{dtype}'")))?;
        let bytes = ro(&data, "tensor data")?;
        let w = self.get()?;
        run_detached(py, move || {
            w.write_tensor_to(shard.as_deref(), &name, d, &shape, bytes)
        })
    }

    fn write_file(&mut self, py: Python<'_>, name: String, data: Vec<u8>) -> PyResult<()> {
        let w = self.get()?;
        run_detached(py, move || w.write_file(&name, &data))
    }

    /// Shard names and total tensor bytes; the output is in place when this returns.
    fn finish(&mut self, py: Python<'_>) -> PyResult<(Vec<String>, u64)> {
        let mut w = self
            .inner
            .take()
            .ok_or_else(|| Exc::Plan.new_err("the writer is closed (finished or aborted)"))?;
        run_detached(py, move || w.finish())
    }

    /// Drop everything written so far (nothing appears at the output path).
    fn abort(&mut self) {
        self.inner = None;
    }

    #[getter]
    fn staging_dir(&self) -> Option<String> {
        self.inner
            .as_ref()
            .and_then(|w| w.staging_dir())
            .map(|p| p.display().to_string())
    }
}

/// Add the library functions to the `dqfast._core` module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ops_block_amax, m)?)?;
    m.add_function(wrap_pyfunction!(ops_weight_scales, m)?)?;
    m.add_function(wrap_pyfunction!(ops_quantize_e4m3, m)?)?;
    m.add_function(wrap_pyfunction!(ops_dequantize_e4m3, m)?)?;
    m.add_function(wrap_pyfunction!(ops_quantize_nvfp4, m)?)?;
    m.add_function(wrap_pyfunction!(ops_dequantize_nvfp4, m)?)?;
    m.add_function(wrap_pyfunction!(ops_swap_nibbles, m)?)?;
    m.add_function(wrap_pyfunction!(checkpoint_offsets, m)?)?;
    m.add_class::<StreamWriterCore>()?;
    Ok(())
}
