"""``python -m ctxprop spool status|replay|purge``: look into, send or empty the offline spool.

``--dir`` names the spool directory; without it the one ``init()`` would use for ``--service`` (default
``OTEL_SERVICE_NAME``) is taken. ``replay`` sends to ``--endpoint``, else to the endpoint ``init()`` would
resolve from the environment.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from ctxprop._spool import Spool, SpoolStatus, default_spool_dir

__all__ = ["add_arguments", "make_sender", "resolve_endpoint", "run"]

_DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
_PROGRESS_MIN_SEGMENTS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``spool`` sub-commands to ``parser``."""
    parser.add_argument("--dir", help="spool directory (default: the one init() would use)")
    parser.add_argument("--service", help="service name that selects the default directory")
    sub = parser.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    status = sub.add_parser("status", help="segments, spans, bytes, oldest age and drops")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    replay = sub.add_parser("replay", help="send what the spool holds now")
    replay.add_argument("--endpoint", help="OTLP/HTTP traces URL (default: as init() resolves it)")
    replay.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    sub.add_parser("purge", help="delete everything the spool holds")


def resolve_endpoint(explicit: Optional[str] = None) -> str:
    """The traces URL ``init()`` would use: explicit, else the OTLP environment, else the default.

    Raises ValueError for a malformed URL, as ``init()`` does.
    """
    try:
        config = importlib.import_module("ctxprop._config")
    except ImportError:
        config = None
    resolve = getattr(config, "resolve_endpoint", None)
    if callable(resolve):
        return str(resolve(explicit))
    if explicit:
        return explicit
    traces = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return _DEFAULT_ENDPOINT


def make_sender(endpoint: str) -> Callable[[bytes, float], object]:
    """``send(payload, timeout)`` posting spooled OTLP bytes as the pipeline does.

    The pipeline's own sender (official exporter transport, keep-alive) when present, else a plain
    ``requests`` session (the exporter's HTTP library). Headers come from
    ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` / ``OTEL_EXPORTER_OTLP_HEADERS``.
    """
    from opentelemetry.util.re import parse_env_headers

    env = os.environ
    raw = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS", "")
    headers = dict(parse_env_headers(raw, liberal=True))
    try:
        from ctxprop._export import OTLPSender
    except ImportError:
        pass
    else:
        return OTLPSender(endpoint, headers=headers)
    import requests

    headers["Content-Type"] = "application/x-protobuf"
    session = requests.Session()

    def send(payload: bytes, timeout: float) -> bool:
        try:
            answer = session.post(endpoint, data=payload, headers=headers, timeout=max(0.05, timeout))
        except requests.RequestException:
            return False
        return 200 <= answer.status_code < 300

    return send


def _say(text: str, stream: Optional[TextIO] = None) -> None:
    # A command's output is its interface; the library itself never prints.
    out = sys.stdout if stream is None else stream
    out.write(text + "\n")


def _directory(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir)
    return default_spool_dir(args.service or os.environ.get("OTEL_SERVICE_NAME") or None)


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
    before = spool.status()
    try:
        endpoint = resolve_endpoint(args.endpoint)
    except ValueError as exc:
        _say(f"cannot replay: {exc}", sys.stderr)
        return 2
    send = make_sender(endpoint)
    progress = _Progress(before.spans, before.segments, sys.stderr)
    sent = spool.replay(send, time.monotonic() + args.timeout, progress=progress.advance)
    progress.finish()
    after = spool.status()
    _say(f"sent {sent} spans to {endpoint}; {after.spans} spans in {after.segments} segments remain")
    return 0 if after.segments == 0 else 1


def run(args: argparse.Namespace) -> int:
    """Run one ``spool`` action; 0 on success, 1 if something could not be sent, 2 if the dir is unusable."""
    directory = _directory(args)
    if not os.path.lexists(directory):
        # Nothing was ever spooled there: say so without creating the directory.
        if args.spool_command == "status":
            empty = SpoolStatus(str(directory), 0, 0, 0, None, 0, 0, 0, memory_only=False)
            _print_status(empty, args.json, sys.stdout)
        else:
            _say(f"nothing to {args.spool_command}: {directory} does not exist")
        return 0
    with Spool.open(directory) as spool:
        if spool.status().memory_only:
            _say(f"cannot use the spool at {directory} (see the warning above)", sys.stderr)
            return 2
        if args.spool_command == "status":
            _print_status(spool.status(), args.json, sys.stdout)
            return 0
        if args.spool_command == "replay":
            return _replay(spool, args)
        removed = spool.purge()
        _say(f"purged {removed} spans from {directory}")
        return 0
