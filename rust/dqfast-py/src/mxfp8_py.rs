//! Python binding for the MXFP8 kernel (tests, verification and small tensors; the engine will call
//! `dqfast_core::mxfp8` directly).

use dqfast_core::mxfp8;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::Exc;

/// Quantize a `[rows, k]` BF16/F16/F32 tensor: returns (e4m3 values `[rows, k]`, E8M0 scale
/// bytes `[rows, k/32]`). Bad dtype, K, length or a non-finite value raise `PlanError`.
#[pyfunction]
fn mxfp8_quantize<'py>(
    py: Python<'py>,
    data: &[u8],
    dtype: &str,
    k: usize,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let dtype = crate::parse_dtype(dtype)?;
    let n = data.len() / dtype.size();
    let (values, scales) = crate::detach_catch(py, || {
        let mut values = vec![0u8; n];
        let mut scales = vec![0u8; n / mxfp8::BLOCK];
        mxfp8::quantize(data, dtype, k, &mut values, &mut scales).map(|()| (values, scales))
    })?
    .map_err(|e| Exc::Plan.new_err(e.to_string()))?;
    Ok((PyBytes::new(py, &values), PyBytes::new(py, &scales)))
}

/// Add the MXFP8 function and its block size to the `dqfast._core` module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MXFP8_BLOCK", mxfp8::BLOCK)?;
    m.add_function(wrap_pyfunction!(mxfp8_quantize, m)?)?;
    Ok(())
}
