"""The zero-code route: ``OTEL_PYTHON_CONFIGURATOR=ctxprop opentelemetry-instrument ...`` gets ctxprop's whole
pipeline; without the configurator, the stock provider still gets scope tags and a flush at SIGTERM; and
``init()`` after someone else set the provider warns once and still delivers. Real processes under the real
``opentelemetry-instrument``, against the loopback receiver.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import serverkit
import support
from serverkit import (
    assert_delivered,
    drive,
    drive_every_worker,
    free_port,
    measure,
    noise,
    serve,
    telemetry_env,
)
from support import REPO, OTLPReceiver, child_env

receiver = support.receiver

TOOL = Path(sys.executable).with_name("opentelemetry-instrument")
pytestmark = pytest.mark.skipif(not TOOL.exists(), reason="opentelemetry-instrument is not installed here")

# opentelemetry-instrument's own line when more than one configurator is installed (the distro's and
# ctxprop's, as in the dev extra): "Configuration of X not loaded, Y already loaded" or "... not loaded
# because Y is set by OTEL_PYTHON_CONFIGURATOR". OTel's, not ctxprop's.
_OTEL_CHOICE = re.compile(r"^Configuration of \w+ not loaded")

VIAS = ("pool", "to_thread", "sync_to_async")
N_REQUESTS = 30


def _zero_code_env(receiver: OTLPReceiver, tmp_path: Path, configurator: str, **extra: str) -> dict[str, str]:
    env = telemetry_env(receiver, "zero-code", tmp_path)
    env.update(
        {
            "OTEL_PYTHON_CONFIGURATOR": configurator,
            "OTEL_SERVICE_NAME": "zero-code-app",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
    )
    env.update(extra)
    return env


def _uvicorn_under_instrument(
    receiver: OTLPReceiver, tmp_path: Path, env: dict[str, str], *extra: str, workers: int = 0
) -> tuple[int, list[dict[str, Any]], str]:
    port = free_port()
    argv = [
        str(TOOL), sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1",
        "--port", str(port), "--no-access-log", *extra,
    ]  # fmt: skip
    with serve(argv, port=port, env=env, tmp_path=tmp_path, ready_workers=workers) as server:
        if workers:  # the kernel may hand every connection to one worker: send until each has answered
            answers = drive_every_worker(server, "z", N_REQUESTS, workers)
        else:
            answers = drive(server, [f"z{i}" for i in range(N_REQUESTS)])
        server.signal(signal.SIGTERM)
        status = server.wait(20)
        return status, answers, server.stderr()


def _without_otel_choice(text: str) -> list[str]:
    return [ln for ln in noise(text) if not _OTEL_CHOICE.match(ln)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2], ids=["single", "workers2"])
def test_sigterm_to_uvicorn_under_the_configurator_delivers_every_span_tagged(
    receiver: OTLPReceiver, tmp_path: Path, workers: int
) -> None:
    """``OTEL_PYTHON_CONFIGURATOR=ctxprop opentelemetry-instrument uvicorn app:app`` (alone and with
    ``--workers 2``, whose spawned workers configure themselves), SIGTERM after the requests: every span
    arrives once, each worker span a child of its request span carrying the scope tag as an attribute; the
    exit status is the stock configurator's."""
    # A 30 s worker health check: uvicorn's 5 s default kills workers still importing on a loaded machine.
    extra = ("--workers", str(workers), "--timeout-worker-healthcheck", "30") if workers else ()
    stock_env = _zero_code_env(
        receiver, tmp_path, "configurator", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="ctxprop"
    )
    base_status, stock_answers, _ = _uvicorn_under_instrument(
        receiver, tmp_path, stock_env, *extra, workers=workers
    )
    receiver.wait_for_spans(len(stock_answers) * 4, 0.5)  # the server has exited: what it sent is in
    stock_spans = receiver.span_count
    receiver.clear()
    status, answers, err = _uvicorn_under_instrument(
        receiver, tmp_path, _zero_code_env(receiver, tmp_path, "ctxprop"), *extra, workers=workers
    )
    spans = assert_delivered(receiver, answers, VIAS)
    measure(
        f"uvicorn SIGTERM under opentelemetry-instrument {' '.join(extra)}",
        ctxprop_configurator_spans=f"{len(spans)}/{len(answers) * 4}",
        stock_spans=f"{stock_spans}/{len(stock_answers) * 4}",
        status=serverkit.signal_status(status),
        baseline_status=serverkit.signal_status(base_status),
    )
    assert status == base_status, err
    assert _without_otel_choice(err) == [], err
    assert {s.service_name for s in spans} == {"zero-code-app"}
    if workers:
        assert len({a["pid"] for a in answers}) == workers, "both workers served requests"


def _start(
    script: str, env: dict[str, str], tmp_path: Path, *args: str, instrument: bool = True
) -> subprocess.Popen[str]:
    """Run ``script`` with ``args`` (under ``opentelemetry-instrument`` unless ``instrument`` is False), its
    environment the tests' child environment updated with ``env``."""
    path = tmp_path / "app.py"
    path.write_text(textwrap.dedent(script))
    tool = [str(TOOL)] if instrument else []
    return subprocess.Popen(
        [*tool, sys.executable, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=child_env(env),
        cwd=str(REPO),
    )


def _tagged_spans(count: int, tracer: str = "tracer") -> str:
    """A child script's lines: ``count`` spans from ``tracer`` in an isolation scope tagged tenant=acme."""
    return f"""
with ctxprop.isolation_scope():
    ctxprop.set_tag("tenant", "acme")
    for i in range({count}):
        with {tracer}.start_as_current_span(f"span-{{i}}"):
            pass
"""


# A child script's last lines: say it is ready (``_finish(..., signal_on=READY)`` sends SIGTERM then), and
# wait for the signal.
READY = '"ready"'
WAIT_FOR_SIGTERM = """
print(json.dumps({"ready": True}), flush=True)
import threading
threading.Event().wait(60)
"""


def _finish(proc: subprocess.Popen[str], *, signal_on: str | None = None) -> tuple[int, list[Any], str]:
    """Read the child's JSON lines; send SIGTERM once a line contains ``signal_on``; wait for its end."""
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None
    assert stderr is not None
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(stderr.read()), daemon=True)
    reader.start()
    lines = []
    for line in stdout:
        if line.startswith("{"):
            lines.append(json.loads(line))
        if signal_on is not None and signal_on in line:
            proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("child did not exit within 60s")
    reader.join(10)
    stdout.close()
    stderr.close()
    return status, lines, "".join(err)


SCRIPT = """
import json, os, warnings
from opentelemetry import metrics, trace
from opentelemetry._logs import get_logger_provider
import ctxprop, ctxprop._pipeline

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    provider = ctxprop.init(service_name="ignored-under-the-configurator")
tracer = trace.get_tracer("zero-code")
""" + _tagged_spans(20) + """
print(json.dumps({
    "init_warnings": [str(w.message) for w in caught],
    "init_returns_global": provider is trace.get_tracer_provider(),
    "pipeline": ctxprop._pipeline.current_processor() is not None,
    "meter_provider": type(metrics.get_meter_provider()).__module__,
    "logger_provider": type(get_logger_provider()).__module__,
    "traces_exporter_env": os.environ.get("OTEL_TRACES_EXPORTER"),
}), flush=True)
"""


def test_configurator_sets_up_ctxprop_pipeline_and_leaves_metrics_and_logs_stock(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """Under the configurator, a script's spans reach the collector at exit with the scope tags and the
    OTEL_SERVICE_NAME resource; metrics and logs get the SDK's stock providers; the application's own
    init() is a silent no-op returning the configured provider; OTEL_TRACES_EXPORTER is left as set."""
    env = _zero_code_env(
        receiver, tmp_path, "ctxprop", OTEL_METRICS_EXPORTER="console", OTEL_LOGS_EXPORTER="console"
    )
    env["OTEL_METRIC_EXPORT_INTERVAL"] = "600000"
    status, lines, err = _finish(_start(SCRIPT, env, tmp_path))
    assert status == 0, err
    out = lines[0]
    assert out == {
        "init_warnings": [],
        "init_returns_global": True,
        "pipeline": True,
        "meter_provider": "opentelemetry.sdk.metrics._internal",
        "logger_provider": "opentelemetry.sdk._logs._internal",
        "traces_exporter_env": "otlp",
    }
    assert receiver.wait_for_spans(20, 10)
    spans = receiver.spans
    assert len(spans) == 20
    assert all(s.attributes.get("tenant") == "acme" for s in spans)
    assert {s.service_name for s in spans} == {"zero-code-app"}
    assert all("telemetry.auto.version" in s.resource for s in spans)
    assert _without_otel_choice(err) == [], err


CONSOLE_SCRIPT = """
from opentelemetry import trace
import ctxprop
""" + _tagged_spans(5, 'trace.get_tracer("zero-code")')


def test_other_trace_exporters_stay_with_the_sdk_and_otlp_goes_by_http_whatever_the_protocol(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """``OTEL_TRACES_EXPORTER=otlp,console`` with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``: the SDK's console
    exporter prints each span, and ctxprop's pipeline delivers each to the OTLP/HTTP collector, tagged."""
    env = _zero_code_env(
        receiver, tmp_path, "ctxprop", OTEL_TRACES_EXPORTER="otlp,console", OTEL_EXPORTER_OTLP_PROTOCOL="grpc"
    )
    proc = _start(CONSOLE_SCRIPT, env, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    printed = [ln.strip() for ln in out.splitlines() if ln.strip().startswith('"name": "span-')]
    assert sorted(printed) == sorted(f'"name": "span-{i}",' for i in range(5)), out
    assert receiver.wait_for_spans(5, 10)
    spans = receiver.spans
    assert sorted(sp.name for sp in spans) == [f"span-{i}" for i in range(5)]
    assert all(sp.attributes.get("tenant") == "acme" for sp in spans)
    assert _without_otel_choice(err) == [], err


SPOOL_SCRIPT = """
from opentelemetry import trace
import ctxprop
""" + _tagged_spans(20, 'trace.get_tracer("zero-code")')


def test_configurator_spools_when_the_collector_is_down_and_the_next_run_sends(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """The configurator's pipeline has ctxprop's spool (the script never calls init()): with the collector
    down the spans wait on disk (exit status 0), and the next run under the configurator sends them."""
    down = free_port()
    env = _zero_code_env(
        receiver,
        tmp_path,
        "ctxprop",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{down}/v1/traces",
    )
    status, _, err = _finish(_start(SPOOL_SCRIPT, env, tmp_path))
    assert status == 0, err
    assert receiver.span_count == 0
    status, _, err = _finish(_start(SPOOL_SCRIPT, _zero_code_env(receiver, tmp_path, "ctxprop"), tmp_path))
    assert status == 0, err
    assert receiver.wait_for_spans(40, 10)
    assert len({(s.trace_id, s.span_id) for s in receiver.spans}) == receiver.span_count == 40


STOCK_SCRIPT = """
import json
from opentelemetry import trace
import ctxprop, ctxprop._pipeline

tracer = trace.get_tracer("stock")
""" + _tagged_spans(50) + WAIT_FOR_SIGTERM


def test_instrumentor_without_the_configurator_tags_and_flushes_the_stock_provider(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """Under opentelemetry-instrument with the stock configurator, ctxprop's instrumentor gives the stock
    provider's spans the scope tags, and a SIGTERM still delivers what its BatchSpanProcessor queued; the
    process dies by SIGTERM as without ctxprop."""
    env = _zero_code_env(receiver, tmp_path, "configurator", OTEL_BSP_SCHEDULE_DELAY="600000")
    status, _, err = _finish(_start(STOCK_SCRIPT, env, tmp_path), signal_on=READY)
    assert status == -signal.SIGTERM, err
    assert receiver.wait_for_spans(50, 10), err
    assert receiver.span_count == 50
    assert all(s.attributes.get("tenant") == "acme" for s in receiver.spans)


FOREIGN_SCRIPT = """
import json, sys, warnings
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
import ctxprop, ctxprop._pipeline

theirs = TracerProvider()
exporter = OTLPSpanExporter(endpoint=sys.argv[1])
theirs.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600000))
trace.set_tracer_provider(theirs)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ctxprop.init(endpoint=sys.argv[1])
tracer = trace.get_tracer("app")
""" + _tagged_spans(50) + """
print(json.dumps({"warnings": [str(w.message) for w in caught]}), flush=True)
""" + WAIT_FOR_SIGTERM


def test_init_after_another_provider_warns_once_and_still_delivers(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """init() after the application set its own SDK provider: exactly one warning, naming what to set
    instead; that provider's spans get the scope tags, and a SIGTERM delivers what it had queued."""
    env = {"CTXPROP_SPOOL_DIR": str(tmp_path / "spool")}
    proc = _start(FOREIGN_SCRIPT, env, tmp_path, receiver.endpoint, instrument=False)
    status, lines, err = _finish(proc, signal_on=READY)
    assert status == -signal.SIGTERM, err
    (message,) = lines[0]["warnings"]
    assert "OTEL_PYTHON_CONFIGURATOR=ctxprop" in message
    assert "CtxpropSpanProcessor" in message
    assert receiver.wait_for_spans(50, 10), err
    assert receiver.span_count == 50
    assert all(s.attributes.get("tenant") == "acme" for s in receiver.spans)
    assert err == ""


LIFESPAN_APP = '''
import os
from opentelemetry import trace
import ctxprop, ctxprop._pipeline

ctxprop.init(endpoint=os.environ["APP_ENDPOINT"], service_name="lifespan-app")
tracer = trace.get_tracer("lifespan-app")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with tracer.start_as_current_span("shutdown"):
                    pass
                await ctxprop.aclose()  # the README's recipe
                print("CLOSED", ctxprop._pipeline.current_provider() is None, flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    with tracer.start_as_current_span("request " + scope["path"]):
        body = b'{"pid": %d}' % os.getpid()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
'''


def test_aclose_in_the_asgi_lifespan_shutdown_delivers_everything(
    receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """uvicorn stopped by SIGTERM, the app awaiting ctxprop.aclose() in its lifespan shutdown: every span,
    the shutdown's own included, is exported before the process ends, and nothing reaches stderr."""
    (tmp_path / "lifespan_app.py").write_text(LIFESPAN_APP)
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", "lifespan_app:app", "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--app-dir", str(tmp_path),
    ]  # fmt: skip
    env = telemetry_env(receiver, "ctxprop", tmp_path)
    with serve(argv, port=port, env=env, tmp_path=tmp_path) as server:
        import httpx

        with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
            for i in range(10):
                client.get(f"/r{i}").raise_for_status()
        server.signal(signal.SIGTERM)
        status = server.wait(20)
        out = server.stderr()
    assert receiver.wait_for_spans(12, 10), out
    names = sorted(s.name for s in receiver.spans)
    assert names.count("shutdown") == 1
    assert len(names) == receiver.span_count == 12  # 10 requests, /health, shutdown
    closed = [ln.split() for ln in out.splitlines() if ln.startswith("CLOSED")]
    assert closed == [["CLOSED", "True"]], out
    assert noise(out) == [], out
    measure("uvicorn lifespan aclose", status=serverkit.signal_status(status), spans=receiver.span_count)
