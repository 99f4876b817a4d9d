"""Routes mirrored to Redis, and recovered from it after a whole relay restart.

The routing table lives in shared memory, so it survives any one worker but not the whole
relay host (a deploy, a crash, a reboot). Without help, every call in flight would then
break: its client keeps sending RTP from the same address, but no STUN binding request
(whose ufrag token names the transceiver) arrives until the next consent check, and
browsers give up first. So the supervisor mirrors each route to Redis, and a restarted
worker that meets an unknown, non-STUN client asks Redis which transceiver it belonged to.

Two classes, one per side (keys are fixed in docs/internals.md, "Redis"):

* :class:`RouteMirror` runs in the supervisor, in its own thread. Every interval it scans
  the table and, in pipelines of ``batch_size`` commands, ``SET``s new or re-pointed
  routes with a TTL (``redis.route_ttl``, by default twice the idle timeout),
  ``PEXPIRE``s routes that carried traffic since their last refresh (each at most every
  TTL/3), and ``DEL``s routes the supervisor expired (:meth:`RouteMirror.forget`). On any
  Redis error it backs off exponentially, and once Redis answers again it writes every
  live route anew, since it cannot know what a failed pipeline or a restarted server kept.
* :class:`RouteRecovery` runs in a relay worker, in a background thread. The hot loop calls
  :meth:`RouteRecovery.request`, which is O(1), never waits on Redis and allocates at most
  a bounded amount under a flood; the thread ``GET``s pending keys in batches and inserts
  the routes it finds into the shared table.

Neither class is ever called on a hot path with Redis I/O in it: the supervisor's loop and
the worker's loop only touch in-memory queues guarded by a lock that is never held across
a network call.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from voxrelay.engine.routing import TableError

log = logging.getLogger("voxrelay.redis")

ROUTE_KEY_SIZE = 24
"""A route key is the client's 24-byte relay header (docs/internals.md)."""

MAX_TRANSCEIVER_ID = 0xFFFF


def unix_ms() -> int:
    """Wall-clock unix milliseconds, the time base of the routing table."""
    return time.time_ns() // 1_000_000


def route_redis_key(cluster_id: int, route_key: bytes) -> str:
    """``voxrelay:{cluster}:route:<hex route key>``: where one route is mirrored."""
    if len(route_key) != ROUTE_KEY_SIZE:
        raise ValueError(
            f"a route key is the {ROUTE_KEY_SIZE}-byte relay header of a client, "
            f"got {len(route_key)} bytes"
        )
    return f"voxrelay:{cluster_id}:route:{route_key.hex()}"


def open_redis(url: str, *, socket_timeout: float) -> redis.Redis:
    """A client whose every call fails within ``socket_timeout`` instead of retrying.

    redis-py retries failed calls by default (with backoff), which turns one slow call into
    several seconds; these callers have their own backoff, so each call gets one attempt,
    bounded by the timeout for both connecting and reading.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def resolve_client(
    url: str | None, client: redis.Redis | None, *, socket_timeout: float
) -> redis.Redis:
    """The client to use: ``client`` as given, or a new one for ``url`` (exactly one)."""
    if client is not None:
        if url is not None:
            raise ValueError("pass either url= or client=, not both")
        return client
    if not url:
        raise ValueError("a Redis URL (redis://host:port/db) or a client is required")
    return open_redis(url, socket_timeout=socket_timeout)


def redact_url(url: str) -> str:
    """``url`` with any password masked, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparsable Redis URL>"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def parse_transceiver_id(value: bytes | str | int | None) -> int | None:
    """The transceiver id stored under a route key, or None when the value is not one."""
    if value is None:
        return None
    try:
        transceiver_id = int(value)
    except ValueError:
        return None
    return transceiver_id if 0 < transceiver_id <= MAX_TRANSCEIVER_ID else None


class ExponentialBackoff:
    """Delays for retrying a failing dependency: doubling from ``initial`` up to ``maximum``.

    A ±10 % jitter keeps a fleet of relays that lost Redis together from coming back in
    lock-step.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"need 0 < initial <= maximum, got {initial} and {maximum}")
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before the next attempt."""
        self.failures += 1
        base = min(self.maximum, self.initial * 2 ** min(self.failures - 1, 32))
        return base * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        self.failures = 0


class RouteLike(Protocol):
    """What the mirror reads from a routing table entry (``routing.Route`` fits)."""

    @property
    def key(self) -> bytes: ...
    @property
    def transceiver_id(self) -> int: ...
    @property
    def last_seen_ms(self) -> int: ...
    @property
    def created_ms(self) -> int: ...


class RouteSource(Protocol):
    """A table the mirror can scan (``routing.RoutingTable`` fits)."""

    def routes(self) -> Iterable[RouteLike]: ...


class RouteSink(Protocol):
    """A table recovery can fill (``routing.RoutingTable`` fits)."""

    def find(self, key: bytes) -> int: ...
    def insert(self, key: bytes, transceiver_id: int, now_ms: int) -> int: ...


# --------------------------------------------------------------------------------------
# Supervisor side: mirroring
# --------------------------------------------------------------------------------------


@dataclass
class MirrorStats:
    """Counters of a :class:`RouteMirror`, cumulative since it was created."""

    mirrored: int = 0  # SETs of new or re-pointed routes
    refreshed: int = 0  # PEXPIREs of live routes
    deleted: int = 0  # DELs of expired or vanished routes
    errors: int = 0  # failed passes (a Redis error or timeout)
    lost: int = 0  # refreshes that found the key gone (evicted, flushed): SET again
    resyncs: int = 0  # full passes after an error or a Redis restart
    deletes_dropped: int = 0  # forgotten routes not deleted because the queue was full
    passes: int = 0  # successful passes
    tracked: int = 0  # routes currently known to be mirrored
    pending_deletes: int = 0
    last_error: str | None = None
    last_success_ms: int | None = None
    connected: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Mirrored:
    """What the mirror last wrote for one route; one small object per live route."""

    transceiver_id: int
    created_ms: int
    refreshed_ms: int


class RouteMirror:
    """Keeps ``voxrelay:{cluster}:route:*`` in Redis in step with the routing table.

    Use: ``start()`` once the table exists, ``forget(routes)`` with whatever
    ``table.expire`` returned, ``stop()`` at shutdown. ``forget``, ``stats`` and
    ``stats_dict`` only touch memory and return at once, whatever state Redis is in.
    ``sync_once`` runs one pass on the caller's thread (the mirror thread calls it; tests
    may too, without ``start``).

    Memory is bounded by the table: one entry per live route, plus at most
    ``max_pending_deletes`` keys waiting for a ``DEL`` while Redis is away (beyond that
    they are left to expire by their TTL, and counted).
    """

    def __init__(
        self,
        table: RouteSource,
        *,
        cluster_id: int,
        ttl_seconds: float,
        url: str | None = None,
        client: redis.Redis | None = None,
        interval: float = 1.0,
        socket_timeout: float = 0.5,
        batch_size: int = 1000,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_pending_deletes: int = 65536,
        clock_ms: Callable[[], int] = unix_ms,
    ) -> None:
        if ttl_seconds <= 0 or interval <= 0 or batch_size <= 0 or max_pending_deletes <= 0:
            raise ValueError(
                "ttl_seconds, interval, batch_size and max_pending_deletes must be positive"
            )
        self.table = table
        self.cluster_id = cluster_id
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.refresh_after_ms = self.ttl_ms // 3
        self.interval = interval
        self.batch_size = batch_size
        self.max_pending_deletes = max_pending_deletes
        self._client = resolve_client(url, client, socket_timeout=socket_timeout)
        self._clock_ms = clock_ms
        self._backoff = ExponentialBackoff(backoff_initial, backoff_max)
        self._prefix = f"voxrelay:{cluster_id}:route:"

        # Owned by the syncing thread only.
        self._mirrored: dict[bytes, _Mirrored] = {}
        self._server_run_id: str | None = None
        self._resync_needed = True

        # Shared with callers; guarded by _lock, which is never held across Redis I/O.
        self._lock = threading.Lock()
        # key -> the forget() call that queued it, so a DEL that completes does not
        # drop a newer forget() of the same key made while it was in flight.
        self._pending_deletes: dict[bytes, int] = {}
        self._forget_calls = 0
        self._stats = MirrorStats()

        self._sync_lock = threading.Lock()  # one pass at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public, non-blocking -----------------------------------------------------------

    def start(self) -> None:
        """Start the mirror thread (daemon); a no-op when it is already running."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="voxrelay-route-mirror", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread; True once it has ended.

        The thread may be inside one Redis call, bounded by ``socket_timeout``; ``timeout``
        bounds the wait (default: one socket timeout plus a margin). The client is closed
        when the thread has ended.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout if timeout is not None else self._join_timeout())
            if thread.is_alive():
                return False
            self._thread = None
        self._client.close()
        return True

    def forget(self, routes: Iterable[RouteLike]) -> None:
        """Queue ``DEL``s for routes the supervisor expired; returns without touching Redis."""
        with self._lock:
            self._forget_calls += 1
            call = self._forget_calls
            pending = self._pending_deletes
            for route in routes:
                if route.key not in pending and len(pending) >= self.max_pending_deletes:
                    self._stats.deletes_dropped += 1
                    continue
                pending[route.key] = call

    def stats(self) -> MirrorStats:
        """A consistent copy of the counters."""
        with self._lock:
            self._stats.pending_deletes = len(self._pending_deletes)
            return replace(self._stats)

    def stats_dict(self) -> dict[str, Any]:
        """The counters as a dict, for metrics and the status endpoint."""
        return self.stats().as_dict()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the pass ---------------------------------------------------------------------

    def sync_once(self) -> bool:
        """One mirror pass; True when every command of it reached Redis."""
        with self._sync_lock:
            try:
                self._sync()
            except redis.RedisError as exc:
                self._note_failure(exc)
                return False
            return True

    def _sync(self) -> None:
        client = self._client
        # INFO's run_id changes when Redis restarts: a restarted server lost our keys even
        # if redis-py reconnected silently, so the pass must write everything again.
        run_id = str(client.info("server").get("run_id", ""))
        if run_id != self._server_run_id or self._resync_needed:
            if self._server_run_id is not None or self._stats.passes:
                with self._lock:
                    self._stats.resyncs += 1
            self._mirrored.clear()
            self._server_run_id = run_id
            self._resync_needed = False

        now_ms = self._clock_ms()
        batch = _Batch(self, now_ms)
        # A failed batch leaves Redis in an unknown state: rewrite everything next time.
        self._resync_needed = True

        with self._lock:
            forgotten = list(self._pending_deletes.items())
        mirrored = self._mirrored
        for key, call in forgotten:
            mirrored.pop(key, None)
            batch.delete(key, forgotten_by=call)

        seen: set[bytes] = set()
        for route in self.table.routes():
            key = route.key
            seen.add(key)
            entry = mirrored.get(key)
            if (
                entry is None
                or entry.transceiver_id != route.transceiver_id
                or entry.created_ms != route.created_ms
            ):
                batch.set(key, route.transceiver_id, route.created_ms)
            elif (
                route.last_seen_ms > entry.refreshed_ms
                and now_ms - entry.refreshed_ms >= self.refresh_after_ms
            ):
                batch.refresh(key)
        # Routes gone from the table without a forget() (another writer removed them).
        for key in [key for key in mirrored if key not in seen]:
            del mirrored[key]
            batch.delete(key, forgotten_by=None)
        batch.flush()

        self._resync_needed = False
        self._backoff.reset()
        with self._lock:
            self._stats.passes += 1
            self._stats.connected = True
            self._stats.last_success_ms = self._clock_ms()
            self._stats.tracked = len(mirrored)

    def _note_failure(self, exc: redis.RedisError) -> None:
        self._resync_needed = True
        with self._lock:
            self._stats.errors += 1
            self._stats.connected = False
            self._stats.last_error = f"{type(exc).__name__}: {exc}"
            self._stats.tracked = len(self._mirrored)

    def _run(self) -> None:
        was_connected = True
        while not self._stop.is_set():
            try:
                ok = self.sync_once()
            except Exception:
                # A bug or a broken table must not silently end mirroring for good.
                log.exception("route mirror pass failed unexpectedly")
                self._resync_needed = True
                ok = False
            if ok:
                if not was_connected:
                    log.info("route mirror reconnected to Redis, routes re-synced")
                was_connected = True
                delay = self.interval
            else:
                delay = self._backoff.next_delay()
                if was_connected:
                    log.warning(
                        "route mirror lost Redis, retrying with backoff",
                        extra={"error": self._stats.last_error, "retry_in_s": round(delay, 3)},
                    )
                was_connected = False
            self._stop.wait(delay)

    def _join_timeout(self) -> float:
        kwargs = self._client.connection_pool.connection_kwargs
        socket_timeout = kwargs.get("socket_timeout") or 1.0
        return 2 * float(socket_timeout) + 1.0


class _Batch:
    """Commands of one pass, sent in pipelines of ``batch_size``; bookkeeping on success."""

    def __init__(self, mirror: RouteMirror, now_ms: int) -> None:
        self._mirror = mirror
        self._now_ms = now_ms
        self._pipe = mirror._client.pipeline(transaction=False)
        # One record per queued command, to apply when its pipeline succeeded:
        # ("set", key, transceiver id, created) / ("refresh", key) /
        # ("delete", key, the forget() call that queued it or None)
        self._effects: list[tuple[Any, ...]] = []

    def set(self, key: bytes, transceiver_id: int, created_ms: int) -> None:
        mirror = self._mirror
        self._pipe.set(mirror._prefix + key.hex(), transceiver_id, px=mirror.ttl_ms)
        self._effects.append(("set", key, transceiver_id, created_ms))
        self._maybe_flush()

    def refresh(self, key: bytes) -> None:
        mirror = self._mirror
        self._pipe.pexpire(mirror._prefix + key.hex(), mirror.ttl_ms)
        self._effects.append(("refresh", key))
        self._maybe_flush()

    def delete(self, key: bytes, *, forgotten_by: int | None) -> None:
        self._pipe.delete(self._mirror._prefix + key.hex())
        self._effects.append(("delete", key, forgotten_by))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._effects) >= self._mirror.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._effects:
            return
        results = self._pipe.execute()
        effects, self._effects = self._effects, []
        mirror = self._mirror
        mirrored = mirror._mirrored
        mirrored_count = refreshed = deleted = lost = 0
        done_deletes: list[tuple[bytes, int]] = []
        for effect, result in zip(effects, results, strict=True):
            kind, key = effect[0], effect[1]
            if kind == "set":
                mirrored[key] = _Mirrored(effect[2], effect[3], self._now_ms)
                mirrored_count += 1
            elif kind == "refresh":
                entry = mirrored.get(key)
                if not result:
                    # The key vanished from Redis (evicted, flushed): SET it next pass.
                    mirrored.pop(key, None)
                    lost += 1
                elif entry is not None:
                    entry.refreshed_ms = self._now_ms
                    refreshed += 1
            else:
                deleted += 1
                if effect[2] is not None:
                    done_deletes.append((key, effect[2]))
        with mirror._lock:
            stats = mirror._stats
            stats.mirrored += mirrored_count
            stats.refreshed += refreshed
            stats.deleted += deleted
            stats.lost += lost
            stats.connected = True
            pending = mirror._pending_deletes
            for key, call in done_deletes:
                if pending.get(key) == call:
                    del pending[key]


# --------------------------------------------------------------------------------------
# Worker side: recovery
# --------------------------------------------------------------------------------------


@dataclass
class RecoveryStats:
    """Counters of a :class:`RouteRecovery`, cumulative since it was created."""

    requested: int = 0  # request() calls
    already_pending: int = 0  # key already queued or in flight
    negative_hits: int = 0  # answered by the negative cache, no Redis call
    dropped_pending_full: int = 0  # the pending set was full
    rate_limited: int = 0  # no token left in the bucket
    lookups: int = 0  # keys sent to Redis
    recovered: int = 0  # routes inserted into the table
    misses: int = 0  # Redis had no route for the key
    unknown_transceiver: int = 0  # Redis named a transceiver this worker does not know
    already_routed: int = 0  # another worker recovered the route first
    table_full: int = 0  # the table refused the route (full, or its slot busy)
    errors: int = 0  # failed batches (a Redis error or timeout)
    last_error: str | None = None
    pending: int = 0
    negative_cached: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RouteRecovery:
    """Re-creates routes from Redis for clients the table does not know (worker side).

    The worker's hot loop calls :meth:`request` with the route key of a non-STUN packet
    from an unknown address. That packet is dropped: the lookup runs later, on this
    object's thread, and once it inserts the route the client's next packet (the next RTP
    packet 20 ms later, or a DTLS/SRTCP retransmission) follows it like any other. No
    packet is held or replayed, and only route keys up to fixed bounds are queued, so a
    flood of unknown (even spoofed) addresses costs bounded memory and Redis load.

    ``request`` admits a key only if it is not in the negative cache (keys Redis did not
    know, for ``negative_cache_seconds``), not already pending, the pending set holds
    fewer than ``max_pending`` keys, and the token bucket (``rate`` lookups per second,
    bursts of ``burst``) has a token. Everything it does is O(1) under a lock that the
    thread never holds across Redis I/O.

    Create it in the worker process, after any fork: the Redis client's sockets must not
    be shared between processes.
    """

    def __init__(
        self,
        table: RouteSink,
        *,
        cluster_id: int,
        is_known_transceiver: Callable[[int], bool],
        url: str | None = None,
        client: redis.Redis | None = None,
        rate: float = 200.0,
        burst: float | None = None,
        max_pending: int = 1024,
        negative_cache_seconds: float = 5.0,
        negative_cache_size: int = 65536,
        socket_timeout: float = 0.2,
        batch_size: int = 64,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        clock_ms: Callable[[], int] = unix_ms,
    ) -> None:
        if rate <= 0 or max_pending <= 0 or negative_cache_size <= 0 or batch_size <= 0:
            raise ValueError(
                "rate, max_pending, negative_cache_size and batch_size must be positive"
            )
        if negative_cache_seconds < 0:
            raise ValueError("negative_cache_seconds must not be negative")
        self.table = table
        self.cluster_id = cluster_id
        self.is_known_transceiver = is_known_transceiver
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self.max_pending = max_pending
        self.negative_cache_seconds = negative_cache_seconds
        self.negative_cache_size = negative_cache_size
        self.batch_size = batch_size
        self._client = resolve_client(url, client, socket_timeout=socket_timeout)
        self._clock = clock
        self._clock_ms = clock_ms
        self._backoff = ExponentialBackoff(backoff_initial, backoff_max)
        self._prefix = f"voxrelay:{cluster_id}:route:"

        self._lock = threading.Lock()
        self._pending: dict[bytes, None] = {}  # queued or in flight
        self._queue: deque[bytes] = deque()  # queued, in arrival order
        # key -> expiry (clock seconds). Entries share one lifetime, so insertion order is
        # expiry order and the oldest entry is always first.
        self._negative: dict[bytes, float] = {}
        self._tokens = self.burst
        self._tokens_at = clock()
        self._stats = RecoveryStats()

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- hot path ---------------------------------------------------------------------

    def request(self, key: bytes) -> None:
        """Ask for ``key``'s route to be looked up; returns at once, usually doing nothing."""
        now = self._clock()
        with self._lock:
            stats = self._stats
            stats.requested += 1
            negative = self._negative
            expiry = negative.get(key)
            if expiry is not None:
                if expiry > now:
                    stats.negative_hits += 1
                    return
                del negative[key]
            pending = self._pending
            if key in pending:
                stats.already_pending += 1
                return
            if len(pending) >= self.max_pending:
                stats.dropped_pending_full += 1
                return
            tokens = min(self.burst, self._tokens + (now - self._tokens_at) * self.rate)
            self._tokens_at = now
            if tokens < 1.0:
                self._tokens = tokens
                stats.rate_limited += 1
                return
            self._tokens = tokens - 1.0
            pending[key] = None
            self._queue.append(key)
        if not self._wake.is_set():
            self._wake.set()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the lookup thread (daemon); a no-op when it is already running."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="voxrelay-route-recovery", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread; True once it has ended (it may be in one bounded Redis call)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout if timeout is not None else self._join_timeout())
            if thread.is_alive():
                return False
            self._thread = None
        self._client.close()
        return True

    def stats(self) -> RecoveryStats:
        """A consistent copy of the counters."""
        with self._lock:
            self._stats.pending = len(self._pending)
            self._stats.negative_cached = len(self._negative)
            return replace(self._stats)

    def stats_dict(self) -> dict[str, Any]:
        return self.stats().as_dict()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the lookup thread ------------------------------------------------------------

    def lookup_once(self) -> bool:
        """Look up one batch of pending keys; False on a Redis error, True otherwise.

        The thread calls this until nothing is pending; tests may call it directly.
        """
        with self._lock:
            queue = self._queue
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
        if not batch:
            return True
        try:
            pipe = self._client.pipeline(transaction=False)
            for key in batch:
                pipe.get(self._prefix + key.hex())
            values = pipe.execute()
        except redis.RedisError as exc:
            with self._lock:
                self._stats.errors += 1
                self._stats.lookups += len(batch)
                self._stats.last_error = f"{type(exc).__name__}: {exc}"
                for key in batch:
                    self._pending.pop(key, None)
            return False

        misses: list[bytes] = []
        recovered = unknown = already = full = 0
        now_ms = self._clock_ms()
        for key, value in zip(batch, values, strict=True):
            transceiver_id = parse_transceiver_id(value)
            if transceiver_id is None:
                misses.append(key)
                continue
            if not self.is_known_transceiver(transceiver_id):
                unknown += 1
                misses.append(key)
                continue
            if self.table.find(key) >= 0:
                already += 1
                continue
            if self._insert(key, transceiver_id, now_ms):
                recovered += 1
            else:
                full += 1
        with self._lock:
            stats = self._stats
            stats.lookups += len(batch)
            stats.recovered += recovered
            stats.misses += len(misses) - unknown
            stats.unknown_transceiver += unknown
            stats.already_routed += already
            stats.table_full += full
            self._remember_misses(misses)
            for key in batch:
                self._pending.pop(key, None)
        return True

    def _insert(self, key: bytes, transceiver_id: int, now_ms: int) -> bool:
        """Insert a recovered route; False when the table refuses it (full, or busy)."""
        try:
            self.table.insert(key, transceiver_id, now_ms)
        except TableError:  # TableFull, or SlotBusy under pathological contention
            return False
        return True

    def _remember_misses(self, keys: list[bytes]) -> None:
        """Add keys to the negative cache, evicting the oldest beyond its size (lock held)."""
        if not keys or self.negative_cache_seconds <= 0:
            return
        negative = self._negative
        now = self._clock()
        expiry = now + self.negative_cache_seconds
        # Drop expired entries from the front first; they are the oldest.
        while negative:
            oldest = next(iter(negative))
            if negative[oldest] > now and len(negative) < self.negative_cache_size:
                break
            del negative[oldest]
        for key in keys:
            negative.pop(key, None)  # re-inserting moves the key to the back
            if len(negative) >= self.negative_cache_size:
                del negative[next(iter(negative))]
            negative[key] = expiry

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._stop.is_set():
                with self._lock:
                    if not self._queue:
                        break
                try:
                    ok = self.lookup_once()
                except Exception:
                    # A bug in a callback must not end recovery for the worker's lifetime.
                    log.exception("route recovery batch failed unexpectedly")
                    ok = False
                if ok:
                    if self._backoff.failures:
                        log.info("route recovery reached Redis again")
                    self._backoff.reset()
                    continue
                if not self._backoff.failures:
                    log.warning(
                        "route recovery cannot reach Redis, backing off",
                        extra={"error": self._stats.last_error},
                    )
                self._stop.wait(self._backoff.next_delay())

    def _join_timeout(self) -> float:
        kwargs = self._client.connection_pool.connection_kwargs
        socket_timeout = kwargs.get("socket_timeout") or 1.0
        return 2 * float(socket_timeout) + 1.0
