"""Dask across hosts: a scheduler and two workers, each on its own test host (a network namespace made
here, joined by a bridge in a namespace of its own), the client and the loopback collector in the root
namespace. Worker spans ride home with the results and reach the collector through the client's pipeline.

Only the 10.231.K.0/24 addresses of these namespaces and loopback are used; everything is torn down after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO, OTLPReceiver, child_env, receiver  # noqa: F401

import ctxprop

distributed = pytest.importorskip("distributed")

TAGS = {"tenant": "acme"}
pytestmark = pytest.mark.slow


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _can_make_namespaces() -> str | None:
    if shutil.which("ip") is None:
        return "no ip(8) command"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"ctxprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace here: {exc}"
    _ip("netns", "del", probe)
    return None


class Hosts:
    """Three test hosts (scheduler, worker 1, worker 2) and the root namespace on one bridged /24."""

    def __init__(self, tmp: Path) -> None:
        tag = os.urandom(2).hex()
        self.tmp = tmp
        self.switch = f"ctxsw{tag}"
        self.names = [f"ctxs{tag}", f"ctxw1{tag}", f"ctxw2{tag}"]
        used = subprocess.run(["ip", "-4", "addr"], check=False, capture_output=True, text=True, timeout=10)
        used_text = used.stdout
        self.net = next(f"10.231.{k}" for k in range(17, 250) if f"10.231.{k}." not in used_text)
        self.root_if = f"cx{tag}r"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made: list[str] = []

    def address(self, i: int) -> str:
        return f"{self.net}.{i + 2}"  # .1 is the root namespace

    def up(self) -> None:
        for ns in (self.switch, *self.names):
            _ip("netns", "add", ns)
            self.made.append(ns)
        sw = ("netns", "exec", self.switch, "ip")
        _ip(*sw, "link", "add", "br0", "type", "bridge")
        _ip(*sw, "link", "set", "br0", "up")
        ports: list[tuple[str, str | None, str]] = [(self.root_if, None, f"{self.net}.1")]
        ports += [(f"cx{i}{ns[-4:]}", ns, self.address(i)) for i, ns in enumerate(self.names)]
        for end, where, addr in ports:
            peer = end + "p"
            _ip("link", "add", end, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", self.switch)
            _ip(*sw, "link", "set", peer, "master", "br0", "up")
            inside: tuple[str, ...] = ()
            if where is not None:
                _ip("link", "set", end, "netns", where)
                inside = ("netns", "exec", where, "ip")
                _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "addr", "add", f"{addr}/24", "dev", end)
            _ip(*inside, "link", "set", end, "up")

    def run(self, i: int, *argv: str) -> None:
        env = child_env({"PYTHONPATH": str(REPO / "tests")})
        with (self.tmp / f"host{i}.log").open("wb") as log:
            self.procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.names[i], sys.executable, *argv],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=str(REPO),
                )
            )

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("host*.log")))

    def down(self) -> None:
        # The test is over and nothing reads the cluster's goodbyes: kill it at once. A graceful SIGTERM
        # let the scheduler and each worker wait on one another's goodbyes (about 15 s in all).
        # `ip netns exec` execs the interpreter, so each pid is the scheduler or worker itself.
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)
        subprocess.run(["ip", "link", "del", self.root_if], capture_output=True, timeout=10, check=False)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """A scheduler and two workers, each in its own network namespace; torn down after the test."""
    reason = _can_make_namespaces()
    if reason is not None:
        pytest.skip(reason)
    made = Hosts(tmp_path)
    try:
        made.up()
        scheduler = f"tcp://{made.address(0)}:8786"
        made.run(0, "-m", "distributed.cli.dask_scheduler", "--host", made.address(0), "--port", "8786",
                 "--no-dashboard")
        for i in (1, 2):
            made.run(i, "-m", "distributed.cli.dask_worker", scheduler, "--host", made.address(i),
                     "--nthreads", "1", "--no-nanny", "--no-dashboard")
        made.scheduler = scheduler  # type: ignore[attr-defined]
        yield made
    finally:
        made.down()


def test_worker_spans_across_hosts_are_children_of_the_submitting_span(
    hosts: Hosts,
    receiver: OTLPReceiver,  # noqa: F811
) -> None:
    """Tasks on two workers on other hosts see the submitter's tags, and every span they make reaches the
    loopback collector once as a child of the submitting span (ContextAwareExecutor and instrument());
    the same tasks submitted bare carry nothing."""
    from executor_tasks import traced_where
    from opentelemetry import trace

    ctxprop.init(endpoint=receiver.endpoint, service_name="netns-client", handle_signals=False)
    try:
        with distributed.Client(hosts.scheduler, timeout=60) as client:  # type: ignore[attr-defined]
            try:
                client.wait_for_workers(2, timeout=90)
            except (TimeoutError, OSError) as exc:
                pytest.fail(f"workers did not join: {exc}\n{hosts.logs()}")
            workers = sorted(client.scheduler_info()["workers"])
            hosts_seen = {w.split("//")[1].rsplit(":", 1)[0] for w in workers}
            assert hosts_seen == {hosts.address(1), hosts.address(2)}
            ctxprop.set_tag("tenant", "acme")
            bare = [
                client.submit(traced_where, 100 + i, workers=[w], pure=False).result(60)
                for i, w in enumerate(workers)
            ]
            with trace.get_tracer("test").start_as_current_span("submit") as root:
                executor = ctxprop.ContextAwareExecutor(client.get_executor())
                mapped = list(executor.map(traced_where, range(6), timeout=60))
                ctxprop.instrument()
                try:
                    pinned = [
                        client.submit(traced_where, 10 + i, workers=[w]).result(60)
                        for i, w in enumerate(workers)
                    ]
                finally:
                    ctxprop.uninstrument()
    finally:
        ctxprop.close(10)
    assert [r["tags"] for r in bare] == [{}, {}]  # the control: nothing crossed
    results = [*mapped, *pinned]
    assert all(r["tags"] == TAGS for r in results), results
    assert {r["worker"] for r in pinned} == set(workers)
    assert receiver.wait_for_spans(9, timeout=30)
    sc = root.get_span_context()
    names = sorted(s.name for s in receiver.spans if s.name.startswith("task-"))
    assert names == sorted([*(f"task-{n}" for n in range(6)), "task-10", "task-11"])
    for span in receiver.spans:
        if span.name == "submit":
            continue
        if span.name in ("task-100", "task-101"):
            pytest.fail("a bare task's span reached the collector")
        assert span.trace_id == format(sc.trace_id, "032x"), span
        assert span.parent_span_id == format(sc.span_id, "016x"), span
        assert span.attributes.get("tenant") == "acme", span
