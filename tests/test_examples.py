"""Every script in examples/ runs to completion in a real interpreter, silently on stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.py"))

# The examples of the demo's capability also print an all-good verdict line: what each exists to show.
# Checked in the same run that checks the exit status and the silent stderr (one run per example).
VERDICTS = {
    "short_script.py": "collector received 100/100 spans",
    "asyncio_service.py": "8/8 requests: worker spans under their request span, request tags on them",
    "sentry_scopes.py": "5/5 Sentry events carry their own job's tags; none leaked back",
    "process_pool.py": "6/6 are children of the 'batch' span; 6/6 carry the tag batch=2024-06-01",
    "subprocess_trace.py": "same trace as the parent: True; child of the parent's 'nightly' span: True",
    "shell_child_proxy.py": "span 'load': child of nightly-etl, status error, events ['rows-rejected']",
}


def test_examples_exist() -> None:
    """The three ways to use ctxprop each have a runnable example."""
    names = {p.name for p in EXAMPLES}
    assert {"replace_import.py", "wrap_run_in_executor.py", "decorate_workers.py"} <= names
    assert set(VERDICTS) <= names  # every verdict below is checked on a real example


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """The example exits 0, prints something (its verdict line, if it has one), and nothing to stderr."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # A private spool directory: an example that spools must not touch the user's real state dir.
    env = {**os.environ, "PYTHONPATH": pythonpath, "CTXPROP_SPOOL_DIR": str(tmp_path / "spool")}
    # No collector is reachable on purpose: an example must not need one unless it embeds its own.
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip()
    if script.name in VERDICTS:
        assert VERDICTS[script.name] in proc.stdout.splitlines(), proc.stdout


def test_propagation_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/bench_propagation.py still runs end to end (tiny sizes; timings are not checked)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_propagation.py"), "--smoke"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for label in ("ContextAwareThreadPoolExecutor", "sentry-sdk ThreadingIntegration", "OTel Threading"):
        assert label in proc.stdout
    assert "capture() with 20+20 tags" in proc.stdout
