"""``python -m ctxprop collector`` end to end: a real child process, OTLP/HTTP on loopback, real signals."""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from support import REPO, child_env, run_child

from ctxprop._devtools import collector as _collector_cli

DEADLINE = 60.0  # generous: the machine is shared by several test runs


class Collector:
    """A ``python -m ctxprop collector`` child, its stdout read line by line into a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctxprop", "collector", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=str(REPO),
        )
        self.lines: list[str] = []
        self._stderr: str | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.wait_for(lambda ln: "listening on" in ln)
        self.endpoint = first.split("listening on ")[1].split()[0]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pred: Callable[[str], bool], timeout: float = DEADLINE) -> str:
        """The first new stdout line matching ``pred``; fails the test at the deadline or at EOF."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                pytest.fail("collector printed no matching line in time:\n" + "\n".join(self.lines))
            if line is None:
                pytest.fail("collector exited early:\n" + "\n".join(self.lines) + "\n" + self.stderr())
            self.lines.append(line)
            if pred(line):
                return line

    def block_after(self, head: str) -> list[str]:
        """The lines of the printed trace block whose header line is ``head`` (up to the blank line)."""
        i = self.lines.index(head)
        while "" not in self.lines[i:]:
            self.wait_for(lambda ln: ln == "")
        j = self.lines.index("", i)
        return self.lines[i + 1 : j]

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        while True:
            line = self._queue.get_nowait()
            if line is None:
                break
            self.lines.append(line)
        return rc

    def stderr(self) -> str:
        """Everything the child wrote to stderr (once it has exited)."""
        if self._stderr is None:
            assert self.proc.stderr is not None
            self.proc.wait(DEADLINE)
            self._stderr = self.proc.stderr.read()
        return self._stderr

    def close(self) -> None:
        """Kill the child if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def start_collector() -> Iterator[Callable[..., Collector]]:
    """Start collector children; any still running at the end of the test are killed."""
    started: list[Collector] = []

    def start(*args: str) -> Collector:
        c = Collector(*args)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


def _make_spans(service: str = "shop") -> list[ReadableSpan]:
    """A root span ``checkout`` with children ``reserve`` (ok) and ``charge`` (error), in memory."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("checkout", attributes={"cart.items": 3}):
        with tracer.start_as_current_span("reserve"):
            pass
        with tracer.start_as_current_span("charge") as charge:
            charge.set_status(StatusCode.ERROR, "card declined")
    provider.shutdown()
    spans = list(memory.get_finished_spans())
    return sorted(spans, key=lambda s: s.name)  # charge, checkout, reserve


def _export(endpoint: str, spans: Sequence[ReadableSpan]) -> None:
    exporter = OTLPSpanExporter(endpoint=endpoint)
    try:
        assert exporter.export(spans) is SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()


def test_prints_a_trace_tree_after_the_quiet_period_and_stops_on_sigint(
    start_collector: Callable[..., Collector], tmp_path: Path
) -> None:
    """A trace sent by a real ctxprop process is printed as a tree with attributes and written as JSON
    lines; SIGINT then stops the collector with status 0 and nothing on stderr."""
    jsonl = tmp_path / "spans.jsonl"
    col = start_collector("--settle", "0.2", "--attributes", "--jsonl", str(jsonl))
    child = run_child(
        f"""
        import ctxprop
        from opentelemetry import trace
        ctxprop.init(service_name="billing", endpoint={col.endpoint!r}, spool_dir={str(tmp_path / "spool")!r})
        tracer = trace.get_tracer("t")
        with ctxprop.isolation_scope():
            ctxprop.set_tag("tenant", "acme")
            with tracer.start_as_current_span("invoice run"):
                with tracer.start_as_current_span("render pdf"):
                    pass
        ctxprop.close(timeout=30)  # generous: the machine may be loaded; returns once delivered
        print("sent")
        """
    )
    assert child.returncode == 0, child.stderr
    head = col.wait_for(lambda ln: ln.startswith("trace "))
    assert "2 spans" in head
    assert "services: billing" in head
    block = col.block_after(head)
    assert block[0].lstrip().startswith("invoice run [billing]")
    assert block[1].lstrip().startswith("└─ render pdf")
    assert "tenant=acme" in block[1]
    assert col.stop(signal.SIGINT) == 0
    assert col.lines[-1] == "ctxprop collector stopped"
    assert col.stderr() == ""
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["invoice run", "render pdf"]
    assert {r["service_name"] for r in rows} == {"billing"}
    assert all(r["attributes"]["tenant"] == "acme" for r in rows)


def test_a_trace_arriving_in_several_requests_is_printed_once_complete(
    start_collector: Callable[..., Collector],
) -> None:
    """Spans of one trace sent in two requests are grouped: one tree, children under the root, error shown.
    A long quiet period holds the trace back until SIGTERM, which prints what is pending and exits 0."""
    col = start_collector("--settle", "600")
    charge, checkout, reserve = _make_spans()
    _export(col.endpoint, [reserve, charge])  # children first, as a real batching exporter may do
    _export(col.endpoint, [checkout])
    assert col.stop(signal.SIGTERM) == 0
    heads = [ln for ln in col.lines if ln.startswith("trace ")]
    assert len(heads) == 1, col.lines
    assert "3 spans" in heads[0]
    block = col.lines[col.lines.index(heads[0]) + 1 :]
    assert block[0].lstrip().startswith("checkout [shop]")
    assert block[1].lstrip().startswith("├─ reserve")
    assert block[2].lstrip().startswith("└─ charge")
    assert "ERROR: card declined" in block[2]
    assert "cart.items" not in block[0]  # attributes only with --attributes
    assert col.stderr() == ""


def test_late_spans_of_a_printed_trace_are_printed_as_an_update(
    start_collector: Callable[..., Collector],
) -> None:
    """A span arriving after its trace was printed reprints the trace, marked as an update."""
    col = start_collector("--settle", "0.1")
    charge, checkout, reserve = _make_spans()
    _export(col.endpoint, [checkout, reserve])
    first = col.wait_for(lambda ln: ln.startswith("trace "))
    assert "2 spans" in first
    _export(col.endpoint, [charge])
    second = col.wait_for(lambda ln: ln.startswith("trace "))
    assert "3 spans" in second
    assert "(update: +1 spans)" in second
    assert col.stop() == 0


def _run_collector(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a collector child that is expected to exit by itself (a start-up error)."""
    return subprocess.run(
        [sys.executable, "-m", "ctxprop", "collector", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=str(REPO),
        timeout=DEADLINE,
        check=False,
    )


def test_port_in_use_is_a_clear_error() -> None:
    """A port that is taken: exit status 2 and a one-line reason, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _run_collector("--port", str(port))
    assert out.returncode == 2
    assert out.stderr.startswith(f"ctxprop collector: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in out.stderr


def test_unwritable_jsonl_is_a_clear_error(tmp_path: Path) -> None:
    """--jsonl into a missing directory: exit status 2 and a one-line reason, before listening."""
    target = tmp_path / "missing" / "spans.jsonl"
    out = _run_collector("--port", "0", "--jsonl", str(target))
    assert out.returncode == 2
    assert out.stderr == f"ctxprop collector: cannot write {target}: No such file or directory\n"
    assert out.stdout == ""


def test_a_reader_that_goes_away_ends_the_collector_quietly() -> None:
    """`collector | head -1`: once the reader closed the pipe, the next trace ends the collector with
    status 0 and nothing on stderr (no BrokenPipeError traceback)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxprop", "collector", "--port", "0", "--settle", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=str(REPO),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "listening on" in first, first
        proc.stdout.close()  # what `head -1` does after its line; every later write hits a closed pipe
        _export(first.split("listening on ")[1].split()[0], _make_spans())
        rc = proc.wait(DEADLINE)
        assert proc.stderr is not None
        assert proc.stderr.read() == ""
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_jsonl_file_that_cannot_be_written_is_reported_once_and_trees_still_print(
    start_collector: Callable[..., Collector],
) -> None:
    """--jsonl on a full disk (/dev/full): one line on stderr, every request still answered 200 (so the
    sender does not resend and no span is shown twice), and the trees keep printing."""
    col = start_collector("--settle", "0.1", "--jsonl", "/dev/full")
    charge, checkout, reserve = _make_spans()
    _export(col.endpoint, [checkout, reserve])  # asserts the export succeeded on its first attempt
    first = col.wait_for(lambda ln: ln.startswith("trace "))
    assert "2 spans" in first
    assert "update" not in first
    _export(col.endpoint, [charge])
    second = col.wait_for(lambda ln: ln.startswith("trace "))
    assert "3 spans" in second
    assert "(update: +1 spans)" in second
    assert col.stop() == 0
    assert col.stderr() == (
        "ctxprop collector: writing /dev/full failed (No space left on device); no longer writing it\n"
    )


def _spans_of(trace_id: str, n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(trace_id=trace_id, span_id=f"{trace_id}-{i}") for i in range(n)]


def test_printed_traces_are_forgotten_beyond_the_retention_bound() -> None:
    """Only the most recently printed traces are kept for updates: an older one's late span starts a new
    tree instead of an update, and its spans are no longer held in memory."""
    traces = _collector_cli._Traces(0.0, None, keep_printed=2)
    stop = threading.Event()
    for t in ("t1", "t2", "t3"):
        traces.add(_spans_of(t, 2))
        assert [(tid, before) for tid, _, before in traces.wait_ready(stop)] == [(t, 0)]
    assert sorted(traces._spans) == ["t2", "t3"]
    traces.add(_spans_of("t1", 1))  # late span of a forgotten trace
    traces.add(_spans_of("t3", 1))  # late span of a kept one
    ready = {tid: (len(spans), before) for tid, spans, before in traces.wait_ready(stop)}
    assert ready == {"t1": (1, 0), "t3": (3, 2)}


def test_the_receiver_keeps_no_copy_of_what_the_collector_holds() -> None:
    """The collector's receiver hands each request's spans to the trace table and keeps none itself, so
    memory is bounded by the retention of printed traces alone."""
    traces = _collector_cli._Traces(600.0, None)
    receiver = _collector_cli._make_receiver("127.0.0.1", 0, traces)
    with receiver:
        _export(receiver.endpoint, _make_spans())
        assert receiver.spans == []
    stop = threading.Event()
    stop.set()
    [(_, spans, _)] = traces.wait_ready(stop)
    assert sorted(s.name for s in spans) == ["charge", "checkout", "reserve"]
