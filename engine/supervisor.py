"""Supervisor: owns the shared state, runs the relay workers, and keeps them running.

Why it exists: the relay workers are deliberately dumb hot loops that may die at any moment.
The supervisor creates the routing table and fleet state *before* any worker starts (so they
outlive every worker), spawns one process per worker, replaces a dead one with backoff after
reclaiming whatever table slot it left half-written, expires idle routes, mirrors routes to
Redis, publishes the transceiver directory (static config or Redis registry; reloaded on
SIGHUP), serves /metrics, /status and /healthz, and drains on SIGTERM: new routes stop at
once, established flows keep flowing for the grace period, then the workers exit.

The runtime directory holds ``supervisor.pid`` and ``state.json`` (control URL, addresses,
segment names), which is all ``voxrelay status`` and ``voxrelay down`` need.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from voxrelay.engine.config import Config, load_config, resolve_secrets
from voxrelay.engine.fleetstate import FleetState, FleetStateError
from voxrelay.engine.metrics import FleetCollector, render_metrics
from voxrelay.engine.processes import free_port, restart_backoff
from voxrelay.engine.redis_mirror import redact_url
from voxrelay.engine.relay import WorkerSettings, open_public_socket
from voxrelay.engine.routing import RoutingTable, TableError

log = logging.getLogger("voxrelay.supervisor")


class SupervisorError(Exception):
    """The fleet cannot start (already running, port taken, bad runtime dir...)."""


@dataclass
class WorkerProcess:
    index: int
    internal_port: int
    pin_cpu: int | None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = 0


@dataclass
class _Flags:
    drain: bool = False
    reload: bool = False
    stop_now: bool = False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as dead: it will never write again.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


def read_state(runtime_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The running supervisor's state.json, or None when no live supervisor owns the dir."""
    path = Path(runtime_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _pid_alive(int(state.get("pid", 0))):
        return None
    return state


class Supervisor:
    """Runs a relay fleet described by a Config; ``run()`` blocks until drained."""

    def __init__(self, config: Config, *, config_path: str | None = None, role: str = "up") -> None:
        self.config = config
        self.role = role  # "up" (whole fleet) or "relay" (relay role only)
        self.config_path = config_path
        self.flags = _Flags()
        self.workers: list[WorkerProcess] = []
        self.runtime_dir = Path(config.fleet.runtime_dir)
        self.table: RoutingTable | None = None
        self.fleet: FleetState | None = None
        self.mirror = None
        self.registry = None
        self.public_port = 0
        self._port_holder: socket.socket | None = None
        self._http: ThreadingHTTPServer | None = None
        self._secrets: list[bytes] = []
        self._directory: dict[int, tuple[str, int, bool]] = {}
        self.started_ms = int(time.time() * 1000)
        self.metrics_url: str | None = None
        self.signaling_url: str | None = None
        self.transceivers = None  # TransceiverPool when this machine runs transceivers

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if read_state(self.runtime_dir) is not None:
            raise SupervisorError(
                f"a fleet named {cfg.fleet.name!r} is already running "
                f"(runtime dir {self.runtime_dir}); stop it with `voxrelay down`"
            )
        self._secrets = resolve_secrets(cfg)
        relay = cfg.relay
        uid = os.getuid()
        prefix = f"voxrelay-{uid}-{cfg.fleet.name}"
        for suffix in ("routes", "fleet"):
            # A crashed earlier supervisor may have left its segments: replace them.
            with contextlib.suppress(FileNotFoundError):
                from multiprocessing import shared_memory

                stale = shared_memory.SharedMemory(name=f"{prefix}-{suffix}")
                stale.close()
                stale.unlink()
        self.table = RoutingTable.create(relay.table_capacity, name=f"{prefix}-routes")
        self.fleet = FleetState.create(
            max(relay.workers, 1), name=f"{prefix}-fleet", cluster_id=cfg.fleet.cluster_id
        )
        # Port 0 means "pick one": hold it with a SO_REUSEPORT socket until workers bind it.
        try:
            self._port_holder = open_public_socket(relay.bind, relay.port, 65536, 65536)
        except OSError as exc:
            self.close()
            raise SupervisorError(
                f"cannot bind the relay port {relay.bind}:{relay.port}: {exc.strerror}"
            ) from exc
        self.public_port = self._port_holder.getsockname()[1]
        self.fleet.public_port = self.public_port
        if self.role == "up" and cfg.transceiver.count:
            from voxrelay.engine.transceiver_pool import TransceiverPool

            try:
                self.transceivers = TransceiverPool(
                    cfg,
                    secrets=self._secrets,
                    candidate_address=relay.public_address,
                    candidate_port=self.public_port,
                    runtime_dir=self.runtime_dir,
                )
            except OSError as exc:
                self.close()
                raise SupervisorError(str(exc.strerror)) from exc
            self.signaling_url = self.transceivers.signaling_url
        self._setup_registry()
        self._refresh_directory(force=True)
        cpus = sorted(os.sched_getaffinity(0))
        pins: list[int] | None = None
        if relay.pin_cpus is True:
            pins = cpus
        elif isinstance(relay.pin_cpus, list | tuple) and relay.pin_cpus:
            pins = list(relay.pin_cpus)
        for index in range(relay.workers):
            port = relay.internal_port_base + index if relay.internal_port_base else 0
            if port == 0:
                port = free_port(relay.internal_bind)
            pin = pins[index % len(pins)] if pins else None
            self.workers.append(WorkerProcess(index=index, internal_port=port, pin_cpu=pin))
        for worker in self.workers:
            self._spawn(worker)
        if self.transceivers is not None:
            self.transceivers.start()
        self._setup_mirror()
        self._start_http()
        self._write_state()
        log.info(
            "fleet started",
            extra={
                "public": f"{relay.public_address}:{self.public_port}",
                "workers": relay.workers,
                "table_capacity": relay.table_capacity,
                "metrics": self.metrics_url,
                "signaling": self.signaling_url,
                "redis": bool(cfg.redis.url),
            },
        )

    def _setup_registry(self) -> None:
        from voxrelay.engine.registry import RedisRegistry, StaticRegistry

        cfg = self.config
        if cfg.redis.url:
            self.registry = RedisRegistry(
                cluster_id=cfg.fleet.cluster_id,
                url=cfg.redis.url,
                socket_timeout=cfg.redis.socket_timeout,
                heartbeat_interval=cfg.redis.heartbeat_interval,
                static=self._static_entries(),
            )
        else:
            self.registry = StaticRegistry(self._static_entries())

    def _setup_mirror(self) -> None:
        cfg = self.config
        if not cfg.redis.url:
            return
        from voxrelay.engine.redis_mirror import RouteMirror

        self.mirror = RouteMirror(
            table=self.table,
            cluster_id=cfg.fleet.cluster_id,
            url=cfg.redis.url,
            ttl_seconds=cfg.redis.route_ttl,
            interval=cfg.redis.mirror_interval,
            socket_timeout=cfg.redis.socket_timeout,
        )
        self.mirror.start()

    def _spawn(self, worker: WorkerProcess) -> None:
        cfg, relay = self.config, self.config.relay
        settings = WorkerSettings(
            index=worker.index,
            table_name=self.table.name,
            fleet_name=self.fleet.name,
            bind=relay.bind,
            port=self.public_port,
            internal_bind=relay.internal_bind,
            internal_port=worker.internal_port,
            cluster_id=cfg.fleet.cluster_id,
            token_secrets=[secret.hex() for secret in self._secrets],
            batch_size=relay.batch_size,
            max_datagram=relay.max_datagram,
            bundle_max_bytes=relay.bundle_max_bytes,
            coalesce_us=relay.coalesce_us,
            recv_buffer_bytes=relay.recv_buffer_bytes,
            send_buffer_bytes=relay.send_buffer_bytes,
            pin_cpu=worker.pin_cpu,
            redis_url=cfg.redis.url,
            recovery_rate=cfg.redis.recovery_rate,
            negative_cache_seconds=cfg.redis.negative_cache_seconds,
            redis_socket_timeout=cfg.redis.socket_timeout,
        )
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            [sys.executable, "-m", "voxrelay.engine.relay"],
            stdin=subprocess.PIPE,
            env=env,
            # Its own process group: Ctrl-C, `timeout` or `kill -- -PGID` reach only the
            # supervisor, which drains and then stops the workers (they die with us too).
            process_group=0,
        )
        assert process.stdin is not None
        process.stdin.write(settings.to_json())
        process.stdin.close()
        worker.process = process
        worker.started_at = time.monotonic()
        log.info("worker started", extra={"worker": worker.index, "pid": process.pid})

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT, then drain; returns the exit status."""
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_terminate),
            signal.SIGINT: signal.signal(signal.SIGINT, self._on_terminate),
            signal.SIGHUP: signal.signal(signal.SIGHUP, self._on_reload),
        }
        try:
            next_expire = next_directory = 0.0
            while not self.flags.drain:
                now = time.monotonic()
                self._reap_and_respawn(now)
                if self.transceivers is not None:
                    self.transceivers.poll(now)
                if self._port_holder is not None and self._all_workers_bound():
                    self._port_holder.close()  # workers hold the port now
                    self._port_holder = None
                if now >= next_expire:
                    next_expire = now + 1.0
                    self._expire()
                if self.flags.reload:
                    self.flags.reload = False
                    self._reload()
                if now >= next_directory:
                    next_directory = now + self._directory_interval()
                    self._refresh_directory()
                time.sleep(0.05)
            self._drain()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.transceivers is not None:
                self.transceivers.stop(timeout=2)
            self.close()
        return 0

    def _static_entries(self) -> list[tuple[int, str, int]]:
        """The config's static registry plus this machine's own transceivers."""
        entries = _static_entries(self.config)
        if self.transceivers is not None and not self.config.redis.url:
            entries += self.transceivers.entries()
        return entries

    def _directory_interval(self) -> float:
        return self.config.redis.heartbeat_interval if self.config.redis.url else 5.0

    def _on_terminate(self, signum: int, frame: Any) -> None:
        if self.flags.drain:
            self.flags.stop_now = True  # a second signal skips the grace period
        self.flags.drain = True

    def _on_reload(self, signum: int, frame: Any) -> None:
        self.flags.reload = True

    def _all_workers_bound(self) -> bool:
        fleet = self.fleet
        return all(
            fleet.read_worker(w.index).state in ("running", "draining") for w in self.workers
        )

    def _reap_and_respawn(self, now: float) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.poll() is not None:
                pid, code = process.pid, process.returncode
                worker.process = None
                self.fleet.mark_worker_exited(worker.index)
                reclaimed = self.table.reclaim(_pid_alive)
                if self.flags.drain:
                    # Expected while the fleet drains (it is not restarted); the other
                    # workers' sockets take its flows over.
                    log.info(
                        "worker exited while draining",
                        extra={"worker": worker.index, "pid": pid, "code": code},
                    )
                    continue
                relay = self.config.relay
                worker.failures, delay = restart_backoff(
                    now - worker.started_at,
                    worker.failures,
                    relay.restart_backoff_initial,
                    relay.restart_backoff_max,
                )
                worker.restart_at = now + delay
                log.warning(
                    "worker died",
                    extra={
                        "worker": worker.index,
                        "pid": pid,
                        "code": code,
                        "reclaimed_slots": reclaimed,
                        "restart_in_s": round(delay, 3),
                    },
                )
            if worker.process is None and not self.flags.drain and now >= worker.restart_at:
                worker.restarts += 1
                self.fleet.note_restart(worker.index)
                self._spawn(worker)

    def _expire(self) -> None:
        idle_ms = int(self.config.relay.idle_timeout * 1000)
        expired = self.table.expire(int(time.time() * 1000), idle_ms)
        if expired:
            if self.mirror is not None:
                self.mirror.forget(expired)
            log.info("routes expired", extra={"count": len(expired)})

    def _reload(self) -> None:
        """SIGHUP: re-read the config file's transceiver registry (other keys need a restart)."""
        if self.config_path:
            try:
                fresh = load_config(self.config_path)
            except Exception as exc:
                log.error("reload failed, keeping the running registry", extra={"error": str(exc)})
                return
            self.config = _replace_transceivers(self.config, fresh)
            if hasattr(self.registry, "reload"):
                self.registry.reload(self._static_entries())
        self._refresh_directory(force=True)
        log.info("registry reloaded", extra={"transceivers": len(self._directory)})

    def _refresh_directory(self, force: bool = False) -> None:
        """Publish the registry into the shared directory; bump its generation on change."""
        snapshot = self.registry.snapshot()
        if getattr(snapshot, "stale", False) and not force:
            # Redis is unreachable: heartbeats cannot be seen, so health cannot be judged.
            # Keep routing to the transceivers we knew; live traffic must not notice.
            return
        entries = snapshot
        now_ms = int(time.time() * 1000)
        interval_ms = int(self._directory_interval() * 1000)
        wanted: dict[int, tuple[str, int, bool]] = {}
        for info in entries:
            wanted[info.id] = (info.host, info.port, info.healthy(now_ms, interval_ms))
        changed = force or wanted != self._directory
        for tid, (host, port, healthy) in wanted.items():
            if force or self._directory.get(tid) != (host, port, healthy):
                self.fleet.publish_transceiver(
                    tid, host, port, healthy=healthy, heartbeat_ms=now_ms
                )
        for tid in set(self._directory) - set(wanted):
            self.fleet.withdraw_transceiver(tid)
        if changed:
            self._directory = wanted
            self.fleet.bump_generation()

    def _drain(self) -> None:
        """Stop new routes now, let live flows run for the grace period, then stop workers."""
        grace = self.config.relay.drain_seconds
        log.info("draining", extra={"grace_s": grace})
        self.fleet.set_draining(True)
        self._write_state(draining=True)
        if self.transceivers is not None:
            self.transceivers.drain()  # no new calls; live ones go on
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self.flags.stop_now:
            time.sleep(0.05)
            self._reap_and_respawn(time.monotonic())  # reaps; nothing restarts now
            if self.transceivers is not None:
                self.transceivers.poll(time.monotonic(), respawn=False)
        if self.transceivers is not None:
            # Before the relay workers: the calls' goodbyes (RTCP BYE, close_notify) leave
            # through them.
            self.transceivers.stop(timeout=5)
        for worker in self.workers:
            if worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.terminate()
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
        log.info("drained")

    def close(self) -> None:
        table_in_use = False
        if self.mirror is not None:
            # A mirror thread still inside a Redis call reads the table next.
            table_in_use = not self.mirror.stop()
            self.mirror = None
        if self.registry is not None and hasattr(self.registry, "close"):
            self.registry.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._port_holder is not None:
            self._port_holder.close()
            self._port_holder = None
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        if self.table is not None:
            _unlink_and_close(self.table, unmap=not table_in_use)
        if self.fleet is not None:
            _unlink_and_close(self.fleet, unmap=True)
        self.table = self.fleet = None
        for name in ("state.json", "supervisor.pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.runtime_dir / name).unlink()

    # -- status and metrics ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        cfg, relay = self.config, self.config.relay
        fleet, table = self.fleet, self.table
        workers = []
        for worker in self.workers:
            stats = fleet.read_worker(worker.index)
            alive = worker.process is not None and worker.process.poll() is None
            workers.append(
                {
                    "index": worker.index,
                    # The pid we spawned: known at once, before the worker has written its
                    # stats block.
                    "pid": worker.process.pid if alive else None,
                    "alive": alive,
                    "state": stats.state if alive else "restarting",
                    "internal_port": worker.internal_port,
                    "cpu": stats.cpu,
                    "rcvbuf": stats.rcvbuf,
                    "sndbuf": stats.sndbuf,
                    "restarts": worker.restarts,
                    "heartbeat_age_ms": max(0, int(time.time() * 1000) - stats.heartbeat_ms),
                    "counters": stats.counters,
                    "drops": stats.drops,
                }
            )
        transceivers = [
            {
                "id": e.transceiver_id,
                "address": f"{e.host}:{e.port}",
                "health": e.state,
                "load": e.load,
            }
            for e in fleet.transceivers()
        ]
        status: dict[str, Any] = {
            "role": self.role,
            "name": cfg.fleet.name,
            "cluster_id": cfg.fleet.cluster_id,
            "pid": os.getpid(),
            "started_ms": self.started_ms,
            "draining": fleet.draining,
            "signaling_url": self.signaling_url,
            "metrics_url": self.metrics_url,
            "relay": {
                "bind": relay.bind,
                "public_address": relay.public_address,
                "port": self.public_port,
                "workers": workers,
            },
            "routing_table": {
                "entries": table.live_count(),
                "capacity": table.capacity,
                "slots": table.slot_count,
                "memory_bytes": table.memory_bytes,
                "refused": table.refused_count,
            },
            "transceivers": transceivers,
            "local_transceivers": self.transceivers.status() if self.transceivers else [],
            "redis": None,
        }
        if cfg.redis.url:
            mirror = self.mirror.stats_dict() if self.mirror is not None else None
            status["redis"] = {"url": redact_url(cfg.redis.url), "mirror": mirror}
        return status

    def _start_http(self) -> None:
        metrics = self.config.metrics
        if not metrics.enabled:
            return
        collector = FleetCollector(self)

        def render() -> bytes:
            body, _ = render_metrics(collector)
            if self.transceivers is not None:
                from voxrelay.engine.transceiver_pool import transceiver_metrics

                body += transceiver_metrics(self.transceivers.status())
            return body

        try:
            self._http, self.metrics_url = serve_control_http(
                metrics.bind,
                metrics.port,
                status=self.status,
                metrics=render,
                healthy=lambda: self.fleet is not None and not self.fleet.draining,
            )
        except OSError as exc:
            raise SupervisorError(
                f"cannot bind the metrics port {metrics.bind}:{metrics.port}: {exc.strerror}"
            ) from exc

    def _write_state(self, draining: bool = False) -> None:
        state = {
            "pid": os.getpid(),
            "name": self.config.fleet.name,
            "config_path": self.config_path,
            "control_url": self.metrics_url,
            "public_address": self.config.relay.public_address,
            "public_port": self.public_port,
            "table": self.table.name,
            "fleet": self.fleet.name,
            "draining": draining,
            "drain_seconds": self.config.relay.drain_seconds,
            "started_ms": self.started_ms,
        }
        tmp = self.runtime_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.runtime_dir / "state.json")
        (self.runtime_dir / "supervisor.pid").write_text(f"{os.getpid()}\n")


def serve_control_http(
    host: str,
    port: int,
    *,
    status: Callable[[], dict[str, Any]],
    metrics: Callable[[], bytes],
    healthy: Callable[[], bool],
) -> tuple[ThreadingHTTPServer, str]:
    """Serve /metrics, /status and /healthz from a thread; returns the server and its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    body, ctype = metrics(), "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/status":
                    body = orjson.dumps(status(), option=orjson.OPT_INDENT_2)
                    ctype = "application/json"
                elif path == "/healthz":
                    ok = healthy()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"draining\n", "text/plain")
                    return
                else:
                    self._reply(404, b"not found\n", "text/plain")
                    return
            except Exception as exc:
                self._reply(500, f"error: {exc}\n".encode(), "text/plain")
                return
            self._reply(200, body, ctype)

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server, f"http://{shown}:{bound_port}"


def _unlink_and_close(segment: RoutingTable | FleetState, *, unmap: bool) -> None:
    """Destroy a shared segment and unmap it here.

    Unmapping explicitly (each close() releases its casts of the buffer first) is what
    keeps ``SharedMemory.__del__`` from printing "BufferError: cannot close exported
    pointers exist" at exit. A view leaked elsewhere is logged with the segment's name.
    ``unmap=False`` when a thread that may still read the segment could not be stopped:
    unmapping under it would crash the process, so the mapping goes with the process.
    """
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()
    if not unmap:
        log.warning(
            "shared segment left mapped, a thread still uses it", extra={"segment": segment.name}
        )
        return
    try:
        segment.close()
    except (BufferError, TableError, FleetStateError) as exc:
        log.warning(
            "cannot unmap shared segment", extra={"segment": segment.name, "error": str(exc)}
        )


def _static_entries(config: Config) -> list[tuple[int, str, int]]:
    return [(t.id, t.host, t.port) for t in config.transceivers.static]


def _replace_transceivers(current: Config, fresh: Config) -> Config:
    import dataclasses

    return dataclasses.replace(current, transceivers=fresh.transceivers)
