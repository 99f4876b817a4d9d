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
from voxrelay.engine.processes import free_port, restart_backoff
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
        # Hold the signaling port with a bound, never-listening SO_REUSEPORT socket for
        # the pool's life: the transceivers (SO_REUSEPORT too) can bind it at any time,
        # even after a restart, while nothing else can take it in between, not even an
        # outgoing connection's ephemeral port. Not listening, it is never handed a
        # connection.
        family = socket.AF_INET6 if ":" in local.signaling_bind else socket.AF_INET
        self._signaling_holder = socket.socket(family, socket.SOCK_STREAM)
        self._signaling_holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self._signaling_holder.bind((local.signaling_bind, local.signaling_port))
        except OSError as exc:
            self._signaling_holder.close()
            raise OSError(
                exc.errno,
                f"cannot bind the signaling port {local.signaling_bind}:{local.signaling_port}: "
                f"{exc.strerror}",
            ) from exc
        self.signaling_port = self._signaling_holder.getsockname()[1]
        self.processes = [
            TransceiverProcess(
                transceiver_id=transceiver_id,
                udp_port=(local.port + index)
                if local.port
                else free_port(local.bind, socket.SOCK_DGRAM),
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
            parent_pid=os.getpid(),
            max_sessions=local.max_calls,
            consent_timeout=local.consent_timeout,
            setup_timeout=local.setup_timeout,
            heap_trim_interval=local.heap_trim_interval,
            certificate_path=str(local.certificate) if local.certificate else None,
            private_key_path=str(local.private_key) if local.private_key else None,
            backend=cfg.backend.client_settings(),
            relay_bundle_max_bytes=min(cfg.relay.bundle_max_bytes, cfg.relay.max_datagram),
        )

    def _spawn(self, entry: TransceiverProcess) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            [sys.executable, "-m", "voxrelay.engine.transceiver"],
            stdin=subprocess.PIPE,
            env=env,
            process_group=0,  # signals to our group reach us; we drain, then stop it
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
                with contextlib.suppress(FileNotFoundError):
                    (self.runtime_dir / f"transceiver-{entry.transceiver_id}.json").unlink()
                if not respawn:  # the fleet drains: an exit is expected, not restarted
                    log.info(
                        "transceiver exited while draining",
                        extra={
                            "transceiver": entry.transceiver_id,
                            "pid": process.pid,
                            "code": process.returncode,
                        },
                    )
                    continue
                entry.failures, delay = restart_backoff(
                    now - entry.started_at,
                    entry.failures,
                    relay.restart_backoff_initial,
                    relay.restart_backoff_max,
                )
                entry.restart_at = now + delay
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
        self._signaling_holder.close()
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


def transceiver_metrics(rows: list[dict], timeout: float = 1.0) -> bytes:
    """One Prometheus exposition of every local transceiver's metrics, merged.

    Each transceiver serves its own ``/metrics`` on its private listener (the shared
    signaling port would reach a random one); samples carry a ``transceiver`` label, so
    merging the families by name gives one valid document for a single scrape.
    """
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, object] = {}
    for row in rows:
        url = row.get("private_url")
        if not url or not row.get("alive"):
            continue
        try:
            with urllib.request.urlopen(url + "metrics", timeout=timeout) as response:
                text = response.read().decode()
        except OSError:
            continue  # a transceiver restarting right now; the next scrape has it
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                families[family.name] = family
            else:
                known.samples.extend(family.samples)  # type: ignore[attr-defined]
    lines: list[str] = []
    for family in families.values():
        name, kind = family.name, family.type  # type: ignore[attr-defined]
        lines.append(f"# HELP {name} {family.documentation}")  # type: ignore[attr-defined]
        lines.append(f"# TYPE {name} {kind}")
        for sample in family.samples:  # type: ignore[attr-defined]
            labels = ",".join(
                f'{key}="{_escape_label(value)}"' for key, value in sorted(sample.labels.items())
            )
            shown = f"{sample.name}{{{labels}}}" if labels else sample.name
            lines.append(f"{shown} {_format_value(sample.value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


class TransceiverHost:
    """``voxrelay transceiver``: this machine's transceivers without relays.

    For a host that only runs transceivers (etc/two-host): relays elsewhere route callers
    here, learning this host's transceivers from the Redis registry they heartbeat to.
    Same runtime-directory contract as the relay supervisor (``state.json``,
    ``supervisor.pid``, ``/status``), so ``voxrelay status`` and ``down`` work unchanged.
    """

    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.runtime_dir = Path(config.fleet.runtime_dir)
        self.pool: TransceiverPool | None = None
        self.metrics_url: str | None = None
        self.started_ms = int(time.time() * 1000)
        self._http = None
        self._drain = False
        self._stop_now = False

    def start(self) -> None:
        from voxrelay.engine.config import resolve_secrets
        from voxrelay.engine.supervisor import SupervisorError, read_state

        cfg = self.config
        if cfg.transceiver.count == 0:
            raise SupervisorError("[transceiver] count is 0: nothing to run on this host")
        if not cfg.relay.port:
            raise SupervisorError(
                "relay.port must name the relays' public port: every answer from this host "
                "gives relay.public_address:relay.port as the caller's only candidate"
            )
        if not cfg.redis.url:
            log.warning(
                "no redis.url: relays elsewhere can only find these transceivers through "
                "their own [[transceivers.static]] entries"
            )
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if read_state(self.runtime_dir) is not None:
            raise SupervisorError(
                f"a fleet named {cfg.fleet.name!r} is already running "
                f"(runtime dir {self.runtime_dir}); stop it with `voxrelay down`"
            )
        try:
            self.pool = TransceiverPool(
                cfg,
                secrets=resolve_secrets(cfg),
                candidate_address=cfg.relay.public_address,
                candidate_port=cfg.relay.port,
                runtime_dir=self.runtime_dir,
            )
        except OSError as exc:
            raise SupervisorError(str(exc.strerror)) from exc
        self.pool.start()
        self._start_http()
        self._write_state()
        log.info(
            "transceiver host started",
            extra={"signaling": self.pool.signaling_url, "transceivers": cfg.transceiver.count},
        )

    def run(self) -> int:
        assert self.pool is not None

        def on_terminate(signum, frame) -> None:
            if self._drain:
                self._stop_now = True
            self._drain = True

        def on_reload(signum, frame) -> None:
            # A service manager's reload (as for `up` and `relay`) must not kill us.
            log.info("reload: the transceiver role has nothing to reload; restart to apply")

        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_terminate),
            signal.SIGINT: signal.signal(signal.SIGINT, on_terminate),
            signal.SIGHUP: signal.signal(signal.SIGHUP, on_reload),
        }
        try:
            while not self._drain:
                self.pool.poll(time.monotonic())
                time.sleep(0.05)
            self.pool.drain()
            self._write_state(draining=True)
            deadline = time.monotonic() + self.config.relay.drain_seconds
            while time.monotonic() < deadline and not self._stop_now:
                self.pool.poll(time.monotonic(), respawn=False)
                time.sleep(0.05)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.pool.stop(timeout=5)
            self.close()
        log.info("drained")
        return 0

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        for name in ("state.json", "supervisor.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.runtime_dir / name).unlink()

    def status(self) -> dict:
        assert self.pool is not None
        cfg = self.config
        return {
            "role": "transceiver",
            "name": cfg.fleet.name,
            "cluster_id": cfg.fleet.cluster_id,
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "draining": self._drain,
            "signaling_url": self.pool.signaling_url,
            "metrics_url": self.metrics_url,
            "relay": None,
            "routing_table": None,
            "transceivers": [],
            "local_transceivers": self.pool.status(),
            "redis": {"url": _redacted(cfg.redis.url)} if cfg.redis.url else None,
        }

    def _start_http(self) -> None:
        from voxrelay.engine.supervisor import SupervisorError, serve_control_http

        metrics = self.config.metrics
        if not metrics.enabled:
            return
        pool = self.pool
        assert pool is not None
        try:
            self._http, self.metrics_url = serve_control_http(
                metrics.bind,
                metrics.port,
                status=self.status,
                metrics=lambda: transceiver_metrics(pool.status()),
                healthy=lambda: not self._drain,
            )
        except OSError as exc:
            raise SupervisorError(
                f"cannot bind the metrics port {metrics.bind}:{metrics.port}: {exc.strerror}"
            ) from exc

    def _write_state(self, draining: bool = False) -> None:
        state = {
            "pid": os.getpid(),
            "role": "transceiver",
            "name": self.config.fleet.name,
            "config_path": self.config_path,
            "control_url": self.metrics_url,
            "public_address": self.config.relay.public_address,
            "public_port": self.config.relay.port,
            "draining": draining,
            "drain_seconds": self.config.relay.drain_seconds,
            "started_ms": self.started_ms,
        }
        tmp = self.runtime_dir / "state.json.tmp"
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
        tmp.replace(self.runtime_dir / "state.json")
        (self.runtime_dir / "supervisor.pid").write_text(f"{os.getpid()}\n")


def _redacted(url: str) -> str:
    from voxrelay.engine.redis_mirror import redact_url

    return redact_url(url)
