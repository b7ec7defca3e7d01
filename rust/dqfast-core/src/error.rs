//! One error type for the whole crate. Every variant names the file and, where there is one,
//! the tensor, so a user can act on the message alone.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching `path`.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The safetensors header (or index json) of `path` is malformed.
    #[error("{path}: invalid header: {msg}")]
    Header { path: PathBuf, msg: String },
    /// A tensor is present but unusable (dtype, shape, values).
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// A tensor the plan needs does not exist in the checkpoint.
    #[error("{path}: tensor '{tensor}' not found")]
    MissingTensor { path: PathBuf, tensor: String },
    /// An input path is a FIFO, device or socket: opening (or reading) it could block forever.
    #[error("{path}: not a regular file ({kind}); dqfast reads only regular files")]
    NotRegular { path: PathBuf, kind: &'static str },
    /// The build was cancelled (SIGINT/SIGTERM): nothing was written at the output path.
    #[error("cancelled")]
    Cancelled,
    /// The plan handed to the engine is inconsistent.
    #[error("invalid plan: {0}")]
    Plan(String),
    /// The output exists and overwriting was not asked for.
    #[error("{0}: output already exists (pass overwrite to replace it)")]
    OutputExists(PathBuf),
    /// The output is, contains or lies inside an input: writing it could destroy that input.
    #[error("{msg}")]
    UnsafeOutput {
        output: PathBuf,
        input: PathBuf,
        msg: String,
    },
    /// A bug: a panic caught at the boundary.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
    pub fn header(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Header {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl Into<PathBuf>, tensor: &str, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}
