"""Placeholder: the ``@worker`` decorator (issue 2, being written)."""

from __future__ import annotations

from typing import Any

__all__ = ["worker"]


def worker(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("ctxprop.worker is being written")
