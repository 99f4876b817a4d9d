"""Routing table semantics, crash repair and cross-process attachment (fast tests)."""

from __future__ import annotations

import ipaddress
import os
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from voxrelay.engine import _atomics, routing
from voxrelay.engine.routing import (
    CLAIMED,
    DELETED,
    EMPTY,
    HEADER_SIZE,
    LIVE,
    SLOT_CREATED,
    SLOT_KEY,
    SLOT_LAST_SEEN,
    SLOT_SEQ,
    SLOT_SIZE,
    SLOT_TAG,
    SLOT_TRANSCEIVER,
    Route,
    RoutingTable,
    SlotBusy,
    TableError,
    TableFull,
)

NOW = 1_700_000_000_000


def ipv4_key(address: str, port: int) -> bytes:
    """A v1 relay header for an IPv4 client (IPv4-mapped IPv6 address)."""
    mapped = b"\x00" * 10 + b"\xff\xff" + ipaddress.IPv4Address(address).packed
    return bytes([1, 4]) + port.to_bytes(2, "big") + bytes(4) + mapped


def ipv6_key(address: str, port: int) -> bytes:
    """A v1 relay header for an IPv6 client."""
    packed = ipaddress.IPv6Address(address).packed
    return bytes([1, 6]) + port.to_bytes(2, "big") + bytes(4) + packed


def numbered_key(n: int) -> bytes:
    return ipv4_key(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 40000 + n % 20000)


@pytest.fixture
def make_table() -> Iterator:
    created: list[RoutingTable] = []

    def make(capacity: int) -> RoutingTable:
        table = RoutingTable.create(capacity)
        created.append(table)
        return table

    yield make
    for table in created:
        table.close()
        table.unlink()


@pytest.fixture
def table(make_table) -> RoutingTable:
    return make_table(100)


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def slot_words(table: RoutingTable, slot: int) -> dict[str, int]:
    base = table.slot_offset(slot) // 8
    words = table.words
    return {
        "seq": words[base + SLOT_SEQ // 8],
        "tag": words[base + SLOT_TAG // 8],
        "transceiver": words[base + SLOT_TRANSCEIVER // 8],
    }


def plant(
    table: RoutingTable,
    slot: int,
    *,
    tag: int,
    seq: int,
    key: bytes | None = None,
    transceiver: int = 0,
) -> None:
    """Write a slot's raw words, as a writer interrupted at some point would leave them."""
    offset = table.slot_offset(slot)
    if key is not None:
        table.buffer[offset + SLOT_KEY : offset + SLOT_KEY + 24] = key
    words = table.words
    words[(offset + SLOT_TRANSCEIVER) // 8] = transceiver
    words[(offset + SLOT_LAST_SEEN) // 8] = NOW
    words[(offset + SLOT_CREATED) // 8] = NOW
    words[(offset + SLOT_SEQ) // 8] = seq
    words[(offset + SLOT_TAG) // 8] = tag


def reserve_room(table: RoutingTable) -> None:
    """Bump the live counter as an insert does before it starts writing its slot."""
    _atomics.fetch_add(table.base_address + routing._H_LIVE, routing._LIVE_ADD)


def held_by(state: int, pid: int) -> int:
    return state | pid << routing.OWNER_SHIFT


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_quiescent(table: RoutingTable) -> None:
    """Every seq even, no slot held, live counter equal to the LIVE slots."""
    tags = table.words[routing._FIRST_TAG_WORD :: 8].tolist()
    seqs = table.words[routing._FIRST_SEQ_WORD :: 8].tolist()
    assert all(seq % 2 == 0 for seq in seqs)
    assert all(tag >> routing.OWNER_SHIFT == 0 for tag in tags)
    assert table.live_count() == tags.count(LIVE)


# --- layout ----------------------------------------------------------------------------


def test_layout_constants_follow_the_internals_contract():
    assert (routing.SLOT_SIZE, routing.HEADER_SIZE) == (64, 4096)
    offsets = (SLOT_SEQ, SLOT_TAG, SLOT_KEY, SLOT_TRANSCEIVER, SLOT_LAST_SEEN, SLOT_CREATED)
    assert offsets == (0, 8, 16, 40, 48, 56)
    assert (EMPTY, CLAIMED, LIVE, DELETED) == (0, 1, 2, 3)


def test_geometry_uses_a_075_load_factor(make_table):
    table = make_table(1000)
    assert table.slot_count == 1334
    assert table.memory_bytes == HEADER_SIZE + 1334 * SLOT_SIZE
    assert len(table.buffer) >= table.memory_bytes
    assert table.slot_offset(0) == HEADER_SIZE
    assert table.slot_offset(5) == HEADER_SIZE + 5 * SLOT_SIZE
    assert table.seq_index(5) == table.slot_offset(5) // 8


def test_a_million_routes_fit_well_under_100_mb(make_table):
    table = make_table(1_000_000)
    print(f"capacity 1_000_000 -> {table.slot_count} slots, {table.memory_bytes:,} bytes")
    assert table.memory_bytes == routing.segment_size(1_000_000)
    assert table.memory_bytes < 90 * 1024 * 1024
    assert table.find(numbered_key(1)) == -1


def test_slot_out_of_range_is_a_value_error(table):
    with pytest.raises(ValueError, match="out of range"):
        table.read(table.slot_count)
    with pytest.raises(ValueError, match="out of range"):
        table.touch(-1, NOW)


def test_bad_arguments_are_rejected(table):
    with pytest.raises(ValueError, match="24 bytes"):
        table.insert(b"short", 1, NOW)
    with pytest.raises(ValueError, match="24 bytes"):
        table.find(bytes(25))
    with pytest.raises(ValueError, match="16 bits"):
        table.insert(numbered_key(1), 70000, NOW)
    with pytest.raises(ValueError, match="capacity"):
        RoutingTable.create(0)


# --- insert / find / read / touch / remove -----------------------------------------------


def test_insert_then_find_and_read_ipv4_route(table):
    key = ipv4_key("192.0.2.7", 50000)
    slot = table.insert(key, 17, NOW)
    assert table.find(key) == slot
    route = table.read(slot)
    assert route == Route(slot, key, 17, NOW, NOW, route.version)
    assert route.version % 2 == 0 and route.version > 0
    assert table.words[table.seq_index(slot)] == route.version
    assert bytes(table.key_view(slot)) == key
    assert table.live_count() == 1


def test_ipv4_and_ipv6_clients_are_distinct_routes(table):
    v4 = ipv4_key("198.51.100.1", 3478)
    v6 = ipv6_key("2001:db8::1", 3478)
    same_port_other_ip = ipv6_key("2001:db8::2", 3478)
    slots = [table.insert(key, n, NOW) for n, key in enumerate((v4, v6, same_port_other_ip))]
    assert len(set(slots)) == 3
    assert [table.read(table.find(k)).transceiver_id for k in (v4, v6, same_port_other_ip)] == [
        0,
        1,
        2,
    ]


def test_find_misses_unknown_key(table):
    table.insert(numbered_key(1), 1, NOW)
    assert table.find(numbered_key(2)) == -1


def test_insert_existing_key_repoints_it_and_bumps_version(table):
    key = ipv4_key("203.0.113.9", 9000)
    slot = table.insert(key, 1, NOW)
    before = table.read(slot)
    assert table.insert(key, 2, NOW + 5) == slot
    after = table.read(slot)
    assert after.transceiver_id == 2
    assert after.version > before.version
    assert (after.created_ms, after.last_seen_ms) == (NOW, NOW + 5)
    assert table.live_count() == 1


def test_insert_existing_key_with_same_transceiver_keeps_version(table):
    key = numbered_key(3)
    slot = table.insert(key, 4, NOW)
    version = table.read(slot).version
    assert table.insert(key, 4, NOW + 9) == slot
    assert table.read(slot).version == version
    assert table.read(slot).last_seen_ms == NOW + 9


def test_touch_sets_last_seen_without_version_bump(table):
    slot = table.insert(numbered_key(1), 1, NOW)
    version = table.read(slot).version
    table.touch(slot, NOW + 1234)
    route = table.read(slot)
    assert (route.last_seen_ms, route.version, route.created_ms) == (NOW + 1234, version, NOW)


def test_remove_invalidates_version_and_frees_room(table):
    key = numbered_key(1)
    slot = table.insert(key, 1, NOW)
    version = table.read(slot).version
    assert table.remove(slot, version) is True
    assert table.words[table.seq_index(slot)] != version
    assert table.read(slot) is None
    assert table.find(key) == -1
    assert table.live_count() == 0
    assert table.remove(slot) is False


def test_remove_with_stale_version_is_refused(table):
    key = numbered_key(1)
    slot = table.insert(key, 1, NOW)
    stale = table.read(slot).version
    table.insert(key, 2, NOW)
    assert table.remove(slot, stale) is False
    assert table.find(key) == slot
    assert table.remove(slot, table.read(slot).version) is True


def test_expire_removes_only_idle_routes_and_returns_them(table):
    idle = table.insert(numbered_key(1), 1, NOW)
    busy = table.insert(numbered_key(2), 2, NOW)
    fresh = table.insert(numbered_key(3), 3, NOW + 25_000)
    table.touch(busy, NOW + 29_000)
    expired = table.expire(NOW + 30_000, idle_ms=30_000)
    assert [(r.slot, r.key, r.transceiver_id) for r in expired] == [(idle, numbered_key(1), 1)]
    assert table.find(numbered_key(1)) == -1
    assert {r.slot for r in table.routes()} == {busy, fresh}
    assert table.live_count() == 2
    assert table.expire(NOW + 30_000, idle_ms=30_000) == []


def test_routes_lists_every_live_route(table):
    keys = [numbered_key(n) for n in range(20)]
    for n, key in enumerate(keys):
        table.insert(key, n, NOW)
    table.remove(table.find(keys[5]))
    listed = {r.key: r.transceiver_id for r in table.routes()}
    assert listed == {key: n for n, key in enumerate(keys) if n != 5}


# --- capacity, probing, tombstones -------------------------------------------------------


def test_full_table_refuses_new_routes_and_never_evicts(make_table):
    table = make_table(8)
    keys = [numbered_key(n) for n in range(8)]
    slots = [table.insert(key, n, NOW) for n, key in enumerate(keys)]
    with pytest.raises(TableFull, match="8/8 live"):
        table.insert(numbered_key(99), 1, NOW)
    assert table.refused_count == 1
    assert table.live_count() == 8
    assert [table.find(key) for key in keys] == slots
    # An existing route may still be re-pointed when full.
    assert table.insert(keys[0], 42, NOW) == slots[0]
    table.remove(slots[3])
    assert table.insert(numbered_key(99), 1, NOW) >= 0
    assert table.live_count() == 8


def keys_sharing_a_home(table: RoutingTable, count: int) -> list[bytes]:
    by_home: dict[int, list[bytes]] = {}
    n = 0
    while True:
        key = ipv6_key(f"2001:db8::{n >> 16:x}:{n & 0xFFFF:x}", 1 + n % 60000)
        group = by_home.setdefault(table.home_slot(key), [])
        group.append(key)
        if len(group) == count:
            return group
        n += 1


def test_probe_chain_longer_than_max_probe_counts_as_full(make_table):
    table = make_table(1000)
    keys = keys_sharing_a_home(table, routing.MAX_PROBE + 1)
    slots = [table.insert(key, 1, NOW) for key in keys[:-1]]
    assert len(set(slots)) == routing.MAX_PROBE
    with pytest.raises(TableFull, match="64 probes"):
        table.insert(keys[-1], 1, NOW)
    assert table.refused_count == 1
    assert [table.find(key) for key in keys[:-1]] == slots


def test_tombstone_is_reused_and_lookups_probe_past_it(make_table):
    table = make_table(1000)
    first, second, third, newcomer = keys_sharing_a_home(table, 4)
    home = table.home_slot(first)
    slots = [table.insert(key, n, NOW) for n, key in enumerate((first, second, third))]
    assert slots == [home, (home + 1) % table.slot_count, (home + 2) % table.slot_count]
    table.remove(slots[1])
    assert slot_words(table, slots[1])["tag"] == DELETED
    assert table.find(third) == slots[2]  # a tombstone does not end the chain
    assert table.insert(third, 7, NOW) == slots[2]  # existing key found past the tombstone
    assert table.insert(newcomer, 9, NOW) == slots[1]
    assert table.read(slots[1]).key == newcomer


# --- cross-process -----------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_attach_from_another_process_shares_the_data(table):
    key = ipv4_key("192.0.2.1", 1000)
    table.insert(key, 321, NOW)
    result = run_python(
        f"""
        from voxrelay.engine.routing import RoutingTable
        table = RoutingTable.attach({table.name!r})
        route = table.read(table.find({key!r}))
        print(route.transceiver_id, table.capacity)
        table.insert(bytes(range(24)), 77, 5)
        table.close()
        """
    )
    assert result.stdout.split() == ["321", "100"]
    route = table.read(table.find(bytes(range(24))))
    assert (route.transceiver_id, route.created_ms) == (77, 5)
    assert table.live_count() == 2


def segment_exists(name: str) -> bool:
    try:
        probe = SharedMemory(name=name)
    except FileNotFoundError:
        return False
    # Balance the registration SharedMemory made in this (creating) process.
    probe.close()
    return True


def test_child_that_attaches_and_exits_does_not_unlink_the_table(table):
    table.insert(numbered_key(1), 5, NOW)
    result = run_python(
        f"""
        from multiprocessing import resource_tracker
        from voxrelay.engine.routing import RoutingTable
        table = RoutingTable.attach({table.name!r})
        print(table.live_count(), resource_tracker._resource_tracker._pid)
        """
    )
    # No resource tracker was even started in the child, so nothing can unlink at exit.
    assert result.stdout.split() == ["1", "None"]
    time.sleep(0.3)
    assert segment_exists(table.name)
    assert RoutingTable.attach(table.name).live_count() == 1


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="track=False fixed it in 3.13")
def test_control_plain_shared_memory_attach_would_unlink_at_child_exit():
    """Shows the failure the test above guards against (CPython gh-82300)."""
    victim = SharedMemory(create=True, size=4096)
    try:
        run_python(
            f"""
            from multiprocessing.shared_memory import SharedMemory
            SharedMemory(name={victim.name!r}).close()
            """
        )
        deadline = time.monotonic() + 5
        while segment_exists(victim.name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not segment_exists(victim.name)
    finally:
        victim.close()
        try:
            victim.unlink()
        except FileNotFoundError:
            from multiprocessing import resource_tracker

            resource_tracker.unregister(victim._name, "shared_memory")


def test_unlink_through_an_attachment_destroys_the_segment(make_table):
    creator = RoutingTable.create(10)
    attached = RoutingTable.attach(creator.name)
    attached.unlink()
    assert not segment_exists(creator.name)
    assert creator.insert(numbered_key(1), 1, NOW) >= 0  # existing mappings stay valid
    attached.close()
    creator.close()


def test_pickled_table_reattaches_by_name(table):
    table.insert(numbered_key(1), 9, NOW)
    with pickle.loads(pickle.dumps(table)) as copy:
        assert copy.name == table.name
        assert copy.read(copy.find(numbered_key(1))).transceiver_id == 9


def test_attach_validates_the_header(table):
    other = SharedMemory(create=True, size=8192)
    try:
        with pytest.raises(TableError, match="not a voxrelay routing table"):
            RoutingTable.attach(other.name)
        other.buf[:8] = routing.MAGIC
        other.buf[8:16] = (99).to_bytes(8, sys.byteorder)
        with pytest.raises(TableError, match="layout version 99"):
            RoutingTable.attach(other.name)
    finally:
        other.close()
        other.unlink()
    tiny = SharedMemory(create=True, size=100)
    try:
        with pytest.raises(TableError, match="100 bytes, not a routing table"):
            RoutingTable.attach(tiny.name)
    finally:
        tiny.close()
        tiny.unlink()
    # A header claiming more slots than the segment holds.
    table.words[routing._H_CAPACITY // 8] = 1000
    table.words[routing._H_SLOT_COUNT // 8] = 1334
    with pytest.raises(TableError, match="truncated"):
        RoutingTable.attach(table.name)
    table.words[routing._H_SLOT_COUNT // 8] = 7
    with pytest.raises(TableError, match="inconsistent geometry"):
        RoutingTable.attach(table.name)
    table.words[routing._H_CAPACITY // 8] = 100
    table.words[routing._H_SLOT_COUNT // 8] = 134


def test_attach_to_a_missing_table_is_a_table_error():
    with pytest.raises(TableError, match="no routing table named"):
        RoutingTable.attach("voxrelay-routes-does-not-exist")


def test_create_refuses_an_existing_name(table):
    with pytest.raises(TableError, match="already exists"):
        RoutingTable.create(10, name=table.name)


def test_close_with_a_live_key_view_says_what_to_do(table):
    slot = table.insert(numbered_key(1), 1, NOW)
    view = table.key_view(slot)
    with pytest.raises(TableError, match="release them first"):
        table.close()
    view.release()
    table.close()


# --- crash repair --------------------------------------------------------------------------


def test_insert_left_claimed_by_dead_writer_blocks_nobody(table, dead_pid):
    key = ipv4_key("192.0.2.50", 6000)
    home = table.home_slot(key)
    torn = key[:12] + b"\xee" * 12
    plant(table, home, tag=held_by(CLAIMED, dead_pid), seq=1, key=torn, transceiver=9)
    reserve_room(table)  # an odd seq means the dead insert had reserved room

    started = time.monotonic()
    assert table.read(home) is None
    assert table.find(key) == -1
    assert table.find(torn) == -1
    slot = table.insert(key, 3, NOW)
    assert slot == (home + 1) % table.slot_count
    assert table.find(key) == slot
    assert table.read(slot).transceiver_id == 3
    assert time.monotonic() - started < 0.5

    assert table.reclaim(is_alive) == 1
    assert slot_words(table, home) == {"seq": 2, "tag": DELETED, "transceiver": 9}
    assert table.find(key) == slot  # the tombstone keeps the chain intact
    assert table.reclaimed_count == 1
    assert_quiescent(table)
    assert table.live_count() == 1


def test_insert_claimed_before_reserving_is_reclaimed_without_leak(table, dead_pid):
    plant(table, 10, tag=held_by(CLAIMED, dead_pid), seq=0)
    reserve_room(table)  # died between the reservation and the odd seq: ambiguous
    assert table.reclaim(is_alive) == 1
    assert slot_words(table, 10)["tag"] == DELETED
    assert_quiescent(table)
    assert table.live_count() == 0


def test_interrupted_repoint_or_removal_keeps_the_route(table, dead_pid):
    key = numbered_key(7)
    slot = table.insert(key, 4, NOW)
    version = table.read(slot).version
    plant(table, slot, tag=held_by(LIVE, dead_pid), seq=version + 1, key=key, transceiver=4)

    started = time.monotonic()
    assert table.read(slot) is None  # a writer is (was) inside: no snapshot, no hang
    assert table.find(key) == slot  # the key of a LIVE slot is stable
    assert table.insert(key, 4, NOW) == slot  # same transceiver: nothing to rewrite
    with pytest.raises(SlotBusy, match="died holding it"):
        table.remove(slot)
    with pytest.raises(SlotBusy):
        table.insert(key, 5, NOW)
    assert table.expire(NOW + 10**9, idle_ms=1) == []
    assert time.monotonic() - started < 0.5

    assert table.reclaim(is_alive) == 1
    route = table.read(slot)
    assert (route.key, route.transceiver_id, route.version) == (key, 4, version + 2)
    assert_quiescent(table)
    assert table.remove(slot, route.version) is True


def test_removal_interrupted_after_marking_deleted_is_completed(table, dead_pid):
    key = numbered_key(8)
    slot = table.insert(key, 4, NOW)
    version = table.read(slot).version
    plant(table, slot, tag=held_by(DELETED, dead_pid), seq=version + 1, key=key, transceiver=4)
    assert table.find(key) == -1
    assert table.reclaim(is_alive) == 1
    assert table.live_count() == 0
    assert slot_words(table, slot)["tag"] == DELETED
    assert_quiescent(table)


def test_duplicate_left_by_dead_inserter_is_settled(make_table, dead_pid):
    table = make_table(1000)
    key, neighbour = keys_sharing_a_home(table, 2)
    home = table.home_slot(key)
    table.insert(neighbour, 1, NOW)  # takes the home slot
    canonical = table.insert(key, 2, NOW)  # home + 1
    later = (canonical + 1) % table.slot_count
    # A rival inserter published a second copy and died before settling it.
    plant(table, later, tag=held_by(LIVE, dead_pid), seq=2, key=key, transceiver=3)
    reserve_room(table)
    assert table.find(key) == canonical  # the first copy in probe order, always
    assert home != canonical
    assert table.reclaim(is_alive) == 1
    assert table.read(later) is None
    assert [r.slot for r in table.routes() if r.key == key] == [canonical]
    assert table.live_count() == 2
    assert_quiescent(table)


def test_reclaim_leaves_slots_of_live_writers_alone(table):
    me = os.getpid()
    plant(table, 20, tag=held_by(CLAIMED, me), seq=1)
    reserve_room(table)
    assert table.reclaim(is_alive) == 0
    assert slot_words(table, 20)["tag"] == held_by(CLAIMED, me)
    assert table.live_count() == 1  # the live writer's reservation is not recounted away


def test_reclaim_recounts_a_reservation_lost_at_death(table):
    for n in range(5):
        table.insert(numbered_key(n), n, NOW)
    reserve_room(table)  # a writer died between fetch_add and claiming anything visible
    assert table.live_count() == 6
    assert table.reclaim(is_alive) == 0
    assert table.live_count() == 5


# --- model-based -------------------------------------------------------------------------

POOL = [numbered_key(n) for n in range(6)] + [ipv6_key(f"2001:db8::{n}", 443) for n in range(6)]


class RoutingTableMachine(RuleBasedStateMachine):
    """The table behaves like a dict of key -> (transceiver, last seen, created)."""

    CAPACITY = 7

    @initialize()
    def setup(self) -> None:
        self.table = RoutingTable.create(self.CAPACITY)
        self.model: dict[bytes, tuple[int, int, int]] = {}
        self.now = NOW
        self.refused = 0

    def teardown(self) -> None:
        if hasattr(self, "table"):
            self.table.close()
            self.table.unlink()

    @rule(key=st.sampled_from(POOL), transceiver=st.integers(0, 3), dt=st.integers(0, 50))
    def insert(self, key: bytes, transceiver: int, dt: int) -> None:
        self.now += dt
        if key not in self.model and len(self.model) == self.CAPACITY:
            with pytest.raises(TableFull):
                self.table.insert(key, transceiver, self.now)
            self.refused += 1
            return
        before = self.table.read(self.table.find(key)) if key in self.model else None
        slot = self.table.insert(key, transceiver, self.now)
        created = self.model[key][2] if key in self.model else self.now
        self.model[key] = (transceiver, self.now, created)
        route = self.table.read(slot)
        assert route.key == key
        if before is not None:
            assert slot == before.slot
            moved = before.transceiver_id != transceiver
            assert (route.version != before.version) == moved

    @rule(key=st.sampled_from(POOL))
    def remove(self, key: bytes) -> None:
        slot = self.table.find(key)
        if key not in self.model:
            assert slot == -1
            return
        assert self.table.remove(slot, self.table.read(slot).version)
        assert self.table.remove(slot) is False
        del self.model[key]

    @rule(key=st.sampled_from(POOL), dt=st.integers(0, 100))
    def touch(self, key: bytes, dt: int) -> None:
        slot = self.table.find(key)
        if key in self.model:
            self.now += dt
            self.table.touch(slot, self.now)
            transceiver, _, created = self.model[key]
            self.model[key] = (transceiver, self.now, created)

    @rule(idle=st.integers(0, 300), dt=st.integers(0, 300))
    def expire(self, idle: int, dt: int) -> None:
        self.now += dt
        expired = self.table.expire(self.now, idle)
        expected = {k for k, (_, seen, _) in self.model.items() if seen <= self.now - idle}
        assert {r.key for r in expired} == expected
        for route in expired:
            assert route.last_seen_ms == self.model.pop(route.key)[1]

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "table"):
            return
        listed = {
            r.key: (r.transceiver_id, r.last_seen_ms, r.created_ms) for r in self.table.routes()
        }
        assert listed == self.model
        for key in POOL:
            assert (self.table.find(key) >= 0) == (key in self.model)
        assert self.table.live_count() == len(self.model)
        assert self.table.refused_count == self.refused
        assert_quiescent(self.table)


RoutingTableMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_routing_table_matches_a_dict_model = RoutingTableMachine.TestCase
