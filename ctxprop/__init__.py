"""ctxprop: observability context that survives every executor boundary, and spans that reach the
collector however the process ends.

>>> import ctxprop
>>> with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
...     ctxprop.set_tag("job", "nightly")
...     pool.submit(lambda: ctxprop.get_isolation_scope().tags["job"]).result()
'nightly'
"""

from __future__ import annotations

from ctxprop._capture import Snapshot, capture, wrap
from ctxprop._executors import ContextAwareThreadPoolExecutor, run_in_executor_with_context
from ctxprop._instrument import instrument, uninstrument
from ctxprop._pipeline import aclose, aflush, close, flush, init
from ctxprop._process_pool import ContextAwareProcessPoolExecutor
from ctxprop._processor import CtxpropSpanProcessor
from ctxprop._proxy import run_proxied
from ctxprop._scopes import (
    AttrValue,
    Scope,
    get_current_scope,
    get_isolation_scope,
    isolation_scope,
    new_scope,
    set_tag,
    use_isolation_scope,
    use_scope,
)
from ctxprop._stats import snapshot as stats
from ctxprop._subprocess import popen_with_context, run_subprocess, subprocess_env
from ctxprop._tagging import ScopeTagSpanProcessor
from ctxprop._worker import worker

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Names that need an optional dependency are imported only when asked for, so that sentry-sdk stays
    # optional and `from ctxprop import *` never imports it.
    if name == "CtxpropIntegration":
        from ctxprop._sentry import CtxpropIntegration

        return CtxpropIntegration
    raise AttributeError(f"module 'ctxprop' has no attribute {name!r}")


__all__ = [
    "AttrValue",
    "ContextAwareProcessPoolExecutor",
    "ContextAwareThreadPoolExecutor",
    "CtxpropSpanProcessor",
    "Scope",
    "ScopeTagSpanProcessor",
    "Snapshot",
    "__version__",
    "aclose",
    "aflush",
    "capture",
    "close",
    "flush",
    "get_current_scope",
    "get_isolation_scope",
    "init",
    "instrument",
    "isolation_scope",
    "new_scope",
    "popen_with_context",
    "run_in_executor_with_context",
    "run_proxied",
    "run_subprocess",
    "set_tag",
    "stats",
    "subprocess_env",
    "uninstrument",
    "use_isolation_scope",
    "use_scope",
    "worker",
    "wrap",
]
