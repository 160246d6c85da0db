"""End to end: connections are scarce, and a hostile client cannot take them all.

A real `condery serve` with small limits, attacked over loopback by many idle and
trickling sockets: its open sockets stay bounded, the attackers are cut within the
timeouts, the log stays small, and a normal pull works right after (issue 5, item 7).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.procs import running
from tests.test_e2e import OCI_MANIFEST, Registry, serve

pytestmark = pytest.mark.e2e

MAX_CONNECTIONS = 50
TIMEOUT = 2  # header_timeout and idle_timeout, seconds


@contextlib.contextmanager
def condery_process(tmp: Path, channel: Path, base_layout: Path, *, wrapper: tuple[str, ...] = (), **extra) -> Iterator[
    tuple[Registry, int]
]:
    """`condery serve` (optionally run under `wrapper`, e.g. prlimit), and its pid."""
    argv, store, port = serve(tmp, [str(channel)], f"oci:{base_layout}:bookworm", **extra)
    url = f"http://127.0.0.1:{port}"
    env = {"PYTHONPATH": str(Path(__file__).parent.parent)}
    with running([*wrapper, *argv], url=url + "/v2/", env=env, log_path=tmp / "condery.log", timeout=60) as proc:
        yield Registry(url, f"127.0.0.1:{port}", store), proc.pid


def _status(registry: Registry, path: str) -> int | None:
    """The status of a GET, or None when the connection was refused or cut."""
    try:
        return registry.get(path)[0]
    except OSError:
        return None


def open_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def get_from(source: str, port: int, path: str) -> tuple[int, bytes]:
    """A GET from another loopback address (all of 127.0.0.0/8 is local): another client."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        connection.request("GET", path, headers={"Accept": OCI_MANIFEST})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def attack(port: int, count: int) -> list[socket.socket]:
    """`count` connections: half silent, half sending the start of a request."""
    sockets = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        if i % 2:
            with contextlib.suppress(OSError):
                sock.send(b"GET /v2/ HTTP/1.1\r\nHost: condery\r\n")
        sockets.append(sock)
    return sockets


def trickle_and_watch(sockets: list[socket.socket], seconds: float, on_tick) -> tuple[list[socket.socket], list[bytes]]:
    """Send a byte every 0.2 s on each trickling socket until the server closes it.

    Returns the sockets still open after `seconds` and what the closed ones received.
    """
    open_ = {sock: b"" for sock in sockets}
    answers: list[bytes] = []
    deadline = time.monotonic() + seconds
    trickling = set(sockets[1::2])
    while open_ and time.monotonic() < deadline:
        for sock in list(trickling & open_.keys()):
            with contextlib.suppress(OSError):
                sock.send(b"X")
        readable, _, _ = select.select(list(open_), [], [], 0.2)
        for sock in readable:
            try:
                data = sock.recv(65536)
            except OSError:  # reset: closed too
                data = b""
            if data:
                open_[sock] += data
                continue
            answers.append(open_.pop(sock))
            sock.close()
        on_tick()
    return list(open_), answers


def test_idle_and_trickling_connections_cannot_lock_out_a_pull(
    tmp_path: Path, fixture_channel: Path, base_layout: Path
) -> None:
    # One attacker address may fill every slot here: this is the global limit's test.
    limits = {"max_connections": MAX_CONNECTIONS, "max_connections_per_client": MAX_CONNECTIONS,
              "header_timeout": TIMEOUT, "idle_timeout": TIMEOUT}
    with condery_process(tmp_path, fixture_channel, base_layout, **limits) as (registry, pid):
        status, headers, body = registry.get("/v2/xz/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200, body  # built before the attack; pulled again after it
        layer = json.loads(body)["layers"][-1]["digest"]
        port = int(registry.host.rsplit(":", 1)[1])
        baseline = open_sockets(pid)
        log_before = (tmp_path / "condery.log").stat().st_size

        started = time.monotonic()
        sockets = attack(port, 4 * MAX_CONNECTIONS)
        attacked = time.monotonic()
        samples: list[tuple[float, int]] = []
        still_open, answers = trickle_and_watch(
            sockets, TIMEOUT + 2.5, lambda: samples.append((time.monotonic() - attacked, open_sockets(pid)))
        )
        elapsed = time.monotonic() - started
        for sock in still_open:
            sock.close()

        # Bounded: the listener and the limit's worth of connections. asyncio accepts
        # connections in batches before any of them is refused, so a burst may show more
        # for an instant (seen: up to 188 of 200 on a loaded 2-core machine, for a few
        # milliseconds); once settled, nothing beyond the limit.
        settled = [count for at, count in samples if at > 0.5]
        assert settled and max(settled) <= baseline + MAX_CONNECTIONS + 1, (baseline, samples)
        # Every attacker was cut within the header deadline (plus scheduling slack).
        assert not still_open, f"{len(still_open)} of {len(sockets)} sockets still open after {elapsed:.1f}s"
        statuses = sorted({answer.split(b" ", 2)[1].decode() for answer in answers if answer})
        assert statuses == ["408", "503"], statuses  # too slow, or past the limit

        # Right after: a normal pull works.
        assert registry.get("/v2/")[0] == 200
        status, headers, again = registry.get("/v2/xz/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200 and again == body
        status, _, blob = registry.get(f"/v2/xz/blobs/{layer}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == layer

        # Quiet: a few lines for 200 connections, no traceback.
        log = (tmp_path / "condery.log").read_bytes()[log_before:].decode(errors="replace")
        assert "Traceback" not in log and len(log) < 2000, log[-3000:]


def test_out_of_file_descriptors_is_one_log_line_not_a_traceback_each(
    tmp_path: Path, fixture_channel: Path, base_layout: Path
) -> None:
    """max_connections set above what the fd limit allows: accept() fails with EMFILE."""
    nofile = 96
    limits = {"max_connections": 1000, "header_timeout": TIMEOUT, "idle_timeout": TIMEOUT}
    wrapper = ("prlimit", f"--nofile={nofile}:{nofile}", "--")
    with condery_process(tmp_path, fixture_channel, base_layout, wrapper=wrapper, **limits) as (registry, _):
        port = int(registry.host.rsplit(":", 1)[1])
        log_before = (tmp_path / "condery.log").stat().st_size
        sockets = attack(port, nofile + 40)  # within the listen queue: connect() never waits
        # Past the fd limit the rest wait in the listen queue: the attackers give up first.
        still_open, _ = trickle_and_watch(sockets, TIMEOUT + 1, lambda: None)
        for sock in still_open:
            sock.close()
        # The server is not wedged: once the attackers are cut, it answers.
        deadline = time.monotonic() + 5
        while _status(registry, "/v2/") != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        log = (tmp_path / "condery.log").read_bytes()[log_before:].decode(errors="replace")
        assert "accept failed for lack of file descriptors" in log, log[-3000:]
        assert "Traceback" not in log and len(log) < 2000, log[-3000:]


def test_one_attacking_address_leaves_room_for_everyone_else(
    tmp_path: Path, fixture_channel: Path, base_layout: Path
) -> None:
    """Default per-client share (an eighth of 50: 8): pulls from elsewhere work during the attack."""
    limits = {"max_connections": MAX_CONNECTIONS, "header_timeout": 30, "idle_timeout": 30}
    with condery_process(tmp_path, fixture_channel, base_layout, **limits) as (registry, pid):
        port = int(registry.host.rsplit(":", 1)[1])
        baseline = open_sockets(pid)
        sockets = attack(port, 2 * MAX_CONNECTIONS)  # held: the timeouts are long here
        try:
            time.sleep(0.5)
            assert open_sockets(pid) <= baseline + 8 + 1
            assert get_from("127.0.0.2", port, "/v2/")[0] == 200
            status, body = get_from("127.0.0.2", port, "/v2/xz/manifests/latest")  # a cold build
            assert status == 200 and json.loads(body)["mediaType"] == OCI_MANIFEST
            # While the attacker's own further connections are refused (a 503, or a reset
            # when the request was still unread as the server closed).
            try:
                refused = get_from("127.0.0.1", port, "/v2/")[0]
            except (ConnectionError, http.client.HTTPException):
                refused = None
            assert refused in (503, None)
        finally:
            for sock in sockets:
                sock.close()
        log = (tmp_path / "condery.log").read_text(errors="replace")
        assert "max_connections_per_client=8" in log and "Traceback" not in log
