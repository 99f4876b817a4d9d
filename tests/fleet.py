"""Helpers for end-to-end fleet tests: a real fleet started through the CLI, a transceiver
stand-in that speaks the relay header, and clients that send real STUN binding requests.

Everything here uses real processes and real UDP sockets on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aioice import stun

from voxrelay.proto.relay_header import (
    BUNDLE_MARKER,
    HEADER_SIZE,
    RelayHeaderError,
    bundle_decode,
    decode_header,
    encode_header,
)
from voxrelay.proto.token import mint_token

SECRET = bytes(range(32))
CLUSTER = 7


def binding_request(
    server_ufrag: str, client_ufrag: str = "cli1", password: str = "p" * 22
) -> bytes:
    """A real ICE binding request like a browser's (USERNAME, PRIORITY, integrity, fingerprint)."""
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    message.attributes["USERNAME"] = f"{server_ufrag}:{client_ufrag}"
    message.attributes["PRIORITY"] = 1853817087
    message.attributes["ICE-CONTROLLING"] = 0x1234567890
    message.add_message_integrity(password.encode())
    message.add_fingerprint()
    return bytes(message)


def rtp_packet(seq: int, payload: bytes = b"\x00" * 80) -> bytes:
    """An RTP-shaped datagram (first byte 0x80): never STUN, never a route creator."""
    return bytes([0x80, 111]) + seq.to_bytes(2, "big") + b"\x00" * 8 + payload


class FakeTransceiver:
    """Receives relay-header datagrams and bundles, and echoes each payload to its client.

    It stands in for the real transceiver: the relay only cares that replies carry the
    relay header and come from a registered address. ``datagrams`` logs each internal
    datagram as ``(kind, size, payload lengths)``, kind ``"v1"`` or ``"bundle"``; a
    malformed datagram keeps the records before the fault and counts one ``bad``.
    """

    def __init__(self, transceiver_id: int = 1, echo: bool = True) -> None:
        self.id = transceiver_id
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.received: list[tuple[tuple[str, int], bytes, tuple]] = []  # (client, payload, relay)
        self.relays: set[tuple] = set()
        self.datagrams: list[tuple[str, int, tuple[int, ...]]] = []
        self.bad = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, relay_address = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            records: list[tuple[tuple[str, int], bytes]] = []
            kind = "bundle" if data[:1] == bytes([BUNDLE_MARKER]) else "v1"
            bad = False
            try:
                if kind == "bundle":
                    for client, payload in bundle_decode(data):
                        records.append((client, payload))
                else:
                    records.append((decode_header(data), data[HEADER_SIZE:]))
            except RelayHeaderError:
                bad = True
            with self.lock:
                for client, payload in records:
                    self.received.append((client, payload, relay_address))
                self.relays.add(relay_address)
                self.datagrams.append((kind, len(data), tuple(len(p) for _, p in records)))
                self.bad += bad
            if self.echo:
                for client, payload in records:
                    self.sock.sendto(encode_header(*client) + b"echo:" + payload, relay_address)

    def send_to_client(self, client: tuple[str, int], payload: bytes, relay: tuple) -> None:
        self.sock.sendto(encode_header(*client) + payload, relay)

    def payloads_from(self, client: tuple[str, int]) -> list[bytes]:
        with self.lock:
            return [p for c, p, _ in self.received if c == client]

    def datagram_log(self) -> list[tuple[str, int, tuple[int, ...]]]:
        with self.lock:
            return list(self.datagrams)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class Client:
    """A UDP client on its own ephemeral port talking to the relay's public port."""

    def __init__(self, relay: tuple[str, int]) -> None:
        self.relay = relay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.relay)

    def receive_all(self, wait: float = 0.3) -> list[bytes]:
        got: list[bytes] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            assert source == self.relay, f"reply from {source}, expected the relay {self.relay}"
            got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def still_running_after(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every process of ``pids`` to end; those that did not."""
    deadline = time.monotonic() + timeout
    while (running := [pid for pid in pids if process_running(pid)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    return running


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


class Fleet:
    """A fleet started with `voxrelay up --detach` from a generated config file."""

    def __init__(
        self,
        tmp_path: Path,
        transceivers: list[FakeTransceiver],
        *,
        workers: int = 2,
        redis_url: str | None = None,
        capacity: int = 1000,
        idle_timeout: float = 30,
        drain_seconds: float = 1,
        bundle_max_bytes: int | None = None,
        batch_size: int | None = None,
        extra: str = "",
    ) -> None:
        self.name = f"t{secrets.token_hex(4)}"
        self.runtime_dir = tmp_path / "run"
        self.config_path = tmp_path / "fleet.toml"
        lines = [
            "[fleet]",
            f'name = "{self.name}"',
            f"cluster_id = {CLUSTER}",
            f'runtime_dir = "{self.runtime_dir}"',
            'log_format = "text"',
            "[secrets]",
            f'token_secrets = ["hex:{SECRET.hex()}"]',
            "[relay]",
            'bind = "127.0.0.1"',
            "port = 0",
            f"workers = {workers}",
            f"table_capacity = {capacity}",
            f"idle_timeout = {idle_timeout}",
            f"drain_seconds = {drain_seconds}",
            "restart_backoff_initial = 0.05",
            *([f"bundle_max_bytes = {bundle_max_bytes}"] if bundle_max_bytes is not None else []),
            *([f"batch_size = {batch_size}"] if batch_size is not None else []),
            "[metrics]",
            "port = 0",
            "[transceiver]",
            "count = 0",
        ]
        if redis_url:
            lines += [
                "[redis]",
                f'url = "{redis_url}"',
                "mirror_interval = 0.1",
                "heartbeat_interval = 0.5",
            ]
        for t in transceivers:
            lines += ["[[transceivers.static]]", f"id = {t.id}", f'address = "127.0.0.1:{t.port}"']
        self.config_path.write_text("\n".join(lines) + "\n" + extra)
        self.state: dict[str, Any] = {}

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "voxrelay", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"voxrelay {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}\n{self.log()}"
            )
        return result

    def up(self) -> None:
        self.cli("up", "--detach")
        self.state = json.loads((self.runtime_dir / "state.json").read_text())
        wait_until(
            lambda: all(w["state"] == "running" for w in self.status()["relay"]["workers"]),
            what="workers running",
        )

    def up_foreground(self, stderr_path: Path) -> subprocess.Popen:
        """Run `voxrelay up` in the foreground, as in a terminal, until its workers run.

        It gets a session (and process group) of its own, so a test can deliver Ctrl-C the
        way a terminal does, to the whole group, without hitting pytest. Its stdout and
        stderr go to ``stderr_path`` (a file, so a full pipe can never stall it).
        """
        with open(stderr_path, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "voxrelay", "up", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        try:
            wait_until(
                lambda: (self.runtime_dir / "state.json").exists() or process.poll() is not None,
                what="foreground fleet started",
            )
            if process.poll() is not None:
                raise AssertionError(f"voxrelay up exited: {stderr_path.read_text()}")
            self.state = json.loads((self.runtime_dir / "state.json").read_text())
            wait_until(
                lambda: all(w["state"] == "running" for w in self.status()["relay"]["workers"]),
                what="workers running",
            )
        except BaseException:
            kill_quietly(-process.pid, signal.SIGKILL)
            process.wait()
            raise
        return process

    def down(self) -> None:
        if (self.runtime_dir / "state.json").exists():
            self.cli("down", "--now", check=False)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    @property
    def relay(self) -> tuple[str, int]:
        return ("127.0.0.1", int(self.state["public_port"]))

    @property
    def supervisor_pid(self) -> int:
        return int(self.state["pid"])

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["relay"]["workers"] if w["pid"]]

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.runtime_dir / "voxrelay.log").read_text()[-4000:]
        return ""

    def token(self, transceiver_id: int = 1) -> str:
        return mint_token(SECRET, CLUSTER, transceiver_id)


@contextlib.contextmanager
def running_fleet(
    tmp_path: Path, transceivers: list[FakeTransceiver], **kwargs: Any
) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, transceivers, **kwargs)
    fleet.up()
    try:
        yield fleet
    finally:
        fleet.down()


def kill_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
