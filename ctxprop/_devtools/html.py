"""A self-contained HTML waterfall of one or more sets of spans (``python -m ctxprop demo --html FILE``).

One file, no external assets (inline CSS, a few lines of inline script), so it opens from disk anywhere,
offline. Each section is a forest drawn as rows: the span name indented under its parent, and a bar placed
on the section's own time axis. Spans whose parent is missing are marked, and a caller's ``note`` (e.g.
"orphan: not under its round") is shown on the row and makes it stand out.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from ctxprop._devtools.tree import SpanLike, attrs_text, build_forest, format_duration

__all__ = ["Section", "render_waterfall"]

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
h2 { font-size: 1.05em; margin: 1.6em 0 .4em; }
p.summary { font-family: ui-monospace, monospace; margin: .2em 0; }
section.run { border: 1px solid #ddd; border-radius: 6px; padding: .2em .8em .8em; }
.row { display: grid; grid-template-columns: 34% 1fr 6em; align-items: center; gap: .6em;
       border-bottom: 1px solid #f2f2f2; min-height: 1.5em; }
.row:hover { background: #f7f9ff; }
.label { white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
         font-family: ui-monospace, monospace; }
.guide { color: #aaa; }
.tags { color: #667; font-size: .85em; margin-left: .6em; }
.note { color: #b00020; font-weight: 600; margin-left: .6em; font-size: .85em; }
.track { position: relative; height: .9em; background: #fafafa; }
.bar { position: absolute; top: 0; bottom: 0; min-width: 2px; border-radius: 2px; background: #3b7dd8; }
.row.root .bar { background: #1f4f99; }
.row.flagged .bar { background: #d33; }
.row.error .bar { background: #e07b00; }
.dur { text-align: right; font-family: ui-monospace, monospace; font-size: .9em; color: #555; }
.axis { display: grid; grid-template-columns: 34% 1fr 6em; gap: .6em; color: #888; font-size: .8em; }
.axis .ticks { display: flex; justify-content: space-between; }
"""

# Runs after layout; records how many bars actually got a width, so a headless browser's DOM dump shows
# the waterfall was drawn, not merely present in the markup.
_SCRIPT = """
for (const sec of document.querySelectorAll("section.run")) {
  const bars = Array.from(sec.querySelectorAll(".bar"));
  sec.dataset.visibleBars = bars.filter((b) => b.getBoundingClientRect().width > 0).length;
}
document.body.dataset.rendered = "yes";
"""


class Section:
    """One waterfall: a heading, its spans, and an optional per-span note (flagged rows turn red)."""

    def __init__(
        self,
        key: str,
        title: str,
        spans: Sequence[SpanLike],
        note: Callable[[SpanLike], str | None] | None = None,
    ) -> None:
        self.key = key
        self.title = title
        self.spans = spans
        self.note = note


def _section_html(section: Section, attributes: Sequence[str]) -> list[str]:
    roots = build_forest(section.spans)
    nodes = [n for r in roots for n in r.walk()]
    key = html.escape(section.key, quote=True)
    out = [
        f'<section class="run" id="run-{key}" data-run="{key}" data-spans="{len(nodes)}">',
        f"<h2>{html.escape(section.title)}</h2>",
    ]
    if not nodes:
        out.append("<p>No spans.</p></section>")
        return out
    lo = min(n.span.start_ns for n in nodes)
    hi = max(n.span.end_ns for n in nodes)
    total = max(hi - lo, 1)
    ticks = "".join(f"<span>{total * i / 4e6:.1f} ms</span>" for i in range(5))
    out.append(f'<div class="axis"><span></span><div class="ticks">{ticks}</div><span></span></div>')
    for node in nodes:
        s = node.span
        note = section.note(s) if section.note is not None else None
        if note is None and node.missing_parent:
            note = f"parent {node.missing_parent} not received"
        elif note is None and node.in_cycle:
            note = f"parent {s.parent_span_id} is its own descendant"
        classes = ["row"]
        if node.depth == 0:
            classes.append("root")
        if note:
            classes.append("flagged")
        if s.status_code == 2:
            classes.append("error")
        left = (s.start_ns - lo) * 100 / total
        width = max(s.end_ns - s.start_ns, 0) * 100 / total
        guide = "└ " if node.depth else ""
        tags = attrs_text(s.attributes, list(attributes))
        title = f"{s.name} span={s.span_id} parent={s.parent_span_id or '-'} trace={s.trace_id}"
        out.append(
            f'<div class="{" ".join(classes)}" data-span-id="{html.escape(s.span_id, quote=True)}"'
            f' data-depth="{node.depth}" title="{html.escape(title, quote=True)}">'
            f'<div class="label" style="padding-left: {node.depth * 1.4:.1f}em">'
            f'<span class="guide">{guide}</span>{html.escape(s.name)}'
            + (f'<span class="tags">{html.escape(tags)}</span>' if tags else "")
            + (f'<span class="note">{html.escape(note.removeprefix("<- "))}</span>' if note else "")
            + "</div>"
            f'<div class="track"><div class="bar" style="left: {left:.3f}%; width: {width:.3f}%"></div></div>'
            f'<div class="dur">{html.escape(format_duration(max(s.end_ns - s.start_ns, 0)))}</div>'
            "</div>"
        )
    out.append("</section>")
    return out


def render_waterfall(
    sections: Sequence[Section],
    *,
    title: str = "ctxprop traces",
    summary: Sequence[str] = (),
    attributes: Sequence[str] = (),
) -> str:
    """A complete HTML document drawing each section as a waterfall.

    >>> page = render_waterfall([Section("empty", "Nothing yet", [])], title="demo")
    >>> page.startswith("<!doctype html>") and 'id="run-empty"' in page
    True
    """
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts.extend(f'<p class="summary">{html.escape(line)}</p>' for line in summary)
    for section in sections:
        parts.extend(_section_html(section, attributes))
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"
