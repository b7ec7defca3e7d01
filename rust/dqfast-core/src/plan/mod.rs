//! The plan and its engine, split by responsibility:
//!
//! - [`schema`]: the plan as the Python planner writes it (JSON);
//! - [`ops`]: one file per op — its plan fields, how it resolves, how it emits its bytes;
//! - `resolve`: a plan checked against its sources, every output's dtype, shape and bytes known;
//! - `layout`: which shard each output goes to (the source's by default) and the write order;
//! - `schedule`: which source tensors are read ahead with direct I/O, and when;
//! - `pipeline`: the reader, compute and writer threads, staging and the report.

mod layout;
pub mod ops;
mod pipeline;
mod resolve;
mod schedule;
pub mod schema;

pub use ops::fp8::ScaleSpec;
pub use ops::nvfp4::NvAmax;
pub use ops::Op;
pub use pipeline::{
    effective_threads, execute, execute_json, execute_json_with, execute_with, validate,
    validate_json, Control, Progress, Report, ShardReport, TensorReport, Timings,
};
pub use schema::{plan_schema, ExtraFile, IoMode, OutTensor, Plan, SrcRef};
