"""Every way a process ends still delivers its spans: real child processes against the loopback collector."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
import support
from support import OTLPReceiver, run_child

receiver = support.receiver

N = 1000

PRELUDE = f"""
import json, os, signal, sys, time
import ctxprop
from opentelemetry import trace

def make_spans(prefix, n={N}):
    tracer = trace.get_tracer("endings")
    for i in range(n):
        with tracer.start_as_current_span(f"{{prefix}}-{{i}}") as s:
            s.set_attribute("pid", os.getpid())

def ready(**extra):
    print(json.dumps({{"ready": True, **extra}}), flush=True)

def linger(seconds=60):
    # Short sleeps: Python runs a signal's handler between bytecodes, so a signal that lands after the
    # last check and before one long sleep starts would wait the whole sleep out (the parent signals the
    # moment it reads "ready"). A loop sees it within 20 ms.
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
"""

INIT = 'ctxprop.init(service_name="endings", endpoint=os.environ["EP"]{kw})\n'


def _code(body: str, *, kw: str = "", before_init: str = "") -> str:
    return PRELUDE + before_init + INIT.format(kw=kw) + body


def _env(rx: OTLPReceiver, tmp_path: Path) -> dict[str, str]:
    return {"EP": rx.endpoint, "CTXPROP_SPOOL_DIR": str(tmp_path / "spool")}


def _assert_all(rx: OTLPReceiver, prefix: str = "main", n: int = N) -> None:
    names = Counter(s.name for s in rx.spans if s.name.startswith(prefix + "-"))
    assert len(names) == n, f"{len(names)}/{n} distinct spans arrived"
    dupes = {k: v for k, v in names.items() if v > 1}
    assert not dupes, f"duplicates: {list(dupes.items())[:5]}"


def test_close_delivers_all(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """close() sends all 1000 spans before it returns; exit status 0, stderr empty."""
    res = run_child(
        _code('make_spans("main")\nctxprop.close()\nready(after_close=True)\n'),
        env=_env(receiver, tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    _assert_all(receiver)  # already there: close() returned before the child printed
    assert res.last("after_close") is True


def test_normal_exit_delivers_all(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """A script that just ends (no close()) delivers through the atexit backup."""
    res = run_child(_code('make_spans("main")\nready()\n'), env=_env(receiver, tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    _assert_all(receiver)


def test_sys_exit_status_kept(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """sys.exit(7) delivers and keeps status 7."""
    res = run_child(_code('make_spans("main")\nsys.exit(7)\n'), env=_env(receiver, tmp_path))
    assert res.returncode == 7
    assert res.stderr == ""
    _assert_all(receiver)


def test_unhandled_exception_delivers_all(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """An unhandled exception still delivers; status 1 and the traceback are Python's own."""
    res = run_child(_code('make_spans("main")\nraise RuntimeError("boom")\n'), env=_env(receiver, tmp_path))
    assert res.returncode == 1
    assert "RuntimeError: boom" in res.stderr
    assert "ctxprop" not in res.stderr.split("RuntimeError")[-1]
    _assert_all(receiver)


def test_sigterm_without_handler_dies_by_sigterm(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """SIGTERM flushes, then the process still dies by SIGTERM (status -15), silently."""
    res = run_child(
        _code('make_spans("main")\nready()\nlinger()\n'),
        env=_env(receiver, tmp_path),
        signal_after_line='"ready"',
        sig=signal.SIGTERM,
    )
    assert res.signalled
    assert res.returncode == -signal.SIGTERM
    assert res.stderr == ""
    _assert_all(receiver)


APP_HANDLER = """
def on_term(signum, frame):
    print(json.dumps({"app_handler": signum}), flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("when", ["before_init", "after_init"])
def test_sigterm_chains_app_handler(receiver: OTLPReceiver, tmp_path: Path, when: str) -> None:
    """An app SIGTERM handler set before or after init() still runs (its exit status wins); spans arrive."""
    install = "signal.signal(signal.SIGTERM, on_term)\n"
    before = APP_HANDLER + (install if when == "before_init" else "")
    after = install if when == "after_init" else ""
    body = after + (
        'assert signal.getsignal(signal.SIGTERM) is on_term\nmake_spans("main")\nready()\nlinger()\n'
    )
    res = run_child(
        _code(body, before_init=before),
        env=_env(receiver, tmp_path),
        signal_after_line='"ready"',
        sig=signal.SIGTERM,
    )
    assert res.signalled
    assert res.returncode == 3, res.stderr
    assert res.last("app_handler") == signal.SIGTERM
    assert res.stderr == ""
    _assert_all(receiver)


def test_handle_signals_false_leaves_sigterm_alone(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """With handle_signals=False ctxprop installs no SIGTERM handler (the default action stays)."""
    res = run_child(
        _code(
            "ready(default=signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\nctxprop.close()\n",
            kw=", handle_signals=False",
        ),
        env=_env(receiver, tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert res.last("default") is True


def test_sigint_keyboardinterrupt_delivers(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT -> KeyboardInterrupt) delivers; the status stays Python's own (-2)."""
    res = run_child(
        _code('make_spans("main")\nready()\nlinger()\n'),
        env=_env(receiver, tmp_path),
        signal_after_line='"ready"',
        sig=signal.SIGINT,
    )
    assert res.signalled
    assert res.returncode == -signal.SIGINT
    assert "KeyboardInterrupt" in res.stderr
    _assert_all(receiver)


def test_fork_children_deliver_their_own_spans(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """Forked children deliver their own 1000 spans each, never the parent's queued ones, exactly once."""
    body = """
make_spans("parent")  # still queued at fork time: the children must not send these
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        make_spans(f"child{k}")
        sys.exit(0)
    kids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids]
ready(codes=codes)
"""
    res = run_child(_code(body, kw=", schedule_delay=30"), env=_env(receiver, tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.last("codes") == [0, 0]
    assert res.stderr == ""
    _assert_all(receiver, "parent")
    _assert_all(receiver, "child0")
    _assert_all(receiver, "child1")
    assert len(receiver.spans) == 3 * N


@pytest.mark.parametrize("mode", ["refuse", "slow", "die", "503"])
def test_collector_unavailable_close_is_bounded_and_silent(tmp_path: Path, mode: str) -> None:
    """Collector refusing, hanging, dying mid-request or 503: close() returns by its 2 s deadline, rc 0,
    silent."""
    rx = OTLPReceiver(mode="ok" if mode == "refuse" else mode, delay=60, retry_after=1).start()
    if mode == "refuse":
        rx.stop()
    try:
        body = """
make_spans("main")
t0 = time.monotonic()
ctxprop.close()
ready(close_s=time.monotonic() - t0, stats=ctxprop.stats())
"""
        res = run_child(_code(body, kw=", close_timeout=2.0"), env=_env(rx, tmp_path))
    finally:
        rx.stop()
    assert res.returncode == 0
    assert res.stderr == ""
    close_s = res.last("close_s")
    assert close_s < 2.0 + 1.5, f"close() took {close_s:.2f}s"
    stats = res.last("stats")
    assert stats.get("exported", 0) == 0
    assert stats.get("spooled", 0) == N  # what close() could not send waits in the spool
    if mode in ("503", "die"):
        assert stats.get("retried", 0) > 0


def test_sigterm_graceful_app_handler_keeps_running(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """An app handler that only sets a stop flag keeps control: the process finishes its work, exits 0,
    and the spans made after the signal arrive too."""
    body = """
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
make_spans("main")
os.kill(os.getpid(), signal.SIGTERM)
while not stop:
    time.sleep(0.01)
make_spans("after")
ready(stop=stop)
"""
    res = run_child(_code(body), env=_env(receiver, tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.last("stop") == [signal.SIGTERM]
    assert res.stderr == ""
    _assert_all(receiver)
    _assert_all(receiver, "after")


def test_sigterm_ignored_by_the_app_stays_ignored(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """If the app ignores SIGTERM before init(), ctxprop does not overrule it: the process survives it."""
    body = """
os.kill(os.getpid(), signal.SIGTERM)
make_spans("main")
ready(alive=True)
"""
    res = run_child(
        _code(body, before_init="signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"),
        env=_env(receiver, tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert res.last("alive") is True
    _assert_all(receiver)



def test_sigterm_while_main_thread_counts_a_drop(tmp_path: Path) -> None:
    """SIGTERM handled while the main thread is counting a dropped span (queue full) and the worker is
    mid-export: the handler's close() neither deadlocks nor waits out its deadline; every span arrives."""
    with OTLPReceiver(mode="slow", delay=0.5) as rx:
        body = """
proc = ctxprop._pipeline.current_processor()
make_spans("main")  # 2 batches: the worker takes the first to the (slow) collector
while proc._inflight is None:
    time.sleep(0.005)
def at_drop(frame, event, arg):
    # Right after the first C call inside the processor's _count() returns (taking a lock, if it takes
    # one): the handler runs here, in the middle of the counting.
    if event == "c_return" and frame.f_code.co_name == "_count":
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGTERM)
proc._limit = 0  # as if the queue were full: the next span is dropped and counted
sys.setprofile(at_drop)
trace.get_tracer("endings").start_span("dropped").end()
sys.setprofile(None)
time.sleep(30)
"""
        kw = ", max_export_batch_size=500, schedule_delay=60"
        res = run_child(_code(body, kw=kw), env=_env(rx, tmp_path), timeout=30)
        assert res.returncode == -signal.SIGTERM, res.stderr
        assert res.stderr == ""
        _assert_all(rx)


def test_sigterm_during_close_lets_close_finish_then_dies(tmp_path: Path) -> None:
    """SIGTERM arriving while close() is already running (collector hanging) does not cut it short: close()
    still writes every span to the spool by its deadline, then the process dies by SIGTERM."""
    from ctxprop._spool import Spool

    with OTLPReceiver(mode="slow", delay=60) as rx:
        body = """
import threading
proc = ctxprop._pipeline.current_processor()
make_spans("main")
def terminate_once_close_sends():
    while proc._inflight is None:
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=terminate_once_close_sends, daemon=True).start()
ctxprop.close()
ready(after_close=True)
"""
        kw = ", max_export_batch_size=2000, schedule_delay=60, close_timeout=2.0"
        res = run_child(_code(body, kw=kw), env=_env(rx, tmp_path), timeout=30)
    assert res.returncode == -signal.SIGTERM, res.stderr
    assert res.stderr == ""
    assert not any("after_close" in ln for ln in res.stdout_lines)  # it died at the end of close()
    assert Spool.open(tmp_path / "spool").status().spans == N


def test_fork_during_another_threads_close_child_still_dies_by_sigterm(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """A child forked while another thread was in close() (aclose) is not left thinking a close runs:
    SIGTERM still flushes the child's spans and kills it."""
    body = """
import threading
from ctxprop import _lifecycle
in_close, forked = threading.Event(), threading.Event()
def closer():
    with _lifecycle.closing():  # as aclose()'s thread is while it closes
        in_close.set()
        forked.wait(30)
threading.Thread(target=closer, daemon=True).start()
in_close.wait(30)
pid = os.fork()
if pid == 0:
    make_spans("child")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    os._exit(5)
forked.set()
ready(child=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    res = run_child(_code(body), env=_env(receiver, tmp_path), timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.last("child") == -signal.SIGTERM
    _assert_all(receiver, "child")


def test_spans_ended_in_a_later_atexit_handler_arrive_without_error(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """Spans that end in an atexit handler registered after init() (it runs before ctxprop's own close)
    arrive, and ending them raises nothing even where no thread may start then (Python 3.12+)."""
    body = """
import atexit
def late():
    make_spans("main")  # the processor's first spans: its worker thread starts only now
    print(json.dumps({"late_done": True}), flush=True)
atexit.register(late)
ready()
"""
    init = (
        "from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter\n"
        'ctxprop.init(exporter=OTLPSpanExporter(endpoint=os.environ["EP"]))\n'
    )
    res = run_child(PRELUDE + init + body, env=_env(receiver, tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.last("late_done") is True
    _assert_all(receiver)


def test_sigterm_while_main_thread_flushes_keeps_the_batch_it_was_encoding(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """SIGTERM handled while the main thread waits in flush() and the export thread is mid-batch (popped,
    being encoded): close() does not wait out its deadline, and that batch is kept (sent or spooled)."""
    from ctxprop._spool import Spool

    body = """
ENCODE = ("encode", "ctxprop._encoding")
import threading
def at_encode(frame, event, arg):
    # ctxprop._encoding.encode(): the batch is popped, not yet sent
    if event == "call" and (frame.f_code.co_name, frame.f_globals["__name__"]) == ENCODE:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGTERM)
threading.setprofile(at_encode)  # the export thread, started by the first span, encodes
make_spans("main")
threading.setprofile(None)
t0 = time.monotonic()
ctxprop.flush()
"""
    kw = ", max_export_batch_size=2000, schedule_delay=60, close_timeout=10.0"
    res = run_child(_code(body, kw=kw), env=_env(receiver, tmp_path), timeout=60)
    assert res.returncode == -signal.SIGTERM, res.stderr
    assert res.stderr == ""
    delivered = len({s.name for s in receiver.spans if s.name.startswith("main-")})
    assert delivered + Spool.open(tmp_path / "spool").status().spans == N
    assert res.elapsed < 8.0  # not the 10 s close deadline spent waiting for its own lock


def test_ctrl_c_during_flush_keeps_the_batch_it_was_encoding(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """Ctrl-C (KeyboardInterrupt) raised inside flush() while a batch is being encoded: those spans are not
    lost, so the exit still delivers all of them; the status stays Python's own."""
    body = """
ENCODE = ("encode", "ctxprop._encoding")
import threading
def at_encode(frame, event, arg):
    if event == "call" and (frame.f_code.co_name, frame.f_globals["__name__"]) == ENCODE:
        sys.setprofile(None)
        os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt, raised in the middle of the flush
threading.setprofile(at_encode)  # the export thread, started by the first span, encodes
make_spans("main")
threading.setprofile(None)
ctxprop.flush()
"""
    kw = ", max_export_batch_size=2000, schedule_delay=60"
    res = run_child(_code(body, kw=kw), env=_env(receiver, tmp_path), timeout=60)
    assert res.returncode == -signal.SIGINT, res.stderr
    assert "KeyboardInterrupt" in res.stderr
    _assert_all(receiver)
