"""A real DNS server on loopback, and child processes whose system resolver asks it.

``in_dns_namespace()`` gives ``support.run_child`` the argv prefix that runs the child in a private mount
namespace (``unshare --mount``) where ``/etc/resolv.conf`` names only one loopback address (a new one each
time, so runs side by side do not meet), so the child's ``getaddrinfo`` goes through glibc's real resolver
to the ``DNSServer`` that the child runs there (``DNSServer(os.environ["DNS_HOST"])``). Nothing outside the
child sees the changed file. It needs root and ``unshare(1)``: ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

__all__ = ["NAME", "DNSServer", "in_dns_namespace", "unavailable"]

#: A name only the tests' DNS server knows (``.test`` is reserved, RFC 2606).
NAME = "collector.ctxprop.test"
_A, _AAAA = 1, 28


@functools.cache
def unavailable() -> str | None:
    """Why a child cannot get a private resolv.conf here, or None."""
    if shutil.which("unshare") is None:
        return "no unshare(1) command"
    if os.geteuid() != 0:
        return "a private mount namespace and port 53 need root"
    probe = subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", "mount --bind /etc/resolv.conf /etc/resolv.conf"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot bind-mount in a private mount namespace: {probe.stderr.decode(errors='replace')}"
    return None


def in_dns_namespace(tmp: Path, options: str = "timeout:3 attempts:1") -> tuple[list[str], dict[str, str]]:
    """The argv prefix and environment of a child whose resolver asks only the address in its
    ``DNS_HOST`` variable, with resolv.conf's ``options``."""
    host = f"127.77.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    conf = tmp / "resolv.conf"
    conf.write_text(f"nameserver {host}\noptions {options}\n")
    script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
    return ["unshare", "--mount", "--", "sh", "-c", script, str(conf)], {"DNS_HOST": host}


class DNSServer:
    """Answers every A query with ``answers`` (IPv4 strings, in that order), every AAAA query with no
    record; or, while ``silent``, nothing at all. ``queries`` lists the names asked, in order."""

    def __init__(self, host: str, answers: list[str] | None = None, *, silent: bool = False) -> None:
        self.answers = list(answers or [])
        self.silent = silent
        self.queries: list[tuple[str, int]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 53))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)
        self._thread.start()

    def __enter__(self) -> DNSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            parsed = _question(query)
            if parsed is None:
                continue
            name, qtype, end = parsed
            self.queries.append((name, qtype))
            if self.silent:
                continue
            records = self.answers if qtype == _A else []
            # The header: the query's id, "a response, recursion available, no error", one question.
            head = query[:2] + struct.pack(">HHHHH", 0x8180, 1, len(records), 0, 0)
            body = b"".join(
                struct.pack(">HHHIH", 0xC00C, _A, 1, 60, 4) + socket.inet_aton(ip) for ip in records
            )
            self._sock.sendto(head + query[12:end] + body, peer)


def _question(query: bytes) -> tuple[str, int, int] | None:
    """The question's name, type and where it ends, or None for what is not a one-question query."""
    if len(query) < 12 or struct.unpack(">H", query[4:6])[0] != 1:
        return None
    labels, i = [], 12
    while i < len(query) and query[i]:
        n = query[i]
        labels.append(query[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if i + 5 > len(query):
        return None
    qtype = struct.unpack(">H", query[i + 1 : i + 3])[0]
    return ".".join(labels), qtype, i + 5
