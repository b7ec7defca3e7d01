"""``python -m dqfast.cli``: the ``dqfast`` command."""

from dqfast.cli import main

if __name__ == "__main__":  # not on a plain import (tests import every module)
    main()
