"""click parameter types for dqfast's commands: a bad value fails in click, which names the flag
(``--max-shard-size '5X': not a size``) — no command sees an unchecked number."""

from __future__ import annotations

from typing import Any

import click

from dqfast.errors import DqfastError
from dqfast.plan import SIZE_EXAMPLES

__all__ = ["SizeParam", "PositiveFloat", "SIZE", "POSITIVE_FLOAT", "COUNT", "AT_LEAST_ONE"]


class SizeParam(click.ParamType):
    """A byte size (``5GB``, ``500MiB``, ``1000000``), parsed by :func:`dqfast.plan.parse_size`,
    so click names the flag in the error."""

    name = "size"

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from dqfast.plan import parse_size

        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            try:
                n = parse_size(str(value))
            except DqfastError:
                self.fail(f"'{value}': not a size ({SIZE_EXAMPLES})", param, ctx)
        if n < self.minimum:
            self.fail(f"'{value}': must be at least {self.minimum} bytes", param, ctx)
        return n


class PositiveFloat(click.ParamType):
    """A finite float > 0 (an activation amax): ``inf``, ``nan`` and ``-1`` are refused."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}': not a number", param, ctx)
        if not (math.isfinite(v) and v > 0):
            self.fail(f"'{value}': must be finite and > 0", param, ctx)
        return v


SIZE = SizeParam()
POSITIVE_FLOAT = PositiveFloat()
COUNT = click.IntRange(min=0)  # thread/core/parallelism counts: 0 = automatic
AT_LEAST_ONE = click.IntRange(min=1)
