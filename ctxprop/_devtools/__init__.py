"""Developer tools, kept apart from the runtime: nothing here is imported by ``import ctxprop`` or by the
pipeline.

- ``cli``: ``python -m ctxprop <command>``, one entry point, one module per command;
- ``demo``: ``python -m ctxprop demo``, the seed scenario with a plain pool and with ctxprop;
- ``collector``: ``python -m ctxprop collector``, a local OTLP/HTTP receiver that prints trace trees;
- ``spool_cli``: ``python -m ctxprop spool status|replay|purge``;
- ``receiver``: the loopback OTLP/HTTP receiver used by the above, the tests and the benchmarks;
- ``tree`` and ``html``: text trees and the HTML waterfall of a set of spans.
"""
