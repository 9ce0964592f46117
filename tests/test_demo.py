"""``python -m ctxprop demo`` end to end in a child process and its counting (this capability's examples
are run, and their verdict lines checked, by tests/test_examples.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from support import REPO, child_env

from ctxprop._devtools.demo import _Verdict

DEADLINE = 120.0


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=child_env(env),
        cwd=str(REPO),
        timeout=DEADLINE,
        check=False,
    )


def test_demo_prints_both_trees_and_the_orphan_counts(tmp_path: Path) -> None:
    """Default demo: exit 0, nothing on stderr, both trees, and the exact verdict line; it ignores the
    user's OTEL_* settings (endpoint, a sampler that drops everything, SDK disabled, attribute limits, a
    malformed value) and leaves the user's spool alone."""
    spool = tmp_path / "user-spool"
    user_settings = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_TRACES_SAMPLER": "always_off",
        "OTEL_SDK_DISABLED": "true",
        "OTEL_ATTRIBUTE_COUNT_LIMIT": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "soon",
    }
    out = _run("-m", "ctxprop", "demo", env={**user_settings, "CTXPROP_SPOOL_DIR": str(spool)})
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[-1] == "plain: 15/15 worker spans orphaned; ctxprop: 0/15"
    plain = lines.index("== plain: plain ThreadPoolExecutor + loop.run_in_executor")
    ours = lines.index("== ctxprop: ctxprop.ContextAwareThreadPoolExecutor, same code")
    plain_tree, our_tree = lines[plain + 1 : ours - 1], lines[ours + 1 : lines.index("", ours)]
    # plain: every worker is a root of its own trace, flagged; ctxprop: every worker nested in its round.
    assert sum("<- ORPHAN: not under round" in ln for ln in plain_tree) == 15
    assert not any(ln.startswith(("├─", "└─")) for ln in plain_tree)
    for rnd in range(1, 6):
        i = our_tree.index(next(ln for ln in our_tree if ln.startswith(f"round {rnd} ")))
        children = our_tree[i + 1 : i + 4]
        assert [c[:2] for c in children] == ["├─", "├─", "└─"]
        assert all(f"round={rnd}" in c and "worker=" not in c for c in children)
    assert "ORPHAN" not in "\n".join(our_tree)
    assert any("plain:   15/15 worker spans missing their round's tag" in ln for ln in lines)
    assert any(ln.startswith("ctxprop: 0/15 worker spans missing their round's tag; 0/15") for ln in lines)
    assert not spool.exists() or not any(spool.iterdir())


def test_demo_rounds_option_and_validation() -> None:
    """--rounds N scales the counts; a round count below 1 is refused by the argument parser."""
    out = _run("-m", "ctxprop", "demo", "--rounds", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "plain: 9/9 worker spans orphaned; ctxprop: 0/9"
    bad = _run("-m", "ctxprop", "demo", "--rounds", "0")
    assert bad.returncode == 2
    assert "must be at least 1" in bad.stderr


def test_demo_html_to_an_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    """--html into a missing directory: exit status 2 and a one-line reason, no traceback."""
    target = tmp_path / "no-such-dir" / "demo.html"
    out = _run("-m", "ctxprop", "demo", "--rounds", "1", "--html", str(target))
    assert out.returncode == 2
    assert out.stderr == f"ctxprop demo: cannot write {target}: No such file or directory\n"


def test_demo_into_a_closed_pipe_ends_quietly_and_still_writes_the_html(tmp_path: Path) -> None:
    """`demo --html F | true`: stdout is a pipe nobody reads; exit 0, no traceback, and the page exists."""
    page = tmp_path / "demo.html"
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child starts: its very first write meets a broken pipe
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ctxprop", "demo", "--rounds", "1", "--html", str(page)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=str(REPO),
            timeout=DEADLINE,
            check=False,
        )
    finally:
        os.close(write_end)
    assert out.stderr == ""
    assert out.returncode == 0
    assert "plain: 3/3 worker spans orphaned; ctxprop: 0/3" in page.read_text(encoding="utf-8")


def _span(span_id: str, parent: str | None, rnd: int, job: int | None = None, **tags: object) -> object:
    attrs: dict[str, object] = {"demo.run": "x", "demo.round": rnd, **tags}
    if job is not None:
        attrs["demo.worker"] = job
    return SimpleNamespace(trace_id="t", span_id=span_id, parent_span_id=parent, attributes=attrs)


def test_verdict_counts_a_worker_under_the_wrong_round_as_orphaned() -> None:
    """Counting is honest: a worker parented to another round's span is orphaned, as is a parentless one;
    a missing round tag and a tag left by another task are counted separately."""
    spans = [
        _span("r1", None, 1),
        _span("r2", None, 2),
        _span("w1", "r1", 1, 1, round=1),
        _span("w2", "r1", 2, 1, round=2),  # parent is round 1's span, but it belongs to round 2
        _span("w3", None, 2, 2, worker=1),  # no parent, no round tag, a stale worker tag
    ]
    v = _Verdict(spans)
    assert v.orphaned == {"w2", "w3"}
    assert v.lost_tags == {"w3"}
    assert v.leaked == {"w3"}
    assert v.note(spans[3]) == "<- ORPHAN: not under round 2 (wrong parent)"
