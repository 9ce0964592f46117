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
- One deadline per ending: when the chained SIGTERM flush could not deliver by its deadline (the
  collector hangs), the ``close()`` at exit does not wait for the collector again; it gets what is left
  of that same deadline (usually nothing: it writes the leftovers to the spool and returns).
- SIGINT with the default action (an application that sets ``SIG_DFL`` and re-raises it, as gunicorn's
  UvicornWorker and uvicorn do) would kill the process without atexit: while SIGINT is ``SIG_DFL`` (set
  before or after ``init()``), ctxprop's handler stands in for it, closes the pipeline, restores
  ``SIG_DFL`` and re-sends SIGINT, so the process still dies by SIGINT (status -2 / 130).
  ``signal.getsignal(SIGINT)`` still answers ``SIG_DFL``. Python's own handler (KeyboardInterrupt) and
  an application's handler are left alone: atexit delivers there.
- PID 1 (a container without an init): the kernel ignores a default-action SIGTERM or SIGINT sent to
  it, so the process keeps running. With ctxprop it does the same: the handler flushes and returns, and
  the pipeline stays open for the spans made afterwards.
- ``os.fork()``: the processor re-initialises itself in the child (see ``_processor``).

>>> install(lambda: None, handle_signals=False)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["closing", "install", "uninstall"]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_close: Callable[..., object] | None = None
_flush: Callable[[], object] | None = None
_atexit_registered = False
_sigterm_installed = False
_app_handler: _Handler = None
_real_signal = signal.signal
_real_getsignal = signal.getsignal
_closers: set[int] = set()  # threads inside a close() right now
_term_pending = False
_int_pending = False
_signals_wrapped = False
# When a chained SIGTERM flush ran out of its deadline: the monotonic time that deadline ended, so the
# close() at exit waits only for what is left of it (one deadline per ending, not two).
_spent_deadline: float | None = None


def _at_exit() -> None:
    close = _close
    if close is None:
        return
    spent = _spent_deadline
    if spent is None:
        close()
    else:
        close(max(0.0, spent - time.monotonic()))


def install(
    close: Callable[..., object],
    *,
    handle_signals: bool,
    flush: Callable[[], object] | None = None,
    close_timeout: float = 3.0,
) -> None:
    """Register ``close`` (called with no argument, or with a timeout in seconds) for atexit and, when
    asked and possible, for SIGTERM and a default-action SIGINT.

    ``close_timeout`` is the deadline a chained SIGTERM flush gets, as ``flush()`` would.

    .. versionadded:: 0.1.0
    """
    global _close, _flush, _atexit_registered, _spent_deadline, _close_timeout  # noqa: PLW0603
    _close = close
    _flush = flush or close
    _spent_deadline = None
    _close_timeout = close_timeout
    if not _atexit_registered:
        atexit.register(_at_exit)
        _atexit_registered = True
    if handle_signals:
        _install_sigterm()
        _install_sigint()


_close_timeout = 3.0


def _wrap_signal_functions() -> None:
    global _signals_wrapped  # noqa: PLW0603
    # An application that sets its handler after init() would replace ours; route that through the
    # chain instead, and show it its own handler when it asks.
    signal.signal = _signal_wrapper
    signal.getsignal = _getsignal_wrapper
    _signals_wrapped = True


def _install_sigint() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    _wrap_signal_functions()
    if _real_getsignal(signal.SIGINT) is signal.SIG_DFL:
        with contextlib.suppress(ValueError, OSError):
            _real_signal(signal.SIGINT, _on_sigint)


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
    _wrap_signal_functions()


def _signal_wrapper(signalnum: Any, handler: Any) -> Any:
    global _app_handler
    if _sigterm_installed and signalnum == signal.SIGTERM and _real_getsignal(signal.SIGTERM) is _on_sigterm:
        if not (callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN)):
            return _real_signal(signalnum, handler)  # let the stdlib raise its TypeError
        if threading.current_thread() is not threading.main_thread():
            return _real_signal(signalnum, handler)  # raises the stdlib's ValueError
        prev, _app_handler = _app_handler, handler
        return prev
    if (
        signalnum == signal.SIGINT
        and _close is not None
        and handler is signal.SIG_DFL
        and threading.current_thread() is threading.main_thread()
    ):
        # The default action would kill the process without atexit: stand in for it.
        prev = _getsignal_wrapper(signal.SIGINT)
        _real_signal(signal.SIGINT, _on_sigint)
        return prev
    prev = _real_signal(signalnum, handler)
    return signal.SIG_DFL if prev is _on_sigint else prev


def _getsignal_wrapper(signalnum: Any) -> Any:
    if _sigterm_installed and signalnum == signal.SIGTERM and _real_getsignal(signal.SIGTERM) is _on_sigterm:
        return _app_handler
    current = _real_getsignal(signalnum)
    return signal.SIG_DFL if current is _on_sigint else current


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _term_pending, _spent_deadline  # noqa: PLW0603
    handler = _app_handler
    if callable(handler):
        if _flush is not None:
            end = time.monotonic() + _close_timeout
            if _flush() is False:
                # The collector did not take everything within the deadline: the exit's close() must not
                # wait for it a second time.
                _spent_deadline = end
        handler(signum, frame)
        return
    if handler is signal.SIG_IGN:
        return
    if os.getpid() == 1:
        _ignored_like_the_kernel()
        return
    if _closers:
        # A close() is running already, perhaps in the very frame this handler interrupted: dying now
        # would lose what it has not written yet. It re-sends SIGTERM when it is done (closing()).
        _term_pending = True
        return
    if _close is not None:
        _close()
    _die()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """SIGINT while the application wants its default action: deliver, then die by SIGINT."""
    global _int_pending  # noqa: PLW0603
    if os.getpid() == 1:
        _ignored_like_the_kernel()
        return
    if _closers:
        _int_pending = True  # the close() running finishes first (see closing())
        return
    if _close is not None:
        _close()
    _die(signal.SIGINT)


def _ignored_like_the_kernel() -> None:
    """PID 1 got a signal whose action is the default: the kernel ignores it, so the process lives on.
    Flush (an orchestrator's SIGTERM often precedes a SIGKILL) and keep the pipeline open."""
    if _flush is not None and not _closers:
        _flush()


def _die(signum: int = signal.SIGTERM) -> None:
    # Die the way the signal kills a process, so supervisors see the same status as without ctxprop.
    with contextlib.suppress(ValueError):
        # Off the main thread the handler cannot be changed; ours, run by the main thread, then finds no
        # close() in progress and comes back here.
        _real_signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


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
        if not _closers and _int_pending:
            _die(signal.SIGINT)


def _after_fork_in_child() -> None:
    # Only the forking thread lives on in the child: a close() another thread was running is not running
    # here, and a SIGTERM the parent got is not the child's.
    global _term_pending, _int_pending  # noqa: PLW0603
    _closers.intersection_update({threading.get_ident()})
    _term_pending = _int_pending = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def uninstall() -> None:
    """Undo the SIGTERM chaining (restoring the application's handler) and disarm the atexit backup."""
    global _close, _flush, _sigterm_installed, _app_handler, _signals_wrapped  # noqa: PLW0603
    _close = None
    _flush = None
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError, TypeError):
        if _real_getsignal(signal.SIGINT) is _on_sigint:
            _real_signal(signal.SIGINT, signal.SIG_DFL)
    if _signals_wrapped:
        _signals_wrapped = False
        if signal.signal is _signal_wrapper:
            signal.signal = _real_signal
        if signal.getsignal is _getsignal_wrapper:
            signal.getsignal = _real_getsignal
    if not _sigterm_installed:
        return
    _sigterm_installed = False
    try:
        if _real_getsignal(signal.SIGTERM) is _on_sigterm:
            _real_signal(signal.SIGTERM, _app_handler if _app_handler is not None else signal.SIG_DFL)
    except (ValueError, OSError, TypeError):
        pass
    _app_handler = None
