"""Dask distributed: a worker plugin that gives each worker process its own ctxprop pipeline.

Without it, spans made in Dask tasks submitted through ctxprop (``ContextAwareExecutor`` over
``client.get_executor()``, or ``Client.submit``/``map`` under ``instrument()``) ride home with each
result to the client's pipeline. With it registered, each worker runs ``init()`` with the given
arguments, and those spans go from the worker straight to the collector instead (never both): the way
for results that are never fetched, or workers that can reach the collector.
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ctxprop import _stats

__all__ = ["CtxpropWorkerPlugin"]


class CtxpropWorkerPlugin(WorkerPlugin):
    """A Dask ``WorkerPlugin`` that runs ``ctxprop.init(**init_kwargs)`` in every worker and
    ``ctxprop.close()`` when the worker shuts down.

    ``handle_signals`` defaults to False there: the nanny manages the worker's life, and the plugin's
    teardown flushes. The arguments are pickled to the workers (give an ``endpoint``, not an exporter
    object that cannot travel).

    >>> from ctxprop import CtxpropWorkerPlugin
    >>> plugin = CtxpropWorkerPlugin(endpoint="http://127.0.0.1:4318/v1/traces", service_name="jobs")
    >>> # client.register_plugin(plugin)

    .. versionadded:: 0.1.0
    """

    name = "ctxprop"

    def __init__(self, **init_kwargs: Any) -> None:
        self.init_kwargs = {"handle_signals": False, **init_kwargs}

    def setup(self, worker: Any) -> None:
        """Start the worker's pipeline (a bad configuration is counted, never fails the worker)."""
        import ctxprop
        from ctxprop import _worker_spans

        try:
            # Tasks that ran before the plugin made the worker collect their spans for the client.
            _worker_spans.release_collecting_provider()
            ctxprop.init(**self.init_kwargs)
        except Exception:  # noqa: BLE001 - the worker must run tasks even with telemetry misconfigured
            _stats.incr("worker_plugin_errors")

    def teardown(self, worker: Any) -> None:
        """Flush and close the worker's pipeline, within its ``close_timeout``."""
        import ctxprop

        ctxprop.close()
