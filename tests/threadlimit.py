"""A real limit on threads for a child process: a pids cgroup of its own, whose ``pids.max`` the child sets
to the threads it already has, so ``Thread.start()`` raises ``RuntimeError("can't start new thread")``
from then on (as a container's pids limit or an exhausted ``ulimit -u`` would make it).

``cgroup()`` makes the group (and removes it once the child is gone); the child joins it and sets the
limit with ``LIMIT_THREADS``'s ``limit_threads()``, which returns what starting one more thread then
says (the control), reading the group's path from ``CTXPROP_TEST_PIDS``.
It needs a writable pids controller (cgroup v1 ``/sys/fs/cgroup/pids`` or v2 ``/sys/fs/cgroup``):
``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LIMIT_THREADS", "cgroup", "unavailable"]

_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))

LIMIT_THREADS = """
def limit_threads():
    '''Join the test's pids cgroup and allow no thread beyond those running now; what starting one more
    then says (the control: "can't start new thread").'''
    import threading
    group = os.environ["CTXPROP_TEST_PIDS"]
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open(os.path.join(group, "pids.current")) as f:
        running = f.read().strip()
    with open(os.path.join(group, "pids.max"), "w") as f:
        f.write(running)
    try:
        threading.Thread(target=lambda: None).start()
    except RuntimeError as exc:
        return str(exc)
    return "started"
"""


def _root() -> Path | None:
    for root in _ROOTS:
        probe = root / f"ctxprop-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            if (probe / "pids.max").exists():
                return root
        finally:
            with contextlib.suppress(OSError):
                probe.rmdir()
    return None


@functools.cache
def unavailable() -> str | None:
    """Why no pids cgroup can be made here, or None."""
    if _root() is None:
        return "no writable pids cgroup controller (/sys/fs/cgroup/pids or /sys/fs/cgroup)"
    return None


@contextlib.contextmanager
def cgroup() -> Iterator[dict[str, str]]:
    """A new pids cgroup, as the environment a child needs to join it; removed afterwards."""
    root = _root()
    assert root is not None, unavailable()
    group = root / f"ctxprop-test-{os.getpid()}-{os.urandom(3).hex()}"
    group.mkdir()
    try:
        yield {"CTXPROP_TEST_PIDS": str(group)}
    finally:
        deadline = time.monotonic() + 10
        while True:  # the child has exited; its exit is accounted for a moment later
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
