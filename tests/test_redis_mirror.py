"""Route mirroring to Redis and recovery from it, against a real redis-server.

The routing table is the real shared-memory ``RoutingTable``; Redis is a real server
started per test (tests/redis_server.py), stopped, restarted or frozen to play outages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxrelay.engine.redis_mirror import (
    ExponentialBackoff,
    RouteMirror,
    RouteRecovery,
    parse_transceiver_id,
    redact_url,
    route_redis_key,
)
from voxrelay.engine.routing import RoutingTable
from voxrelay.proto.relay_header import encode_header

from redis_server import RedisServer, require_redis_server

CLUSTER = 3
TTL_MS = 3000
T = TypeVar("T")
# A call that "never waits" still shares the GIL with the Redis thread, and a hand-off can
# take one switch interval (5 ms); a call that waited on Redis would take the socket
# timeout (200-300 ms here). The bound sits well between the two.
NEVER_WAITS_S = 0.02


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        yield server


def new_table(capacity: int = 4096) -> RoutingTable:
    return RoutingTable.create(capacity)


@pytest.fixture
def table() -> Iterator[RoutingTable]:
    routes = new_table()
    yield routes
    routes.unlink()
    routes.close()


def client_key(n: int) -> bytes:
    """The route key of client number ``n``: its relay header."""
    return encode_header(f"198.51.{n // 250}.{n % 250 + 1}", 40000 + n % 20000)


def redis_key(key: bytes) -> str:
    return route_redis_key(CLUSTER, key)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
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


class FakeClock:
    """Unix ms under the test's control, for refresh timing."""

    def __init__(self, start_ms: int) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms


def make_mirror(
    table: RoutingTable, server: RedisServer, clock: Callable[[], int] = now_ms, **options: Any
) -> RouteMirror:
    settings: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "url": server.url,
        "ttl_seconds": TTL_MS / 1000,
        "interval": 0.05,
        "socket_timeout": 0.2,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "clock_ms": clock,
        **options,
    }
    return RouteMirror(table, **settings)


def make_recovery(
    table: RoutingTable, server: RedisServer, known: Callable[[int], bool], **options: Any
) -> RouteRecovery:
    settings: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "url": server.url,
        "is_known_transceiver": known,
        "socket_timeout": 0.2,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        **options,
    }
    return RouteRecovery(table, **settings)


# -- keys and values ------------------------------------------------------------------


def test_route_key_is_the_documented_name() -> None:
    key = encode_header("192.0.2.10", 5000)
    assert route_redis_key(7, key) == f"voxrelay:7:route:{key.hex()}"
    with pytest.raises(ValueError, match="24-byte relay header"):
        route_redis_key(7, key[:-1])


@given(st.binary(max_size=12) | st.text(max_size=12).map(str.encode) | st.none())
def test_transceiver_id_parser_never_raises(value: bytes | None) -> None:
    parsed = parse_transceiver_id(value)
    assert parsed is None or 0 < parsed <= 0xFFFF


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"17", 17), (b"65535", 65535), (b"0", None), (b"65536", None), (b"-3", None), (b"x", None)],
)
def test_transceiver_id_values(value: bytes, expected: int | None) -> None:
    assert parse_transceiver_id(value) == expected


def test_redact_url_hides_the_password_only() -> None:
    assert redact_url("redis://:hunter2@cache:6380/1") == "redis://:***@cache:6380/1"
    assert redact_url("redis://cache:6380/1") == "redis://cache:6380/1"


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = ExponentialBackoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0], strict=True):
        assert base * 0.9 <= delay <= base * 1.1
    backoff.reset()
    assert backoff.next_delay() <= 0.11


# -- mirroring ------------------------------------------------------------------------


def test_new_routes_are_set_with_the_idle_ttl(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    for n in range(3):
        table.insert(client_key(n), 10 + n, now_ms())
    mirror = make_mirror(table, redis_server)
    assert mirror.sync_once()
    admin = redis_server.client()
    for n in range(3):
        assert admin.get(redis_key(client_key(n))) == str(10 + n).encode()
        assert TTL_MS - 500 < admin.pttl(redis_key(client_key(n))) <= TTL_MS
    stats = mirror.stats()
    assert (stats.mirrored, stats.tracked, stats.errors) == (3, 3, 0)
    assert stats.connected and stats.last_success_ms is not None


def test_unchanged_routes_are_not_written_again(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    table.insert(client_key(1), 5, now_ms())
    mirror = make_mirror(table, redis_server)
    mirror.sync_once()
    sets = redis_server.command_calls("set")
    for _ in range(3):
        assert mirror.sync_once()
    assert redis_server.command_calls("set") == sets
    assert redis_server.command_calls("pexpire") == 0
    assert mirror.stats().mirrored == 1


def test_active_routes_are_refreshed_at_most_every_third_of_the_ttl(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    clock = FakeClock(1_000_000)
    slot = table.insert(client_key(1), 5, clock.ms)
    mirror = make_mirror(table, redis_server, clock)
    mirror.sync_once()  # SET at t0
    admin = redis_server.client()
    time.sleep(0.3)  # let the real TTL run down a little
    ttl_before = admin.pttl(redis_key(client_key(1)))
    assert ttl_before < TTL_MS - 250

    clock.ms += TTL_MS // 3 - 1
    table.touch(slot, clock.ms)
    mirror.sync_once()
    assert redis_server.command_calls("pexpire") == 0  # active, but refreshed too recently

    clock.ms += 1
    mirror.sync_once()
    assert redis_server.command_calls("pexpire") == 1
    assert admin.pttl(redis_key(client_key(1))) > ttl_before + 200  # the TTL starts over
    assert mirror.stats().refreshed == 1


def test_idle_routes_are_not_refreshed(table: RoutingTable, redis_server: RedisServer) -> None:
    clock = FakeClock(1_000_000)
    table.insert(client_key(1), 5, clock.ms)
    mirror = make_mirror(table, redis_server, clock)
    mirror.sync_once()
    clock.ms += TTL_MS  # no traffic since the SET: let the key expire with the route
    mirror.sync_once()
    assert redis_server.command_calls("pexpire") == 0


def test_expired_routes_are_deleted(table: RoutingTable, redis_server: RedisServer) -> None:
    old, fresh = client_key(1), client_key(2)
    table.insert(old, 5, now_ms() - 60_000)
    table.insert(fresh, 6, now_ms())
    mirror = make_mirror(table, redis_server)
    mirror.sync_once()
    expired = table.expire(now_ms(), 30_000)
    assert [route.key for route in expired] == [old]
    mirror.forget(expired)
    assert mirror.sync_once()
    admin = redis_server.client()
    assert admin.exists(redis_key(old)) == 0
    assert admin.get(redis_key(fresh)) == b"6"
    stats = mirror.stats()
    assert (stats.deleted, stats.tracked, stats.pending_deletes) == (1, 1, 0)


def test_a_route_removed_without_forget_is_deleted_too(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    slot = table.insert(client_key(1), 5, now_ms())
    mirror = make_mirror(table, redis_server)
    mirror.sync_once()
    assert table.remove(slot)
    mirror.sync_once()
    assert redis_server.client().exists(redis_key(client_key(1))) == 0


def test_a_repointed_route_is_written_again(table: RoutingTable, redis_server: RedisServer) -> None:
    table.insert(client_key(1), 5, now_ms())
    mirror = make_mirror(table, redis_server)
    mirror.sync_once()
    table.insert(client_key(1), 9, now_ms())  # a newer token names another transceiver
    mirror.sync_once()
    assert redis_server.client().get(redis_key(client_key(1))) == b"9"
    assert mirror.stats().mirrored == 2


def test_a_key_lost_from_redis_is_set_again(table: RoutingTable, redis_server: RedisServer) -> None:
    clock = FakeClock(1_000_000)
    slot = table.insert(client_key(1), 5, clock.ms)
    mirror = make_mirror(table, redis_server, clock)
    mirror.sync_once()
    admin = redis_server.client()
    admin.delete(redis_key(client_key(1)))  # evicted under memory pressure, say
    clock.ms += TTL_MS // 3
    table.touch(slot, clock.ms)
    mirror.sync_once()  # the refresh finds the key gone
    mirror.sync_once()  # and writes it again
    assert admin.get(redis_key(client_key(1))) == b"5"
    assert mirror.stats().lost == 1


def test_many_routes_go_out_in_several_pipelines(redis_server: RedisServer) -> None:
    table = new_table(capacity=3000)
    try:
        stamp = now_ms()
        for n in range(2500):
            table.insert(client_key(n), 1 + n % 7, stamp)
        mirror = make_mirror(table, redis_server, batch_size=1000)
        assert mirror.sync_once()
        assert redis_server.command_calls("set") == 2500
        assert redis_server.client().dbsize() == 2500
    finally:
        table.unlink()
        table.close()


def test_a_redis_restart_triggers_a_full_resync(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    for n in range(5):
        table.insert(client_key(n), 4, now_ms())
    mirror = make_mirror(table, redis_server)
    mirror.sync_once()
    redis_server.restart()  # comes back empty; redis-py may reconnect without an error
    assert wait_until(mirror.sync_once)
    assert redis_server.client().dbsize() == 5
    assert mirror.stats().resyncs == 1


def test_a_failed_pass_makes_the_next_one_write_everything(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    """After an error the mirror cannot know what Redis kept, so it writes every route."""
    for n in range(4):
        table.insert(client_key(n), 4, now_ms())
    mirror = make_mirror(table, redis_server)
    assert mirror.sync_once()
    redis_server.freeze()
    try:
        assert not mirror.sync_once()  # times out
    finally:
        redis_server.thaw()
    assert mirror.sync_once()
    stats = mirror.stats()
    assert (stats.mirrored, stats.resyncs, stats.errors) == (8, 1, 1)


def test_mirror_keeps_running_through_an_outage_and_resyncs(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    before = client_key(1)
    table.insert(before, 4, now_ms())
    mirror = make_mirror(table, redis_server)
    mirror.start()
    try:
        assert wait_until(lambda: redis_server.client().exists(redis_key(before)) == 1)
        redis_server.stop()
        assert wait_until(lambda: mirror.stats().errors >= 2)
        stats = mirror.stats()
        assert not stats.connected and "ConnectionError" in (stats.last_error or "")
        assert mirror.running

        # While Redis is away: routes come and go, and the caller's calls never wait.
        during = client_key(2)
        table.insert(during, 6, now_ms())
        expired = table.expire(now_ms() + 60_000, 30_000)
        table.insert(during, 6, now_ms())
        for _ in range(50):
            _, elapsed = timed(lambda: mirror.forget(expired))
            assert elapsed < NEVER_WAITS_S
            _, elapsed = timed(mirror.stats_dict)
            assert elapsed < NEVER_WAITS_S

        redis_server.start()  # empty
        admin = redis_server.client()
        assert wait_until(lambda: admin.get(redis_key(during)) == b"6")
        assert wait_until(lambda: mirror.stats().connected)
        assert admin.exists(redis_key(before)) == 0  # expired during the outage
        assert mirror.stats().resyncs >= 1
    finally:
        assert mirror.stop()
    assert not mirror.running


def test_a_hung_redis_never_blocks_the_callers(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    table.insert(client_key(1), 4, now_ms())
    mirror = make_mirror(table, redis_server, socket_timeout=0.3)
    mirror.start()
    try:
        assert wait_until(lambda: mirror.stats().passes >= 1)
        redis_server.freeze()
        time.sleep(0.1)  # the thread is now stuck in a read
        worst = 0.0
        for n in range(100):
            route = table.read(table.insert(client_key(100 + n), 4, now_ms()))
            assert route is not None
            _, elapsed = timed(partial(mirror.forget, [route]))
            worst = max(worst, elapsed)
            _, elapsed = timed(mirror.stats)
            worst = max(worst, elapsed)
        assert worst < NEVER_WAITS_S
        assert wait_until(lambda: mirror.stats().errors >= 1)
        assert "Timeout" in (mirror.stats().last_error or "")
    finally:
        redis_server.thaw()
        _, elapsed = timed(mirror.stop)
    assert elapsed < 1.0


def test_the_pending_delete_queue_is_bounded(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    mirror = make_mirror(table, redis_server, max_pending_deletes=10)
    stamp = now_ms() - 60_000
    for n in range(25):
        table.insert(client_key(n), 2, stamp)
    mirror.forget(table.expire(now_ms(), 30_000))
    stats = mirror.stats()
    assert (stats.pending_deletes, stats.deletes_dropped) == (10, 15)


# -- recovery -------------------------------------------------------------------------


def test_a_fresh_table_recovers_routes_from_redis_without_stun(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    """The whole relay restarts: a new table, filled back from Redis by the first packets."""
    keys = [client_key(n) for n in range(20)]
    for n, key in enumerate(keys):
        table.insert(key, 1 + n % 3, now_ms())
    make_mirror(table, redis_server).sync_once()

    restarted = new_table()
    recovery = make_recovery(restarted, redis_server, known=lambda tid: tid in (1, 2, 3))
    recovery.start()
    try:
        for key in keys:  # the first RTP packet of each client, to a table that is empty
            recovery.request(key)
        assert wait_until(lambda: all(restarted.find(key) >= 0 for key in keys))
        for n, key in enumerate(keys):
            route = restarted.read(restarted.find(key))
            assert route is not None and route.transceiver_id == 1 + n % 3
        stats = recovery.stats()
        assert (stats.recovered, stats.misses, stats.errors) == (20, 0, 0)

        # The restarted supervisor's mirror then owns these routes again.
        mirror = make_mirror(restarted, redis_server)
        assert mirror.sync_once()
        assert mirror.stats().tracked == 20
    finally:
        recovery.stop()
        restarted.unlink()
        restarted.close()


def test_a_route_naming_an_unknown_transceiver_is_not_recovered(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    redis_server.client().set(redis_key(client_key(1)), b"42")
    recovery = make_recovery(table, redis_server, known=lambda tid: tid != 42)
    recovery.request(client_key(1))
    assert recovery.lookup_once()
    assert table.find(client_key(1)) == -1
    stats = recovery.stats()
    assert (stats.unknown_transceiver, stats.recovered, stats.negative_cached) == (1, 0, 1)


def test_misses_are_negatively_cached(table: RoutingTable, redis_server: RedisServer) -> None:
    recovery = make_recovery(table, redis_server, known=lambda tid: True, negative_cache_seconds=30)
    recovery.start()
    try:
        stranger = client_key(999)
        recovery.request(stranger)
        assert wait_until(lambda: recovery.stats().misses == 1)
        for _ in range(5000):  # the stranger keeps sending
            recovery.request(stranger)
        stats = recovery.stats()
        assert stats.negative_hits == 5000 and stats.lookups == 1
        assert redis_server.command_calls("get") == 1
    finally:
        recovery.stop()


def test_the_negative_cache_expires(table: RoutingTable, redis_server: RedisServer) -> None:
    now = [100.0]
    recovery = make_recovery(
        table, redis_server, known=lambda tid: True, negative_cache_seconds=2, clock=lambda: now[0]
    )
    key = client_key(5)
    recovery.request(key)
    recovery.lookup_once()
    redis_server.client().set(redis_key(key), b"3")  # the route shows up in Redis later
    now[0] += 1.9
    recovery.request(key)
    assert recovery.stats().negative_hits == 1
    now[0] += 0.2
    recovery.request(key)
    recovery.lookup_once()
    assert table.find(key) >= 0


def test_a_flood_of_unknown_addresses_is_rate_limited_and_bounded(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    recovery = make_recovery(
        table,
        redis_server,
        known=lambda tid: True,
        rate=200,
        burst=50,
        max_pending=64,
        negative_cache_size=500,
    )
    recovery.start()
    try:
        started = time.monotonic()
        worst = 0.0
        for n in range(20000):  # spoofed sources: every packet a new address
            key = client_key(n)
            before = time.perf_counter()
            recovery.request(key)
            worst = max(worst, time.perf_counter() - before)
        elapsed = time.monotonic() - started
        assert wait_until(lambda: recovery.stats().pending == 0)
        stats = recovery.stats()
        allowed = 50 + 200 * elapsed
        assert stats.lookups <= allowed + 1
        assert redis_server.command_calls("get") == stats.lookups
        assert stats.rate_limited + stats.dropped_pending_full >= 20000 - allowed - 1
        assert stats.negative_cached <= 500
        assert worst < NEVER_WAITS_S  # the hot loop never waits
    finally:
        recovery.stop()


def test_the_pending_set_is_bounded_while_redis_hangs(
    table: RoutingTable, redis_server: RedisServer
) -> None:
    recovery = make_recovery(
        table, redis_server, known=lambda tid: True, rate=1e6, max_pending=8, batch_size=4
    )
    recovery.start()
    redis_server.freeze()
    try:
        worst = 0.0
        for n in range(1000):
            _, elapsed = timed(partial(recovery.request, client_key(n)))
            worst = max(worst, elapsed)
        stats = recovery.stats()
        assert stats.pending <= 8
        assert stats.dropped_pending_full >= 1000 - 8 - 4  # at most one batch in flight
        assert worst < NEVER_WAITS_S
    finally:
        redis_server.thaw()
        assert recovery.stop()


def test_recovery_survives_an_outage(table: RoutingTable, redis_server: RedisServer) -> None:
    recovery = make_recovery(table, redis_server, known=lambda tid: True)
    recovery.start()
    try:
        redis_server.stop()
        recovery.request(client_key(1))
        assert wait_until(lambda: recovery.stats().errors == 1)
        assert "ConnectionError" in (recovery.stats().last_error or "")
        assert recovery.stats().negative_cached == 0  # an error is not a miss

        redis_server.start()
        redis_server.client().set(redis_key(client_key(1)), b"8")
        # The client's next packet asks again, after the backoff.
        assert wait_until(lambda: recovery.request(client_key(1)) or table.find(client_key(1)) >= 0)
        route = table.read(table.find(client_key(1)))
        assert route is not None and route.transceiver_id == 8
    finally:
        recovery.stop()


def test_recovery_counts_a_full_table(redis_server: RedisServer) -> None:
    small = new_table(capacity=1)
    try:
        small.insert(client_key(1), 2, now_ms())
        redis_server.client().set(redis_key(client_key(2)), b"2")
        recovery = make_recovery(small, redis_server, known=lambda tid: True)
        recovery.request(client_key(2))
        assert recovery.lookup_once()
        assert recovery.stats().table_full == 1
        assert small.find(client_key(2)) == -1
        recovery.stop()
    finally:
        small.unlink()
        small.close()
