"""Endings the kernel decides: SIGINT with its default action, and SIGTERM to PID 1 (no init)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import OTLPReceiver, assert_books_balance, child_env, receiver, run_child  # noqa: F401
from test_endings import _assert_all, _code, _env

# Long schedule delay: the spans wait in the queue, so only an ending that flushes delivers them.
KW = ", schedule_delay=60"


@pytest.mark.parametrize(
    "body",
    [
        # gunicorn's UvicornWorker: SIGINT back to the default action, then re-raised after the shutdown.
        'signal.signal(signal.SIGINT, signal.SIG_DFL)\nmake_spans("main")\n'
        'print("answers SIG_DFL:", signal.getsignal(signal.SIGINT) is signal.SIG_DFL)\n'
        "os.kill(os.getpid(), signal.SIGINT)\n",
        # uvicorn: its own handler while serving, then the handler it found restored and the signal re-raised.
        textwrap.dedent(
            """
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            found = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, lambda s, f: None)
            make_spans("main")
            signal.signal(signal.SIGINT, found)
            signal.raise_signal(signal.SIGINT)
            """
        ),
    ],
    ids=["sig_dfl_then_kill", "capture_restore_raise"],
)
def test_sigint_with_default_action_delivers_and_still_dies_by_sigint(
    receiver: OTLPReceiver,  # noqa: F811
    tmp_path: Path,
    body: str,
) -> None:
    """SIGINT set to SIG_DFL after init() and re-raised: every span is delivered, and the process still
    dies by SIGINT (status -2), as it does without ctxprop."""
    res = run_child(_code(body + "print('survived')\n", kw=KW), env=_env(receiver, tmp_path))
    assert res.returncode == -signal.SIGINT, res.stderr
    assert "survived" not in res.stdout_lines
    if "answers SIG_DFL" in body:  # ctxprop stands in for the default action, and hides that it does
        assert "answers SIG_DFL: True" in res.stdout_lines, res.stdout_lines
    _assert_all(receiver)
    plain = "import os, signal\n" + body.replace('make_spans("main")', "pass") + "print('survived')\n"
    without = run_child(plain)
    assert without.returncode == -signal.SIGINT


def test_sigint_set_to_default_before_init_delivers_too(receiver: OTLPReceiver, tmp_path: Path) -> None:  # noqa: F811
    """SIGINT already SIG_DFL when init() runs: the default-action death still delivers first."""
    res = run_child(
        _code(
            'make_spans("main")\n'
            'print("answers SIG_DFL:", signal.getsignal(signal.SIGINT) is signal.SIG_DFL)\n'
            'os.kill(os.getpid(), signal.SIGINT)\nprint("survived")\n',
            kw=KW,
            before_init="signal.signal(signal.SIGINT, signal.SIG_DFL)\n",
        ),
        env=_env(receiver, tmp_path),
    )
    assert res.returncode == -signal.SIGINT, res.stderr
    assert "answers SIG_DFL: True" in res.stdout_lines, res.stdout_lines
    _assert_all(receiver)


PID1 = """
make_spans("before")
os.kill(os.getpid(), signal.SIGTERM)   # the kernel ignores a default-action SIGTERM to PID 1
make_spans("after")
ctxprop.flush(5)
default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
print(json.dumps({"pid": os.getpid(), "alive": True, "handler_is_default": default}), flush=True)
ctxprop.close()
print(json.dumps({"stats": ctxprop.stats()}), flush=True)
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_sigterm_to_pid_1_is_ignored_as_without_ctxprop_and_the_pipeline_stays_open(
    receiver: OTLPReceiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    """As PID 1 of a pid namespace (a container without init), a SIGTERM with the default action is
    ignored by the kernel: with ctxprop too the process keeps running, its spans are flushed, and spans
    made afterwards are still delivered."""
    script = tmp_path / "pid1.py"
    script.write_text(_code(PID1, kw=KW))
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=child_env(_env(receiver, tmp_path)),
        timeout=60,
        check=False,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr and "alive" not in proc.stdout:
        pytest.skip(f"cannot make a pid namespace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    assert '"pid": 1' in proc.stdout
    assert '"alive": true' in proc.stdout
    assert '"handler_is_default": true' in proc.stdout
    _assert_all(receiver, "before")
    _assert_all(receiver, "after")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])["stats"]
    assert_books_balance(stats, ended=2000)
    assert stats["spans_exported"] == 2000


HANDLED_TERM = """
make_spans("main")
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(time.monotonic()))
ready()
T0 = time.monotonic()
end = T0 + 30
while not stop and time.monotonic() < end:
    time.sleep(0.01)
"""

REPORT_AT_EXIT = """
import atexit, json, time
def _report():  # registered before init(): runs after ctxprop's own close at exit
    import ctxprop
    print(json.dumps({"exit_after_ready_s": time.monotonic() - T0, "stats": ctxprop.stats()}), flush=True)
atexit.register(_report)
"""


def test_sigterm_with_a_hanging_collector_costs_one_deadline_not_two(tmp_path: Path) -> None:
    """SIGTERM with an application handler (ctxprop flushes, then chains) and a collector that never
    answers: from the signal to the end of the exit's close(), one close_timeout passes, not two; the
    spans wait in the spool."""
    close_timeout = 2.0
    with OTLPReceiver(mode="slow", delay=60) as rx:
        res = run_child(
            _code(HANDLED_TERM, kw=f"{KW}, close_timeout={close_timeout}", before_init=REPORT_AT_EXIT),
            env=_env(rx, tmp_path),
            signal_after_line='"ready"',
        )
    assert res.signalled
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    took = res.last("exit_after_ready_s")
    assert took < close_timeout + 0.5, f"{took:.2f} s from SIGTERM to the end of close()"
    from ctxprop._spool import Spool

    assert Spool.open(tmp_path / "spool").status().spans == 1000
    assert_books_balance(res.last("stats"), ended=1000)
    assert res.last("stats")["spans_pending"] == 1000
