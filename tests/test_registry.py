"""The transceiver registry: static config entries, and Redis with a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxrelay.engine.registry import (
    DRAINING,
    READY,
    STOPPED,
    MalformedEntry,
    RedisRegistry,
    Registry,
    RegistryError,
    RegistrySnapshot,
    RegistryUnavailable,
    StaticRegistry,
    TransceiverHeartbeat,
    TransceiverInfo,
    transceivers_key,
)

from redis_server import RedisServer, require_redis_server

CLUSTER = 7
INTERVAL_MS = 1000
# An answer from memory, with slack for a busy machine; a Redis call that waited would take
# the socket timeout (200 ms).
FROM_MEMORY_S = 0.02


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def registry(redis_server: RedisServer) -> Iterator[RedisRegistry]:
    reg = RedisRegistry(
        CLUSTER,
        redis_server.url,
        socket_timeout=0.2,
        heartbeat_interval=INTERVAL_MS / 1000,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    yield reg
    reg.close()


def info(transceiver_id: int = 1, **changes: Any) -> TransceiverInfo:
    fields: dict[str, Any] = {
        "id": transceiver_id,
        "host": "10.0.0.5",
        "port": 4000 + transceiver_id,
        "load": 0.25,
        "heartbeat_ms": 1_000_000,
        "state": READY,
    }
    fields.update(changes)
    return TransceiverInfo(**fields)


T = TypeVar("T")


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def timed(call: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


# -- TransceiverInfo ------------------------------------------------------------------


def test_healthy_within_three_heartbeat_intervals() -> None:
    entry = info(heartbeat_ms=10_000)
    assert entry.healthy(10_000 + 3 * INTERVAL_MS, INTERVAL_MS)
    assert not entry.healthy(10_000 + 3 * INTERVAL_MS + 1, INTERVAL_MS)


def test_draining_is_healthy_but_not_accepting_and_stopped_is_neither() -> None:
    draining = info(heartbeat_ms=5_000, state=DRAINING)
    assert draining.healthy(5_000, INTERVAL_MS)
    assert not draining.accepting(5_000, INTERVAL_MS)
    assert info(heartbeat_ms=5_000).accepting(5_000, INTERVAL_MS)
    assert not info(heartbeat_ms=5_000, state=STOPPED).healthy(5_000, INTERVAL_MS)


def test_json_uses_the_documented_field_names() -> None:
    assert orjson.loads(info(3).to_json()) == {
        "address": "10.0.0.5",
        "port": 4003,
        "load": 0.25,
        "heartbeat_ms": 1_000_000,
        "state": "ready",
    }


@given(
    transceiver_id=st.integers(1, 0xFFFF),
    host=st.text(min_size=1, max_size=40),
    port=st.integers(1, 0xFFFF),
    load=st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
    heartbeat_ms=st.integers(0, 2**62),
    state=st.sampled_from([READY, DRAINING, STOPPED]),
)
def test_json_round_trips(
    transceiver_id: int, host: str, port: int, load: float, heartbeat_ms: int, state: str
) -> None:
    entry = TransceiverInfo(transceiver_id, host, port, load, heartbeat_ms, state)
    assert TransceiverInfo.from_json(transceiver_id, entry.to_json()) == entry


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["address", "port", "load", "heartbeat_ms", "state", "x"]),
            children,
            max_size=6,
        )
    ),
    max_leaves=12,
)


@given(st.binary(max_size=200) | json_values.map(lambda value: orjson.dumps(value)))
def test_from_json_raises_only_malformed_entry(data: bytes) -> None:
    try:
        entry = TransceiverInfo.from_json(9, data)
    except MalformedEntry:
        return
    assert entry.id == 9 and 0 < entry.port <= 0xFFFF and entry.host


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"port": 5}', "missing field 'address'"),
        (b'{"address": "h", "port": 0}', "port must be 1..65535"),
        (b'{"address": "h", "port": true}', "port must be an integer"),
        (b'{"address": "", "port": 5}', "host must be a non-empty string"),
        (b'{"address": "h", "port": 5, "load": -1}', "load must be finite and >= 0"),
    ],
)
def test_from_json_says_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(MalformedEntry, match=message):
        TransceiverInfo.from_json(4, data)


# -- StaticRegistry -------------------------------------------------------------------


def test_static_registry_lists_config_entries_as_healthy() -> None:
    registry: Registry = StaticRegistry(
        [(2, "10.0.0.2", 5002), {"id": 1, "host": "10.0.0.1", "port": 5001}]
    )
    snapshot = registry.snapshot()
    assert [(t.id, t.host, t.port) for t in snapshot] == [
        (1, "10.0.0.1", 5001),
        (2, "10.0.0.2", 5002),
    ]
    assert not snapshot.stale
    # Minutes later, still healthy: a configured transceiver has no heartbeat to miss.
    later = registry.snapshot()
    assert all(t.healthy(later.fetched_ms, INTERVAL_MS) for t in later)


def test_static_reload_swaps_entries_and_a_bad_reload_keeps_the_old_ones() -> None:
    registry = StaticRegistry([(1, "10.0.0.1", 5001)])
    registry.reload([(3, "10.0.0.3", 5003)])
    assert [t.id for t in registry.snapshot()] == [3]
    with pytest.raises(MalformedEntry, match="listed twice"):
        registry.reload([(4, "h", 1), (4, "h", 2)])
    with pytest.raises(MalformedEntry, match=r"port must be 1\.\.65535"):
        registry.reload([(5, "h", 70000)])
    assert [t.id for t in registry.snapshot()] == [3]


# -- RedisRegistry --------------------------------------------------------------------


def test_register_writes_the_documented_hash_entry(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    registry.register(info(12, load=0.5, heartbeat_ms=123))
    raw = redis_server.client().hget(f"voxrelay:{CLUSTER}:transceivers", "12")
    assert transceivers_key(CLUSTER) == f"voxrelay:{CLUSTER}:transceivers"
    assert orjson.loads(raw) == {
        "address": "10.0.0.5",
        "port": 4012,
        "load": 0.5,
        "heartbeat_ms": 123,
        "state": "ready",
    }


def test_snapshot_lists_registered_transceivers_in_id_order(registry: RedisRegistry) -> None:
    registry.register(info(9))
    registry.register(info(2))
    snapshot = registry.snapshot()
    assert isinstance(snapshot, RegistrySnapshot)
    assert [t.id for t in snapshot] == [2, 9]
    assert snapshot.get(9) == info(9)
    assert not snapshot.stale and snapshot.error is None


def test_heartbeat_updates_load_time_and_state(registry: RedisRegistry) -> None:
    registry.register(info(4, heartbeat_ms=1_000))
    registry.heartbeat(4, 0.75, 5_000)
    entry = registry.snapshot().get(4)
    assert entry is not None
    assert (entry.load, entry.heartbeat_ms, entry.state) == (0.75, 5_000, READY)
    assert entry.healthy(5_000 + 3 * INTERVAL_MS, registry.interval_ms)
    assert not entry.healthy(5_001 + 3 * INTERVAL_MS, registry.interval_ms)
    registry.heartbeat(4, 0.1, 6_000, DRAINING)
    assert registry.snapshot()[0].state == DRAINING


def test_heartbeat_before_register_is_an_error(registry: RedisRegistry) -> None:
    with pytest.raises(RegistryError, match="call register"):
        registry.heartbeat(77, 0.0, 1)


def test_unregister_removes_the_entry(registry: RedisRegistry) -> None:
    registry.register(info(5))
    registry.register(info(6))
    registry.unregister(5)
    assert [t.id for t in registry.snapshot()] == [6]


def test_malformed_entries_are_skipped_and_counted(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    registry.register(info(1))
    admin = redis_server.client()
    admin.hset(registry.key, "2", b"{broken")
    admin.hset(registry.key, "not-an-id", info(3).to_json())
    admin.hset(registry.key, "70000", info(3).to_json())
    snapshot = registry.snapshot()
    assert [t.id for t in snapshot] == [1]
    assert snapshot.malformed == 3 and not snapshot.stale


def test_static_entries_merge_and_redis_wins_on_the_same_id(redis_server: RedisServer) -> None:
    registry = RedisRegistry(
        CLUSTER, redis_server.url, static=[(1, "192.0.2.1", 7001), (2, "192.0.2.2", 7002)]
    )
    try:
        registry.register(info(2, host="198.51.100.2"))
        snapshot = registry.snapshot()
        assert [(t.id, t.host) for t in snapshot] == [(1, "192.0.2.1"), (2, "198.51.100.2")]
        assert snapshot[0].healthy(snapshot.fetched_ms or 0, registry.interval_ms)
    finally:
        registry.close()


def test_clusters_do_not_see_each_other(redis_server: RedisServer, registry: RedisRegistry) -> None:
    other = RedisRegistry(CLUSTER + 1, redis_server.url)
    try:
        other.register(info(1))
        assert len(registry.snapshot()) == 0
        assert len(other.snapshot()) == 1
    finally:
        other.close()


def test_snapshot_with_redis_down_returns_the_last_good_one_marked_stale(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    registry.register(info(3))
    assert not registry.snapshot().stale
    redis_server.stop()
    snapshot, elapsed = timed(registry.snapshot)
    assert snapshot.stale and "ConnectionError" in (snapshot.error or "")
    assert [t.id for t in snapshot] == [3]
    assert elapsed < 0.1
    # Within the backoff window Redis is not even tried.
    for _ in range(20):
        again, elapsed = timed(registry.snapshot)
        assert again.stale and elapsed < FROM_MEMORY_S


def test_snapshot_before_any_success_is_empty_and_stale(tmp_path: Path) -> None:
    require_redis_server()
    server = RedisServer(tmp_path / "never-started")  # a free port nothing listens on
    registry = RedisRegistry(CLUSTER, server.url, static=[(8, "192.0.2.8", 7008)])
    snapshot = registry.snapshot()
    assert snapshot.stale and snapshot.error
    # Static entries are still known, and healthy: they do not depend on Redis.
    assert [t.id for t in snapshot] == [8]
    assert snapshot[0].healthy(snapshot.fetched_ms or 0, registry.interval_ms)
    registry.close()


def test_writes_with_redis_down_raise_registry_unavailable_quickly(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    registry.register(info(1))
    redis_server.stop()
    for call in (
        lambda: registry.register(info(2)),
        lambda: registry.heartbeat(1, 0.3, 2_000),
        lambda: registry.unregister(1),
    ):
        started = time.perf_counter()
        with pytest.raises(RegistryUnavailable, match="did not answer the registry"):
            call()
        assert time.perf_counter() - started < 0.1


def test_snapshot_of_a_hung_redis_returns_within_the_socket_timeout(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    registry.register(info(1))
    registry.snapshot()
    redis_server.freeze()
    try:
        snapshot, elapsed = timed(registry.snapshot)
        assert snapshot.stale and "Timeout" in (snapshot.error or "")
        assert elapsed < 0.2 + 0.15  # socket_timeout plus scheduling slack
        _, elapsed = timed(registry.snapshot)
        assert elapsed < FROM_MEMORY_S  # backing off: answered from memory
    finally:
        redis_server.thaw()


def test_snapshot_recovers_after_redis_restarts(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    registry.register(info(1))
    redis_server.stop()
    assert registry.snapshot().stale
    redis_server.start()
    registry.heartbeat(1, 0.9, 42)  # the next heartbeat re-creates the lost entry
    assert wait_until(lambda: not registry.snapshot().stale, timeout=2.0)
    snapshot = registry.snapshot()
    assert snapshot.get(1) == info(1, load=0.9, heartbeat_ms=42)


# -- TransceiverHeartbeat -------------------------------------------------------------


def entry_in_redis(server: RedisServer, transceiver_id: int) -> dict[str, Any] | None:
    raw = server.client().hget(transceivers_key(CLUSTER), str(transceiver_id))
    return orjson.loads(raw) if raw is not None else None


def field_of(server: RedisServer, transceiver_id: int, name: str) -> Any:
    entry = entry_in_redis(server, transceiver_id)
    assert entry is not None, f"transceiver {transceiver_id} is not in Redis"
    return entry[name]


def test_heartbeat_thread_registers_refreshes_and_unregisters(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    loads = iter(range(1000))
    heartbeat = TransceiverHeartbeat(
        registry, info(21), interval=0.05, load=lambda: float(next(loads))
    )
    _, elapsed = timed(heartbeat.start)
    assert elapsed < FROM_MEMORY_S
    assert wait_until(lambda: entry_in_redis(redis_server, 21) is not None)
    first = entry_in_redis(redis_server, 21)
    assert first is not None
    assert wait_until(lambda: field_of(redis_server, 21, "heartbeat_ms") > first["heartbeat_ms"])
    assert field_of(redis_server, 21, "load") > first["load"]

    heartbeat.set_state(DRAINING)
    assert wait_until(lambda: field_of(redis_server, 21, "state") == DRAINING)

    assert heartbeat.stop()
    assert entry_in_redis(redis_server, 21) is None
    stats = heartbeat.stats()
    assert stats.beats >= 3 and stats.errors == 0 and not stats.registered


def test_heartbeat_thread_survives_an_outage_and_re_registers(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    heartbeat = TransceiverHeartbeat(registry, info(22), interval=0.05)
    heartbeat.start()
    try:
        assert wait_until(lambda: entry_in_redis(redis_server, 22) is not None)
        redis_server.stop()
        assert wait_until(lambda: heartbeat.stats().errors >= 2)
        assert "did not answer" in (heartbeat.stats().last_error or "")
        redis_server.start()  # empty: the entry was lost with the server
        assert wait_until(lambda: entry_in_redis(redis_server, 22) is not None)
        assert wait_until(lambda: not registry.snapshot().stale)
        assert registry.snapshot().get(22) is not None
    finally:
        heartbeat.stop()


def test_heartbeat_stop_with_redis_down_reports_the_failed_unregister(
    registry: RedisRegistry, redis_server: RedisServer
) -> None:
    heartbeat = TransceiverHeartbeat(registry, info(23), interval=0.05)
    heartbeat.start()
    assert wait_until(lambda: heartbeat.stats().registered)
    redis_server.stop()
    started = time.perf_counter()
    assert heartbeat.stop() is False
    assert time.perf_counter() - started < 1.0
    assert heartbeat.stats().errors >= 1
