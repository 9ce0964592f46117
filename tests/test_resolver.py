"""The collector's name, looked up and connected to within the request's deadline, through glibc's real
resolver asking a real DNS server (``dnskit``): one that never answers, one that answers and then goes
quiet, one that names a black-holed address first. Each child runs in a private mount namespace whose
resolv.conf names only its own server; the controls show the stock calls waiting longer."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import dnskit
import pytest
import threadlimit
from support import REPO, ChildResult, OTLPReceiver, run_child

from ctxprop._spool import Spool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(dnskit.unavailable() is not None, reason=str(dnskit.unavailable())),
]

PRELUDE = """
import json, os, socket, sys, time
from dnskit import NAME, DNSServer

def out(**kw):
    print(json.dumps(kw), flush=True)

def payload(name="via-dns"):
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    provider.get_tracer("dns").start_span(name).end()
    return encode_spans(exp.get_finished_spans()).SerializeToString()

def timed(call, *args):
    t = time.monotonic()
    try:
        value = call(*args)
    except OSError as exc:
        value = repr(exc)
    return value, time.monotonic() - t
"""


def _run(tmp_path: Path, code: str, env: dict[str, str] | None = None, **kw: Any) -> ChildResult:
    """Run ``PRELUDE + code`` in a child whose resolver asks only its own DNS server."""
    prefix, child_env = dnskit.in_dns_namespace(tmp_path)
    child_env.update({"PYTHONPATH": str(REPO / "tests"), "CTXPROP_SPOOL_DIR": str(tmp_path / "spool")})
    child_env.update(env or {})
    return run_child(PRELUDE + code, prefix=prefix, env=child_env, **kw)


def test_a_resolver_that_never_answers_cannot_hold_a_post_past_its_deadline(tmp_path: Path) -> None:
    """A DNS server that never answers: a 1 s POST to the collector's name gives up at its deadline (no
    answer, retryable) instead of waiting out the resolver (3 s here; 10 s per server by glibc's
    defaults), and a second POST does not start a second lookup while the first is still waiting."""
    res = _run(
        tmp_path,
        """
from ctxprop._transport import OTLPSender
with DNSServer(os.environ["DNS_HOST"], silent=True) as dns:
    _, control_s = timed(socket.getaddrinfo, NAME, 4318)  # the control: the stock lookup waits it out
    asked = len(dns.queries)
    sender = OTLPSender(f"http://{NAME}:4318/v1/traces")
    body = payload()
    times, outcomes = [], []
    for _ in range(2):
        o, took = timed(sender, body, 1.0)
        times.append(took)
        outcomes.append([o.ok, o.retryable, o.status])
    out(control_s=control_s, times=times, outcomes=outcomes, queries=len(dns.queries) - asked)
""",
    )
    assert res.returncode == 0, res.stderr
    found = res.json_lines[-1]
    assert found["control_s"] >= 2.5, found  # the resolver really is silent, for its 3 s
    assert found["outcomes"] == [[False, True, None]] * 2, found
    assert all(t < 1.0 + 0.5 for t in found["times"]), found
    assert found["queries"] == 2, found  # one A and one AAAA query: one lookup for both POSTs


def test_sigterm_with_a_resolver_that_never_answers_keeps_the_close_deadline_and_spools_every_span(
    tmp_path: Path,
) -> None:
    """SIGTERM while the collector's name cannot be resolved: the process dies by SIGTERM within one
    close deadline (2 s) of the signal, not after the resolver's timeouts, with its 300 spans in the spool;
    the next start (the endpoint an address now) delivers each of them once. (The export thread kept this
    deadline before lookups had one; this pins it with the lookup in the path.)"""
    res = _run(
        tmp_path,
        """
import ctxprop
from opentelemetry import trace
dns = DNSServer(os.environ["DNS_HOST"], silent=True)
ctxprop.init(endpoint=f"http://{NAME}:4318", close_timeout=2.0, schedule_delay=60)
for i in range(300):
    trace.get_tracer("dns").start_span(f"s-{i}").end()
out(ready=True, ready_at=time.monotonic())
for _ in range(3000):  # short sleeps, so the handler runs even if SIGTERM lands just before one starts
    time.sleep(0.02)
""",
        timeout=60,
        signal_after_line="ready",
    )
    ended = time.monotonic()
    assert res.signalled
    assert res.returncode == -signal.SIGTERM, res.stderr
    assert res.stderr == ""
    assert ended - res.last("ready_at") < 2.0 + 0.5 + 0.5  # + signal delivery, teardown, pipe reading
    assert Spool.open(tmp_path / "spool").status().spans == 300
    with OTLPReceiver() as rx:
        again = run_child(
            """
import json, os, ctxprop
ctxprop.init(endpoint=os.environ["EP"], close_timeout=10.0, handle_signals=False)
ctxprop.close()
""",
            env={"EP": rx.endpoint, "CTXPROP_SPOOL_DIR": str(tmp_path / "spool")},
        )
        assert again.returncode == 0, again.stderr
        assert rx.wait_for_spans(300, timeout=10)
        assert sorted(s.name for s in rx.spans) == sorted(f"s-{i}" for i in range(300))
    assert Spool.open(tmp_path / "spool").status().spans == 0


def test_a_black_holed_first_address_leaves_a_share_of_the_deadline_to_the_next(tmp_path: Path) -> None:
    """The name's first address drops every SYN (a listener whose backlog is full), the second is the
    collector: the POST is delivered within its 2 s deadline, the first address given half of it. The
    control, ``socket.create_connection`` with the same timeout, spends all of it on the first address."""
    with OTLPReceiver(host="127.0.0.2") as rx:
        res = _run(
            tmp_path,
            """
from ctxprop._transport import OTLPSender
port = int(os.environ["PORT"])
hole = socket.socket()
hole.bind(("127.0.0.3", port))
hole.listen(0)
held = []
for _ in range(4):  # fill its backlog: later SYNs to it are dropped, unanswered
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(("127.0.0.3", port))
    held.append(c)
time.sleep(0.2)
with DNSServer(os.environ["DNS_HOST"], ["127.0.0.3", "127.0.0.2"]):
    order = [info[4][0] for info in socket.getaddrinfo(NAME, port, 0, socket.SOCK_STREAM)]
    conn, control_s = timed(socket.create_connection, (NAME, port), 2.0)
    conn.close()
    o, took = timed(OTLPSender(f"http://{NAME}:{port}/v1/traces"), payload("past-the-hole"), 2.0)
out(order=order, control_s=control_s, ok=o.ok, took=took)
""",
            env={"PORT": str(rx.port)},
        )
        assert res.returncode == 0, res.stderr
        found = res.json_lines[-1]
        assert found["order"] == ["127.0.0.3", "127.0.0.2"], found  # the black hole is tried first
        assert found["control_s"] >= 1.9, found  # the stock connect gave it the whole timeout
        assert found["ok"] is True, found
        assert found["took"] < 2.0, found
        assert rx.wait_for_spans(1, timeout=10)
        assert [s.name for s in rx.spans] == ["past-the-hole"]


def test_an_answer_is_kept_and_a_stale_one_serves_while_the_resolver_is_down(tmp_path: Path) -> None:
    """An answer is kept (new connections ask no DNS server); once stale (TTL, or no address of it would
    connect), it still serves while the name is looked up again, so a resolver that went down does not
    stop delivery; when the server answers again with a new address, the next connection goes there."""
    with OTLPReceiver(host="127.0.0.1") as first, OTLPReceiver(host="127.0.0.2", port=first.port) as moved:
        res = _run(
            tmp_path,
            """
from ctxprop._transport import OTLPSender
port = int(os.environ["PORT"])
dns = DNSServer(os.environ["DNS_HOST"], ["127.0.0.1"])
sender = OTLPSender(f"http://{NAME}:{port}/v1/traces")
steps = {}
steps["first"] = sender(payload("first"), 5.0).ok
asked = len(dns.queries)
sender.close()  # no pooled connection: the next POST connects again
steps["cached"] = [sender(payload("cached"), 5.0).ok, len(dns.queries) - asked]
dns.silent = True
sender._resolver.forget()  # stale now, as after its TTL
sender.close()
o, took = timed(sender, payload("stale"), 2.0)
steps["stale"] = [o.ok, took < 1.0]
lookup = sender._resolver._lookup
steps["lookup_waiting"] = lookup is not None and not lookup.done.is_set()
lookup.done.wait(10)  # it gives up after resolv.conf's 3 s, the answer still stale
dns.answers, dns.silent = ["127.0.0.2"], False
sender.close()
sender(payload("trigger"), 2.0)  # served stale again, and looks the name up again: answered this time
deadline = time.monotonic() + 10
while sender._resolver._answer[0][4][0] != "127.0.0.2" and time.monotonic() < deadline:
    time.sleep(0.01)
sender.close()
steps["moved"] = sender(payload("moved"), 5.0).ok
out(**steps)
""",
            env={"PORT": str(first.port)},
        )
        assert res.returncode == 0, res.stderr
        found = res.json_lines[-1]
        assert found == {
            "first": True,
            "cached": [True, 0],
            "stale": [True, True],
            "lookup_waiting": True,
            "moved": True,
        }, found
        assert first.wait_for_spans(4, timeout=10)
        assert sorted(s.name for s in first.spans) == ["cached", "first", "stale", "trigger"]
        assert moved.wait_for_spans(1, timeout=10)
        assert [s.name for s in moved.spans] == ["moved"]


def test_a_forked_child_does_not_wait_for_its_parents_lookup(tmp_path: Path) -> None:
    """A fork while a lookup is waiting for a silent resolver: the child (whose copy of that lookup has no
    thread) looks the name up itself and delivers; without the reset it would time out on every POST."""
    with OTLPReceiver() as rx:
        res = _run(
            tmp_path,
            """
import warnings
from ctxprop._transport import OTLPSender
port = int(os.environ["PORT"])
dns = DNSServer(os.environ["DNS_HOST"], silent=True)
sender = OTLPSender(f"http://{NAME}:{port}/v1/traces")
before = sender(payload("never"), 0.3).ok  # its lookup is still waiting for the resolver
dns.answers, dns.silent = ["127.0.0.1"], False  # later queries are answered (by this process's thread)
r, w = os.pipe()
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # forking with threads alive is the point here
    pid = os.fork()
if pid == 0:
    ok = sender(payload("from-the-child"), 5.0).ok
    os.write(w, b"1" if ok else b"0")
    os._exit(0)
os.close(w)
answer = os.read(r, 1)
os.waitpid(pid, 0)
out(before=before, child_ok=answer == b"1")
""",
            env={"PORT": str(rx.port)},
        )
        assert res.returncode == 0, res.stderr
        assert res.json_lines[-1] == {"before": False, "child_ok": True}, res.json_lines
        assert rx.wait_for_spans(1, timeout=10)
        assert [s.name for s in rx.spans] == ["from-the-child"]


@pytest.mark.skipif(threadlimit.unavailable() is not None, reason=str(threadlimit.unavailable()))
def test_where_no_thread_can_start_a_stale_answer_serves_and_a_first_lookup_runs_inline(
    tmp_path: Path,
) -> None:
    """Under a real thread limit: a stale answer is used at once (no lookup in the calling thread, which
    a silent resolver would hold for 3 s); with no answer at all, the name is looked up inline."""
    with OTLPReceiver() as rx, threadlimit.cgroup() as limit:
        res = _run(
            tmp_path,
            threadlimit.LIMIT_THREADS
            + """
from ctxprop._resolver import Resolver
from ctxprop._transport import OTLPSender
port = int(os.environ["PORT"])
dns = DNSServer(os.environ["DNS_HOST"], ["127.0.0.1"])
sender = OTLPSender(f"http://{NAME}:{port}/v1/traces")
first = sender(payload("first"), 5.0).ok
body = payload("stale")  # (the SDK's resource detection starts threads: before the limit)
sender._resolver.forget()
sender.close()
control = limit_threads()
dns.silent = True
asked = len(dns.queries)
o, took = timed(sender, body, 5.0)
stale = [o.ok, took < 1.0, len(dns.queries) - asked]
dns.silent = False
fresh, _ = timed(Resolver(NAME, port).addresses, time.monotonic() + 5.0)
out(first=first, control=control, stale=stale, fresh=[info[4][0] for info in fresh])
""",
            env={"PORT": str(rx.port), **limit},
        )
        assert res.returncode == 0, res.stderr
        assert res.json_lines[-1] == {
            "first": True,
            "control": "can't start new thread",
            "stale": [True, True, 0],
            "fresh": ["127.0.0.1"],
        }, res.json_lines
        assert rx.wait_for_spans(2, timeout=10)
        assert sorted(s.name for s in rx.spans) == ["first", "stale"]


def test_an_answer_is_looked_up_again_once_its_ttl_has_passed(tmp_path: Path) -> None:
    """Within the answer's lifetime (made 2 s here) a new connection asks no DNS server; after it, the
    next new connection asks again (and meanwhile uses the stale answer)."""
    with OTLPReceiver() as rx:
        res = _run(
            tmp_path,
            """
from ctxprop import _resolver
from ctxprop._transport import OTLPSender
_resolver.TTL = 2.0
port = int(os.environ["PORT"])
dns = DNSServer(os.environ["DNS_HOST"], ["127.0.0.1"])
sender = OTLPSender(f"http://{NAME}:{port}/v1/traces")
bodies = {name: payload(name) for name in ("first", "within", "after")}  # before the clock matters
counts = []
for name in ("first", "within"):
    sender.close()  # each POST on a new connection
    assert sender(bodies[name], 5.0).ok
    counts.append(len(dns.queries))
time.sleep(2.1)  # the answer's lifetime passes
sender.close()
assert sender(bodies["after"], 5.0).ok
lookup = sender._resolver._lookup
if lookup is not None:
    lookup.done.wait(5)
counts.append(len(dns.queries))
out(counts=counts)
""",
            env={"PORT": str(rx.port)},
        )
        assert res.returncode == 0, res.stderr
        assert res.last("counts") == [2, 2, 4]  # an A and an AAAA query per lookup
        assert rx.wait_for_spans(3, timeout=10)
