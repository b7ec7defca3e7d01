"""The ``dqfast`` command line: a thin layer over the Python API, one module per command group.

``build`` (one command per registered builder, generated from :mod:`dqfast.builders`),
``inspect``/``check``, ``verify``, ``presets``, ``demo``, ``ptq``, ``batch``; ``_format`` maps
errors to one ``error:`` line and an exit status (2: bad input), ``_types`` checks flag values.
"""

from __future__ import annotations

import click

from dqfast.cli import batch, build, demo, inspect, presets, ptq, verify
from dqfast.cli._format import OneLineGroup

__all__ = ["main"]


@click.group(cls=OneLineGroup, context_settings=dict(help_option_names=["-h", "--help"]))  # inherited by every subcommand
@click.version_option(package_name="dqfast")
def main() -> None:
    """Convert diffusion-transformer checkpoints to FP8 / NVFP4 for SGLang Diffusion and vLLM-Omni."""


# Every subcommand is registered here, unconditionally: their modules import only click and
# dqfast, so a broken one fails loudly instead of vanishing from --help; optional extras (torch,
# modelopt, ray) are imported when a command runs, and a missing one is a one-line error (main).
for _cmd in (
    build.build,
    inspect.inspect_cmd,
    inspect.check_cmd,
    verify.verify,
    presets.presets_cmd,
    demo.demo_cmd,
    ptq.ptq,
    batch.batch,
):
    main.add_command(_cmd)


def _help_everywhere(cmd: click.Command) -> None:
    # On each command too, not only the root's context: click caches a command's help option from
    # the first context it sees, which is not the root's when a command is run on its own.
    cmd.context_settings.setdefault("help_option_names", ["-h", "--help"])
    for sub in getattr(cmd, "commands", {}).values():
        _help_everywhere(sub)


_help_everywhere(main)
