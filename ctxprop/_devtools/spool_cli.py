"""``python -m ctxprop spool status|replay|purge``: look into, send or empty the offline spool.

``--dir`` names the spool directory; without it the one ``init()`` would use for ``--service`` (default
``OTEL_SERVICE_NAME``) is taken, and where nothing names a service (nor ``CTXPROP_SPOOL_DIR``), ``status``
and ``replay`` take every service's spool under the state directory (``purge`` then asks for a name).
``replay`` sends to ``--endpoint``, else to the endpoint ``init()`` would resolve from the environment,
with the same ``OTEL_EXPORTER_OTLP_*`` headers and compression.
Exit status: 0 done, 1 something could not be sent (or was refused by the collector), 2 unusable spool
directory or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

from ctxprop import _stats
from ctxprop._config import build_config, redact_url
from ctxprop._spool import Spool, SpoolStatus, default_spool_dir
from ctxprop._transport import OTLPSender

__all__ = ["add_arguments", "make_sender", "run"]

_PROGRESS_MIN_SEGMENTS = 20


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spool`` sub-commands to ``parser``."""
    parser.add_argument("--dir", help="spool directory (default: the one init() would use)")
    parser.add_argument("--service", help="service name that selects the default directory")
    sub = parser.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    status = sub.add_parser("status", help="segments, spans, bytes, oldest age and drops")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    replay = sub.add_parser("replay", help="send what the spool holds now")
    replay.add_argument("--endpoint", help="OTLP/HTTP traces URL (default: as init() resolves it)")
    replay.add_argument(
        "--timeout", type=_positive_seconds, default=60.0, help="give up after this many seconds"
    )
    sub.add_parser("purge", help="delete everything the spool holds")


def make_sender(endpoint: str | None = None) -> OTLPSender:
    """The sender ``init()`` would build: ``endpoint`` (else resolved from the environment), with the
    ``OTEL_EXPORTER_OTLP_*`` headers and compression. Raises ValueError for a bad setting, as ``init()``."""
    cfg = build_config(endpoint=endpoint)
    return OTLPSender(cfg.endpoint, headers=cfg.headers, compression=cfg.compression)


def _say(text: str, stream: TextIO | None = None) -> None:
    # A command's output is its interface; the library itself never prints.
    out = sys.stdout if stream is None else stream
    out.write(text + "\n")


def _directories(args: argparse.Namespace) -> list[Path]:
    if args.dir:
        return [Path(args.dir)]
    service = args.service or os.environ.get("OTEL_SERVICE_NAME") or None
    if service is not None or os.environ.get("CTXPROP_SPOOL_DIR"):
        return [default_spool_dir(service)]
    # Nothing names a service: every service's spool under the state directory, since an app that called
    # init(service_name="billing") spools to .../ctxprop/billing, not to the unnamed service's directory.
    default = default_spool_dir(None)
    root = default.parent
    try:
        found = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        found = []
    return found or [default]


def _print_status(st: SpoolStatus, as_json: bool, out: TextIO) -> None:
    if as_json:
        _say(json.dumps(st.__dict__), out)
        return
    age = "-" if st.oldest_age is None else f"{st.oldest_age:.1f} s"
    _say(f"spool:     {st.directory}", out)
    _say(f"segments:  {st.segments}", out)
    _say(f"spans:     {st.spans}", out)
    _say(f"bytes:     {st.bytes}", out)
    _say(f"oldest:    {age}", out)
    _say(f"dropped:   {st.dropped} spans (size or age cap)", out)
    _say(f"corrupt:   {st.corrupt} records skipped", out)
    _say(f"rejected:  {st.rejected} spans refused for good by the collector", out)
    _say(f"in flight: {st.leased} segments being sent by running processes", out)


class _Progress:
    """A one-line bar on stderr, drawn only for a terminal and a spool worth waiting for."""

    def __init__(self, total_spans: int, segments: int, stream: TextIO) -> None:
        self.total = max(1, total_spans)
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty() and segments >= _PROGRESS_MIN_SEGMENTS

    def advance(self, spans: int) -> None:
        self.done += spans
        if self.enabled:
            filled = int(30 * min(1.0, self.done / self.total))
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\rreplaying [{bar}] {self.done}/{self.total} spans")
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _replay(spool: Spool, args: argparse.Namespace) -> int:
    try:
        send = make_sender(args.endpoint)
    except ValueError as exc:
        _say(f"cannot replay: {exc}", sys.stderr)
        return 2
    before = spool.status()
    rejected_before = _stats.snapshot().get("spool_rejected_spans", 0)
    progress = _Progress(before.spans, before.segments, sys.stderr)
    sent = spool.replay(send, time.monotonic() + args.timeout, progress=progress.advance)
    progress.finish()
    rejected = _stats.snapshot().get("spool_rejected_spans", 0) - rejected_before
    after = spool.status()
    refused = f"; {rejected} spans refused for good by the collector (dropped)" if rejected else ""
    _say(
        f"sent {sent} spans to {redact_url(send.endpoint)}{refused}; "
        f"{after.spans} spans in {after.segments} segments remain"
    )
    return 0 if after.segments == 0 and not rejected else 1


def run(args: argparse.Namespace) -> int:
    """Run one ``spool`` action; 0 on success, 1 if something could not be sent, 2 if unusable."""
    directories = _directories(args)
    if args.spool_command == "purge" and len(directories) > 1:
        names = ", ".join(d.name for d in directories)
        _say(f"several services have a spool ({names}): name one with --service or --dir", sys.stderr)
        return 2
    return max(_run_one(directory, args) for directory in directories)


def _run_one(directory: Path, args: argparse.Namespace) -> int:
    if not os.path.lexists(directory):
        # Nothing was ever spooled there: say so without creating the directory.
        if args.spool_command == "status":
            empty = SpoolStatus(str(directory), 0, 0, 0, None, 0, 0, 0, memory_only=False)
            _print_status(empty, args.json, sys.stdout)
        else:
            _say(f"nothing to {args.spool_command}: {directory} does not exist")
        return 0
    with warnings.catch_warnings():
        # The library's warning speaks of spans kept in memory; here the reason alone is the message.
        warnings.filterwarnings("ignore", "ctxprop: the offline spool is unusable", RuntimeWarning)
        # status only looks: opening it must not run the housekeeping that drops and recovers.
        spool = Spool.open(directory, read_only=args.spool_command == "status")
    with spool:
        if spool.problem is not None:
            _say(f"cannot use the spool at {directory}: {spool.problem}", sys.stderr)
            return 2
        if args.spool_command == "status":
            _print_status(spool.status(), args.json, sys.stdout)
            return 0
        if args.spool_command == "replay":
            return _replay(spool, args)
        removed = spool.purge()
        _say(f"purged {removed} spans from {directory}")
        return 0
