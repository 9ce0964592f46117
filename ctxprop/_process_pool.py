"""Placeholder: ``ContextAwareProcessPoolExecutor`` (issue 5, being written)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

__all__ = ["ContextAwareProcessPoolExecutor"]


class ContextAwareProcessPoolExecutor(ProcessPoolExecutor):
    """Being written."""
