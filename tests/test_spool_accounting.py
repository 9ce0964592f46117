"""Every span the spool took is accounted for: on disk, delivered, or counted as dropped."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support import assert_books_balance, child_env, run_child

SPANS = 2000


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# With the collector down, N spans end and close() spools them; the spool's own view of what it keeps
# on disk is taken after close() (inside the child: a tmpfs of its own dies with it).
SPOOLING_CHILD = """
import json
import ctxprop
from opentelemetry import trace
from ctxprop._spool import Spool
ctxprop.init(service_name="acct", endpoint="http://127.0.0.1:{port}/v1/traces", spool_dir={spool_dir!r},
             close_timeout=2)
tracer = trace.get_tracer("t")
for i in range({spans}):
    with tracer.start_as_current_span(f"span-{{i}}", attributes={{"pad": "x" * 40}}):
        pass
ctxprop.close()
st = Spool.open({spool_dir!r}).status()
print(json.dumps({{"stats": ctxprop.stats(), "on_disk": st.spans, "memory_only": st.memory_only}}))
"""


def dropped(stats: dict[str, int]) -> int:
    """Spans dropped for any reason: the processor's dropped_* keys plus the spool's total."""
    return sum(v for k, v in stats.items() if k.startswith("dropped_")) + stats.get("spool_dropped_spans", 0)


def assert_all_accounted(out: dict[str, Any], ended: int) -> None:
    """ended = exported + rejected + dropped + on disk (the collector is down: nothing exported)."""
    stats = out["stats"]
    assert stats.get("exported", 0) == 0
    assert ended == stats.get("rejected", 0) + dropped(stats) + out["on_disk"], stats
    # The pipeline's books say the same: what waits in the spool on disk is pending, the rest dropped.
    assert_books_balance(stats, ended=ended)
    assert stats["spans_pending"] == out["on_disk"], stats


def test_memory_only_spool_counts_what_it_held_as_dropped_at_close(tmp_path: Path) -> None:
    """A spool with no usable directory keeps spans in memory; what it still holds at close() dies with
    the process and is counted as dropped (spool_dropped_memory_spans), so every span is accounted."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = SPOOLING_CHILD.format(port=_unused_port(), spool_dir=str(blocker / "spool"), spans=SPANS)
    result = run_child(code, env={"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    out = result.last("stats"), result.last("on_disk")
    stats, on_disk = out
    assert on_disk == 0
    assert stats.get("spool_dropped_memory_spans") == SPANS
    assert_all_accounted({"stats": stats, "on_disk": on_disk}, SPANS)


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("unshare") is None, reason="needs Linux unshare")
def test_spool_on_a_full_disk_accounts_for_every_span(tmp_path: Path) -> None:
    """On a 64 KiB tmpfs that fills up mid-run, the spans on disk plus those counted dropped (size cap,
    or held in memory when the disk was full) are every span that ended."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "child.py"
    spool_dir = mnt / "spool"
    script.write_text(
        textwrap.dedent(SPOOLING_CHILD.format(port=_unused_port(), spool_dir=str(spool_dir), spans=SPANS))
    )
    # A mount namespace of the child's own: the tmpfs vanishes with it, whatever happens.
    cmd = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs -o size=64k tmpfs "{mnt}" || exit 77; exec "{sys.executable}" "{script}"',
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=child_env({"PYTHONWARNINGS": "ignore"}),
        timeout=60,
        check=False,
    )
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a private tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["on_disk"] > 0  # the disk took some before it filled
    assert out["stats"].get("spool_memory_only") == 1
    assert_all_accounted(out, SPANS)


@pytest.mark.parametrize("var", ["CTXPROP_SPOOL_MAX_BYTES", "CTXPROP_SPOOL_MAX_AGE"])
def test_inf_spool_cap_means_no_cap(tmp_path: Path, var: str) -> None:
    """``inf`` for the spool's size or age cap means no cap: every span waits on disk, none dropped."""
    code = SPOOLING_CHILD.format(port=_unused_port(), spool_dir=str(tmp_path / "spool"), spans=300)
    result = run_child(code, env={var: "inf"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    stats = result.last("stats")
    assert result.last("on_disk") == 300, stats
    assert dropped(stats) == 0
    assert_all_accounted({"stats": stats, "on_disk": result.last("on_disk")}, 300)


@pytest.mark.parametrize("value", ["-1", "0", "nan", "64MiB", "-inf"])
@pytest.mark.parametrize("var", ["CTXPROP_SPOOL_MAX_BYTES", "CTXPROP_SPOOL_MAX_AGE"])
def test_malformed_spool_cap_is_refused_at_init(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    """A spool cap that is not a positive number (or inf) raises ValueError at init(), naming the variable."""
    import ctxprop

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}=.*positive number.*inf"):
        ctxprop.init(endpoint="http://127.0.0.1:9/v1/traces")


def test_memory_spool_cap_drops_are_counted_as_memory_drops() -> None:
    """A memory spool over its size cap drops its oldest records under spool_dropped_memory_spans too."""
    from ctxprop import _stats
    from ctxprop._spool_memory import MemorySpool

    spool = MemorySpool("nowhere", max_bytes=250, max_age=60)
    for _ in range(5):
        spool.append(b"x" * 100, 3)
    stats = _stats.snapshot()
    assert stats.get("spool_dropped_memory_spans") == 9
    assert stats.get("spool_dropped_spans") == 9
    assert spool.status().spans == 6
    spool.close()
    assert _stats.snapshot().get("spool_dropped_memory_spans") == 15
