"""The offline spool: OTLP requests that could not be sent yet wait there and are sent later, once.

This module is the spool's typed interface (:class:`Spool`), its factory (:func:`open_spool`, also
``Spool.open``) and what both implementations share: the status record, the default directory, the
caps read from the environment, the meaning of one send attempt during a replay, and the one registry
of open spools (every spool, disk or memory, registers itself; in a forked child each one drops what
belongs to the parent: :meth:`Spool._after_fork_in_child`).

- ``_spool_disk``: the POSIX implementation (a private directory of segment files, leases held by
  ``flock()``, a durable write-ahead mode); it falls back to memory when its disk fails mid-run.
- ``_spool_memory``: a bounded in-memory implementation, used when no directory is usable (another
  user's, a symbolic link, a full or read-only disk, no ``fcntl``). Its content cannot outlive the
  process: what it still holds at ``close()`` is counted as dropped (``spool_dropped_memory_spans``).
- ``_spool_format``: the record format of a segment file.

Delivery guarantee of ``replay()``: a record is removed once the collector acknowledged it, and a
record acknowledged is never sent again (leases keep concurrent replays, threads or processes, apart).
A request refused by the collector or by the network before it was answered "no" is sent again later;
that is exactly once as long as a "no" means the collector did not keep it. The one edge is a request
whose outcome is unknown: the collector may have kept it, but the answer did not arrive within the
request's full timeout. Such a record is kept and sent once more later (at least once: counted in
``spool_uncertain_spans``, so a duplicate is never silent), because losing spans the collector never got
is worse than a duplicate that a backend can recognise by its span id. A request is never cut short by
the replay's own slicing: ``replay(..., timeout=t)`` starts a request only before ``deadline`` and always
gives it its whole ``t``; only a caller's hard deadline (``timeout=None``: ``close()``, the CLI) can cut a
request short, and that is the caller's choice of deadline over certainty: such a request is UNCERTAIN
too, and counted the same way.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import re
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolStatus", "default_spool_dir", "open_spool"]

DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_MAX_AGE = 7 * 86400.0

#: ``send(payload, timeout_s)``: True/False, or an outcome with ``ok``/``permanent`` attributes.
Send = Callable[[bytes, float], object]
Progress = Callable[[int], None]


def _sanitize(service_name: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", service_name or "").lstrip(".")[:64]
    return name or "unknown_service"


def default_spool_dir(service_name: str | None) -> Path:
    """The spool directory used when ``init()`` gets no ``spool_dir``.

    ``CTXPROP_SPOOL_DIR`` if set (used as is), else ``$XDG_STATE_HOME/ctxprop/<service>``, else
    ``~/.local/state/ctxprop/<service>``; the service name is reduced to ``[A-Za-z0-9._-]``.

    >>> default_spool_dir("billing api").name
    'billing_api'
    """
    configured = os.environ.get("CTXPROP_SPOOL_DIR")
    if configured:
        return Path(configured).expanduser()
    state = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if state and os.path.isabs(state):
        base = Path(state)
    else:
        try:
            base = Path.home() / ".local" / "state"
        except (RuntimeError, KeyError):
            base = Path(tempfile.gettempdir()) / f"ctxprop-{os.getuid()}"
    return base / "ctxprop" / _sanitize(service_name)


def open_spool(
    directory: str | os.PathLike[str],
    *,
    max_bytes: float | None = None,
    max_age: float | None = None,
    fsync: bool | None = None,
    read_only: bool = False,
) -> Spool:
    """Open (creating it 0700 if needed) the spool in ``directory``; never raises.

    ``max_bytes`` defaults to ``CTXPROP_SPOOL_MAX_BYTES``, else 64 MiB; ``max_age`` (seconds) to
    ``CTXPROP_SPOOL_MAX_AGE``, else 7 days; ``inf`` means no cap. A symbolic link, another user's directory
    or one that cannot be created gives a memory-only spool and one ``RuntimeWarning``. A directory of
    this user with a wider mode is repaired to 0700.

    ``fsync`` (default: ``CTXPROP_SPOOL_FSYNC``, else on) makes each durable write-ahead batch reach the
    disk before its export starts, so it survives a power cut or kernel crash too. A write alone already
    survives ``kill -9`` and ``os._exit`` (the kernel holds it), so it can be turned off where the disk is
    slow and only process deaths matter.

    ``read_only`` (``spool status``) opens an existing directory as it is: nothing is created, repaired,
    recovered, dropped or deleted, and ``replay``/``purge`` do nothing; ``status()`` reports what is there.
    """
    if max_bytes is None:
        max_bytes = spool_cap("CTXPROP_SPOOL_MAX_BYTES", DEFAULT_MAX_BYTES, os.environ, lenient=True)
    if max_age is None:
        max_age = spool_cap("CTXPROP_SPOOL_MAX_AGE", DEFAULT_MAX_AGE, os.environ, lenient=True)
    if fsync is None:
        setting = os.environ.get("CTXPROP_SPOOL_FSYNC", "1").strip().lower()
        fsync = setting not in ("0", "false", "no", "off")
    return _spool_disk.open_disk_spool(
        Path(directory), max_bytes=max_bytes, max_age=max_age, fsync=fsync, read_only=read_only
    )


@dataclass(frozen=True)
class SpoolStatus:
    """What a spool holds: ``Spool.status()`` and ``python -m ctxprop spool status``.

    ``segments``, ``spans`` and ``bytes`` wait to be sent; ``leased`` segments are being sent by running
    processes. ``dropped`` spans (size or age cap), ``corrupt`` records and ``rejected`` spans (refused for
    good by the collector) are totals over every process that used the spool since the last purge.
    """

    directory: str | None
    segments: int
    spans: int
    bytes: int
    oldest_age: float | None
    dropped: int
    corrupt: int
    leased: int
    memory_only: bool
    rejected: int = 0


class Spool(abc.ABC):
    """A bounded, per-user store of OTLP requests that could not be sent yet.

    Never raises into the caller: an unusable directory or a full disk degrades it to memory only, with
    one ``RuntimeWarning``. Drops (size or age cap) and corrupt records are counted in ``ctxprop.stats()``.

    >>> import tempfile
    >>> spool = Spool.open(tempfile.mkdtemp())
    >>> spool.append(b"<ExportTraceServiceRequest bytes>", span_count=3)
    >>> spool.replay(lambda payload, timeout: True, deadline=float("inf"))
    3
    """

    directory: Path
    max_bytes: float
    max_age: float
    fsync: bool
    #: Why the spool is memory-only (None while it uses its directory).
    problem: str | None

    #: :func:`open_spool`, the factory.
    open = staticmethod(open_spool)

    @property
    def memory_only(self) -> bool:
        """Whether what this spool holds is lost with the process (no usable directory)."""
        return self.problem is not None

    @abc.abstractmethod
    def append(self, payload: bytes, span_count: int) -> None:
        """Keep ``payload`` (serialized OTLP request bytes holding ``span_count`` spans) for a later send."""

    @abc.abstractmethod
    def write_ahead(self, payload: bytes, span_count: int) -> object | None:
        """Durable mode: store a batch before it is exported; a handle for ``ack``/``release``, or None.

        None means it could not be stored durably (memory-only spool, too many batches in flight):
        export it anyway and ``append`` it if that fails.
        """

    @abc.abstractmethod
    def ack(self, handle: object) -> None:
        """The batch written ahead under ``handle`` was delivered: forget it."""

    @abc.abstractmethod
    def release(self, handle: object) -> None:
        """The export of the batch written ahead under ``handle`` failed: it becomes a pending record."""

    @abc.abstractmethod
    def replay(
        self,
        send: Send,
        deadline: float,
        *,
        timeout: float | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Send what is pending, oldest first, until done or a send fails; returns the spans delivered.

        ``deadline`` (monotonic): no request starts after it. ``timeout``: each request's own budget,
        given whole whatever is left of ``deadline`` (a background replay, which no caller waits for);
        None gives each request what is left of ``deadline`` (a caller's hard deadline). ``send(payload,
        timeout_s)`` returns True when the collector acknowledged the request (or an outcome with
        ``.ok``; one with ``.permanent`` set drops that record, counted, as unsendable).
        ``progress(spans)`` is called after each acknowledged record.
        """

    @abc.abstractmethod
    def has_pending(self) -> bool:
        """Whether anything waits to be sent."""

    @abc.abstractmethod
    def status(self) -> SpoolStatus:
        """Segments, spans, bytes and age of what waits, plus the drops and corrupt records on record.

        Read-only: it never deletes, moves or rewrites anything.
        """

    @abc.abstractmethod
    def purge(self) -> int:
        """Delete everything pending (not what another live process is sending); returns spans removed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the spool holds open; what only memory held is counted as dropped."""

    @abc.abstractmethod
    def _after_fork_in_child(self) -> None:
        """In a child just forked: drop what belongs to the parent (see :func:`register_open`).

        Locks held by the parent's threads at fork() would never be released here, and what the
        parent holds (its records, its leases) stays the parent's to send.
        """

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def spool_cap(name: str, default: float, environ: Mapping[str, str], *, lenient: bool) -> float:
    """The positive cap in ``environ[name]`` (``inf`` = no cap), else ``default``.

    A malformed value raises ``ValueError`` (``init()`` validates the environment that way), or, with
    ``lenient`` (a spool opened outside ``init()``: the CLI), warns and keeps the default.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if value > 0:  # nan fails this; inf passes: no cap
        return value
    message = f"{name}={raw!r}: expected a positive number, or inf for no cap"
    if not lenient:
        raise ValueError(message)
    import warnings

    with contextlib.suppress(Exception):
        warnings.warn(f"ctxprop: ignoring {message}", RuntimeWarning, stacklevel=3)
    return default


DELIVERED, REJECTED, FAILED, UNCERTAIN = "delivered", "rejected", "failed", "uncertain"


def attempt(send: Send, payload: bytes, deadline: float, timeout: float | None) -> str:
    """One send of ``payload``: DELIVERED, REJECTED (for good), FAILED (not kept) or UNCERTAIN.

    Started only before ``deadline``; it gets ``timeout`` whole when given, else what is left of
    ``deadline``. An answerless failure that used up its whole budget is UNCERTAIN: the collector may
    hold the request. ``send`` may answer a bool, or an outcome with ``ok`` and
    ``permanent`` attributes (the pipeline's sender); an outcome with a bool ``uncertain`` says so itself.
    """
    now = time.monotonic()
    budget = timeout if timeout is not None else deadline - now
    if now >= deadline or budget <= 0:
        return FAILED
    try:
        answer = send(payload, budget)
    except Exception:  # noqa: BLE001 - a failing sender is a failed send
        return FAILED
    verdict = _verdict(answer)
    if verdict is None:
        # No answer within the whole budget: a timeout after the request may have arrived.
        timed_out = time.monotonic() - now >= 0.9 * budget
        verdict = UNCERTAIN if timed_out else FAILED
    return verdict


def _verdict(answer: object) -> str | None:
    """What ``answer`` says for sure; None for an answerless failure (the sender could not tell why)."""
    if isinstance(answer, bool):
        return DELIVERED if answer else None
    if getattr(answer, "ok", False) is True:
        return DELIVERED
    if getattr(answer, "permanent", False) is True:
        return REJECTED
    said = getattr(answer, "uncertain", None)
    if isinstance(said, bool):
        return UNCERTAIN if said else FAILED
    # The collector answered "not now" (a status): it did not keep the request.
    return FAILED if getattr(answer, "status", None) is not None else None


def report(progress: Progress | None, spans: int) -> None:
    """Tell ``progress`` (if any) that ``spans`` more spans were delivered; never raises."""
    if progress is not None:
        with contextlib.suppress(Exception):
            progress(spans)


# Every open spool, disk or memory (weakly: a spool dropped without close() is forgotten), so that one
# fork hook resets them all in the child.
_open_spools: weakref.WeakSet[Spool] = weakref.WeakSet()


def register_open(spool: Spool) -> None:
    """Have ``spool`` reset in every child forked from now on; called last in each ``__init__``."""
    _open_spools.add(spool)


def _after_fork_in_child() -> None:
    for spool in list(_open_spools):
        spool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# At the end (the implementations import this module's names): imported with this module, not at the
# first open(), which may run after the process dropped its privileges or lost access to its files.
from ctxprop import _spool_disk  # noqa: E402
