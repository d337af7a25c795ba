"""Running one of ``fedge``'s command groups on its own (``python -m fedge.tools.keys ...``).

Each tool module registers its commands with an ``add_parser(subparsers)``; the ``fedge`` CLI
adds them all, and this runs one group alone with the same error rule: a fedge error is one
``fedge: error: ...`` line on stderr and exit code 2. Standard library only, so a tool stays
importable without the services' dependencies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fedge.protocol.errors import FedgeError

#: A usage or input error (argparse's own code for the same).
EXIT_USAGE = 2


def run_alone(add_parser: Callable[[Any], Any], description: str, argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` with the commands ``add_parser`` registers and runs the chosen one."""
    parser = argparse.ArgumentParser(prog="fedge", description=description)
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except FedgeError as exc:
        print(f"fedge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
