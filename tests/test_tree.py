"""Text trace trees (``ctxprop._devtools.tree``), shared by the demo and the collector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctxprop._devtools import tree as _tree

MS = 1_000_000


@dataclass(frozen=True)
class S:
    """A span as the renderers read it."""

    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    trace_id: str = "t1"
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: int = 0
    status_message: str = ""
    service_name: str | None = "svc"


def test_children_hang_under_their_parent_in_start_order() -> None:
    """Spans nest under their parent, siblings and roots ordered by start time, whatever the input order."""
    spans = [
        S("c2", "r", "second", 5 * MS, 8 * MS),
        S("r2", None, "later root", 20 * MS, 30 * MS),
        S("c1", "r", "first", 1 * MS, 4 * MS),
        S("g", "c1", "grandchild", 2 * MS, 3 * MS),
        S("r", None, "root", 0, 10 * MS),
    ]
    lines = _tree.render_forest(spans, show_service=False, name_width=20)
    names = [ln[:20].rstrip() for ln in lines]
    assert names == ["root", "├─ first", "│  └─ grandchild", "└─ second", "later root"]


def test_a_span_whose_parent_is_absent_is_a_marked_root() -> None:
    """A span naming a parent that was not received is drawn as a root and says so."""
    lines = _tree.render_forest([S("a", None, "root", 0, MS), S("b", "zz", "stray", 0, MS)])
    assert lines[1].startswith("stray [svc]")
    assert lines[1].endswith("(parent zz not received)")
    assert "not received" not in lines[0]


def test_same_span_id_in_another_trace_is_not_a_parent() -> None:
    """Parents are matched by trace and span id: an equal span id in another trace does not adopt a child."""
    roots = _tree.build_forest(
        [S("a", None, "root", 0, MS, trace_id="t1"), S("b", "a", "x", 0, MS, trace_id="t2")]
    )
    assert [r.span.name for r in roots] == ["root", "x"]
    assert roots[1].missing_parent == "a"


def test_attributes_status_and_note() -> None:
    """Attributes are shown all (sorted), selected, or not at all; error status and a caller's note appear."""
    span = S("a", None, "op", 0, MS, attributes={"b": 2, "a": (1, 2)}, status_code=2, status_message="boom")
    assert _tree.render_forest([span], attributes=True)[0].endswith("ERROR: boom  a=[1,2] b=2")
    assert _tree.render_forest([span], attributes=["b", "nope"])[0].endswith("ERROR: boom  b=2")
    assert "b=2" not in _tree.render_forest([span])[0]
    assert _tree.render_forest([span], note=lambda s: f"<- {s.name}!")[0].endswith("<- op!")


def test_bars_share_one_time_axis() -> None:
    """Bars share the time range: a span over all of it fills its bar, a late one sits at the right."""
    spans = [S("r", None, "root", 0, 100 * MS), S("c", "r", "late", 75 * MS, 100 * MS)]
    lines = _tree.render_forest(spans, bar_width=8, show_service=False, name_width=10)
    assert lines[0][12:20] == "████████"
    assert lines[1][12:20] == "      ██"


def test_deep_chains_render_without_recursion() -> None:
    """A trace deeper than the recursion limit still renders, one line per span."""
    depth = 3000
    spans = [S(f"s{i}", f"s{i - 1}" if i else None, f"n{i}", i, 10_000 - i) for i in range(depth)]
    lines = _tree.render_forest(spans, show_service=False)
    assert len(lines) == depth
    assert lines[-1].lstrip(" │").startswith("└─ n2999")


def test_group_by_trace_and_durations() -> None:
    """Spans group by trace id in order of first appearance; durations read naturally."""
    spans = [S("a", None, "x", 0, 1, trace_id="t2"), S("b", None, "y", 0, 1, trace_id="t1")]
    assert list(_tree.group_by_trace(spans)) == ["t2", "t1"]
    durations = [_tree.format_duration(n) for n in (850_000, 12_340_000, 4_200_000_000)]
    assert durations == ["850 µs", "12.3 ms", "4.20 s"]
    assert _tree.render_forest([]) == []


def test_service_shown_on_roots_and_where_it_changes() -> None:
    """The service is named on a root and on a span whose service differs from its parent's, not elsewhere."""
    spans = [
        S("r", None, "GET /cart", 0, 10 * MS, service_name="web"),
        S("a", "r", "render", 1 * MS, 2 * MS, service_name="web"),
        S("b", "r", "reserve", 3 * MS, 9 * MS, service_name="stock"),
        S("c", "b", "SELECT", 4 * MS, 5 * MS, service_name="stock"),
    ]
    labels = [ln[:24].rstrip() for ln in _tree.render_forest(spans, name_width=24)]
    assert labels == ["GET /cart [web]", "├─ render", "└─ reserve [stock]", "   └─ SELECT"]


def test_spans_whose_parents_form_a_loop_are_still_drawn() -> None:
    """Bad data where parent links loop (a -> b -> a) loses no span and cannot hang the renderer: the loop
    is cut at its earliest span, drawn as a root that says why, its descendants under it; a span received
    twice is drawn once."""
    spans = [
        S("r", None, "root", 0, MS),
        S("a", "b", "loop a", 1 * MS, 5 * MS),
        S("b", "a", "loop b", 2 * MS, 4 * MS),
        S("c", "b", "under b", 3 * MS, 4 * MS),
        S("s", "s", "self", 6 * MS, 7 * MS),
        S("a", "b", "loop a", 1 * MS, 5 * MS),  # received twice, as after a sender's retry
    ]
    lines = _tree.render_forest(spans, show_service=False, name_width=16)
    assert [ln[:16].rstrip() for ln in lines] == ["root", "loop a", "└─ loop b", "   └─ under b", "self"]
    assert lines[1].endswith("(parent b is its own descendant)")
    assert lines[4].endswith("(parent s is its own descendant)")
    assert "not received" not in "\n".join(lines)
