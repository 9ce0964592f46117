"""``python -m ctxprop <command>``: one entry point, one module per command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

# command -> (module, one-line help). Each module has ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS = {
    "demo": (
        "ctxprop._devtools.demo",
        "run the seed scenario with a plain pool and with ctxprop; compare the traces",
    ),
    "spool": ("ctxprop._devtools.spool_cli", "inspect, replay or purge the offline spool"),
    "collector": ("ctxprop._devtools.collector", "a local OTLP/HTTP receiver that prints traces as trees"),
}

_DESCRIPTION = (
    "ctxprop's command-line tools: a demo of context propagation, a local trace viewer for development "
    "(collector) and the offline spool. 'COMMAND --help' tells more."
)


def _silence_stdout() -> None:
    # Whatever is still buffered for the closed pipe would fail again when Python flushes stdout at exit,
    # and print "Exception ignored ... BrokenPipeError" on stderr: point the descriptor at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real descriptor behind sys.stdout: nothing will flush to a pipe
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ctxprop command; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m ctxprop", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        # Every command ships with ctxprop: one that cannot be imported is a broken install, and must say
        # so with its traceback rather than vanish from the list of commands.
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args))
    except BrokenPipeError:
        # The reader of the output went away (`... | head -1`): it has what it asked for. End quietly, with
        # status 0 so a `set -o pipefail` script does not fail over it, instead of a traceback.
        _silence_stdout()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
