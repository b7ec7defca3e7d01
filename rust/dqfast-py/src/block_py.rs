//! Python face of the weight-only block formats (`dqfast_core::formats::BLOCK_FORMATS`): each
//! format's facts as `_core.BLOCK_FORMATS` (what `dqfast.formats` builds its entries from) and its
//! kernels as `_core.block_quantize` (tests, verification and small tensors; builds go through the
//! plan's `block_values` / `block_scales` ops). A new format needs no edit here.

use dqfast_core::formats::{block_format, BlockFormat, BLOCK_FORMATS};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::Exc;

fn lookup(name: &str) -> PyResult<&'static BlockFormat> {
    block_format(name).ok_or_else(|| {
        let known: Vec<_> = BLOCK_FORMATS.iter().map(|f| f.name).collect();
        Exc::Plan.new_err(format!(
            "unknown block format '{name}' (known: {})",
            known.join(", ")
        ))
    })
}

/// Quantize a `[rows, k]` BF16/F16/F32 tensor in block format `format`: returns (values
/// `[rows, k / elements_per_byte]`, scales `[rows, k / block]`). An unknown format, a bad dtype,
/// K or length, or a non-finite value raise `PlanError`.
#[pyfunction]
fn block_quantize<'py>(
    py: Python<'py>,
    format: &str,
    data: &[u8],
    dtype: &str,
    k: usize,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let f = lookup(format)?;
    let dtype = crate::parse_dtype(dtype)?;
    let n = data.len() / dtype.size();
    let (values, scales) = crate::detach_catch(py, || {
        let mut values = vec![0u8; n / f.elements_per_byte];
        let mut scales = vec![0u8; n / f.block];
        (f.values)(data, dtype, k, &mut values)?;
        (f.scales)(data, dtype, k, &mut scales)?;
        Ok::<_, dqfast_core::formats::BlockError>((values, scales))
    })?
    .map_err(|e| Exc::Plan.new_err(e.to_string()))?;
    Ok((PyBytes::new(py, &values), PyBytes::new(py, &scales)))
}

/// Dequantize block format `format`'s values `[rows, k / elements_per_byte]` and scales
/// `[rows, k / block]` to float32 (little-endian bytes, `[rows, k]`): the reference dequantization
/// of the format (verification). Bad lengths or K raise `PlanError`.
#[pyfunction]
fn block_dequantize<'py>(
    py: Python<'py>,
    format: &str,
    values: &[u8],
    scales: &[u8],
    k: usize,
) -> PyResult<Bound<'py, PyBytes>> {
    let f = lookup(format)?;
    let out = crate::detach_catch(py, || (f.dequantize)(values, scales, k))?
        .map_err(|e| Exc::Plan.new_err(e.to_string()))?;
    let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(PyBytes::new(py, &bytes))
}

/// `_core.BLOCK_FORMATS`: name -> {label, block, elements_per_byte, values_dtype, scales_dtype}.
fn formats_dict<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let all = PyDict::new(py);
    for f in BLOCK_FORMATS {
        let d = PyDict::new(py);
        d.set_item("label", f.label)?;
        d.set_item("block", f.block)?;
        d.set_item("elements_per_byte", f.elements_per_byte)?;
        d.set_item("values_dtype", f.values_dtype.name())?;
        d.set_item("scales_dtype", f.scales_dtype.name())?;
        all.set_item(f.name, d)?;
    }
    Ok(all)
}

/// Add the block formats and their kernels to the `dqfast._core` module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BLOCK_FORMATS", formats_dict(m.py())?)?;
    m.add_function(wrap_pyfunction!(block_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(block_dequantize, m)?)?;
    Ok(())
}
