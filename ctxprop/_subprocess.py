"""Placeholder: ``subprocess_env()`` (issue 5, being written)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

__all__ = ["subprocess_env"]


def subprocess_env(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    raise NotImplementedError("ctxprop.subprocess_env is being written")
