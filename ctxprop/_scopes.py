"""Isolation and current scopes, each held in its own ``ContextVar``.

A scope's tags live in a dict that is never changed in place once a scope holds it: a write builds a new
dict and swaps it in. So ``fork()`` shares the dict (O(1), whatever the scope holds) and a later write on
either side cannot reach the other: copy-on-write where the copy is paid by the writer, not by the
submitter of a task.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType

from ctxprop import _stats

__all__ = [
    "AttrValue",
    "Scope",
    "get_current_scope",
    "get_isolation_scope",
    "isolation_scope",
    "new_scope",
    "set_tag",
    "use_isolation_scope",
    "use_scope",
]

#: A value OpenTelemetry accepts as a span attribute.
AttrValue = str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]

_EMPTY: dict[str, AttrValue] = {}
_SCALARS = (str, bool, int, float)
_new_object = object.__new__
# Writers serialise on one lock so two threads writing the same scope at once cannot lose a write
# (read-copy-swap is not atomic). Readers (capture, span start) never take it: they read whichever
# complete dict is current.
_write_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at fork(); the child has no such thread to free it,
    # so without a fresh lock its first set_tag() would hang for ever.
    global _write_lock  # noqa: PLW0603
    _write_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _valid_value(value: object) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        kinds = {type(v) for v in value}
        return len(kinds) <= 1 and all(isinstance(v, _SCALARS) for v in value)
    return False


class Scope:
    """A bag of tags that become attributes of every span started while the scope is active.

    ``fork()`` is O(1): the fork shares the parent's tags until one side writes.

    >>> s = Scope()
    >>> s.set_tag("job", "nightly")
    >>> child = s.fork()
    >>> child.set_tag("job", "retry")
    >>> s.tags["job"], child.tags["job"]
    ('nightly', 'retry')

    .. versionadded:: 0.1.0
    """

    __slots__ = ("__weakref__", "_tags")

    def __init__(self, tags: Mapping[str, AttrValue] | None = None) -> None:
        self._tags: dict[str, AttrValue] = _EMPTY
        if tags:
            for key, value in tags.items():
                self.set_tag(key, value)

    @classmethod
    def _sharing(cls, tags: dict[str, AttrValue]) -> Scope:
        # The fast path of fork() and of Snapshot.run(): no validation, no copy.
        scope: Scope = _new_object(cls)
        scope._tags = tags
        return scope

    @property
    def tags(self) -> Mapping[str, AttrValue]:
        """A read-only view of the tags as they are now (a later write does not show in it)."""
        return MappingProxyType(self._tags)

    def set_tag(self, key: str, value: AttrValue) -> None:
        """Set a tag. A key that is not a ``str`` or a value OpenTelemetry would reject is skipped and
        counted (``ctxprop.stats()["invalid_tags"]``), never raised: telemetry does not break the host."""
        if not isinstance(key, str) or not _valid_value(value):
            _stats.incr("invalid_tags")
            return
        if isinstance(value, list):
            value = tuple(value)  # a list the caller keeps could change under a forked scope
        with _write_lock:
            tags = self._tags.copy()
            tags[key] = value
            self._tags = tags

    def remove_tag(self, key: str) -> None:
        """Remove a tag if present."""
        with _write_lock:
            if key in self._tags:
                tags = self._tags.copy()
                del tags[key]
                self._tags = tags

    def clear(self) -> None:
        """Remove every tag."""
        # Under the writers' lock too: a set_tag() between its copy and its swap would otherwise put
        # back every tag this removed.
        with _write_lock:
            self._tags = _EMPTY

    def fork(self) -> Scope:
        """A new scope with the same tags; writes on either side never reach the other."""
        scope: Scope = _new_object(Scope)
        scope._tags = self._tags
        return scope

    def __repr__(self) -> str:
        return f"Scope({self._tags!r})"


# The default of both vars: it stands for "no scope yet" so that readers on the hot path (capture, span
# start) need no branch. It is never handed out: the getters replace it with a fresh scope of the context.
NO_SCOPE = Scope._sharing(_EMPTY)
ISOLATION: ContextVar[Scope] = ContextVar("ctxprop.isolation_scope", default=NO_SCOPE)
CURRENT: ContextVar[Scope] = ContextVar("ctxprop.current_scope", default=NO_SCOPE)


def get_isolation_scope() -> Scope:
    """The isolation scope of this context (one per unit of work: a request, a job, a round).

    A context that never had one gets a fresh scope of its own, never a process-wide shared object.

    .. versionadded:: 0.1.0
    """
    scope = ISOLATION.get()
    if scope is NO_SCOPE:
        scope = Scope._sharing(_EMPTY)
        ISOLATION.set(scope)
    return scope


def get_current_scope() -> Scope:
    """The current scope of this context (nested in the isolation scope; per span or sub-step).

    .. versionadded:: 0.1.0
    """
    scope = CURRENT.get()
    if scope is NO_SCOPE:
        scope = Scope._sharing(_EMPTY)
        CURRENT.set(scope)
    return scope


def set_tag(key: str, value: AttrValue) -> None:
    """Set a tag on the isolation scope.

    >>> set_tag("tenant", "acme")

    .. versionadded:: 0.1.0
    """
    get_isolation_scope().set_tag(key, value)


@contextlib.contextmanager
def use_isolation_scope(scope: Scope) -> Iterator[Scope]:
    """Make ``scope`` the active isolation scope (no fork) until the block ends.

    .. versionadded:: 0.1.0
    """
    token = ISOLATION.set(scope)
    try:
        yield scope
    finally:
        ISOLATION.reset(token)


@contextlib.contextmanager
def use_scope(scope: Scope) -> Iterator[Scope]:
    """Make ``scope`` the active current scope (no fork) until the block ends.

    .. versionadded:: 0.1.0
    """
    token = CURRENT.set(scope)
    try:
        yield scope
    finally:
        CURRENT.reset(token)


@contextlib.contextmanager
def isolation_scope() -> Iterator[Scope]:
    """Fork the isolation scope and the current scope, enter both, restore both on exit.

    >>> with isolation_scope() as scope:
    ...     scope.set_tag("request_id", "r-1")

    .. versionadded:: 0.1.0
    """
    iso_token = ISOLATION.set(get_isolation_scope().fork())
    cur_token = CURRENT.set(get_current_scope().fork())
    try:
        yield ISOLATION.get()
    finally:
        CURRENT.reset(cur_token)
        ISOLATION.reset(iso_token)


@contextlib.contextmanager
def new_scope() -> Iterator[Scope]:
    """Fork the current scope, enter it, restore on exit.

    .. versionadded:: 0.1.0
    """
    token = CURRENT.set(get_current_scope().fork())
    try:
        yield CURRENT.get()
    finally:
        CURRENT.reset(token)


def active_tags() -> dict[str, AttrValue] | None:
    """The merged tags of the active scopes (isolation first, current overriding), or ``None`` if none.

    Does not create scopes: reading tags must not plant a scope in a context that had none. The dict
    returned may be a scope's own: read it, never change it.
    """
    iso_tags = ISOLATION.get()._tags
    cur_tags = CURRENT.get()._tags
    if not cur_tags:
        return iso_tags or None
    if not iso_tags:
        return cur_tags
    return {**iso_tags, **cur_tags}
