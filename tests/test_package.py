"""The public surface of the package: every exported name resolves, and importing it is cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ctxprop


def test_every_public_name_resolves_to_its_implementation() -> None:
    """Each name in ``__all__`` (and the optional Sentry integration) resolves through the lazy exports."""
    for name in ctxprop.__all__:
        assert getattr(ctxprop, name) is not None, name
    from ctxprop._capture import capture
    from ctxprop._sentry import CtxpropIntegration
    from ctxprop._stats import snapshot

    assert ctxprop.capture is capture
    assert ctxprop.stats is snapshot
    assert ctxprop.CtxpropIntegration is CtxpropIntegration
    assert set(ctxprop.__all__) <= set(dir(ctxprop))


def test_unknown_name_is_an_attribute_error() -> None:
    """A name ctxprop does not export raises AttributeError, as for any module."""
    with pytest.raises(AttributeError, match="no_such_name"):
        ctxprop.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_import_ctxprop_loads_no_sdk_and_no_sentry() -> None:
    """``import ctxprop`` (as the pytest plugin's entry point does in every pytest run) imports neither the
    OpenTelemetry SDK nor sentry-sdk; ``from ctxprop import *`` never imports sentry-sdk."""
    code = (
        "import sys, ctxprop, ctxprop.pytest_plugin\n"
        "heavy = sorted(m for m in ('opentelemetry.sdk', 'sentry_sdk', 'asyncio') if m in sys.modules)\n"
        "from ctxprop import *\n"
        "print(','.join(heavy) + '|' + str('sentry_sdk' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "|False", out.stdout
