"""ctxprop: observability context that survives every executor boundary, and spans that reach the
collector however the process ends.

>>> import ctxprop
>>> with ctxprop.ContextAwareThreadPoolExecutor(max_workers=2) as pool:
...     ctxprop.set_tag("job", "nightly")
...     pool.submit(lambda: ctxprop.get_isolation_scope().tags["job"]).result()
'nightly'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ctxprop._capture import Snapshot, capture, wrap
    from ctxprop._dask import CtxpropWorkerPlugin as CtxpropWorkerPlugin  # optional: not in __all__
    from ctxprop._executors import (
        ContextAwareExecutor,
        ContextAwareThreadPoolExecutor,
        run_in_executor_with_context,
    )
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
    from ctxprop._sentry import CtxpropIntegration as CtxpropIntegration  # optional: not in __all__
    from ctxprop._stats import snapshot as stats
    from ctxprop._subprocess import popen_with_context, run_subprocess, subprocess_env
    from ctxprop._tagging import ScopeTagSpanProcessor
    from ctxprop._worker import worker

__version__ = "0.1.0"

# Public name -> (private module, name there). Imported on first use (PEP 562): `import ctxprop` stays
# cheap, which matters because the pytest plugin entry point imports the package in every pytest run of
# every project that has ctxprop installed, and sentry-sdk stays optional.
_EXPORTS: dict[str, tuple[str, str]] = {
    "AttrValue": ("ctxprop._scopes", "AttrValue"),
    "ContextAwareExecutor": ("ctxprop._executors", "ContextAwareExecutor"),
    "ContextAwareProcessPoolExecutor": ("ctxprop._process_pool", "ContextAwareProcessPoolExecutor"),
    "ContextAwareThreadPoolExecutor": ("ctxprop._executors", "ContextAwareThreadPoolExecutor"),
    "CtxpropIntegration": ("ctxprop._sentry", "CtxpropIntegration"),
    "CtxpropWorkerPlugin": ("ctxprop._dask", "CtxpropWorkerPlugin"),
    "CtxpropSpanProcessor": ("ctxprop._processor", "CtxpropSpanProcessor"),
    "Scope": ("ctxprop._scopes", "Scope"),
    "ScopeTagSpanProcessor": ("ctxprop._tagging", "ScopeTagSpanProcessor"),
    "Snapshot": ("ctxprop._capture", "Snapshot"),
    "aclose": ("ctxprop._pipeline", "aclose"),
    "aflush": ("ctxprop._pipeline", "aflush"),
    "capture": ("ctxprop._capture", "capture"),
    "close": ("ctxprop._pipeline", "close"),
    "flush": ("ctxprop._pipeline", "flush"),
    "get_current_scope": ("ctxprop._scopes", "get_current_scope"),
    "get_isolation_scope": ("ctxprop._scopes", "get_isolation_scope"),
    "init": ("ctxprop._pipeline", "init"),
    "instrument": ("ctxprop._instrument", "instrument"),
    "isolation_scope": ("ctxprop._scopes", "isolation_scope"),
    "new_scope": ("ctxprop._scopes", "new_scope"),
    "popen_with_context": ("ctxprop._subprocess", "popen_with_context"),
    "run_in_executor_with_context": ("ctxprop._executors", "run_in_executor_with_context"),
    "run_proxied": ("ctxprop._proxy", "run_proxied"),
    "run_subprocess": ("ctxprop._subprocess", "run_subprocess"),
    "set_tag": ("ctxprop._scopes", "set_tag"),
    "stats": ("ctxprop._stats", "snapshot"),
    "subprocess_env": ("ctxprop._subprocess", "subprocess_env"),
    "uninstrument": ("ctxprop._instrument", "uninstrument"),
    "use_isolation_scope": ("ctxprop._scopes", "use_isolation_scope"),
    "use_scope": ("ctxprop._scopes", "use_scope"),
    "worker": ("ctxprop._worker", "worker"),
    "wrap": ("ctxprop._capture", "wrap"),
}


def __getattr__(name: str) -> object:
    try:
        module_name, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'ctxprop' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value  # later lookups are plain module attributes
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "AttrValue",
    "ContextAwareExecutor",
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
