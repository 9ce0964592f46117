"""``python -m ctxprop demo``: the seed scenario with a plain pool, then with ctxprop; compare the traces.

The scenario: an asyncio loop, a 2-thread pool, N rounds; each round is a span with a scope tag
``round=N``, and three ``loop.run_in_executor`` calls whose workers start child spans and set a tag of
their own (``worker=J``). It runs twice through the real pipeline (``ctxprop.init(endpoint=...)`` and
``ctxprop.close()``) against a collector embedded in this process on a free loopback port: once with a
plain ``ThreadPoolExecutor``, once with the very same code but ``ctxprop.ContextAwareThreadPoolExecutor``.

The user's ``OTEL_*`` settings are ignored (removed from this process's environment): they are for
their applications, and a sampler or an attribute limit would falsify the comparison.

``init()`` sets one process-wide provider, so both runs share one pipeline; every span carries
``demo.run`` (plain / ctxprop), ``demo.round`` and, for workers, ``demo.worker``, set from the function's
arguments, never from context, so the counts below are honest whatever the context did:
- orphaned: a worker span whose parent is not its own round's span;
- lost tags: a worker span that did not get its round's ``round`` tag;
- leaked tag: a worker span that started with a ``worker`` tag, which only another task could have set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

_RUNS = ("plain", "ctxprop")
_TITLES = {
    "plain": "plain ThreadPoolExecutor + loop.run_in_executor",
    "ctxprop": "ctxprop.ContextAwareThreadPoolExecutor, same code",
}
_WORKERS_PER_ROUND = 3


def _say(text: str = "") -> None:
    # The command's output: the report goes to stdout, and only there.
    sys.stdout.write(text + "\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m ctxprop demo``."""
    parser.add_argument("--rounds", type=_positive_int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML waterfall here")


def _work(tracer: Any, run_name: str, rnd: int, job: int) -> None:
    from ctxprop import set_tag

    attrs = {"demo.run": run_name, "demo.round": rnd, "demo.worker": job}
    with tracer.start_as_current_span(f"worker {rnd}.{job}", attributes=attrs):
        # A tag of the task's own: with a plain pool it stays on the reused thread for the next task.
        set_tag("worker", job)
        time.sleep(0.002)  # some work, so the waterfall shows two threads serving three calls


async def _scenario(tracer: Any, run_name: str, rounds: int) -> None:
    from ctxprop import ContextAwareThreadPoolExecutor, isolation_scope, set_tag

    loop = asyncio.get_running_loop()
    pool_class = ContextAwareThreadPoolExecutor if run_name == "ctxprop" else ThreadPoolExecutor
    with pool_class(max_workers=2, thread_name_prefix=f"demo-{run_name}") as pool:
        for rnd in range(1, rounds + 1):
            with isolation_scope():
                set_tag("round", rnd)
                attrs = {"demo.run": run_name, "demo.round": rnd}
                with tracer.start_as_current_span(f"round {rnd}", attributes=attrs):
                    await asyncio.gather(
                        *(
                            loop.run_in_executor(pool, _work, tracer, run_name, rnd, job)
                            for job in range(1, _WORKERS_PER_ROUND + 1)
                        )
                    )


class _Verdict:
    """The counts of one run, from the spans the collector received."""

    def __init__(self, spans: Sequence[Any]) -> None:
        rounds = {s.attributes.get("demo.round"): s for s in spans if "demo.worker" not in s.attributes}
        self.workers = [s for s in spans if "demo.worker" in s.attributes]
        self.orphaned = set()
        self.lost_tags = set()
        self.leaked = set()
        for w in self.workers:
            mine = rounds.get(w.attributes["demo.round"])
            if mine is None or w.parent_span_id != mine.span_id or w.trace_id != mine.trace_id:
                self.orphaned.add(w.span_id)
            if w.attributes.get("round") != w.attributes["demo.round"]:
                self.lost_tags.add(w.span_id)
            if "worker" in w.attributes:
                self.leaked.add(w.span_id)

    def note(self, span: Any) -> str | None:
        if span.span_id not in self.orphaned:
            return None
        why = "new trace, no parent" if span.parent_span_id is None else "wrong parent"
        return f"<- ORPHAN: not under round {span.attributes['demo.round']} ({why})"


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    from opentelemetry import trace

    import ctxprop
    from ctxprop._devtools import tree as _tree
    from ctxprop._devtools.receiver import OTLPReceiver

    rounds: int = args.rounds
    expected = len(_RUNS) * rounds * (1 + _WORKERS_PER_ROUND)
    # The demo shows ctxprop, not the user's tracing set-up: a sampler, OTEL_SDK_DISABLED or attribute
    # limits meant for their apps would empty or falsify the comparison, and a bad value would stop it.
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[name]
    with tempfile.TemporaryDirectory(prefix="ctxprop-demo-spool-") as spool, OTLPReceiver() as collector:
        # A private spool: the demo must neither replay someone's old spans nor leave any behind.
        ctxprop.init(service_name="ctxprop-demo", endpoint=collector.endpoint, spool_dir=spool)
        tracer = trace.get_tracer("ctxprop.demo")
        for run_name in _RUNS:
            asyncio.run(_scenario(tracer, run_name, rounds))
        # The collector is in this process and healthy: a generous deadline only matters on a machine so
        # loaded that 3 s would not do; close() returns as soon as everything is delivered.
        ctxprop.close(timeout=30.0)
        collector.wait_for_spans(expected, 10.0)
        received = collector.spans

    by_run = {name: [s for s in received if s.attributes.get("demo.run") == name] for name in _RUNS}
    verdicts = {name: _Verdict(spans) for name, spans in by_run.items()}
    n = rounds * _WORKERS_PER_ROUND
    out = [
        f"ctxprop demo: {rounds} rounds x {_WORKERS_PER_ROUND} run_in_executor calls on a 2-thread pool,",
        f"sent through ctxprop.init()/close() to a collector on {collector.base_url}",
    ]
    for name in _RUNS:
        out += ["", f"== {name}: {_TITLES[name]}"]
        out += _tree.render_forest(
            by_run[name], attributes=["round", "worker"], note=verdicts[name].note, show_service=False
        )
    tag_lines = [
        f"{name + ':':8} {len(v.lost_tags)}/{n} worker spans missing their round's tag; "
        f"{len(v.leaked)}/{n} started with a tag another task set"
        for name, v in verdicts.items()
    ]
    out += ["", *tag_lines]
    if args.html:
        from ctxprop._devtools.html import Section, render_waterfall

        page = render_waterfall(
            [Section(name, f"{name}: {_TITLES[name]}", by_run[name], verdicts[name].note) for name in _RUNS],
            title="ctxprop demo: the same asyncio code, plain pool vs ctxprop",
            summary=[*tag_lines, _last_line(verdicts, n)],
            attributes=["round", "worker"],
        )
        # Written before anything is printed: a reader that stops early (`| head`) must not cost the file.
        try:
            Path(args.html).write_text(page, encoding="utf-8")
        except OSError as exc:
            sys.stderr.write(f"ctxprop demo: cannot write {args.html}: {exc.strerror or exc}\n")
            return 2
        out.append(f"HTML waterfall written to {args.html}")
    complete = len(received) >= expected
    if complete:
        out.append(_last_line(verdicts, n))
    for line in out:
        _say(line)
    if not complete:
        sys.stderr.write(f"ctxprop demo: the collector received {len(received)} of {expected} spans\n")
        return 1
    return 0


def _last_line(verdicts: dict[str, _Verdict], n: int) -> str:
    plain, ours = verdicts["plain"], verdicts["ctxprop"]
    return f"plain: {len(plain.orphaned)}/{n} worker spans orphaned; ctxprop: {len(ours.orphaned)}/{n}"
