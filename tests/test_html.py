"""The HTML waterfall: self-contained markup, and the demo's page rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import REPO, child_env

from ctxprop._devtools.html import Section, render_waterfall

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
DEADLINE = 120.0


def _s(span_id: str, parent: str | None, name: str, start: int, end: int, **attrs: object) -> SimpleNamespace:
    return SimpleNamespace(
        trace_id="t",
        span_id=span_id,
        parent_span_id=parent,
        name=name,
        start_ns=start,
        end_ns=end,
        attributes=attrs,
        status_code=0,
        status_message="",
        service_name="svc",
    )


def test_page_is_self_contained_and_escapes_names() -> None:
    """No external asset of any kind, and span names/tags are escaped, never markup."""
    spans = [_s("a", None, "<script>alert(1)</script>", 0, 10), _s("b", "a", 'x" onclick="y', 2, 5, k="<b>")]
    page = render_waterfall([Section("one", "One & only", spans)], attributes=["k"], summary=["a < b"])
    for external in ("src=", "href=", "url(", "@import", "http://", "https://", "<link", "<iframe"):
        assert external not in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'x" onclick' not in page
    assert "&lt;b&gt;" in page
    assert "One &amp; only" in page
    assert page.count('class="row') == 2


def test_rows_follow_the_tree_and_bars_the_time_axis() -> None:
    """Rows are in tree order with their depth; bars are placed in percent of the section's time range;
    a span whose parent is missing, or that the caller's note flags, is marked."""
    spans = [_s("r", None, "root", 0, 100), _s("c", "r", "child", 50, 75), _s("o", "zz", "stray", 60, 80)]
    flag = lambda s: "flag me" if s.name == "child" else None  # noqa: E731
    page = render_waterfall([Section("s", "S", spans, note=flag)])
    rows = re.findall(r'<div class="(row[^"]*)" data-span-id="(\w+)" data-depth="(\d)"', page)
    assert rows == [("row root", "r", "0"), ("row flagged", "c", "1"), ("row root flagged", "o", "0")]
    assert 'style="left: 50.000%; width: 25.000%"' in page
    assert "flag me" in page
    assert "parent zz not received" in page


def test_spans_in_a_parent_loop_get_rows() -> None:
    """Spans whose parent links loop still get a row each, the cut one flagged with the reason."""
    spans = [_s("a", "b", "loop a", 0, 10), _s("b", "a", "loop b", 2, 5)]
    page = render_waterfall([Section("s", "S", spans)])
    rows = re.findall(r'<div class="(row[^"]*)" data-span-id="(\w+)" data-depth="(\d)"', page)
    assert rows == [("row root flagged", "a", "0"), ("row", "b", "1")]
    assert "parent b is its own descendant" in page


def _dump_dom(page: Path, tmp_path: Path) -> str:
    assert CHROMIUM is not None
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
@pytest.mark.timeout(2 * DEADLINE + 30)  # a demo run then a browser start, each with its own deadline
def test_demo_html_renders_both_trees_in_headless_chromium(tmp_path: Path) -> None:
    """The demo's --html page, opened by a real browser: both runs drawn, every bar laid out with a width,
    the plain run's 15 workers flagged as roots, the ctxprop run's 15 workers nested under their rounds."""
    page = tmp_path / "demo.html"
    demo = subprocess.run(
        [sys.executable, "-m", "ctxprop", "demo", "--html", str(page)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=str(REPO),
        timeout=DEADLINE,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert f"HTML waterfall written to {page}" in demo.stdout
    dom = _dump_dom(page, tmp_path)
    assert 'data-rendered="yes"' in dom  # the inline script ran after layout
    sections = dict(re.findall(r'<section class="run" id="run-(\w+)"(.*?)</section>', dom, re.S))
    assert set(sections) == {"plain", "ctxprop"}
    for name, body in sections.items():
        assert 'data-spans="20"' in body, name
        assert 'data-visible-bars="20"' in body, name
    plain_rows = re.findall(r'<div class="([^"]*)" data-span-id="\w+" data-depth="(\d)"', sections["plain"])
    ours_rows = re.findall(r'<div class="([^"]*)" data-span-id="\w+" data-depth="(\d)"', sections["ctxprop"])
    assert sum("flagged" in cls for cls, _ in plain_rows) == 15
    assert all(depth == "0" for _, depth in plain_rows)
    assert not any("flagged" in cls for cls, _ in ours_rows)
    assert [d for _, d in ours_rows].count("1") == 15
    assert "plain: 15/15 worker spans orphaned; ctxprop: 0/15" in dom
