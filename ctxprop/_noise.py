"""OpenTelemetry's warnings that repeat once per event: shown once per process, the rest counted.

The SDK's ``BoundedAttributes`` logs "Attributes dict is full" (logger ``opentelemetry.attributes``) for
every attribute past the span's limit (128 by default): a span given 100,000 attributes printed 99,872
lines. The filter installed here lets the first such record through, with a note saying where the
rest go, and counts every one in ``ctxprop.stats()["span_attributes_dropped"]``. The span itself
records how many it dropped (``dropped_attributes``, exported as ``dropped_attributes_count``).

>>> install_attribute_filter()
>>> install_attribute_filter()  # idempotent
"""

from __future__ import annotations

import logging
import threading

from ctxprop import _stats

__all__ = ["install_attribute_filter"]

_LOGGER = "opentelemetry.attributes"
_FULL = "Attributes dict is full"


class _OnceThenCount(logging.Filter):
    """Passes the first "dict is full" record of the process; drops and counts the others."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(_FULL):
            return True
        _stats.incr("span_attributes_dropped")
        with self._lock:
            if self._shown:
                return False
            self._shown = True
        record.msg += (
            " (shown once per process; ctxprop counts the others in ctxprop.stats()"
            "['span_attributes_dropped'])"
        )
        return True


_filter = _OnceThenCount()


def install_attribute_filter() -> None:
    """Attach the filter to OpenTelemetry's attributes logger (once; a second call does nothing)."""
    logger = logging.getLogger(_LOGGER)
    if _filter not in logger.filters:
        logger.addFilter(_filter)
