"""The transceiver registry: which transceivers exist, where they listen, and if they live.

Relay supervisors read it to publish the transceiver directory to their workers (a route
to a transceiver the directory lacks is refused), and the status page shows it. Two
sources, one interface (:class:`Registry`, whose ``snapshot()`` never raises):

* :class:`StaticRegistry`: the transceivers listed in the config file, always healthy;
  ``reload()`` swaps them on SIGHUP.
* :class:`RedisRegistry`: the hash ``voxrelay:{cluster}:transceivers`` (docs/internals.md),
  id -> JSON ``{"address", "port", "load", "heartbeat_ms", "state"}``, written by
  transceivers themselves (``register`` / ``heartbeat`` / ``unregister``, usually through
  a :class:`TransceiverHeartbeat` thread). A transceiver whose heartbeat is older than
  three intervals is unhealthy. When Redis fails, ``snapshot()`` returns the last good
  data marked ``stale`` at once, instead of raising or waiting: a relay keeps forwarding
  to the transceivers it knew while Redis is away.

Constructors take plain values (cluster id, URL, intervals), not the Config object, so the
registry can be built and tested on its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Protocol, overload

import orjson
import redis

from voxrelay.engine.redis_mirror import ExponentialBackoff, redact_url, resolve_client, unix_ms

log = logging.getLogger("voxrelay.registry")

READY = "ready"  # serving, accepts new sessions
DRAINING = "draining"  # serving its sessions, accepts no new ones
STOPPED = "stopped"  # gone; kept only until unregistered
HEALTHY_STATES = frozenset({READY, DRAINING})
UNHEALTHY_AFTER_INTERVALS = 3
MAX_TRANSCEIVER_ID = 0xFFFF


class RegistryError(Exception):
    """A registry entry or operation is invalid."""


class MalformedEntry(RegistryError):
    """A registry entry (config entry or Redis hash field) is not a valid transceiver."""


class RegistryUnavailable(RegistryError):
    """Redis did not answer a registry write in time; the caller may retry later."""


def transceivers_key(cluster_id: int) -> str:
    """``voxrelay:{cluster}:transceivers``: the hash holding one cluster's registry."""
    return f"voxrelay:{cluster_id}:transceivers"


@dataclass(frozen=True, slots=True)
class TransceiverInfo:
    """One transceiver as the registry knows it. ``host`` is stored as ``address`` in Redis."""

    id: int
    host: str
    port: int
    load: float = 0.0
    heartbeat_ms: int = 0
    state: str = READY

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, int):
            raise MalformedEntry(f"transceiver id must be an integer, got {self.id!r}")
        if not 0 < self.id <= MAX_TRANSCEIVER_ID:
            raise MalformedEntry(f"transceiver id must be 1..{MAX_TRANSCEIVER_ID}, got {self.id}")
        if not isinstance(self.host, str) or not self.host:
            raise MalformedEntry(f"transceiver {self.id}: host must be a non-empty string")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise MalformedEntry(f"transceiver {self.id}: port must be an integer")
        if not 0 < self.port <= 0xFFFF:
            raise MalformedEntry(f"transceiver {self.id}: port must be 1..65535, got {self.port}")
        if isinstance(self.load, bool) or not isinstance(self.load, int | float):
            raise MalformedEntry(f"transceiver {self.id}: load must be a number")
        if not math.isfinite(self.load) or self.load < 0:
            raise MalformedEntry(f"transceiver {self.id}: load must be finite and >= 0")
        if isinstance(self.heartbeat_ms, bool) or not isinstance(self.heartbeat_ms, int):
            raise MalformedEntry(f"transceiver {self.id}: heartbeat_ms must be an integer")
        if not isinstance(self.state, str) or not self.state:
            raise MalformedEntry(f"transceiver {self.id}: state must be a non-empty string")

    def healthy(self, now_ms: int, interval_ms: int) -> bool:
        """Alive and serving: a recent heartbeat (within three intervals) and not stopped."""
        return (
            self.state in HEALTHY_STATES
            and now_ms - self.heartbeat_ms <= UNHEALTHY_AFTER_INTERVALS * interval_ms
        )

    def accepting(self, now_ms: int, interval_ms: int) -> bool:
        """Healthy and willing to take new sessions (not draining)."""
        return self.state == READY and self.healthy(now_ms, interval_ms)

    def to_json(self) -> bytes:
        """The hash field value of docs/internals.md (the id is the field name)."""
        return orjson.dumps(
            {
                "address": self.host,
                "port": self.port,
                "load": self.load,
                "heartbeat_ms": self.heartbeat_ms,
                "state": self.state,
            }
        )

    @classmethod
    def from_json(cls, transceiver_id: int, data: bytes | str) -> TransceiverInfo:
        """Parse one hash field value; raises :class:`MalformedEntry`, nothing else."""
        try:
            fields = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise MalformedEntry(f"transceiver {transceiver_id}: not JSON ({exc})") from None
        if not isinstance(fields, dict):
            raise MalformedEntry(f"transceiver {transceiver_id}: expected a JSON object")
        try:
            return cls(
                id=transceiver_id,
                host=fields["address"],
                port=fields["port"],
                load=fields.get("load", 0.0),
                heartbeat_ms=fields.get("heartbeat_ms", 0),
                state=fields.get("state", READY),
            )
        except KeyError as exc:
            raise MalformedEntry(f"transceiver {transceiver_id}: missing field {exc}") from None


StaticEntry = TransceiverInfo | tuple[int, str, int] | Mapping[str, Any]
"""A config entry: a TransceiverInfo, ``(id, host, port)``, or a mapping with those keys."""


def coerce_entry(entry: StaticEntry) -> TransceiverInfo:
    """A TransceiverInfo from any accepted config entry form; raises MalformedEntry."""
    if isinstance(entry, TransceiverInfo):
        return entry
    if isinstance(entry, tuple):
        if len(entry) != 3:
            raise MalformedEntry(f"a transceiver entry is (id, host, port), got {entry!r}")
        transceiver_id, host, port = entry
        return TransceiverInfo(id=transceiver_id, host=host, port=port)
    if isinstance(entry, Mapping):
        try:
            host = entry["host"] if "host" in entry else entry["address"]
            return TransceiverInfo(
                id=entry["id"],
                host=host,
                port=entry["port"],
                load=entry.get("load", 0.0),
                state=entry.get("state", READY),
            )
        except KeyError as exc:
            raise MalformedEntry(f"transceiver entry {dict(entry)!r} lacks {exc}") from None
    raise MalformedEntry(f"unsupported transceiver entry {entry!r}")


@dataclass(frozen=True)
class RegistrySnapshot(Sequence[TransceiverInfo]):
    """The transceivers at one moment, in id order; iterate it like a list.

    ``stale`` is True when the source failed and these are the last good data (possibly
    none); ``error`` then says why. ``fetched_ms`` is when the data were read.
    """

    transceivers: tuple[TransceiverInfo, ...] = ()
    stale: bool = False
    fetched_ms: int | None = None
    error: str | None = None
    malformed: int = 0  # entries skipped because they did not parse

    def __len__(self) -> int:
        return len(self.transceivers)

    @overload
    def __getitem__(self, index: int) -> TransceiverInfo: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[TransceiverInfo]: ...
    def __getitem__(self, index: int | slice) -> TransceiverInfo | Sequence[TransceiverInfo]:
        return self.transceivers[index]

    def __iter__(self) -> Iterator[TransceiverInfo]:
        return iter(self.transceivers)

    @cached_property
    def by_id(self) -> Mapping[int, TransceiverInfo]:
        return {info.id: info for info in self.transceivers}

    def get(self, transceiver_id: int) -> TransceiverInfo | None:
        return self.by_id.get(transceiver_id)


class Registry(Protocol):
    """What relays and the status page need: the current transceivers, never an exception."""

    def snapshot(self) -> RegistrySnapshot: ...


class Registrar(Protocol):
    """What a transceiver needs to announce itself (``RedisRegistry`` fits)."""

    def register(self, info: TransceiverInfo) -> None: ...
    def heartbeat(
        self, transceiver_id: int, load: float, now_ms: int, state: str | None = None
    ) -> None: ...
    def unregister(self, transceiver_id: int) -> None: ...


def _sorted_infos(entries: Iterable[StaticEntry]) -> tuple[TransceiverInfo, ...]:
    infos: dict[int, TransceiverInfo] = {}
    for entry in entries:
        info = coerce_entry(entry)
        if info.id in infos:
            raise MalformedEntry(f"transceiver id {info.id} is listed twice")
        infos[info.id] = info
    return tuple(sorted(infos.values(), key=lambda info: info.id))


class StaticRegistry:
    """The transceivers of the config file. They have no heartbeat, so each snapshot
    stamps them with the current time: a configured transceiver is always healthy."""

    def __init__(
        self, entries: Iterable[StaticEntry] = (), *, clock_ms: Callable[[], int] = unix_ms
    ) -> None:
        self._entries = _sorted_infos(entries)
        self._clock_ms = clock_ms

    def reload(self, entries: Iterable[StaticEntry]) -> None:
        """Replace the entries (SIGHUP); on a bad entry raise and keep the current ones."""
        self._entries = _sorted_infos(entries)

    def snapshot(self) -> RegistrySnapshot:
        now_ms = self._clock_ms()
        return RegistrySnapshot(
            tuple(replace(info, heartbeat_ms=now_ms) for info in self._entries),
            fetched_ms=now_ms,
        )

    def close(self) -> None:
        """Nothing to release; present so every registry can be closed alike."""


class RedisRegistry:
    """The registry in Redis: transceivers write their entries, relays read snapshots.

    ``snapshot()`` never raises and never blocks longer than one ``socket_timeout``: after
    a failure it does not call Redis again until a backoff delay has passed, returning the
    last good snapshot marked stale in between. ``register``, ``heartbeat`` and
    ``unregister`` raise :class:`RegistryUnavailable` when Redis does not answer, so the
    transceiver can retry (``TransceiverHeartbeat`` does).

    ``static`` entries (from the config file) are merged into every snapshot as always
    healthy, unless Redis holds an entry with the same id, which wins.
    """

    def __init__(
        self,
        cluster_id: int,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        socket_timeout: float = 0.2,
        heartbeat_interval: float = 1.0,
        static: Iterable[StaticEntry] = (),
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        clock_ms: Callable[[], int] = unix_ms,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        self.cluster_id = cluster_id
        self.key = transceivers_key(cluster_id)
        self.heartbeat_interval = heartbeat_interval
        self.url = url
        self._client = resolve_client(url, client, socket_timeout=socket_timeout)
        self._static = _sorted_infos(static)
        self._clock_ms = clock_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._own: dict[int, TransceiverInfo] = {}  # entries this process registered
        self._last_good: RegistrySnapshot = RegistrySnapshot(stale=True, error="not read yet")
        self._backoff = ExponentialBackoff(backoff_initial, backoff_max)
        self._retry_at = 0.0

    @property
    def interval_ms(self) -> int:
        """The heartbeat interval in ms, the unit of ``TransceiverInfo.healthy``."""
        return int(self.heartbeat_interval * 1000)

    # -- transceiver side ---------------------------------------------------------------

    def register(self, info: TransceiverInfo) -> None:
        """Write this transceiver's entry (and remember it for ``heartbeat``)."""
        with self._lock:
            self._own[info.id] = info
        self._write(info)

    def heartbeat(
        self, transceiver_id: int, load: float, now_ms: int, state: str | None = None
    ) -> None:
        """Rewrite the entry with a new load, heartbeat time and optionally state.

        The whole entry is written, not one field, so a Redis that restarted empty learns
        the transceiver again at its next heartbeat.
        """
        with self._lock:
            current = self._own.get(transceiver_id)
            if current is None:
                raise RegistryError(
                    f"transceiver {transceiver_id} is not registered by this process; "
                    "call register() first"
                )
            info = replace(current, load=load, heartbeat_ms=now_ms, state=state or current.state)
            self._own[transceiver_id] = info
        self._write(info)

    def unregister(self, transceiver_id: int) -> None:
        """Remove the entry (a clean shutdown); relays drop the transceiver at once."""
        with self._lock:
            self._own.pop(transceiver_id, None)
        try:
            self._client.hdel(self.key, str(transceiver_id))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def _write(self, info: TransceiverInfo) -> None:
        try:
            self._client.hset(self.key, str(info.id), info.to_json())
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: redis.RedisError) -> RegistryUnavailable:
        where = redact_url(self.url) if self.url else "the configured Redis"
        return RegistryUnavailable(
            f"Redis at {where} did not answer the registry ({type(exc).__name__}: {exc}); "
            "check that it runs and is reachable, the call may be retried"
        )

    # -- relay / status side ------------------------------------------------------------

    def snapshot(self) -> RegistrySnapshot:
        """The registry now, or the last good one marked stale; never raises."""
        with self._lock:
            if self._clock() < self._retry_at:
                return self._last_good
        try:
            raw = self._client.hgetall(self.key)
        except redis.RedisError as exc:
            return self._note_failure(exc)
        snapshot = self._parse(raw)
        with self._lock:
            self._backoff.reset()
            self._retry_at = 0.0
            self._last_good = replace(snapshot, stale=True)
        return snapshot

    def _parse(self, raw: Mapping[bytes, bytes]) -> RegistrySnapshot:
        infos: dict[int, TransceiverInfo] = {}
        malformed = 0
        for raw_id, value in raw.items():
            try:
                transceiver_id = int(raw_id)
                infos[transceiver_id] = TransceiverInfo.from_json(transceiver_id, value)
            except (ValueError, MalformedEntry) as exc:
                malformed += 1
                log.warning(
                    "skipping a malformed registry entry",
                    extra={"key": self.key, "field": raw_id[:32].hex(), "error": str(exc)},
                )
        now_ms = self._clock_ms()
        for info in self._static:
            infos.setdefault(info.id, replace(info, heartbeat_ms=now_ms))
        return RegistrySnapshot(
            tuple(infos[transceiver_id] for transceiver_id in sorted(infos)),
            fetched_ms=now_ms,
            malformed=malformed,
        )

    def _note_failure(self, exc: redis.RedisError) -> RegistrySnapshot:
        error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            first = self._backoff.failures == 0
            self._retry_at = self._clock() + self._backoff.next_delay()
            self._last_good = replace(self._last_good, stale=True, error=error)
            if not self._last_good.transceivers and self._static:
                now_ms = self._clock_ms()
                statics = tuple(replace(info, heartbeat_ms=now_ms) for info in self._static)
                self._last_good = replace(self._last_good, transceivers=statics)
            result = self._last_good
        if first:
            log.warning(
                "registry snapshot failed, serving the last good one", extra={"error": error}
            )
        return result

    def reload(self, entries: Iterable[StaticEntry]) -> None:
        """Replace the static entries (SIGHUP); on a bad entry raise and keep the current."""
        infos = _sorted_infos(entries)
        with self._lock:
            self._static = infos

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------------------
# Transceiver side: the heartbeat thread
# --------------------------------------------------------------------------------------


@dataclass
class HeartbeatStats:
    beats: int = 0  # successful writes (register or heartbeat)
    errors: int = 0
    last_error: str | None = None
    last_success_ms: int | None = None
    registered: bool = False


class TransceiverHeartbeat:
    """Keeps one transceiver's registry entry fresh from a background thread.

    ``start()`` returns at once; the thread registers the entry, then heartbeats every
    ``interval`` seconds with ``load()``'s value. Redis errors are counted and retried at
    the next tick, so an outage only makes relays see the entry as stale. ``stop()``
    ends the thread and unregisters (best effort), so relays forget the transceiver
    without waiting three intervals.
    """

    def __init__(
        self,
        registry: Registrar,
        info: TransceiverInfo,
        *,
        interval: float,
        load: Callable[[], float] = lambda: 0.0,
        clock_ms: Callable[[], int] = unix_ms,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be positive, got {interval}")
        self.registry = registry
        self.info = info
        self.interval = interval
        self._load = load
        self._clock_ms = clock_ms
        self._state = info.state
        self._lock = threading.Lock()
        self._stats = HeartbeatStats()
        self._stop = threading.Event()
        self._beat_now = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"voxrelay-heartbeat-{self.info.id}", daemon=True
        )
        self._thread.start()

    def set_state(self, state: str) -> None:
        """Announce a new state (e.g. ``DRAINING``) with an immediate heartbeat."""
        with self._lock:
            self._state = state
        self._beat_now.set()

    def stop(self, timeout: float = 5.0, unregister: bool = True) -> bool:
        """End the thread, then remove the entry; True when both went through."""
        self._stop.set()
        self._beat_now.set()
        thread = self._thread
        ended = True
        if thread is not None:
            thread.join(timeout)
            ended = not thread.is_alive()
            if ended:
                self._thread = None
        if not unregister:
            return ended
        try:
            self.registry.unregister(self.info.id)
        except RegistryUnavailable as exc:
            self._note_error(exc)
            return False
        with self._lock:
            self._stats.registered = False
        return ended

    def stats(self) -> HeartbeatStats:
        with self._lock:
            return replace(self._stats)

    def beat(self) -> bool:
        """Register the first time, heartbeat afterwards; True when Redis took the write."""
        with self._lock:
            state, registered = self._state, self._stats.registered
        now_ms = self._clock_ms()
        try:
            load = float(self._load())
            if registered:
                self.registry.heartbeat(self.info.id, load, now_ms, state)
            else:
                info = replace(self.info, load=load, heartbeat_ms=now_ms, state=state)
                self.registry.register(info)
        except RegistryUnavailable as exc:
            self._note_error(exc)
            return False
        with self._lock:
            self._stats.beats += 1
            self._stats.registered = True
            self._stats.last_success_ms = now_ms
        return True

    def _note_error(self, exc: Exception) -> None:
        with self._lock:
            self._stats.errors += 1
            self._stats.last_error = str(exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:
                # A failing load callback must not stop the heartbeats for good.
                log.exception("transceiver heartbeat failed unexpectedly")
            self._beat_now.wait(self.interval)
            self._beat_now.clear()
