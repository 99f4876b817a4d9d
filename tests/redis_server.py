"""A real ``redis-server`` for tests: start, stop, restart, freeze, and count commands.

Tests of the Redis-facing code (route mirroring, recovery, the registry) run against the
real server binary, never a fake, because what they check is behaviour a fake would
have to imitate: TTLs, pipelines, a server that vanishes and comes back empty, a server
that accepts connections but never answers.

Use the ``redis_server`` fixture, or ``RedisServer`` directly for several servers. Import
this module explicitly from a test file (``from redis_server import RedisServer``); the
fixture skips the test when ``/usr/bin/redis-server`` (or one on ``PATH``) is missing.

The server runs on a free loopback port in a temporary directory with persistence off
(``--save '' --appendonly no``), so a restart always comes back with an empty keyspace,
like a real Redis that lost its data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

_DEFAULT_BINARY = "/usr/bin/redis-server"
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary, or None when the machine has none."""
    if os.access(_DEFAULT_BINARY, os.X_OK):
        return _DEFAULT_BINARY
    return shutil.which("redis-server")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServerError(RuntimeError):
    """The test Redis server failed to start or stop; the message quotes its log."""


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, restartable on the same port.

    ``stop()`` then ``start()`` simulates an outage: clients see connection errors in
    between, and the server returns with no keys. ``freeze()`` (SIGSTOP) simulates a hung
    server: the kernel still accepts TCP connections but nothing answers, so only a
    client's socket timeout ends a call.
    """

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RedisServerError("redis-server binary not found (install redis-server)")
        self.binary = found
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_loopback_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self._started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (again) on this port and wait until it answers PING.

        The first start retries on a new port if another process grabbed the free port
        first; a restart keeps its port, as clients already hold the URL.
        """
        if self.running:
            return
        attempts = 1 if self._started_once else 3
        for attempt in range(attempts):
            try:
                self._start_once()
            except RedisServerError:
                if attempt + 1 == attempts:
                    raise
                self.port = _free_loopback_port()
            else:
                self._started_once = True
                return

    def _start_once(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._frozen = False
        deadline = time.monotonic() + _START_TIMEOUT_S
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    message = (
                        f"redis-server exited with {self._process.returncode} on port "
                        f"{self.port}: {self._log_tail()}"
                    )
                    self.stop()
                    raise RedisServerError(message)
                with contextlib.suppress(redis.RedisError):
                    if probe.ping():
                        return
                if time.monotonic() > deadline:
                    message = (
                        f"redis-server did not answer PING within {_START_TIMEOUT_S} s: "
                        f"{self._log_tail()}"
                    )
                    self.stop()
                    raise RedisServerError(message)
                time.sleep(0.01)
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for the process to exit."""
        process = self._process
        if process is None:
            return
        self.thaw()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port; the keyspace comes back empty."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """Suspend the server (SIGSTOP): connections hang instead of failing."""
        if self._process is not None and not self._frozen:
            self._process.send_signal(signal.SIGSTOP)
            self._frozen = True

    def thaw(self) -> None:
        """Resume a frozen server (SIGCONT)."""
        if self._process is not None and self._frozen:
            self._process.send_signal(signal.SIGCONT)
            self._frozen = False

    def client(self, **kwargs: object) -> redis.Redis:
        """A fresh client for assertions; decode_responses is off (keys come back as bytes)."""
        options: dict[str, object] = {"socket_timeout": 5.0, **kwargs}
        return redis.Redis(host="127.0.0.1", port=self.port, **options)  # type: ignore[arg-type]

    def command_calls(self, command: str) -> int:
        """How many times ``command`` ran since start or the last ``reset_stats()``.

        Read from ``INFO commandstats``, which does not count the INFO call itself, so
        tests can count the commands a component sends without MONITOR.
        """
        with contextlib.closing(self.client()) as admin:
            stats = admin.info("commandstats")
        entry = stats.get(f"cmdstat_{command.lower()}")
        return int(entry["calls"]) if entry else 0

    def keyspace_lookups(self) -> int:
        """Key reads (hits + misses) since start or the last ``reset_stats()``."""
        with contextlib.closing(self.client()) as admin:
            stats = admin.info("stats")
        return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])

    def reset_stats(self) -> None:
        """Zero the command and keyspace counters (CONFIG RESETSTAT)."""
        with contextlib.closing(self.client()) as admin:
            admin.config_resetstat()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        if not text and self._process is not None and self._process.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                text = self._process.stderr.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no log output)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def require_redis_server() -> None:
    """Skip the calling test when there is no ``redis-server`` binary on this machine."""
    if find_redis_server() is None:
        pytest.skip(
            "redis-server binary not found at /usr/bin/redis-server or on PATH; "
            "install it (apt-get install redis-server) to run the Redis tests"
        )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running, empty Redis server for one test, stopped afterwards."""
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server
