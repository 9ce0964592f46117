"""Placeholder: ``instrument()`` / ``uninstrument()`` (issue 5, being written)."""

from __future__ import annotations

__all__ = ["instrument", "uninstrument"]


def instrument() -> None:
    raise NotImplementedError("ctxprop.instrument is being written")


def uninstrument() -> None:
    raise NotImplementedError("ctxprop.uninstrument is being written")
