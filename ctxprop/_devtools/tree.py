"""Render spans as trace trees in plain text: shared by ``python -m ctxprop demo`` and ``collector``.

A forest is built from whatever spans are at hand: a span whose parent is among them hangs under it; any
other span is a root, and when it names a parent that is not there, that is said on its line (the parent
was never received, or the span lost its context on the way). Bars are drawn against the time range of
the spans rendered together, so siblings that ran at once visibly overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Node",
    "SpanLike",
    "attrs_text",
    "build_forest",
    "format_duration",
    "group_by_trace",
    "render_forest",
]

#: Which attributes to show: none (False), all (True), or these keys.
AttrSelection = bool | Sequence[str]

_STATUS = {0: "", 1: "OK", 2: "ERROR"}


class SpanLike(Protocol):
    """What the renderers read from a span (``ctxprop._devtools.receiver.ReceivedSpan`` has it all)."""

    @property
    def trace_id(self) -> str: ...
    @property
    def span_id(self) -> str: ...
    @property
    def parent_span_id(self) -> str | None: ...
    @property
    def name(self) -> str: ...
    @property
    def start_ns(self) -> int: ...
    @property
    def end_ns(self) -> int: ...
    @property
    def attributes(self) -> Mapping[str, Any]: ...
    @property
    def status_code(self) -> int: ...
    @property
    def status_message(self) -> str: ...
    @property
    def service_name(self) -> str | None: ...


@dataclass
class Node:
    """A span and the spans whose parent it is, ordered by start time."""

    span: SpanLike
    children: list[Node] = field(default_factory=list)
    depth: int = 0
    #: Its parent is among the spans, but the parent links loop back to it (bad data): drawn as a root.
    in_cycle: bool = False

    @property
    def missing_parent(self) -> str | None:
        """The parent span id this root names but that is not among the spans, if any."""
        return self.span.parent_span_id if self.depth == 0 and not self.in_cycle else None

    def walk(self) -> Iterable[Node]:
        """This node, then its descendants, depth first in start order."""
        stack = [self]
        while stack:  # no recursion: traces can be deeper than the recursion limit
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


def group_by_trace(spans: Iterable[SpanLike]) -> dict[str, list[SpanLike]]:
    """Spans by trace id, traces in order of first appearance."""
    out: dict[str, list[SpanLike]] = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def build_forest(spans: Iterable[SpanLike]) -> list[Node]:
    """The roots of the trees the spans form, each tree and the roots ordered by start time."""
    nodes: dict[tuple[str, str], Node] = {}
    for s in spans:
        # A span received twice (a sender's retry) is drawn once: one node per id also keeps every tree
        # below free of a node hanging in two places.
        nodes.setdefault((s.trace_id, s.span_id), Node(s))
    items = sorted((n.span for n in nodes.values()), key=lambda s: (s.start_ns, s.end_ns, s.span_id))
    roots: list[Node] = []
    for s in items:
        node = nodes[(s.trace_id, s.span_id)]
        parent = nodes.get((s.trace_id, s.parent_span_id)) if s.parent_span_id else None
        if parent is None or parent is node:
            node.in_cycle = parent is node
            roots.append(node)
        else:
            parent.children.append(node)
    _set_depths(roots)
    # Spans whose parent links form a loop (a -> b -> a) hang under each other and under no root: cut each
    # loop at its earliest span, so a viewer still shows every span it was given.
    reached = {id(n) for r in roots for n in r.walk()}
    cut = []
    for s in items:
        node = nodes[(s.trace_id, s.span_id)]
        if id(node) in reached:
            continue
        # Unreached means its parent is among the spans: a span with no parent there is a root.
        parent = nodes[(s.trace_id, s.parent_span_id or "")]
        parent.children.remove(node)
        node.in_cycle = True
        cut.append(node)
        reached.update(id(n) for n in node.walk())
    if cut:
        _set_depths(cut)
        roots = sorted([*roots, *cut], key=lambda n: (n.span.start_ns, n.span.end_ns, n.span.span_id))
    return roots


def _set_depths(roots: list[Node]) -> None:
    stack = [(r, 0) for r in roots]
    while stack:  # iterative: a long chain of spans must not hit the recursion limit
        node, depth = stack.pop()
        node.depth = depth
        stack.extend((c, depth + 1) for c in node.children)


def format_duration(ns: int) -> str:
    """A short human duration: ``850 µs``, ``12.3 ms``, ``4.20 s``."""
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def _bar(start: int, end: int, lo: int, hi: int, width: int) -> str:
    span = max(hi - lo, 1)
    a = min(width - 1, max(0, int((start - lo) * width / span)))
    b = min(width, max(a + 1, round((end - lo) * width / span)))
    return " " * a + "█" * (b - a) + " " * (width - b)


def attrs_text(attributes: Mapping[str, Any], selection: AttrSelection) -> str:
    if selection is False:
        return ""
    keys = sorted(attributes) if selection is True else [k for k in selection if k in attributes]
    return " ".join(f"{k}={_value_text(attributes[k])}" for k in keys)


def _value_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_value_text(v) for v in value) + "]"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def render_forest(
    spans: Iterable[SpanLike],
    *,
    attributes: AttrSelection = False,
    bar_width: int = 24,
    name_width: int | None = None,
    note: Callable[[SpanLike], str | None] | None = None,
    show_service: bool = True,
) -> list[str]:
    """Lines drawing the spans as trees: one line per span, children indented under their parent.

    Each line: tree guides and the span name, ``[service]`` on roots and wherever the service changes
    from the parent's (a call into another process), a duration bar on the common time axis, the
    duration, the status, then the selected attributes and ``note(span)`` if it returns text.

    >>> from types import SimpleNamespace as S
    >>> a = S(trace_id="t", span_id="a", parent_span_id=None, name="request", start_ns=0, end_ns=10**7,
    ...       attributes={}, status_code=0, status_message="", service_name="api")
    >>> b = S(trace_id="t", span_id="b", parent_span_id="a", name="query", start_ns=0, end_ns=5 * 10**6,
    ...       attributes={"db": "pg"}, status_code=2, status_message="timeout", service_name="api")
    >>> print("\\n".join(render_forest([a, b], attributes=True, bar_width=4)))
    request [api]  ████  10.0 ms
    └─ query       ██     5.0 ms  ERROR: timeout  db=pg
    """
    roots = build_forest(spans)
    if not roots:
        return []
    rows: list[tuple[str, Node, bool]] = []  # (guides + name prefix, node, service differs from parent)
    # (node, guides of its ancestors, is last sibling, parent's service); a stack, not recursion: traces
    # can be deeper than the recursion limit.
    stack: list[tuple[Node, str, bool, str | None]] = [(r, "", True, None) for r in reversed(roots)]
    while stack:
        node, lead, last, parent_service = stack.pop()
        top = node.depth == 0
        service = node.span.service_name
        guide = "" if top else lead + ("└─ " if last else "├─ ")
        rows.append((guide, node, top or service != parent_service))
        child_lead = "" if top else lead + ("   " if last else "│  ")
        n = len(node.children)
        stack.extend(
            (c, child_lead, i == n - 1, service) for i, c in reversed(list(enumerate(node.children)))
        )

    all_nodes = [n for _, n, _ in rows]
    lo = min(n.span.start_ns for n in all_nodes)
    hi = max(n.span.end_ns for n in all_nodes)
    labels = []
    for guide, node, new_service in rows:
        label = guide + node.span.name
        service = node.span.service_name
        if show_service and service and new_service:
            label += f" [{service}]"
        labels.append(label)
    width = name_width or max(len(label) for label in labels)
    durations = [format_duration(max(0, n.span.end_ns - n.span.start_ns)) for n in all_nodes]
    dur_width = max(len(d) for d in durations)
    lines = []
    for label, node, dur in zip(labels, all_nodes, durations, strict=True):
        s = node.span
        parts = [label.ljust(width), _bar(s.start_ns, s.end_ns, lo, hi, bar_width), dur.rjust(dur_width)]
        status = _STATUS.get(s.status_code, str(s.status_code))
        if status:
            parts.append(status + (f": {s.status_message}" if s.status_message else ""))
        extra = attrs_text(s.attributes, attributes)
        if extra:
            parts.append(extra)
        if node.missing_parent:
            parts.append(f"(parent {node.missing_parent} not received)")
        elif node.in_cycle:
            parts.append(f"(parent {s.parent_span_id} is its own descendant)")
        text = note(s) if note is not None else None
        if text:
            parts.append(text)
        lines.append("  ".join(parts).rstrip())
    return lines
