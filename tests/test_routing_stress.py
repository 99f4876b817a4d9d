"""Routing table under real multi-process contention and repeated SIGKILL (slow tests).

Every key carries a checksum of itself, and the transceiver id and created time are
derived from the key, so a reader that ever saw a torn slot (fields of two writes mixed)
would notice.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import time
import zlib
from collections import Counter

import pytest

from voxrelay.engine import routing
from voxrelay.engine.routing import LIVE, Route, RoutingTable, SlotBusy, TableFull

pytestmark = pytest.mark.slow

CONTEXT = multiprocessing.get_context("fork")
BASE_MS = 1_700_000_000_000


def make_key(n: int) -> bytes:
    """A relay-header-shaped key whose reserved field holds a CRC of the rest."""
    port = (1 + n % 65000).to_bytes(2, "big")
    address = b"\x20\x01\x0d\xb8" + n.to_bytes(12, "big")
    check = zlib.crc32(port + address).to_bytes(4, "big")
    return b"\x01\x06" + port + check + address


def key_is_whole(key: bytes) -> bool:
    return zlib.crc32(key[2:4] + key[8:24]).to_bytes(4, "big") == key[4:8]


def transceiver_for(key: bytes, variant: int) -> int:
    return (zlib.crc32(key) & 0xFFFF) ^ variant


def created_for(key: bytes) -> int:
    return BASE_MS + (zlib.crc32(key) & 0xFFFFF)


def route_is_whole(route: Route) -> bool:
    return (
        key_is_whole(route.key)
        and route.transceiver_id ^ transceiver_for(route.key, 0) in (0, 1)
        and route.created_ms == created_for(route.key)
        and route.version % 2 == 0
    )


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def writer(name: str, seed: int, pool: int, stop, results) -> None:
    table = RoutingTable.attach(name)
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    while not stop.is_set():
        key = make_key(rng.randrange(pool))
        roll = rng.random()
        try:
            if roll < 0.6:
                table.insert(key, transceiver_for(key, rng.randrange(2)), created_for(key))
                counts["insert"] += 1
            elif roll < 0.85:
                slot = table.find(key)
                route = table.read(slot) if slot >= 0 else None
                if route is not None and table.remove(slot, route.version):
                    counts["remove"] += 1
            else:
                slot = table.find(key)
                if slot >= 0:
                    table.touch(slot, created_for(key) + rng.randrange(1000))
                    counts["touch"] += 1
        except SlotBusy:
            counts["busy"] += 1
        except TableFull:
            counts["full"] += 1
    results.put(("writer", dict(counts)))


def reader(name: str, seed: int, pool: int, stop, results) -> None:
    table = RoutingTable.attach(name)
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    torn: list[str] = []
    cached: list[Route] = []
    words = table.words
    while not stop.is_set():
        slot = rng.randrange(table.slot_count)
        route = table.read(slot)
        counts["read"] += 1
        if route is not None:
            counts["live"] += 1
            if not route_is_whole(route):
                torn.append(repr(route))
            cached.append(route)
        key = make_key(rng.randrange(pool))
        found = table.find(key)
        if found >= 0:
            route = table.read(found)
            counts["found"] += 1
            if route is not None and not route_is_whole(route):
                torn.append(repr(route))
        # The relay hot loop: trust a cached route while its seq word is unchanged.
        if cached:
            route = cached.pop(rng.randrange(len(cached)))
            index = table.seq_index(route.slot)
            if words[index] == route.version:
                with table.key_view(route.slot) as view:
                    key_now = bytes(view)
                if words[index] == route.version:
                    counts["cache_hit"] += 1
                    if key_now != route.key:
                        torn.append(f"cached {route!r} but key {key_now!r}")
        if table.live_count() > table.capacity:
            torn.append(f"live count {table.live_count()} over capacity")
        del cached[:-64]
    results.put(("reader", {"counts": dict(counts), "torn": torn[:5], "torn_total": len(torn)}))


def assert_consistent(table: RoutingTable) -> None:
    """Quiet table: nothing held, seqs even, counter exact, no duplicate, all findable."""
    tags = table.words[routing._FIRST_TAG_WORD :: 8].tolist()
    seqs = table.words[routing._FIRST_SEQ_WORD :: 8].tolist()
    assert [slot for slot, tag in enumerate(tags) if tag >> routing.OWNER_SHIFT] == []
    assert [slot for slot, seq in enumerate(seqs) if seq % 2] == []
    routes = list(table.routes())
    assert len(routes) == tags.count(LIVE) == table.live_count() <= table.capacity
    duplicates = [key for key, n in Counter(r.key for r in routes).items() if n > 1]
    assert duplicates == []
    for route in routes:
        assert route_is_whole(route), route
        assert table.find(route.key) == route.slot


def collect(results, count: int) -> list[tuple[str, dict]]:
    return [results.get(timeout=30) for _ in range(count)]


@pytest.mark.parametrize(
    ("capacity", "pool"),
    [(1500, 2200), (12, 20)],
    ids=["spread", "hot-slots"],
)
def test_concurrent_writers_and_readers_never_see_torn_entries(capacity: int, pool: int):
    duration = 2.5
    table = RoutingTable.create(capacity)
    stop, results = CONTEXT.Event(), CONTEXT.Queue()
    try:
        workers = [
            CONTEXT.Process(target=writer, args=(table.name, seed, pool, stop, results))
            for seed in range(3)
        ] + [
            CONTEXT.Process(target=reader, args=(table.name, 100 + seed, pool, stop, results))
            for seed in range(2)
        ]
        for process in workers:
            process.start()
        time.sleep(duration)
        stop.set()
        reports = collect(results, len(workers))
        for process in workers:
            process.join(timeout=30)
            assert process.exitcode == 0

        writes = Counter()
        for role, report in reports:
            if role == "writer":
                writes.update(report)
        reads = Counter()
        torn_total = 0
        for role, report in reports:
            if role == "reader":
                reads.update(report["counts"])
                torn_total += report["torn_total"]
                assert report["torn"] == []
        print(f"\nwriters: {dict(writes)}\nreaders: {dict(reads)}")
        assert torn_total == 0
        assert writes["insert"] > 1000 and writes["remove"] > 100
        assert reads["live"] > 1000
        assert_consistent(table)
    finally:
        table.close()
        table.unlink()


def racer(name: str, keys: list[bytes], variant: int, rounds: int, go, done) -> None:
    table = RoutingTable.attach(name)
    for round_number in range(1, rounds + 1):
        while go.value < round_number:  # spin, so that racers start within microseconds
            pass
        for key in keys:  # every racer in the same order: same-key inserts collide
            with contextlib.suppress(SlotBusy):
                table.insert(key, transceiver_for(key, variant), created_for(key))
        with done.get_lock():
            done.value += 1


def test_racing_inserts_of_the_same_keys_leave_one_copy_each():
    racers, rounds = 2, 150
    table = RoutingTable.create(2000)
    keys = [make_key(n) for n in range(40)]
    go, done = CONTEXT.RawValue("q", 0), CONTEXT.Value("q", 0)
    processes = [
        CONTEXT.Process(target=racer, args=(table.name, keys, n % 2, rounds, go, done))
        for n in range(racers)
    ]
    try:
        for process in processes:
            process.start()
        for round_number in range(1, rounds + 1):
            go.value = round_number
            deadline = time.monotonic() + 30
            while done.value < racers * round_number:
                assert time.monotonic() < deadline, "racers stalled"
                time.sleep(0.0005)
            assert_consistent(table)
            assert sorted(r.key for r in table.routes()) == sorted(keys)
            for route in list(table.routes()):
                assert table.remove(route.slot, route.version)
        for process in processes:
            process.join(timeout=30)
            assert process.exitcode == 0
    finally:
        go.value = rounds + 1
        for process in processes:
            process.join(timeout=5)
        table.close()
        table.unlink()


def churn(name: str, seed: int, pool: int, stop=None) -> None:
    """Insert, re-point and remove as fast as possible (until killed or stopped)."""
    table = RoutingTable.attach(name)
    rng = random.Random(seed)
    while stop is None or not stop.is_set():
        key = make_key(rng.randrange(pool))
        try:
            if rng.random() < 0.7:
                table.insert(key, transceiver_for(key, rng.randrange(2)), created_for(key))
            else:
                slot = table.find(key)
                if slot >= 0:
                    table.remove(slot)
        except (TableFull, SlotBusy):
            pass


def test_writer_killed_mid_insert_is_reclaimed_and_table_stays_usable():
    capacity, pool, kills = 400, 600, 30
    table = RoutingTable.create(capacity)
    stop = CONTEXT.Event()
    survivor = CONTEXT.Process(target=churn, args=(table.name, 999, pool, stop))
    survivor.start()
    rng = random.Random(7)
    repaired = 0
    try:
        for round_number in range(kills):
            victim = CONTEXT.Process(target=churn, args=(table.name, round_number, pool))
            victim.start()
            time.sleep(rng.uniform(0.02, 0.08))
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(timeout=10)
            assert victim.exitcode == -signal.SIGKILL
            repaired += table.reclaim(is_alive)
            assert table.live_count() <= capacity
        stop.set()
        survivor.join(timeout=30)
        assert survivor.exitcode == 0
        repaired += table.reclaim(is_alive)  # now quiet: the recount is exact
        print(f"\n{kills} kills, {repaired} slots repaired, {table.live_count()} live")
        assert repaired == table.reclaimed_count
        assert repaired > 0, "no kill landed inside a write: the repair path went untested"
        assert_consistent(table)

        # Fully usable: fill to capacity, refuse beyond, then empty it.
        n = pool
        while True:
            key = make_key(n)
            n += 1
            try:
                table.insert(key, transceiver_for(key, 0), created_for(key))
            except TableFull as exc:
                if "capacity reached" in str(exc):
                    break
        assert table.live_count() == capacity
        assert_consistent(table)
        for route in list(table.routes()):
            assert table.remove(route.slot, route.version)
        assert table.live_count() == 0
        assert_consistent(table)
    finally:
        stop.set()
        survivor.join(timeout=5)
        table.close()
        table.unlink()


def per_call_ns(function, arguments: list) -> float:
    started = time.perf_counter()
    for argument in arguments:
        function(argument)
    return (time.perf_counter() - started) / len(arguments) * 1e9


def test_report_operation_costs():
    """Prints what each operation costs on this machine (nothing is asserted on speed)."""
    table = RoutingTable.create(1_000_000)
    try:
        count = 50_000
        keys = [make_key(n) for n in range(count)]
        started = time.perf_counter()
        slots = [table.insert(key, 1, BASE_MS) for key in keys]
        insert_ns = (time.perf_counter() - started) / count * 1e9
        misses = [make_key(n) for n in range(count, count + 10_000)]
        sample = keys[:10_000]
        seq_indexes = [table.seq_index(slot) for slot in slots[:10_000]]
        words = table.words
        costs = {
            "insert (new route)": insert_ns,
            "find hit": per_call_ns(table.find, sample),
            "find miss": per_call_ns(table.find, misses),
            "read": per_call_ns(table.read, slots[:10_000]),
            "version read words[i]": per_call_ns(words.__getitem__, seq_indexes),
            "touch": per_call_ns(lambda slot: table.touch(slot, BASE_MS), slots[:10_000]),
        }
        started = time.perf_counter()
        table.expire(BASE_MS - 1, idle_ms=0)
        scan_ms = (time.perf_counter() - started) * 1e3
        print(f"\nrouting table, capacity 1_000_000 ({table.memory_bytes:,} bytes), {count} live:")
        for name, ns in costs.items():
            print(f"  {name:24s} {ns / 1000:8.2f} us")
        print(f"  {'expire scan (no match)':24s} {scan_ms:8.1f} ms")
        assert table.live_count() == count
    finally:
        table.close()
        table.unlink()
