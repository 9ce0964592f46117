"""Name resolution and connecting within the request's deadline.

``socket.create_connection(address, timeout)`` bounds neither of its two waits by ``timeout``:
``getaddrinfo`` blocks as long as the system resolver likes (with glibc's defaults, 10 s per nameserver
that does not answer, whatever the caller's deadline), and each address it returns is then given the
whole timeout again, so a black-holed first address (a broken IPv6 route, say) uses up the deadline and
the request fails though the next address answers. The export thread sat in such a request far past its
timeout, retries and later batches behind it; where no thread can start, ``close()`` itself would wait.

So the collector's name is resolved here on a short-lived helper thread, and the caller waits for it at
most until the request's deadline; a late answer still lands in the cache for the next request. An answer
is kept for ``TTL`` seconds; after that, and after every failure to connect to all its addresses, the
name is looked up again, but the stale answer is used meanwhile (the collector usually did not move, and
a resolver that is down must not stop delivery to it). Each address is then tried with an equal share of
what is left of the deadline, so a black-holed one cannot take the time of those after it.

IP literals are never looked up. When no thread can start (a thread limit, or interpreter shutdown on
Python 3.12.0-3.12.2), a stale answer is used as it is; with none, the lookup runs in the calling thread:
the one wait here without a deadline.

>>> r = Resolver("127.0.0.1", 9)
>>> [info[4] for info in r.addresses(time.monotonic() + 1)]
[('127.0.0.1', 9)]
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

__all__ = ["Resolver", "connect"]

#: How long an answer is used before the name is looked up again (getaddrinfo reports no DNS TTL).
TTL = 30.0

_AddrInfo = tuple[Any, ...]  # one getaddrinfo() result: (family, type, proto, canonname, sockaddr)


class _Lookup:
    """One getaddrinfo() call in flight, on a helper thread (or, if none can start, in the caller)."""

    __slots__ = ("done", "error", "result", "thread")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: list[_AddrInfo] | None = None
        self.error: OSError | None = None
        self.thread: threading.Thread | None = None


class Resolver:
    """The addresses of one host and port, looked up within a deadline and cached for ``TTL`` seconds."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._fixed: list[_AddrInfo] | None = None
        if _is_literal(host):
            # Numeric: getaddrinfo answers at once, without asking any resolver.
            self._fixed = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
        self._lock = threading.Lock()
        self._answer: list[_AddrInfo] | None = None
        self._expires = 0.0  # time.monotonic() after which the answer is stale
        self._lookup: _Lookup | None = None

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's lookup thread does not exist here (its answer is kept)."""
        self._lock = threading.Lock()
        self._lookup = None

    def forget(self) -> None:
        """No address of the answer could be connected to: look the name up again on the next request."""
        with self._lock:
            self._expires = 0.0

    def addresses(self, deadline: float) -> list[_AddrInfo]:
        """The addresses to try, by ``deadline`` (``time.monotonic()``); raises OSError (``TimeoutError``
        when the resolver did not answer in time) if there are none."""
        if self._fixed is not None:
            return self._fixed
        with self._lock:
            answer = self._answer
            if answer is not None and time.monotonic() < self._expires:
                return answer
            lookup = self._lookup
            if lookup is None:
                lookup = self._lookup = _Lookup()
                start = True
            else:
                start = False
        if start:
            self._start(lookup, inline=answer is None)
        if answer is not None:
            return answer  # stale, while the lookup runs: the collector has most likely not moved
        if not lookup.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no answer from the resolver for {self.host!r} by the request's deadline")
        if lookup.thread is not None:
            lookup.thread.join(max(0.0, deadline - time.monotonic()))  # ends at once: no thread outlives it
        if lookup.result is None:
            raise lookup.error or OSError(f"cannot resolve {self.host!r}")
        return lookup.result

    def _start(self, lookup: _Lookup, *, inline: bool) -> None:
        thread = threading.Thread(target=self._run, args=(lookup,), name="ctxprop-resolver", daemon=True)
        lookup.thread = thread
        try:
            thread.start()
        except RuntimeError:
            # No thread can start now. With no answer at all, resolve here (see the module's docstring);
            # with a stale one, keep using it and try again on the next request.
            lookup.thread = None
            if inline:
                self._run(lookup)
            else:
                self._finish(lookup, None, None)

    def _run(self, lookup: _Lookup) -> None:
        error: OSError | None = None
        try:
            result: list[_AddrInfo] | None = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            result, error = None, exc
        except Exception as exc:  # noqa: BLE001 - a helper thread must not die noisily (UnicodeError, ...)
            result, error = None, OSError(f"cannot resolve {self.host!r}: {exc!r}")
        self._finish(lookup, result or None, error)

    def _finish(self, lookup: _Lookup, result: list[_AddrInfo] | None, error: OSError | None) -> None:
        """End ``lookup``: keep its answer, if any, and wake whoever waits for it."""
        with self._lock:
            if result is not None:
                self._answer = result
                self._expires = time.monotonic() + TTL
            if self._lookup is lookup:
                self._lookup = None
        lookup.result, lookup.error = result, error
        lookup.done.set()


def connect(resolver: Resolver, deadline: float) -> socket.socket:
    """A socket connected to one of ``resolver``'s addresses by ``deadline``, each address given an equal
    share of what is left; raises the last OSError (or TimeoutError) when none connects."""
    infos = resolver.addresses(deadline)
    last: OSError | None = None
    for i, (family, kind, proto, _, sockaddr) in enumerate(infos):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left / (len(infos) - i))
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    else:
        resolver.forget()  # every address failed: the collector may have moved
    raise last or TimeoutError("the request's deadline passed before a connection was made")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 scope id ("fe80::1%eth0") is allowed
    except ValueError:
        return False
    return True
