//! `dqfast._core`: the thin Python face of `dqfast-core`.
//!
//! Heavy work runs with the GIL released; every Rust error becomes a typed Python exception
//! carrying `path` and `tensor` attributes, and a panic is caught here and surfaced as
//! `InternalError` instead of tearing the interpreter down.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use dqfast_core::checkpoint::Checkpoint;
use dqfast_core::dtype::Dtype;
use dqfast_core::error::Error;
use dqfast_core::fp8::{self, Rounding, Saturation};
use dqfast_core::plan::{Control, Progress};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyType};

mod block_py;
mod nvfp4_py;
mod ops_py;

/// The exception classes live in Python (`dqfast.errors`), so that they are importable by their
/// module name and pickle (ProcessPoolExecutor, Ray); Rust raises them by name.
#[derive(Clone, Copy)]
pub(crate) enum Exc {
    Checkpoint,
    Plan,
    UnsafeOutput,
    OutputExists,
    Io,
    Internal,
}

impl Exc {
    fn class<'py>(self, py: Python<'py>) -> PyResult<&'py Bound<'py, PyType>> {
        static CELLS: [PyOnceLock<Py<PyType>>; 6] = [const { PyOnceLock::new() }; 6];
        let (i, name) = match self {
            Exc::Checkpoint => (0, "CheckpointError"),
            Exc::Plan => (1, "PlanError"),
            Exc::UnsafeOutput => (2, "UnsafeOutputError"),
            Exc::OutputExists => (3, "OutputExistsError"),
            Exc::Io => (4, "DqfastIOError"),
            Exc::Internal => (5, "InternalError"),
        };
        CELLS[i].import(py, "dqfast.errors", name)
    }

    /// The exception, with `path` and `tensor` set; a RuntimeError only if `dqfast.errors`
    /// itself cannot be imported.
    pub(crate) fn err(
        self,
        py: Python<'_>,
        msg: impl Into<String>,
        path: Option<&Path>,
        tensor: Option<&str>,
    ) -> PyErr {
        let msg = msg.into();
        let cls = match self.class(py) {
            Ok(c) => c.clone(),
            Err(e) => return PyRuntimeError::new_err(format!("{msg} (dqfast.errors: {e})")),
        };
        let err = PyErr::from_type(cls, msg);
        let v = err.value(py);
        let _ = v.setattr("path", path.map(|p| p.display().to_string()));
        let _ = v.setattr("tensor", tensor);
        err
    }

    /// For code that holds no GIL token at hand.
    pub(crate) fn new_err(self, msg: impl Into<String>) -> PyErr {
        Python::attach(|py| self.err(py, msg, None, None))
    }
}

pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { path, .. } => Exc::Io.err(py, msg, Some(&path), None),
        Error::Header { path, .. } | Error::NotRegular { path, .. } => {
            Exc::Checkpoint.err(py, msg, Some(&path), None)
        }
        // Only seen when the caller set the cancel flag, i.e. on an interrupt.
        Error::Cancelled => PyKeyboardInterrupt::new_err(msg),
        Error::Tensor { path, tensor, .. } | Error::MissingTensor { path, tensor } => {
            Exc::Checkpoint.err(py, msg, Some(&path), Some(&tensor))
        }
        Error::Plan(_) => Exc::Plan.err(py, msg, None, None),
        Error::UnsafeOutput { output, input, .. } => {
            let err = Exc::UnsafeOutput.err(py, msg, Some(&output), None);
            let _ = err.value(py).setattr("input", input.display().to_string());
            err
        }
        Error::OutputExists(p) => Exc::OutputExists.err(py, msg, Some(&p), None),
        Error::Internal(_) => Exc::Internal.err(py, msg, None, None),
    }
}

/// Run `f` without the GIL, turning errors and panics into Python exceptions.
pub(crate) fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    let r = py.detach(|| catch_unwind(AssertUnwindSafe(f)));
    outcome_to_py(py, r)
}

/// A caught Rust result (or panic) as a Python result.
fn outcome_to_py<T>(py: Python<'_>, r: std::thread::Result<Result<T, Error>>) -> PyResult<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_py(py, e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Exc::Internal.err(
                py,
                format!("internal error (please report): {what}"),
                None,
                None,
            ))
        }
    }
}

/// Run an infallible kernel without the GIL; a panic still becomes `InternalError`.
pub(crate) fn detach_catch<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    run_detached(py, move || Ok(f()))
}

pub(crate) fn parse_dtype(s: &str) -> PyResult<Dtype> {
    Dtype::parse(s).ok_or_else(|| Exc::Plan.new_err(format!("unknown dtype '{s}'")))
}

/// How often the waiting caller wakes to check Python signals and report progress.
const POLL: Duration = Duration::from_millis(100);

/// Call `progress(bytes_done, bytes_total, tensors_done, tensors_total, current_tensor)` when
/// the counters moved since the last call.
fn report_progress(
    py: Python<'_>,
    cb: Option<&Bound<'_, PyAny>>,
    now: Progress,
    last: &mut Option<Progress>,
) -> PyResult<()> {
    let Some(cb) = cb else { return Ok(()) };
    if last.as_ref() == Some(&now) || now.bytes_total == 0 {
        return Ok(());
    }
    let _ = py;
    cb.call1((
        now.bytes_done,
        now.bytes_total,
        now.tensors_done,
        now.tensors_total,
        now.current.as_str(),
    ))?;
    *last = Some(now);
    Ok(())
}

/// Execute a JSON build plan; returns the JSON report.
///
/// The engine runs on its own thread; this one waits without the GIL and wakes every 100 ms to
/// run Python's signal handlers (`py.check_signals`) and the optional `progress` callback. A
/// KeyboardInterrupt (SIGINT, or SIGTERM turned into one by the CLI) or an exception from the
/// callback sets the engine's cancel flag, waits for it to stop (its staging directory is removed,
/// the previous output untouched) and is re-raised.
#[pyfunction]
#[pyo3(signature = (plan_json, progress=None))]
fn execute_plan(
    py: Python<'_>,
    plan_json: String,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let ctl = Arc::new(Control::default());
    let (tx, mut rx) = channel();
    let engine = {
        let ctl = ctl.clone();
        std::thread::Builder::new()
            .name("dqfast-engine".into())
            .spawn(move || {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    dqfast_core::plan::execute_json_with(&plan_json, &ctl)
                }));
                let _ = tx.send(r);
            })
            .map_err(|e| Exc::Internal.new_err(format!("cannot start the engine thread: {e}")))?
    };
    let mut last = None;
    let outcome = loop {
        // A Receiver is not Sync: move it through the GIL-free wait and back.
        let (got, back) = py.detach(move || (rx.recv_timeout(POLL), rx));
        rx = back;
        match got {
            Ok(r) => break r,
            Err(RecvTimeoutError::Disconnected) => {
                break Err(Box::new("engine thread ended without a result"))
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let polled = py
            .check_signals()
            .and_then(|_| report_progress(py, progress.as_ref(), ctl.progress(), &mut last));
        if let Err(e) = polled {
            ctl.cancel();
            // Wait for the engine to unwind: the staging directory is gone when it returns.
            let _ = py.detach(move || rx.recv());
            let _ = engine.join();
            return Err(e);
        }
    };
    let _ = engine.join();
    let report = outcome_to_py(py, outcome)?;
    // The last call says done == total.
    report_progress(py, progress.as_ref(), ctl.progress(), &mut last)?;
    Ok(serde_json::to_string(&report).expect("report serializes"))
}

/// Check a JSON build plan as `execute_plan` would before writing anything (sources, tensors,
/// shapes, dtypes, scales, output rules, extra files), without writing.
#[pyfunction]
fn validate_plan(py: Python<'_>, plan_json: String) -> PyResult<()> {
    run_detached(py, move || dqfast_core::plan::validate_json(&plan_json))
}

/// The build plan's JSON Schema (a JSON string), derived from the Rust types the engine reads:
/// op names, their fields, which are required, their types.
#[pyfunction]
fn plan_schema() -> String {
    dqfast_core::plan::plan_schema().to_string()
}

/// Worker threads the engine uses for `requested` (0 = one per core; capped at the cores).
#[pyfunction]
fn effective_threads(requested: usize) -> usize {
    dqfast_core::plan::effective_threads(requested)
}

/// e4m3 NaN bytes (0x7F/0xFF) of every F8_E4M3 tensor of a checkpoint that has any:
/// `{tensor: count}`. Counted in Rust over the memory map, in parallel, without the GIL.
#[pyfunction]
fn count_nan_e4m3(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<std::collections::BTreeMap<String, usize>> {
    run_detached(py, move || Ok(Checkpoint::open(&path)?.nan_e4m3_counts()))
}

/// Open and validate a checkpoint (file or directory); returns its layout as JSON.
#[pyfunction]
fn read_checkpoint(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    run_detached(py, move || {
        let ck = Checkpoint::open(&path)?;
        let files: Vec<serde_json::Value> = ck
            .files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "path": f.path,
                    "metadata": f.header.metadata,
                    "tensors": f.header.tensors.iter().map(|t| serde_json::json!({
                        "name": t.name, "dtype": t.dtype.name(), "shape": t.shape, "nbytes": t.nbytes(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(serde_json::json!({"root": ck.root, "files": files}).to_string())
    })
}

/// Raw bytes of one tensor: `(dtype, shape, data)`.
#[pyfunction]
fn read_tensor<'py>(
    py: Python<'py>,
    path: PathBuf,
    name: String,
) -> PyResult<(String, Vec<usize>, Bound<'py, PyBytes>)> {
    let (dtype, shape, data) = run_detached(py, move || {
        let ck = Checkpoint::open(&path)?;
        let (f, t) = ck.require(&name)?;
        Ok((
            t.dtype.name().to_string(),
            t.shape.clone(),
            f.data(t).to_vec(),
        ))
    })?;
    Ok((dtype, shape, PyBytes::new(py, &data)))
}

/// `e4m3(w / scale)` of little-endian float bytes; `scales` has one value or one per row.
#[pyfunction]
#[pyo3(signature = (data, dtype, scales, row_len, rounding="exact", saturation="clamp"))]
fn quantize_e4m3<'py>(
    py: Python<'py>,
    data: &[u8],
    dtype: &str,
    scales: Vec<f32>,
    row_len: usize,
    rounding: &str,
    saturation: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = parse_dtype(dtype)?;
    if !d.is_float_source() {
        return Err(Exc::Plan.new_err(format!("cannot quantize {d}")));
    }
    if !data.len().is_multiple_of(d.size()) || scales.is_empty() || row_len == 0 {
        return Err(Exc::Plan.new_err("data length, scales or row_len inconsistent"));
    }
    let n = data.len() / d.size();
    if scales.len() != 1 && scales.len() * row_len != n {
        return Err(Exc::Plan.new_err(format!(
            "{} scales for {n} elements in rows of {row_len}",
            scales.len()
        )));
    }
    let rounding = match rounding {
        "exact" => Rounding::Exact,
        "source_dtype" | "modelopt" => Rounding::SourceDtype,
        o => return Err(Exc::Plan.new_err(format!("unknown rounding '{o}'"))),
    };
    let saturation = match saturation {
        "clamp" => Saturation::Clamp,
        "none" => Saturation::None,
        o => return Err(Exc::Plan.new_err(format!("unknown saturation '{o}'"))),
    };
    let mut out = vec![0u8; n];
    detach_catch(py, || {
        fp8::quantize_e4m3(data, d, &scales, row_len, 0, rounding, saturation, &mut out)
    })?;
    Ok(PyBytes::new(py, &out))
}

/// e4m3 bytes → little-endian float32 bytes.
#[pyfunction]
fn e4m3_to_f32<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    let out: Vec<u8> = data
        .iter()
        .flat_map(|&b| fp8::e4m3_to_f32(b).to_le_bytes())
        .collect();
    PyBytes::new(py, &out)
}

/// max |x| of little-endian float bytes (NaN if any element is NaN).
#[pyfunction]
fn amax(data: &[u8], dtype: &str) -> PyResult<f32> {
    let d = parse_dtype(dtype)?;
    if !d.is_float_source() || !data.len().is_multiple_of(d.size()) {
        return Err(Exc::Plan.new_err(format!("cannot take amax of {} bytes of {d}", data.len())));
    }
    Ok(fp8::amax(data, d))
}

/// FP8 scale `amax / 448` in float32, by the engine's scale rule (PlanError when the amax is
/// not finite and > 0, or the scale is 0 or subnormal).
#[pyfunction]
#[pyo3(signature = (amax, what="amax"))]
fn fp8_scale_from_amax(amax: f32, what: &str) -> PyResult<f32> {
    scales_from_amax(vec![amax], fp8::E4M3_MAX, what).map(|v| v[0])
}

/// `amax / bound` for every value (448: FP8, 2688: NVFP4), by the engine's scale rule.
#[pyfunction]
#[pyo3(signature = (amax, bound, what="amax"))]
fn scales_from_amax(amax: Vec<f32>, bound: f32, what: &str) -> PyResult<Vec<f32>> {
    fp8::scales_from_amax(what, &amax, bound).map_err(|m| Exc::Plan.new_err(m))
}

/// Check scales given directly (e.g. read from an export) by the engine's scale rule.
#[pyfunction]
#[pyo3(signature = (values, what="scale"))]
fn check_scales(values: Vec<f32>, what: &str) -> PyResult<()> {
    fp8::check_scales(what, &values).map_err(|m| Exc::Plan.new_err(m))
}

/// Remove staging directories of `output` left by dead processes of this host; returns them.
#[pyfunction]
fn clean_stale_staging(output: PathBuf) -> Vec<String> {
    dqfast_core::writer::clean_stale_staging(&output)
        .into_iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// A fresh staging path beside `output` for this process (the name the cleaner recognizes).
#[pyfunction]
fn staging_path(py: Python<'_>, output: PathBuf) -> PyResult<String> {
    dqfast_core::writer::staging_path(&output)
        .map(|p| p.display().to_string())
        .map_err(|e| to_py(py, e))
}

/// Refuse `output` (named by the option `flag`) if it is, contains or lies inside any of
/// `inputs` — by path with symlinks and `..` resolved, or by device + inode — the rule the plan
/// engine applies, for callers that write without a plan. Raises `UnsafeOutputError`.
#[pyfunction]
#[pyo3(signature = (output, inputs, flag="--output-dir"))]
fn check_output_paths(
    py: Python<'_>,
    output: PathBuf,
    inputs: Vec<PathBuf>,
    flag: &str,
) -> PyResult<()> {
    let flag = flag.to_string();
    run_detached(py, move || {
        dqfast_core::writer::OutputGuard::new(&flag, &output, &inputs).map(|_| ())
    })
}

/// Inputs resolved once (directories walked once), to judge many outputs with the rule of
/// [`check_output_paths`] (a batch manifest: every job output against every job input).
#[pyclass(module = "dqfast._core", frozen)]
struct GuardedInputs {
    set: dqfast_core::writer::InputSet,
}

#[pymethods]
impl GuardedInputs {
    #[new]
    fn new(py: Python<'_>, inputs: Vec<PathBuf>) -> PyResult<Self> {
        let set = run_detached(py, move || dqfast_core::writer::InputSet::resolve(&inputs))?;
        Ok(GuardedInputs { set })
    }

    /// Raise `UnsafeOutputError` if `output` is, contains or lies inside one of the inputs.
    #[pyo3(signature = (output, flag="--output-dir"))]
    fn check(&self, py: Python<'_>, output: PathBuf, flag: &str) -> PyResult<()> {
        let flag = flag.to_string();
        run_detached(py, || self.set.check(&flag, &output))
    }

    /// Every input `output` overlaps: `[(index in the inputs given, UnsafeOutputError)]`.
    #[pyo3(signature = (output, flag="--output-dir"))]
    fn overlaps(
        &self,
        py: Python<'_>,
        output: PathBuf,
        flag: &str,
    ) -> PyResult<Vec<(usize, Py<PyAny>)>> {
        let flag = flag.to_string();
        let found = run_detached(py, || self.set.overlaps(&flag, &output))?;
        Ok(found
            .into_iter()
            .map(|(i, e)| (i, to_py(py, e).into_value(py).into_any()))
            .collect())
    }
}

/// Panics inside Rust on purpose, to prove a panic surfaces as `InternalError` (tests only).
#[pyfunction]
fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    run_detached(py, || -> Result<(), Error> {
        panic!("deliberate test panic")
    })
}

/// Peak resident memory of this process in bytes.
#[pyfunction]
fn peak_rss_bytes() -> u64 {
    dqfast_core::rss::peak_rss_bytes()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The format constants, written once in dqfast-core; Python imports them from here.
    m.add("E4M3_MAX", fp8::E4M3_MAX)?;
    m.add("E4M3_MAX_BYTE", fp8::E4M3_MAX_BYTE)?;
    m.add("NVFP4_BOUND", dqfast_core::nvfp4::GLOBAL_BOUND)?;
    m.add("NVFP4_GROUP", dqfast_core::nvfp4::BLOCK)?;
    m.add_function(wrap_pyfunction!(execute_plan, m)?)?;
    m.add_function(wrap_pyfunction!(read_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(read_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_e4m3, m)?)?;
    m.add_function(wrap_pyfunction!(e4m3_to_f32, m)?)?;
    m.add_function(wrap_pyfunction!(amax, m)?)?;
    m.add_function(wrap_pyfunction!(fp8_scale_from_amax, m)?)?;
    m.add_function(wrap_pyfunction!(scales_from_amax, m)?)?;
    m.add_function(wrap_pyfunction!(check_scales, m)?)?;
    m.add_function(wrap_pyfunction!(validate_plan, m)?)?;
    m.add_function(wrap_pyfunction!(plan_schema, m)?)?;
    m.add_function(wrap_pyfunction!(effective_threads, m)?)?;
    m.add_function(wrap_pyfunction!(count_nan_e4m3, m)?)?;
    m.add_function(wrap_pyfunction!(peak_rss_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(clean_stale_staging, m)?)?;
    m.add_function(wrap_pyfunction!(staging_path, m)?)?;
    m.add_function(wrap_pyfunction!(check_output_paths, m)?)?;
    m.add_class::<GuardedInputs>()?;
    nvfp4_py::register(m)?;
    block_py::register(m)?;
    ops_py::register(m)?;
    Ok(())
}
