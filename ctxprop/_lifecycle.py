"""How a process ends, and how the pipeline still delivers: atexit, SIGTERM, and fork.

- ``atexit``: a backup ``close()`` for every ending that runs interpreter shutdown: normal exit,
  ``sys.exit()``, an unhandled exception, and KeyboardInterrupt (Ctrl-C).
- SIGTERM (the default "please stop" of process managers and containers) would kill the process without
  running atexit. ctxprop's handler closes the pipeline within its deadline and then, if the application
  had no handler of its own, restores the default action and re-sends the signal, so the process still
  dies by SIGTERM (status -15 / 143). An application handler, installed before ``init()`` or after it
  (through ``signal.signal``), is chained: ctxprop flushes, then calls it, and the application decides.
  (A handler installed after ``init()`` through a reference taken earlier, ``from signal import signal``,
  bypasses the chain and replaces ctxprop's; atexit still delivers if that handler exits the process.)
- SIGTERM while a ``close()`` is already running (atexit, the application's own, ``aclose()``): the
  handler lets that close finish within its deadline and the process dies by SIGTERM right after it.
- ``os.fork()``: the processor re-initialises itself in the child (see ``_processor``).

>>> install(lambda: None, handle_signals=False)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["closing", "install", "uninstall"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_close: Callable[[], object] | None = None
_flush: Callable[[], object] | None = None
_atexit_registered = False
_sigterm_installed = False
_app_handler: _Handler = None
_real_signal = signal.signal
_real_getsignal = signal.getsignal
_closers: set[int] = set()  # threads inside a close() right now
_term_pending = False


def _at_exit() -> None:
    close = _close
    if close is not None:
        close()


def install(
    close: Callable[[], object], *, handle_signals: bool, flush: Callable[[], object] | None = None
) -> None:
    """Register ``close`` for atexit and, when asked and possible, for SIGTERM.

    .. versionadded:: 0.1.0
    """
    global _close, _flush, _atexit_registered  # noqa: PLW0603
    _close = close
    _flush = flush or close
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True
    if handle_signals:
        _install_sigterm()


def _install_sigterm() -> None:
    global _sigterm_installed, _app_handler  # noqa: PLW0603
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        # Python only lets the main thread set handlers; atexit still covers the other endings.
        return
    prev = _real_getsignal(signal.SIGTERM)
    if prev is signal.SIG_IGN:
        # The application chose to ignore SIGTERM; ctxprop does not overrule it.
        return
    try:
        _real_signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return
    _app_handler = prev
    _sigterm_installed = True
    # An application that sets its SIGTERM handler after init() would replace ours; route that through
    # the chain instead, and show it its own handler when it asks.
    signal.signal = _signal_wrapper
    signal.getsignal = _getsignal_wrapper


def _signal_wrapper(signalnum: Any, handler: Any) -> Any:
    global _app_handler
    if _sigterm_installed and signalnum == signal.SIGTERM and _real_getsignal(signal.SIGTERM) is _on_sigterm:
        if not (callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN)):
            return _real_signal(signalnum, handler)  # let the stdlib raise its TypeError
        if threading.current_thread() is not threading.main_thread():
            return _real_signal(signalnum, handler)  # raises the stdlib's ValueError
        prev, _app_handler = _app_handler, handler
        return prev
    return _real_signal(signalnum, handler)


def _getsignal_wrapper(signalnum: Any) -> Any:
    if _sigterm_installed and signalnum == signal.SIGTERM and _real_getsignal(signal.SIGTERM) is _on_sigterm:
        return _app_handler
    return _real_getsignal(signalnum)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    handler = _app_handler
    if callable(handler):
        if _flush is not None:
            _flush()
        handler(signum, frame)
        return
    if handler is signal.SIG_IGN:
        return
    global _term_pending  # noqa: PLW0603
    if _closers:
        # A close() is running already, perhaps in the very frame this handler interrupted: dying now
        # would lose what it has not written yet. It re-sends SIGTERM when it is done (closing()).
        _term_pending = True
        return
    if _close is not None:
        _close()
    _die()


def _die() -> None:
    # Die the way SIGTERM kills a process, so supervisors see the same status as without ctxprop.
    with contextlib.suppress(ValueError):
        # Off the main thread the handler cannot be changed; ours, run by the main thread, then finds no
        # close() in progress and comes back here.
        _real_signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def closing() -> Iterator[None]:
    """Mark a ``close()`` in progress: a SIGTERM meanwhile waits for it, then kills the process."""
    me = threading.get_ident()
    _closers.add(me)
    try:
        yield
    finally:
        _closers.discard(me)
        if not _closers and _term_pending:
            _die()


def _after_fork_in_child() -> None:
    # Only the forking thread lives on in the child: a close() another thread was running is not running
    # here, and a SIGTERM the parent got is not the child's.
    global _term_pending  # noqa: PLW0603
    _closers.intersection_update({threading.get_ident()})
    _term_pending = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def uninstall() -> None:
    """Undo the SIGTERM chaining (restoring the application's handler) and disarm the atexit backup."""
    global _close, _flush, _sigterm_installed, _app_handler  # noqa: PLW0603
    _close = None
    _flush = None
    if not _sigterm_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = False
    if signal.signal is _signal_wrapper:
        signal.signal = _real_signal
    if signal.getsignal is _getsignal_wrapper:
        signal.getsignal = _real_getsignal
    try:
        if _real_getsignal(signal.SIGTERM) is _on_sigterm:
            _real_signal(signal.SIGTERM, _app_handler if _app_handler is not None else signal.SIG_DFL)
    except (ValueError, OSError, TypeError):
        pass
    _app_handler = None
