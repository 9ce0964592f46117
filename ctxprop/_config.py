"""The pipeline's configuration: ``init()`` keyword arguments over ``OTEL_*`` variables over defaults.

Everything is resolved and validated once, at ``init()``, so a mistake raises a ``ValueError`` that says
what to change instead of surfacing later as silently lost spans.

>>> cfg = build_config(endpoint="http://127.0.0.1:4318/v1/traces", environ={})
>>> cfg.endpoint, cfg.max_queue_size >= cfg.max_export_batch_size
('http://127.0.0.1:4318/v1/traces', True)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from ctxprop._spool import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, spool_cap

__all__ = [
    "DEFAULT_ENDPOINT",
    "PipelineConfig",
    "Settings",
    "build_config",
    "parse_headers",
    "redact_url",
    "resolve_endpoint",
]

DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_MAX_QUEUE_SIZE = 8192
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
DEFAULT_SCHEDULE_DELAY = 1.0
DEFAULT_EXPORT_TIMEOUT = 10.0
_COMPRESSIONS = ("none", "gzip", "deflate")


@dataclass(frozen=True)
class PipelineConfig:
    """Resolved settings of one pipeline (immutable)."""

    service_name: str | None
    endpoint: str
    headers: Mapping[str, str]
    compression: str
    export_timeout: float
    close_timeout: float
    max_queue_size: int
    max_export_batch_size: int
    schedule_delay: float
    spool_dir: str | None
    durable: bool
    handle_signals: bool
    #: The spool's caps (``CTXPROP_SPOOL_MAX_BYTES``, ``CTXPROP_SPOOL_MAX_AGE``); ``inf`` is no cap.
    spool_max_bytes: float = 64 * 2**20
    spool_max_age: float = 7 * 86400.0
    resource_attributes: Mapping[str, Any] = field(default_factory=dict)
    encoder: str = "ctxprop"


def _env(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None


# The longest host name DNS can carry (RFC 1035); a longer one is a mistake, never a collector.
_MAX_HOST = 253
# RFC 9110 token characters: what an HTTP header name may hold.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def redact_url(url: str) -> str:
    """``url`` fit to print: its ``user:password@`` replaced by ``***@``, at most 200 characters.

    >>> redact_url("https://user:s3cr3t@collector:4318/v1/traces")
    'https://***@collector:4318/v1/traces'
    """
    shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
    # Control characters shown escaped, so a message never carries a line break.
    shown = shown.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _check_url(url: str, source: str) -> str:
    shown = redact_url(url)
    bad = next((c for c in url if c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ValueError(
            f"{source}: the URL {shown!r} contains {bad!r} (whitespace or a control character); "
            f"expected e.g. {DEFAULT_ENDPOINT}"
        )
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as e:
        detail = "bad port" if "port" in str(e).lower() else "cannot be parsed"
        raise ValueError(
            f"{source}: malformed URL {shown!r} ({detail}); expected e.g. {DEFAULT_ENDPOINT}"
        ) from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"{source}: unknown scheme {parts.scheme!r} in {shown!r}; ctxprop exports OTLP over http or https"
            f" (e.g. {DEFAULT_ENDPOINT})"
        )
    if not parts.hostname:
        raise ValueError(f"{source}: malformed URL {shown!r}: no host; expected e.g. {DEFAULT_ENDPOINT}")
    if len(parts.hostname) > _MAX_HOST:
        raise ValueError(
            f"{source}: malformed URL {shown!r}: its host has {len(parts.hostname)} characters, more than "
            f"a host name can have ({_MAX_HOST}); expected e.g. {DEFAULT_ENDPOINT}"
        )
    del port
    return url


def resolve_endpoint(endpoint: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The traces URL: ``endpoint``, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as is, else
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``, else ``http://localhost:4318/v1/traces``.

    >>> resolve_endpoint(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    'http://c:4318/v1/traces'

    .. versionadded:: 0.1.0
    """
    env = os.environ if environ is None else environ
    if endpoint is not None:
        if not isinstance(endpoint, str) or not endpoint.strip():
            raise ValueError(
                f"init(endpoint=...): malformed URL {endpoint!r}; expected e.g. {DEFAULT_ENDPOINT}"
            )
        return _check_url(endpoint.strip(), "init(endpoint=...)")
    found = _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if found:
        return _check_url(found[1], found[0])
    found = _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if found:
        base = _check_url(found[1], found[0])
        return base.rstrip("/") + "/v1/traces"
    return DEFAULT_ENDPOINT


def _positive_int(value: int | None, environ: Mapping[str, str], var: str, default: int, arg: str) -> int:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"init({arg}={value!r}): must be a positive integer")
        return value
    found = _env(environ, var)
    if not found:
        return default
    try:
        n = int(found[1])
    except ValueError:
        raise ValueError(f"{var}={found[1]!r}: must be a positive integer") from None
    if n <= 0:
        raise ValueError(f"{var}={found[1]!r}: must be a positive integer")
    return n


def _seconds(value: Any, what: str, *, allow_zero: bool = True) -> float:
    """``value`` as seconds; ``what`` names the setting as written (``init(x=-1)``, ``VAR='-1'``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: must be a number of seconds")
    v = float(value)
    if math.isnan(v) or v < 0 or (v == 0 and not allow_zero) or math.isinf(v):
        kind = "positive" if not allow_zero else "non-negative"
        raise ValueError(f"{what}: must be a finite, {kind} number of seconds")
    return v


def _arg_seconds(value: Any, arg: str, *, allow_zero: bool = True) -> float:
    return _seconds(value, f"init({arg}={value!r})", allow_zero=allow_zero)


def _env_seconds(environ: Mapping[str, str], var: str, scale: float) -> float | None:
    found = _env(environ, var)
    if not found:
        return None
    try:
        v = float(found[1])
    except ValueError:
        raise ValueError(f"{var}={found[1]!r}: must be a number") from None
    return _seconds(v * scale, f"{var}={found[1]!r}")


def parse_headers(raw: str, source: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS``-style ``name=value,name2=value2`` (values may be %-encoded).

    A malformed entry raises ValueError that says where it is, never what it holds: a header value is
    usually a secret, and an entry without ``=`` may be nothing but one. Nothing is logged.

    >>> parse_headers("Api-Key=abc%3D,x-team = obs", "VAR")
    {'api-key': 'abc=', 'x-team': 'obs'}
    >>> parse_headers("Authorization Bearer s3cr3t", "VAR")
    Traceback (most recent call last):
    ...
    ValueError: VAR: entry 1 of 1 is not name=value (values are not shown; they may be secrets)
    """
    entries = [e.strip() for e in raw.split(",")]
    entries = [e for e in entries if e]
    out: dict[str, str] = {}
    for i, entry in enumerate(entries, 1):
        where = f"{source}: entry {i} of {len(entries)}"
        name, sep, value = entry.partition("=")
        name = unquote(name).strip().lower()
        if not sep or not name:
            raise ValueError(f"{where} is not name=value (values are not shown; they may be secrets)")
        if not _TOKEN.match(name):
            raise ValueError(f"{where}: its name is not a valid HTTP header name (not shown)")
        out[name] = _check_header_value(unquote(value).strip(), f"{where} ({name})")
    if not out:
        raise ValueError(f"{source}: expected comma-separated name=value pairs, found none")
    return out


def _check_header_value(value: str, where: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{where}: the value contains a line break or NUL (not shown)")
    return value


def _headers(headers: Mapping[str, str] | None, environ: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    found = _env(environ, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    if found:
        out.update(parse_headers(found[1], found[0]))
    for k, v in (headers or {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ValueError(
                "init(headers=...): header names and values must be non-empty strings, got a "
                f"{type(k).__name__} name and a {type(v).__name__} value (values are not shown)"
            )
        if not _TOKEN.match(k):
            raise ValueError("init(headers=...): a header name is not a valid HTTP header name (not shown)")
        out[k.lower()] = _check_header_value(v, f"init(headers=...) ({k.lower()})")
    return out


def _compression(value: str | None, environ: Mapping[str, str]) -> str:
    if value is not None:
        source, raw = "init(compression=...)", str(getattr(value, "value", value))
    else:
        found = _env(environ, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
        if not found:
            return "none"
        source, raw = found
    c = raw.strip().lower()
    if c not in _COMPRESSIONS:
        raise ValueError(f"{source}: unknown compression {raw!r}; use one of {', '.join(_COMPRESSIONS)}")
    return c


def _encoder(value: str | None, environ: Mapping[str, str]) -> str:
    from ctxprop._encoding import ENCODERS

    if value is not None:
        source, raw = f"init(encoder={value!r})", value
    else:
        found = _env(environ, "CTXPROP_ENCODER")
        if not found:
            return "ctxprop"
        source, raw = f"{found[0]}={found[1]!r}", found[1]
    name = raw.strip().lower() if isinstance(raw, str) else raw
    if name not in ENCODERS:
        raise ValueError(f"{source}: unknown encoder; use 'ctxprop' (the default) or 'official'")
    return str(name)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The pipeline settings as given, before the environment and the defaults resolve them: ``init()``'s
    keyword arguments but ``exporter``, with ``init()``'s defaults. The one list of them: ``init()``
    spells the same names out for its public signature and passes them on as they are. The two agree:

    >>> import dataclasses, inspect, ctxprop
    >>> init = {n: (p.default, p.annotation) for n, p in inspect.signature(ctxprop.init).parameters.items()}
    >>> given = {f.name: (f.default, f.type) for f in dataclasses.fields(Settings)}
    >>> init.pop("exporter")[0], given.pop("export_timeout")[0]
    (None, None)
    >>> list(init.items()) == list(given.items())
    True
    """

    service_name: str | None = None
    endpoint: str | None = None
    spool_dir: str | None = None
    close_timeout: float = 3.0
    durable: bool = False
    handle_signals: bool = True
    headers: Mapping[str, str] | None = None
    compression: str | None = None
    max_queue_size: int | None = None
    max_export_batch_size: int | None = None
    schedule_delay: float | None = None
    resource_attributes: Mapping[str, Any] | None = None
    encoder: str | None = None
    #: Not an ``init()`` argument: the ``OTEL_*`` timeout variables set it, or the default.
    export_timeout: float | None = None


def build_config(*, environ: Mapping[str, str] | None = None, **settings: Any) -> PipelineConfig:
    """Resolve and validate the pipeline settings; raises ``ValueError`` naming the setting to fix.

    >>> build_config(close_timeout=-1, environ={})
    Traceback (most recent call last):
    ...
    ValueError: init(close_timeout=-1): must be a finite, non-negative number of seconds

    ``settings``: the fields of :class:`Settings`, by name (an unknown one raises ``TypeError``);
    ``environ`` defaults to ``os.environ``.

    .. versionadded:: 0.1.0
    """
    env = os.environ if environ is None else environ
    given = Settings(**settings)
    close_t = _arg_seconds(given.close_timeout, "close_timeout")
    resolved_endpoint = resolve_endpoint(given.endpoint, env)
    queue = _positive_int(
        given.max_queue_size, env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE, "max_queue_size"
    )
    batch = _positive_int(
        given.max_export_batch_size,
        env,
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        min(DEFAULT_MAX_EXPORT_BATCH_SIZE, queue),
        "max_export_batch_size",
    )
    if batch > queue:
        raise ValueError(
            f"max_export_batch_size ({batch}) must not exceed max_queue_size ({queue}); lower the first "
            "(OTEL_BSP_MAX_EXPORT_BATCH_SIZE) or raise the second (OTEL_BSP_MAX_QUEUE_SIZE)"
        )
    if given.schedule_delay is not None:
        delay = _arg_seconds(given.schedule_delay, "schedule_delay", allow_zero=False)
    else:
        env_delay = _env_seconds(env, "OTEL_BSP_SCHEDULE_DELAY", 1e-3)
        delay = DEFAULT_SCHEDULE_DELAY if env_delay is None else max(env_delay, 0.001)
    if given.export_timeout is not None:
        exp_t = _arg_seconds(given.export_timeout, "export_timeout", allow_zero=False)
    else:
        # The official Python exporter reads OTEL_EXPORTER_OTLP_TIMEOUT in seconds; follow it.
        exp_t = next(
            (
                t
                for t in (
                    _env_seconds(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 1.0),
                    _env_seconds(env, "OTEL_EXPORTER_OTLP_TIMEOUT", 1.0),
                )
                if t is not None
            ),
            DEFAULT_EXPORT_TIMEOUT,
        )
        bsp_t = _env_seconds(env, "OTEL_BSP_EXPORT_TIMEOUT", 1e-3)
        if bsp_t is not None and bsp_t > 0:
            exp_t = min(exp_t, bsp_t)
        if exp_t <= 0:
            exp_t = DEFAULT_EXPORT_TIMEOUT
    svc = given.service_name
    if svc is not None and (not isinstance(svc, str) or not svc):
        raise ValueError(f"init(service_name={svc!r}): must be a non-empty string")
    if svc is None:
        found = _env(env, "OTEL_SERVICE_NAME")
        svc = found[1] if found else None
    spool_dir = given.spool_dir
    if spool_dir is not None and not isinstance(spool_dir, (str, os.PathLike)):
        raise ValueError(f"init(spool_dir={spool_dir!r}): must be a path")
    return PipelineConfig(
        service_name=svc,
        endpoint=resolved_endpoint,
        headers=_headers(given.headers, env),
        compression=_compression(given.compression, env),
        export_timeout=exp_t,
        close_timeout=close_t,
        max_queue_size=queue,
        max_export_batch_size=batch,
        schedule_delay=delay,
        spool_dir=os.fspath(spool_dir) if spool_dir is not None else None,
        durable=bool(given.durable),
        handle_signals=bool(given.handle_signals),
        spool_max_bytes=spool_cap("CTXPROP_SPOOL_MAX_BYTES", DEFAULT_MAX_BYTES, env, lenient=False),
        spool_max_age=spool_cap("CTXPROP_SPOOL_MAX_AGE", DEFAULT_MAX_AGE, env, lenient=False),
        resource_attributes=dict(given.resource_attributes or {}),
        encoder=_encoder(given.encoder, env),
    )
