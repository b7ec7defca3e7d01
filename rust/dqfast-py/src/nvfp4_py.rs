//! Python bindings for the NVFP4 kernels (used by tests and small tensors; the engine calls
//! `dqfast_core::nvfp4` directly). Bad arguments are `PlanError`s, as everywhere in `_core`.

use crate::Exc;
use dqfast_core::dtype::Dtype;
use dqfast_core::nvfp4;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

fn float_dtype(name: &str) -> PyResult<Dtype> {
    match Dtype::parse(&name.to_ascii_uppercase()) {
        Some(d) if d.is_float_source() => Ok(d),
        _ => Err(Exc::Plan.new_err(format!("dtype must be BF16, F16 or F32, got {name:?}"))),
    }
}

fn check_blocks(k: usize) -> PyResult<()> {
    if k == 0 || !k.is_multiple_of(nvfp4::BLOCK) {
        return Err(Exc::Plan.new_err(format!("k must be a positive multiple of 16, got {k}")));
    }
    Ok(())
}

/// Quantize a `[rows, k]` tensor: returns (packed codes, e4m3 block scales, weight_scale_2).
#[pyfunction]
fn nvfp4_quantize<'py>(
    py: Python<'py>,
    data: &[u8],
    dtype: &str,
    rows: usize,
    k: usize,
    amax: f32,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>, f32)> {
    let dtype = float_dtype(dtype)?;
    check_blocks(k)?;
    if data.len() != rows * k * dtype.size() {
        return Err(Exc::Plan.new_err(format!(
            "data holds {} bytes, expected rows*k*{} = {}",
            data.len(),
            dtype.size(),
            rows * k * dtype.size()
        )));
    }
    let gs = nvfp4::global_scale_from_amax(amax);
    let (packed, scales) = crate::detach_catch(py, || {
        let mut packed = vec![0u8; rows * k / 2];
        let mut scales = vec![0u8; rows * k / nvfp4::BLOCK];
        nvfp4::quantize(data, dtype, k, gs, &mut packed, &mut scales);
        (packed, scales)
    })?;
    Ok((PyBytes::new(py, &packed), PyBytes::new(py, &scales), gs))
}

/// Dequantize to little-endian f32 bytes.
#[pyfunction]
fn nvfp4_dequantize<'py>(
    py: Python<'py>,
    packed: &[u8],
    scales: &[u8],
    k: usize,
    weight_scale_2: f32,
) -> PyResult<Bound<'py, PyBytes>> {
    check_blocks(k)?;
    if packed.len() * 2 != scales.len() * nvfp4::BLOCK || !(packed.len() * 2).is_multiple_of(k) {
        return Err(Exc::Plan.new_err("packed and scales lengths do not describe whole rows of k"));
    }
    let bytes: Vec<u8> = crate::detach_catch(py, || {
        nvfp4::dequantize(packed, scales, k, weight_scale_2)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect()
    })?;
    Ok(PyBytes::new(py, &bytes))
}

/// One E2M1 code per little-endian f32 of `data`.
#[pyfunction]
fn e2m1_encode_f32<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    if !data.len().is_multiple_of(4) {
        return Err(Exc::Plan.new_err("data length must be a multiple of 4"));
    }
    let codes: Vec<u8> = data
        .chunks_exact(4)
        .map(|b| nvfp4::e2m1_encode(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    Ok(PyBytes::new(py, &codes))
}

/// `(b >> 4) | (b << 4)` for every byte.
#[pyfunction]
fn swap_nibbles<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    let mut out = vec![0u8; data.len()];
    nvfp4::swap_nibbles(data, &mut out);
    PyBytes::new(py, &out)
}

/// e4m3 block scales re-rounded after multiplying by `factor` (saturating at 448).
#[pyfunction]
fn rescale_block_scales<'py>(py: Python<'py>, data: &[u8], factor: f32) -> Bound<'py, PyBytes> {
    let mut out = vec![0u8; data.len()];
    nvfp4::rescale_block_scales(data, factor, &mut out);
    PyBytes::new(py, &out)
}

/// Add the NVFP4 functions to the `dqfast._core` module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(nvfp4_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(nvfp4_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(e2m1_encode_f32, m)?)?;
    m.add_function(wrap_pyfunction!(swap_nibbles, m)?)?;
    m.add_function(wrap_pyfunction!(rescale_block_scales, m)?)?;
    Ok(())
}
