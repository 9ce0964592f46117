"""``python -m ctxprop <command>``: one entry point, one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Optional

__all__ = ["main"]

# command -> (module, one-line help). Each module has ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS = {
    "demo": ("ctxprop._demo", "run the seed scenario with a plain pool and with ctxprop; compare the traces"),
    "spool": ("ctxprop._spool_cli", "inspect, replay or purge the offline spool"),
    "collector": ("ctxprop._collector_cli", "a local OTLP/HTTP receiver that prints traces as trees"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a ctxprop command; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m ctxprop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
