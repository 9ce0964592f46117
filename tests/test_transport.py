"""The OTLP/HTTP transport reads the environment as ``requests`` does, once: proxies (with NO_PROXY), the
requests CA bundle and ~/.netrc; a real forward proxy on loopback sees the requests it should see."""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext
from support import OTLPReceiver

from ctxprop._transport import OTLPSender

receiver = support.receiver

_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_NO_PROXY_VARS = ("NO_PROXY", "no_proxy")


class _ForwardProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP forward proxy: takes ``POST http://host:port/path`` and sends it on; records what
    it forwarded (target URL and the Authorization header it was given)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _ForwardProxy

    def do_POST(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.server.seen.append((self.path, self.headers.get("authorization")))
        conn = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=10)
        try:
            conn.request("POST", target.path, body, {"content-type": self.headers.get("content-type", "")})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        self.send_header("content-type", resp.getheader("content-type", "application/x-protobuf"))
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def proxy() -> Iterator[_ForwardProxy]:
    """A started forward proxy on loopback, stopped after the test."""
    server = _ForwardProxy()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No proxy, CA bundle or netrc from the machine running the tests."""
    for name in (*_PROXY_VARS, *_NO_PROXY_VARS, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def _payload(name: str) -> bytes:
    span = ReadableSpan(name, SpanContext(0xAB, 0xCD, False), start_time=1, end_time=2)
    return encode_spans([span]).SerializeToString()


def test_requests_go_through_the_environments_proxy_read_once(
    clean_env: pytest.MonkeyPatch, proxy: _ForwardProxy, receiver: OTLPReceiver
) -> None:
    """HTTP_PROXY set when the sender is made: every POST goes through the proxy, including those made
    after the variable is gone (the environment is read once, not per request)."""
    clean_env.setenv("HTTP_PROXY", proxy.url)
    sender = OTLPSender(receiver.endpoint)
    try:
        assert sender(_payload("first"), 10).ok
        clean_env.delenv("HTTP_PROXY")
        assert sender(_payload("second"), 10).ok
    finally:
        sender.close()
    assert [url for url, _ in proxy.seen] == [receiver.endpoint, receiver.endpoint]
    assert sorted(s.name for s in receiver.spans) == ["first", "second"]


def test_no_proxy_for_the_endpoint_goes_direct(
    clean_env: pytest.MonkeyPatch, proxy: _ForwardProxy, receiver: OTLPReceiver
) -> None:
    """NO_PROXY naming the collector's host: the proxy sees nothing, the span still arrives."""
    clean_env.setenv("HTTP_PROXY", proxy.url)
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    sender = OTLPSender(receiver.endpoint)
    try:
        assert sender(_payload("direct"), 10).ok
    finally:
        sender.close()
    assert proxy.seen == []
    assert [s.name for s in receiver.spans] == ["direct"]


def test_netrc_credentials_for_the_collector_are_sent(
    clean_env: pytest.MonkeyPatch, proxy: _ForwardProxy, receiver: OTLPReceiver, tmp_path: Path
) -> None:
    """~/.netrc (here $NETRC) credentials for the collector's host go out as Basic auth, as with the
    official exporter's requests session."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login otel password s3cret\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    clean_env.setenv("HTTP_PROXY", proxy.url)  # the proxy shows the headers the collector was sent
    sender = OTLPSender(receiver.endpoint)
    try:
        assert sender(_payload("authed"), 10).ok
    finally:
        sender.close()
    assert proxy.seen == [(receiver.endpoint, "Basic b3RlbDpzM2NyZXQ=")]


def test_the_requests_ca_bundle_is_used_for_https(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """REQUESTS_CA_BUNDLE is the CA bundle when no OTLP certificate is set; an OTLP certificate wins."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    assert OTLPSender("https://127.0.0.1:9/v1/traces")._verify == str(bundle)
    own = tmp_path / "own.pem"
    own.write_text("")
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(own))
    assert OTLPSender("https://127.0.0.1:9/v1/traces")._verify == str(own)
