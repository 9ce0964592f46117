"""Configuration: endpoint resolution, OTEL_* variables, validation errors, second init()."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import ctxprop
from ctxprop import _pipeline
from ctxprop._config import DEFAULT_ENDPOINT, build_config, resolve_endpoint


@pytest.mark.parametrize(
    ("arg", "env", "expected"),
    [
        (None, {}, "http://localhost:4318/v1/traces"),
        ("http://a:1/custom", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:2/x"}, "http://a:1/custom"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:2/x"}, "http://b:2/x"),
        (
            None,
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://b:2",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:3",
            },
            "https://b:2",
        ),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:3"}, "http://c:3/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:3/"}, "http://c:3/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:3/base"}, "http://c:3/base/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, DEFAULT_ENDPOINT),
    ],
)
def test_endpoint_resolution(arg: str | None, env: dict[str, str], expected: str) -> None:
    """Endpoint: argument, else TRACES_ENDPOINT as is, else ENDPOINT + /v1/traces, else the default."""
    assert resolve_endpoint(arg, env) == expected


@pytest.mark.parametrize(
    ("kwargs", "env", "match"),
    [
        ({"endpoint": "ftp://host/v1/traces"}, {}, "unknown scheme 'ftp'"),
        ({"endpoint": "localhost:4318"}, {}, "unknown scheme"),
        ({"endpoint": "http://"}, {}, "malformed URL"),
        ({"endpoint": "http://host:notaport/v1/traces"}, {}, "malformed URL"),
        ({"endpoint": ""}, {}, "malformed URL"),
        ({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://c:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT: unknown scheme"),
        ({}, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://:99"}, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ({"close_timeout": -1}, {}, "close_timeout"),
        ({"close_timeout": float("nan")}, {}, "close_timeout"),
        ({"max_queue_size": 0}, {}, "max_queue_size"),
        ({"max_queue_size": 10, "max_export_batch_size": 20}, {}, "must not exceed"),
        ({"schedule_delay": -0.5}, {}, "schedule_delay"),
        ({}, {"OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
        ({}, {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "-3"}, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
        ({}, {"OTEL_BSP_SCHEDULE_DELAY": "soon"}, "OTEL_BSP_SCHEDULE_DELAY"),
        ({}, {"OTEL_EXPORTER_OTLP_TIMEOUT": "-5"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ({}, {"OTEL_EXPORTER_OTLP_COMPRESSION": "brotli"}, "unknown compression 'brotli'"),
        ({"compression": "zip"}, {}, "unknown compression"),
        ({}, {"OTEL_EXPORTER_OTLP_HEADERS": "garbage"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"service_name": ""}, {}, "service_name"),
    ],
)
def test_bad_configuration_raises_clear_value_error(
    kwargs: dict[str, object], env: dict[str, str], match: str
) -> None:
    """Each bad setting raises ValueError naming the setting to change."""
    with pytest.raises(ValueError, match=match):
        build_config(environ=env, **kwargs)  # type: ignore[arg-type]


def test_otel_variables_are_honoured() -> None:
    """OTEL_BSP_*, headers, compression, timeout and service name come from the environment."""
    cfg = build_config(
        environ={
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
            "OTEL_BSP_SCHEDULE_DELAY": "250",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=abc,x-team=obs",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=traces",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "4",
            "OTEL_SERVICE_NAME": "from-env",
        }
    )
    assert (cfg.max_queue_size, cfg.max_export_batch_size, cfg.schedule_delay) == (100, 10, 0.25)
    assert dict(cfg.headers) == {"api-key": "traces"}  # the traces-specific variable wins
    assert cfg.compression == "gzip"
    assert cfg.export_timeout == 4.0
    assert cfg.service_name == "from-env"


def test_arguments_override_environment() -> None:
    """init() keyword arguments win over OTEL_* variables."""
    cfg = build_config(
        max_queue_size=50,
        max_export_batch_size=5,
        schedule_delay=0.1,
        compression="none",
        headers={"X-A": "1"},
        environ={"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"},
    )
    assert (cfg.max_queue_size, cfg.max_export_batch_size, cfg.schedule_delay) == (50, 5, 0.1)
    assert cfg.compression == "none"
    assert dict(cfg.headers) == {"x-a": "1"}


def test_init_raises_on_bad_config_and_installs_nothing() -> None:
    """A ValueError at init() leaves no pipeline and no global provider behind."""
    with pytest.raises(ValueError, match="unknown scheme"):
        ctxprop.init(endpoint="udp://x:1", handle_signals=False)
    assert _pipeline.current_provider() is None
    assert not hasattr(trace.get_tracer_provider(), "add_span_processor")


def test_second_init_warns_and_keeps_first() -> None:
    """A second init() warns with RuntimeWarning and returns the first provider unchanged."""
    first = ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False, service_name="one")
    with pytest.warns(RuntimeWarning, match="already called"):
        second = ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False, service_name="two")
    assert second is first
    assert first.resource.attributes["service.name"] == "one"
    assert trace.get_tracer_provider() is first


def test_service_name_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    """service_name argument, else OTEL_SERVICE_NAME, else the SDK default, becomes service.name."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "env-svc")
    p = ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)
    assert p.resource.attributes["service.name"] == "env-svc"
    ctxprop.close()
    p = ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False, service_name="arg-svc")
    assert p.resource.attributes["service.name"] == "arg-svc"
    ctxprop.close()
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    p = ctxprop.init(exporter=InMemorySpanExporter(), handle_signals=False)
    assert str(p.resource.attributes["service.name"]).startswith("unknown_service")


def test_config_doctests_pass() -> None:
    """The examples in _config's docstrings run and hold (the close_timeout message keeps its parenthesis)."""
    import doctest

    from ctxprop import _config

    result = doctest.testmod(_config)
    assert result.failed == 0
    assert result.attempted >= 5
    with pytest.raises(ValueError, match=r"^init\(close_timeout=-1\): must be"):
        build_config(close_timeout=-1, environ={})
    with pytest.raises(ValueError, match=r"^OTEL_BSP_SCHEDULE_DELAY='-5': must be"):
        build_config(environ={"OTEL_BSP_SCHEDULE_DELAY": "-5"})


SECRET = "s3cr3t-T0KEN"  # noqa: S105 - a fake token that must never be shown


@pytest.mark.parametrize(
    "raw",
    [
        f"Authorization Bearer {SECRET}",
        f"x-team=obs,Authorization: Bearer {SECRET}",
        f"x-team=obs,Authorization=Bearer {SECRET}%0D%0AX-Injected: 1",
        f"{SECRET}",
    ],
)
def test_malformed_headers_never_show_a_value(raw: str) -> None:
    """A malformed OTEL_EXPORTER_OTLP_HEADERS raises ValueError at init() saying where, never what: the
    token is in neither the message nor stderr (OpenTelemetry's own header parser logs it there)."""
    from support import run_child

    result = run_child(
        """
import json, logging, ctxprop
logging.basicConfig(level=logging.DEBUG)
try:
    ctxprop.init()
except ValueError as e:
    print(json.dumps({"error": str(e)}))
""",
        env={"OTEL_EXPORTER_OTLP_HEADERS": raw},
    )
    assert result.returncode == 0, result.stderr
    message = result.last("error")
    assert "OTEL_EXPORTER_OTLP_HEADERS" in message
    assert SECRET not in message
    assert SECRET not in result.stderr


def test_header_argument_errors_never_show_a_value() -> None:
    """init(headers=...) with a line break in a value, or a non-string value, names the problem only."""
    with pytest.raises(ValueError, match="line break") as err:
        build_config(headers={"Authorization": f"Bearer {SECRET}\r\nX-Injected: 1"}, environ={})
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="non-empty strings") as err:
        build_config(headers={"Authorization": [SECRET]}, environ={})  # type: ignore[dict-item]
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    ("endpoint", "match"),
    [
        ("http://collector:4318/v1/traces\r\nX-Injected: 1", "control character"),
        ("http://collector:4318/v1/traces\nfoo", "control character"),
        ("http://collec tor:4318/v1/traces", "whitespace"),
        ("http://collector:4318/v1 traces", "whitespace"),
        ("http://" + "a" * 10_000 + ":4318/v1/traces", "more than a host name can have"),
    ],
)
def test_endpoints_with_control_characters_spaces_or_a_huge_host_are_refused(
    endpoint: str, match: str
) -> None:
    """init() refuses an endpoint with CR/LF, spaces or a 10 kB host, with a short one-line message."""
    with pytest.raises(ValueError, match=match) as err:
        build_config(endpoint=endpoint, environ={})
    assert "\n" not in str(err.value)
    assert len(str(err.value)) < 500
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        build_config(environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint.replace("\r", " ")})


def test_endpoint_errors_do_not_show_credentials() -> None:
    """A rejected endpoint's user:password@ is shown as ***@."""
    with pytest.raises(ValueError, match=r"\*\*\*@collector") as err:
        build_config(endpoint=f"ftp://user:{SECRET}@collector/v1/traces", environ={})
    assert SECRET not in str(err.value)
