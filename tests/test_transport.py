"""The OTLP/HTTP transport reads the environment as ``requests`` does, once: proxies (with NO_PROXY), the
requests CA bundle and ~/.netrc; a real forward proxy on loopback (plain and CONNECT) sees the requests it
should see. A real TLS collector on loopback checks certificates; keep-alive, the stale-connection retry
and the whole-request deadline are checked against real sockets, and no request starts a thread."""

from __future__ import annotations

import http.client
import http.server
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import support
from collectors import serving
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext
from support import OTLPReceiver

from ctxprop._transport import OTLPSender, SendOutcome

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

    def do_CONNECT(self) -> None:
        # An https:// collector through the proxy: a tunnel, bytes piped both ways until one side ends.
        host, _, port = self.path.rpartition(":")
        self.server.seen.append((f"CONNECT {self.path}", self.headers.get("proxy-authorization")))
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200)
        self.end_headers()
        self.close_connection = True
        ends = [self.connection, upstream]
        try:
            while True:
                ready, _, _ = select.select(ends, [], [], 10)
                if not ready:
                    return
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is self.connection else self.connection).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()

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


def _send_once(endpoint: str, name: str) -> SendOutcome:
    """One span named ``name`` sent by a sender made now (reading the environment as it is), then closed."""
    sender = OTLPSender(endpoint)
    try:
        return sender(_payload(name), 5)
    finally:
        sender.close()


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


# -- TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate (.ci/run installs it)")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_receiver(certificate: tuple[Path, Path]) -> Iterator[OTLPReceiver]:
    """An https:// collector on loopback, serving the self-signed certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*certificate)
    rx = OTLPReceiver(tls=ctx).start()
    try:
        yield rx
    finally:
        rx.stop()


def test_an_https_collector_is_verified_against_the_otlp_certificate(
    clean_env: pytest.MonkeyPatch, tls_receiver: OTLPReceiver, certificate: tuple[Path, Path]
) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE trusts the collector's certificate: the span arrives. Without
    it the default bundle (certifi's, as requests uses) does not know the certificate: nothing is sent,
    nothing is raised, and the outcome says to retry."""
    assert tls_receiver.endpoint.startswith("https://")
    out = _send_once(tls_receiver.endpoint, "refused")
    assert not out.ok
    assert out.retryable
    assert out.status is None
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(certificate[0]))
    assert _send_once(tls_receiver.endpoint, "tls").ok
    assert [s.name for s in tls_receiver.spans] == ["tls"]


def test_the_requests_ca_bundle_verifies_an_https_collector(
    clean_env: pytest.MonkeyPatch, tls_receiver: OTLPReceiver, certificate: tuple[Path, Path]
) -> None:
    """REQUESTS_CA_BUNDLE (read when the sender is made) is the CA bundle when no OTLP certificate is set."""
    clean_env.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))
    sender = OTLPSender(tls_receiver.endpoint)
    clean_env.delenv("REQUESTS_CA_BUNDLE")
    try:
        assert sender(_payload("bundle"), 5).ok
    finally:
        sender.close()
    assert [s.name for s in tls_receiver.spans] == ["bundle"]


def test_https_through_the_proxy_goes_by_a_connect_tunnel(
    clean_env: pytest.MonkeyPatch,
    tls_receiver: OTLPReceiver,
    certificate: tuple[Path, Path],
    proxy: _ForwardProxy,
) -> None:
    """HTTPS_PROXY with credentials: the proxy is asked to CONNECT to the collector (with the proxy's
    Basic credentials on the CONNECT, never sent on inside the tunnel), and TLS runs end to end."""
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(certificate[0]))
    clean_env.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://pxuser:pxpass@"))
    assert _send_once(tls_receiver.endpoint, "tunnelled").ok
    assert proxy.seen == [(f"CONNECT 127.0.0.1:{tls_receiver.port}", "Basic cHh1c2VyOnB4cGFzcw==")]
    assert [s.name for s in tls_receiver.spans] == ["tunnelled"]
    assert "proxy-authorization" not in {k.lower() for k in tls_receiver.last_headers}


# -- proxies the transport cannot use ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["socks5", "https"])
def test_a_proxy_scheme_it_cannot_use_fails_at_init_without_its_secret(
    clean_env: pytest.MonkeyPatch, scheme: str
) -> None:
    """A SOCKS or an https:// proxy for the collector's URL: a clear ValueError at once, from the sender and
    from ``init()``, naming the proxy without its password, rather than every request failing later; no
    pipeline is left half set up."""
    import ctxprop
    from ctxprop import _pipeline

    clean_env.setenv("HTTPS_PROXY", f"{scheme}://me:hunter2@127.0.0.1:1080")
    with pytest.raises(ValueError, match="http:// proxies only") as err:
        OTLPSender("https://collector.example:4318/v1/traces")
    assert "hunter2" not in str(err.value)
    assert f"{scheme}://***@127.0.0.1:1080" in str(err.value)
    with pytest.raises(ValueError, match="http:// proxies only") as at_init:
        ctxprop.init(endpoint="https://collector.example:4318", handle_signals=False)
    assert "hunter2" not in str(at_init.value)
    assert _pipeline.current_processor() is None


# -- connections, threads, deadlines ------------------------------------------------------------------------


def test_posts_share_one_keep_alive_connection(clean_env: pytest.MonkeyPatch, receiver: OTLPReceiver) -> None:
    """Twenty POSTs in a row go over one connection."""
    sender = OTLPSender(receiver.endpoint)
    try:
        assert all(sender(_payload(f"s{i}"), 5).ok for i in range(20))
    finally:
        sender.close()
    assert receiver.connections == 1
    assert len(receiver.spans) == 20


class _HangUpAfterEachAnswer:
    """A collector that answers 200 (keep-alive, as far as the client can tell) and then closes the
    connection: the client's pooled connection is stale at its next request."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as reader:
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
                self.requests += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


def test_a_stale_pooled_connection_is_retried_on_a_new_one(clean_env: pytest.MonkeyPatch) -> None:
    """The collector hung up the kept-alive connection between two POSTs: the second POST fails on it
    at once and is sent again on a new connection, within the same call."""
    server = _HangUpAfterEachAnswer()
    sender = OTLPSender(f"http://127.0.0.1:{server.port}/v1/traces")
    try:
        assert sender(_payload("one"), 5).ok
        time.sleep(0.1)  # the server's close reaches the client's socket
        assert sender(_payload("two"), 5).ok
    finally:
        sender.close()
        server.close()
    assert (server.connections, server.requests) == (2, 2)


def test_no_request_starts_a_thread(clean_env: pytest.MonkeyPatch, receiver: OTLPReceiver) -> None:
    """The deadline is kept by the sockets' timeouts, not a timer thread per request: thirty POSTs start
    no thread from the sending thread (threads leave state behind for fork() and cost the GIL a switch
    each way). Thread.start is watched, and still starts what it is asked to."""
    sender = OTLPSender(receiver.endpoint)
    assert sender(_payload("warm"), 5).ok
    me = threading.get_ident()
    started: list[threading.Thread] = []
    original = threading.Thread.start

    def watched_start(thread: threading.Thread) -> None:
        if threading.get_ident() == me:
            started.append(thread)
        original(thread)

    payloads = [_payload(f"s{i}") for i in range(30)]  # (the SDK's resource detection uses a pool)
    clean_env.setattr(threading.Thread, "start", watched_start)
    try:
        assert all(sender(payload, 5).ok for payload in payloads)
    finally:
        clean_env.setattr(threading.Thread, "start", original)
        sender.close()
    assert started == []


def test_the_whole_request_deadline_holds_through_a_proxy(clean_env: pytest.MonkeyPatch) -> None:
    """A proxy that trickles its answer a byte at a time: the POST still ends by its deadline (+0.5 s),
    retryable."""
    with serving("trickle") as trickler:
        clean_env.setenv("HTTP_PROXY", trickler.endpoint.removesuffix("/v1/traces"))
        sender = OTLPSender("http://collector.invalid:4318/v1/traces")
        t0 = time.monotonic()
        out = sender(_payload("slow"), 0.8)
        took = time.monotonic() - t0
        sender.close()
    assert not out.ok
    assert out.retryable
    assert took < 0.8 + 0.5


def test_the_client_certificate_is_presented_to_a_collector_that_asks_for_one(
    clean_env: pytest.MonkeyPatch, certificate: tuple[Path, Path]
) -> None:
    """A collector that requires a client certificate: refused without one (no raise, retryable), and
    delivered with OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE / _CLIENT_KEY."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*certificate)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(certificate[0]))
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", str(certificate[0]))
    with OTLPReceiver(tls=ctx) as rx:
        anonymous = OTLPSender(rx.endpoint)
        try:
            out = anonymous(_payload("anonymous"), 5)
        finally:
            anonymous.close()
        assert not out.ok
        assert out.retryable
        clean_env.setenv("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", str(certificate[0]))
        clean_env.setenv("OTEL_EXPORTER_OTLP_CLIENT_KEY", str(certificate[1]))
        sender = OTLPSender(rx.endpoint)
        try:
            assert sender(_payload("mutual"), 5).ok
        finally:
            sender.close()
        assert [s.name for s in rx.spans] == ["mutual"]


def test_a_header_value_with_a_line_break_is_refused_when_the_sender_is_made() -> None:
    """The head of every POST is written from the headers once: a value that would end a header line
    (and start one of its own) is a ValueError then, and the value is not shown."""
    with pytest.raises(ValueError, match="line break") as err:
        OTLPSender("http://127.0.0.1:9/v1/traces", headers={"x-team": "obs\r\nX-Injected: 1"})
    assert "Injected" not in str(err.value)
