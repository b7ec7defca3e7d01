"""``python -m dqfast.cli``: the ``dqfast`` command."""

from dqfast.cli import main

main()
