"""dqfast's exception types (defined in the Rust extension, re-exported here).

Every error raised by a build carries ``path`` and ``tensor`` attributes (``None`` when not
applicable) and a message that names the file, the tensor and the problem.
"""

from dqfast._core import (
    CheckpointError,
    DqfastError,
    DqfastIOError,
    InternalError,
    OutputExistsError,
    PlanError,
)

# Errors raised from Python (not from the Rust core) carry the attributes too, as None unless set.
DqfastError.path = None
DqfastError.tensor = None

__all__ = [
    "DqfastError",
    "CheckpointError",
    "PlanError",
    "OutputExistsError",
    "DqfastIOError",
    "InternalError",
]
