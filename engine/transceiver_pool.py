"""The transceiver processes of one machine, started and kept running by the supervisor.

``voxrelay up`` runs relays and transceivers side by side: the pool spawns
``[transceiver] count`` processes (``python -m voxrelay.engine.transceiver``, settings as
JSON on stdin so secrets stay off the command line), restarts one that dies with backoff,
and stops them all at shutdown. Each keeps its UDP port across restarts, so the relay's
directory entry for it stays right; its calls die with it (their DTLS keys lived in that
process), and browsers see the call drop rather than hang.

All of one machine's transceivers share the signaling port with ``SO_REUSEPORT``; each
also listens on a private loopback port, published in ``transceiver-<id>.json`` in the
runtime directory, so a sibling can forward a DELETE for a call it does not own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from voxrelay.engine.config import Config
from voxrelay.engine.transceiver import TransceiverSettings

log = logging.getLogger("voxrelay.supervisor")

__all__ = ["TransceiverPool", "TransceiverProcess"]


@dataclass
class TransceiverProcess:
    transceiver_id: int
    udp_port: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = 0


def _free_port(host: str, kind: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class TransceiverPool:
    """Spawns and supervises this machine's transceivers (``[transceiver]`` section)."""

    def __init__(
        self,
        config: Config,
        *,
        secrets: list[bytes],
        candidate_address: str,
        candidate_port: int,
        runtime_dir: Path,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.candidate_address = candidate_address
        self.candidate_port = candidate_port
        self.runtime_dir = runtime_dir
        local = config.transceiver
        self.signaling_port = local.signaling_port or _free_port(
            local.signaling_bind, socket.SOCK_STREAM
        )
        self.processes = [
            TransceiverProcess(
                transceiver_id=transceiver_id,
                udp_port=(local.port + index)
                if local.port
                else _free_port(local.bind, socket.SOCK_DGRAM),
            )
            for index, transceiver_id in enumerate(local.ids)
        ]

    @property
    def signaling_url(self) -> str:
        host = self.config.transceiver.signaling_bind
        if host in ("0.0.0.0", "::"):
            host = self.config.transceiver.advertise_address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.signaling_port}/"

    def entries(self) -> list[tuple[int, str, int]]:
        """Directory entries (id, address, UDP port) for the relays to route to."""
        address = self.config.transceiver.advertise_address
        return [(p.transceiver_id, address, p.udp_port) for p in self.processes]

    def start(self) -> None:
        for entry in self.processes:
            self._spawn(entry)

    def _settings(self, entry: TransceiverProcess) -> TransceiverSettings:
        cfg = self.config
        local = cfg.transceiver
        return TransceiverSettings(
            transceiver_id=entry.transceiver_id,
            cluster_id=cfg.fleet.cluster_id,
            token_secrets=[secret.hex() for secret in self.secrets],
            bind=local.bind,
            port=entry.udp_port,
            candidate_address=self.candidate_address,
            candidate_port=self.candidate_port,
            signaling_bind=local.signaling_bind,
            signaling_port=self.signaling_port,
            signaling_token=local.signaling_token,
            signaling_reuse_port=True,
            runtime_dir=str(self.runtime_dir),
            redis_url=cfg.redis.url,
            advertise_address=local.advertise_address,
            heartbeat_interval=cfg.redis.heartbeat_interval,
            log_level=cfg.fleet.log_level,
            log_format=cfg.fleet.log_format,
            supervised=True,
        )

    def _spawn(self, entry: TransceiverProcess) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            [sys.executable, "-m", "voxrelay.engine.transceiver"], stdin=subprocess.PIPE, env=env
        )
        assert process.stdin is not None
        process.stdin.write(self._settings(entry).to_json())
        process.stdin.close()
        entry.process = process
        entry.started_at = time.monotonic()
        log.info(
            "transceiver started", extra={"transceiver": entry.transceiver_id, "pid": process.pid}
        )

    def poll(self, now: float, *, respawn: bool = True) -> None:
        """Reap dead transceivers and restart them with backoff."""
        relay = self.config.relay
        for entry in self.processes:
            process = entry.process
            if process is not None and process.poll() is not None:
                entry.process = None
                lived = now - entry.started_at
                entry.failures = 0 if lived > 10 else entry.failures + 1
                delay = (
                    min(
                        relay.restart_backoff_initial * (2 ** max(entry.failures - 1, 0)),
                        relay.restart_backoff_max,
                    )
                    if entry.failures
                    else 0.0
                )
                entry.restart_at = now + delay
                with contextlib.suppress(FileNotFoundError):
                    (self.runtime_dir / f"transceiver-{entry.transceiver_id}.json").unlink()
                log.warning(
                    "transceiver died",
                    extra={
                        "transceiver": entry.transceiver_id,
                        "pid": process.pid,
                        "code": process.returncode,
                        "restart_in_s": round(delay, 3),
                    },
                )
            if respawn and entry.process is None and now >= entry.restart_at:
                entry.restarts += 1
                self._spawn(entry)

    def ready(self) -> bool:
        """Whether every transceiver has published its state file (it is serving)."""
        return all(
            (self.runtime_dir / f"transceiver-{p.transceiver_id}.json").exists()
            for p in self.processes
        )

    def drain(self) -> None:
        """SIGUSR1: take no new calls (WHIP answers 503), keep the live ones."""
        for entry in self.processes:
            if entry.process is not None and entry.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    entry.process.send_signal(signal.SIGUSR1)

    def stop(self, timeout: float) -> None:
        """SIGTERM every transceiver (they close their calls politely), then wait."""
        for entry in self.processes:
            if entry.process is not None and entry.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    entry.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for entry in self.processes:
            if entry.process is None:
                continue
            try:
                entry.process.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait()
            entry.process = None

    def status(self) -> list[dict]:
        """Per-transceiver pid, liveness and what it published."""
        rows = []
        for entry in self.processes:
            alive = entry.process is not None and entry.process.poll() is None
            row = {
                "id": entry.transceiver_id,
                "pid": entry.process.pid if entry.process is not None else None,
                "alive": alive,
                "udp_port": entry.udp_port,
                "restarts": entry.restarts,
            }
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                published = orjson.loads(
                    (self.runtime_dir / f"transceiver-{entry.transceiver_id}.json").read_bytes()
                )
                row["private_url"] = published.get("private_url")
            rows.append(row)
        return rows
