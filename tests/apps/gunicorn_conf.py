"""gunicorn settings of a --preload deployment that sets telemetry up in each worker, not in the master."""

from __future__ import annotations

from typing import Any

import telemetry


def post_fork(server: Any, worker: Any) -> None:
    """Runs in each new worker right after the fork."""
    telemetry.setup("asgi-app")
