"""Lock-free routing table in shared memory: client route key -> transceiver id.

Every relay worker process maps a client (its 24-byte relay header, the *route key*) to the
transceiver that owns its session. The table lives in one stdlib ``SharedMemory`` segment
that the supervisor creates before any worker starts and that outlives every worker. No
lock is ever taken, so a worker killed at any instant can block nobody; the supervisor's
``reclaim(is_alive)`` repairs whatever such a worker left half done. The layout is
normative (docs/internals.md) because the relay hot loop reads slots directly: it points an
iovec at a slot's key bytes and validates a cached ``(slot, version)`` with one read of
``words[seq_index(slot)]``.

Design rules, in the order the code relies on them:

* **Slots.** A 4 KiB header, then ``slot_count = ceil(capacity / 0.75)`` slots of 64 bytes:
  ``seq`` (seqlock, odd while a writer is inside), ``tag`` (low 8 bits the state EMPTY,
  CLAIMED, LIVE or DELETED; high bits the pid of the writer holding the slot, 0 when
  nobody does), key, transceiver id, last seen and created (unix ms).
* **Ownership.** Every change of a slot happens while one writer *holds* it: the writer
  CASes the tag from an exact unheld value (EMPTY or DELETED to ``CLAIMED|pid<<8`` to
  insert, ``LIVE`` to ``LIVE|pid<<8`` to re-point or remove), makes ``seq`` odd, writes
  the fields and the new state with plain stores, makes ``seq`` even again (release
  store), then stores the unheld tag. The pid in the tag is how ``reclaim`` finds slots
  held by dead processes; docs/internals.md names it for CLAIMED, and re-pointing and
  removal use it the same way on LIVE slots.
* **Readers** never write. ``read`` is a seqlock read (retry while ``seq`` is odd or moved)
  that gives up after a bounded wait (at once if the holder is dead) and returns None, so a
  dead writer cannot hang a reader. A key's bytes change only while its slot is CLAIMED,
  so ``find`` compares keys of LIVE slots even while a re-point or removal holds them.
* **Probing** is linear from ``(crc32(key) * slot_count) >> 32`` over at most
  ``MAX_PROBE`` (64) slots; a lookup stops at the first EMPTY slot (a slot never becomes
  EMPTY again) and skips CLAIMED and DELETED ones. An insert uses the first unheld
  tombstone of the chain (the whole chain has then proved the key absent), else the
  terminating EMPTY slot; a chain with neither within ``MAX_PROBE`` slots counts as full.
* **Capacity.** The live counter is one header word changed only with ``fetch_add`` by a
  writer that holds a slot: an insert reserves (+1) after claiming its slot and rolls back
  if that overshoots ``capacity``, so the number of LIVE slots never exceeds capacity. The
  word packs the count (low 32 bits) with a change counter (high 32 bits) so that
  ``reclaim`` can recount it exactly without a lock (see ``_resync_live_count``).
* **Same key, two writers.** A CLAIMED slot hides its key, so two processes inserting the
  same key at the same moment can both publish it: a *benign duplicate*. After publishing,
  an insert re-scans the key's chain (after a full fence, so of two racing inserts at least
  the later one sees the other) and keeps only the first LIVE copy in probe order: it
  withdraws its own copy if an earlier one exists, and removes later ones otherwise.
  ``find`` always returns the first LIVE copy in probe order, so it is deterministic even
  in the instant before that settles. An insert that returned the later copy sees it
  disappear like any removed route: its version changes.
* **Deletion** bumps ``seq`` (every cached version of the slot becomes invalid) and leaves
  a DELETED tombstone, which later inserts reuse; nothing ever moves a live route.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from voxrelay.engine import _atomics

__all__ = [
    "CLAIMED",
    "DELETED",
    "EMPTY",
    "HEADER_SIZE",
    "KEY_SIZE",
    "LAYOUT_VERSION",
    "LIVE",
    "MAGIC",
    "MAX_PROBE",
    "SLOT_CREATED",
    "SLOT_KEY",
    "SLOT_LAST_SEEN",
    "SLOT_SEQ",
    "SLOT_SIZE",
    "SLOT_TAG",
    "SLOT_TRANSCEIVER",
    "Route",
    "RoutingTable",
    "SlotBusy",
    "TableError",
    "TableFull",
    "segment_size",
    "slot_count_for",
]

# --- Layout (normative, docs/internals.md) ---------------------------------------------
SLOT_SIZE = 64
HEADER_SIZE = 4096
SLOT_SEQ = 0
SLOT_TAG = 8
SLOT_KEY = 16
SLOT_TRANSCEIVER = 40
SLOT_LAST_SEEN = 48
SLOT_CREATED = 56
KEY_SIZE = 24
EMPTY, CLAIMED, LIVE, DELETED = 0, 1, 2, 3

STATE_MASK = 0xFF
OWNER_SHIFT = 8
MAX_PROBE = 64
MAGIC = b"VOXRTBL1"
LAYOUT_VERSION = 1
MAX_CAPACITY = (1 << 31) - 1  # the live count shares a word with a 32-bit change counter

# Header words (byte offsets). The two counters written by every worker get a cache line
# each so that bumping them does not invalidate the read-mostly geometry words.
_H_MAGIC = 0
_H_LAYOUT_VERSION = 8
_H_HEADER_SIZE = 16
_H_SLOT_SIZE = 24
_H_SLOT_COUNT = 32
_H_CAPACITY = 40
_H_MAX_PROBE = 48
_H_CREATED_MS = 56
_H_LIVE = 64
_H_REFUSED = 128
_H_RECLAIMED = 192

_MASK32 = 0xFFFF_FFFF
_LIVE_ADD = (1 << 32) + 1  # count + 1, change counter + 1
_LIVE_SUB = (1 << 32) - 1  # count - 1, change counter + 1 (count is never 0 when used)
_MAGIC_WORD = int.from_bytes(MAGIC, sys.byteorder)
# The state is the low byte of the native-endian tag word.
_STATE_BYTE = SLOT_TAG if sys.byteorder == "little" else SLOT_TAG + 7
_FIRST_SEQ_WORD = (HEADER_SIZE + SLOT_SEQ) // 8
_FIRST_TAG_WORD = (HEADER_SIZE + SLOT_TAG) // 8
_FIRST_LAST_SEEN_WORD = (HEADER_SIZE + SLOT_LAST_SEEN) // 8
_WORDS_PER_SLOT = SLOT_SIZE // 8
_LIVE_BYTE = bytes((LIVE,))  # what expire() looks for in the state bytes
_BODY = struct.Struct("=24sQQQ")  # key, transceiver, last seen, created (offset SLOT_KEY)
_REPOINT = struct.Struct("=QQ")  # transceiver, last seen (offset SLOT_TRANSCEIVER)

# Waiting on a slot another process holds: spin a little (a healthy holder is done in
# microseconds), then yield the CPU until the deadline. A dead holder ends the wait at
# once. The deadline only matters when a live holder is descheduled for long.
_SPINS_BEFORE_YIELD = 32
_STALL_TIMEOUT_S = 0.010
_INSERT_ATTEMPTS = 64
_RESYNC_ATTEMPTS = 5

_load = _atomics.load
_store = _atomics.store
_cas = _atomics.cas
_fetch_add = _atomics.fetch_add
_fence = _atomics.fence
_sched_yield: Callable[[], Any] = getattr(os, "sched_yield", lambda: time.sleep(0))


class TableError(Exception):
    """The segment is not a usable routing table, or an operation cannot proceed."""


class TableFull(TableError):
    """A new route was refused: live routes are never evicted to make room."""


class SlotBusy(TableFull):
    """Another process holds the slot for too long (or died holding it).

    A TableFull because the caller's answer is the same: the route could not be
    installed or changed right now, so drop the packet and let the client retry (a STUN
    retransmission). It is not counted as refused; ``reclaim`` frees dead holders.
    """


@dataclass(frozen=True, slots=True)
class Route:
    """A consistent snapshot of one LIVE slot; ``version`` is its (even) seq word."""

    slot: int
    key: bytes
    transceiver_id: int
    last_seen_ms: int
    created_ms: int
    version: int


def slot_count_for(capacity: int) -> int:
    """Slots needed for ``capacity`` live routes at a 0.75 load factor."""
    return -(-capacity * 4 // 3)


def segment_size(capacity: int) -> int:
    """Bytes of shared memory a table of ``capacity`` routes uses."""
    return HEADER_SIZE + slot_count_for(capacity) * SLOT_SIZE


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Backoff:
    """Bounded wait for another process to release a slot."""

    __slots__ = ("_deadline", "_spins")

    def __init__(self) -> None:
        self._spins = 0
        self._deadline = 0.0

    def wait(self, holder_pid: int) -> bool:
        """Pause briefly; False once waiting for ``holder_pid`` is pointless."""
        self._spins += 1
        if self._spins <= _SPINS_BEFORE_YIELD:
            return True
        if self._spins == _SPINS_BEFORE_YIELD + 1:
            if holder_pid and not _pid_exists(holder_pid):
                return False
            self._deadline = time.monotonic() + _STALL_TIMEOUT_S
        elif time.monotonic() > self._deadline:
            return False
        _sched_yield()
        return True


_TRACKER_PATCH_LOCK = threading.Lock()


def _open_untracked(name: str) -> SharedMemory:
    """Attach to segment ``name`` without registering it with the resource tracker.

    On Python < 3.13 ``SharedMemory(name)`` registers even an attached segment with the
    process's resource tracker, which unlinks it when the process exits: a worker's exit
    would destroy the table (CPython gh-82300). Unregistering afterwards is not safe
    either: a forked worker shares its parent's tracker, so it would drop the creator's
    registration and make the creator's own unlink() print a KeyError from the tracker.
    So the registration of this one name is skipped instead (``track=False`` on 3.13+).
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    wanted = name.lstrip("/")
    with _TRACKER_PATCH_LOCK:
        original = resource_tracker.register

        def register(resource_name: str, rtype: str) -> None:
            if rtype == "shared_memory" and resource_name.lstrip("/") == wanted:
                return
            original(resource_name, rtype)

        resource_tracker.register = register
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = original


class RoutingTable:
    """Route key -> transceiver id map shared by every relay worker; see module docstring.

    Build one with :meth:`create` (the supervisor) or :meth:`attach` (workers).
    """

    def __init__(self, shm: SharedMemory, *, tracked: bool) -> None:
        """Wrap an opened segment; use :meth:`create` or :meth:`attach` instead."""
        self._shm: SharedMemory | None = shm
        self._tracked = tracked
        self.name: str = shm.name
        self.buffer: memoryview = shm.buf
        self.words: memoryview = shm.buf.cast("Q")
        self.base_address: int = _atomics.address(shm.buf)
        self.slot_count = 0
        self.capacity = 0
        self.memory_bytes = 0
        self._probe_limit = 0
        self._live_addr = self.base_address + _H_LIVE
        self._refused_addr = self.base_address + _H_REFUSED
        self._reclaimed_addr = self.base_address + _H_RECLAIMED

    # --- construction ------------------------------------------------------------------

    @classmethod
    def create(cls, capacity: int, name: str | None = None) -> RoutingTable:
        """Create a zeroed table for ``capacity`` live routes (the supervisor does this)."""
        if not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be an int in 1..{MAX_CAPACITY}, got {capacity!r}")
        if name is None:
            name = f"voxrelay-routes-{secrets.token_hex(6)}"
        slot_count = slot_count_for(capacity)
        try:
            shm = SharedMemory(name=name, create=True, size=segment_size(capacity))
        except FileExistsError as exc:
            raise TableError(
                f"a shared memory segment named {name!r} already exists; unlink it "
                "(a previous supervisor may have crashed) or choose another name"
            ) from exc
        table = cls(shm, tracked=True)
        words = table.words
        words[_H_LAYOUT_VERSION // 8] = LAYOUT_VERSION
        words[_H_HEADER_SIZE // 8] = HEADER_SIZE
        words[_H_SLOT_SIZE // 8] = SLOT_SIZE
        words[_H_SLOT_COUNT // 8] = slot_count
        words[_H_CAPACITY // 8] = capacity
        words[_H_MAX_PROBE // 8] = MAX_PROBE
        words[_H_CREATED_MS // 8] = time.time_ns() // 1_000_000
        # The magic goes last with a release store: a segment with the magic is complete.
        _store(table.base_address + _H_MAGIC, _MAGIC_WORD)
        table._adopt_geometry()
        return table

    @classmethod
    def attach(cls, name: str) -> RoutingTable:
        """Attach to the table the supervisor created; validates magic, version and size.

        The attachment is not registered with the resource tracker, so this process's
        exit never unlinks the segment.
        """
        try:
            shm = _open_untracked(name)
        except FileNotFoundError as exc:
            raise TableError(
                f"no routing table named {name!r}: is the supervisor running, and is this "
                "the name it printed?"
            ) from exc
        except ValueError as exc:  # mmap of an empty segment
            raise TableError(f"shared memory segment {name!r} is empty: {exc}") from exc
        size = shm.size
        if size < HEADER_SIZE or size % 8:
            shm.close()
            raise TableError(
                f"shared memory segment {name!r} has {size} bytes, not a routing table "
                f"(which has a {HEADER_SIZE}-byte header and {SLOT_SIZE}-byte slots)"
            )
        table = cls(shm, tracked=False)
        try:
            table._validate_header()
            table._adopt_geometry()
        except BaseException:
            table.close()
            raise
        return table

    def _validate_header(self) -> None:
        size = len(self.buffer)
        magic = bytes(self.buffer[_H_MAGIC : _H_MAGIC + 8])
        if magic != MAGIC:
            raise TableError(
                f"shared memory segment {self.name!r} is not a voxrelay routing table "
                f"(magic {magic!r}, expected {MAGIC!r})"
            )
        words = self.words
        version = words[_H_LAYOUT_VERSION // 8]
        if version != LAYOUT_VERSION:
            raise TableError(
                f"routing table {self.name!r} has layout version {version}, this build "
                f"understands {LAYOUT_VERSION}: run workers from the same release as the "
                "supervisor"
            )
        header_size, slot_size = words[_H_HEADER_SIZE // 8], words[_H_SLOT_SIZE // 8]
        if (header_size, slot_size) != (HEADER_SIZE, SLOT_SIZE):
            raise TableError(
                f"routing table {self.name!r} declares a {header_size}-byte header and "
                f"{slot_size}-byte slots, expected {HEADER_SIZE} and {SLOT_SIZE}"
            )
        capacity, slot_count = words[_H_CAPACITY // 8], words[_H_SLOT_COUNT // 8]
        if not 1 <= capacity <= MAX_CAPACITY:
            raise TableError(f"routing table {self.name!r} has an invalid capacity {capacity}")
        if slot_count != slot_count_for(capacity):
            raise TableError(
                f"routing table {self.name!r} has inconsistent geometry: capacity "
                f"{capacity} needs {slot_count_for(capacity)} slots, header says {slot_count}"
            )
        needed = segment_size(capacity)
        if size < needed:
            raise TableError(
                f"routing table {self.name!r} is truncated: {size} bytes, {slot_count} "
                f"slots need {needed}"
            )
        if not 1 <= words[_H_MAX_PROBE // 8] <= slot_count + MAX_PROBE:
            raise TableError(f"routing table {self.name!r} has an invalid probe limit")

    def _adopt_geometry(self) -> None:
        words = self.words
        self.capacity = words[_H_CAPACITY // 8]
        self.slot_count = words[_H_SLOT_COUNT // 8]
        self.memory_bytes = segment_size(self.capacity)
        self._probe_limit = min(words[_H_MAX_PROBE // 8], self.slot_count)

    # --- geometry helpers ----------------------------------------------------------------

    def slot_offset(self, slot: int) -> int:
        """Byte offset of ``slot`` in the segment."""
        if not 0 <= slot < self.slot_count:
            raise ValueError(f"slot {slot} out of range 0..{self.slot_count - 1}")
        return HEADER_SIZE + slot * SLOT_SIZE

    def seq_index(self, slot: int) -> int:
        """Index into ``words`` of a slot's seq: one read validates a cached version."""
        return (self.slot_offset(slot) + SLOT_SEQ) // 8

    def key_view(self, slot: int) -> memoryview:
        """The slot's 24 key bytes in shared memory (the relay header for an iovec)."""
        offset = self.slot_offset(slot) + SLOT_KEY
        return self.buffer[offset : offset + KEY_SIZE]

    def home_slot(self, key: bytes) -> int:
        """First slot of ``key``'s probe chain."""
        return (zlib.crc32(key) * self.slot_count) >> 32

    @property
    def created_ms(self) -> int:
        """Unix ms at which the supervisor created the table."""
        return self.words[_H_CREATED_MS // 8]

    @property
    def refused_count(self) -> int:
        """Inserts refused because the table (or a probe chain) was full."""
        return _load(self._refused_addr)

    @property
    def reclaimed_count(self) -> int:
        """Slots repaired by :meth:`reclaim` since creation."""
        return _load(self._reclaimed_addr)

    def live_count(self) -> int:
        """Live routes, from the header counter (one load).

        It includes inserts that reserved room but have not published yet, so it can
        lead the number of LIVE slots by the inserts in flight; it never exceeds capacity.
        """
        return min(_load(self._live_addr) & _MASK32, self.capacity)

    # --- lookups -----------------------------------------------------------------------

    def find(self, key: bytes) -> int:
        """Slot of the LIVE route for ``key`` (the first in probe order), or -1."""
        if len(key) != KEY_SIZE:
            raise ValueError(f"route key must be {KEY_SIZE} bytes, got {len(key)}")
        words, buffer, slot_count = self.words, self.buffer, self.slot_count
        slot = (zlib.crc32(key) * slot_count) >> 32
        for _ in range(self._probe_limit):
            offset = HEADER_SIZE + slot * SLOT_SIZE
            state = words[(offset >> 3) + 1] & STATE_MASK
            if state == EMPTY:
                return -1
            if (
                state == LIVE
                and buffer[offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE] == key
                and self._live_key_matches(offset, key)
            ):
                return slot
            slot += 1
            if slot == slot_count:
                slot = 0
        return -1

    def _live_key_matches(self, offset: int, key: bytes) -> bool:
        """Whether the slot is LIVE with ``key``, checked under its seqlock.

        An odd seq does not force a retry here: a LIVE slot's key is stable while a
        re-point or removal holds it, and only a seq change can recycle the slot.
        """
        seq_addr = self.base_address + offset
        buffer = self.buffer
        backoff: _Backoff | None = None
        while True:
            before = _load(seq_addr)
            tag = _load(seq_addr + SLOT_TAG)
            if tag & STATE_MASK != LIVE:
                return False
            same = buffer[offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE] == key
            _fence()
            if _load(seq_addr) == before:
                return same
            if backoff is None:
                backoff = _Backoff()
            if not backoff.wait(_load(seq_addr + SLOT_TAG) >> OWNER_SHIFT):
                return False

    def read(self, slot: int) -> Route | None:
        """Consistent snapshot of ``slot``, or None unless it holds a LIVE route.

        Also None when a writer has been inside the slot for too long (or died there):
        a reader never waits more than a few milliseconds.
        """
        offset = self.slot_offset(slot)
        seq_addr = self.base_address + offset
        buffer = self.buffer
        backoff: _Backoff | None = None
        while True:
            before = _load(seq_addr)
            if not before & 1:
                if _load(seq_addr + SLOT_TAG) & STATE_MASK != LIVE:
                    return None
                key, transceiver, last_seen, created = _BODY.unpack_from(buffer, offset + SLOT_KEY)
                _fence()
                if _load(seq_addr) == before:
                    return Route(slot, key, transceiver & 0xFFFF, last_seen, created, before)
            if backoff is None:
                backoff = _Backoff()
            if not backoff.wait(_load(seq_addr + SLOT_TAG) >> OWNER_SHIFT):
                return None

    def routes(self) -> Iterator[Route]:
        """Snapshots of the LIVE routes, in slot order (weakly consistent while in use)."""
        states = self._states()
        live = bytes((LIVE,))
        slot = states.find(live)
        while slot >= 0:
            route = self.read(slot)
            if route is not None:
                yield route
            slot = states.find(live, slot + 1)

    def _states(self) -> bytes:
        """The state byte of every slot (one strided copy)."""
        with self.buffer[HEADER_SIZE + _STATE_BYTE :: SLOT_SIZE] as view:
            return bytes(view)

    def _tags(self) -> list[int]:
        with self.words[_FIRST_TAG_WORD::_WORDS_PER_SLOT] as view:
            return view.tolist()

    # --- writes --------------------------------------------------------------------------

    def touch(self, slot: int, now_ms: int) -> None:
        """Record activity: one aligned store of last seen, no seq bump."""
        _store(self.base_address + self.slot_offset(slot) + SLOT_LAST_SEEN, now_ms)

    def insert(self, key: bytes, transceiver_id: int, now_ms: int) -> int:
        """Slot of the route for ``key``, creating it or re-pointing it to ``transceiver_id``.

        An existing route pointing elsewhere is re-pointed (a newer token wins) under its
        seqlock, which bumps its version; either way its last seen becomes ``now_ms``.
        Raises TableFull (and counts the refusal) when a new route does not fit, and
        SlotBusy in the pathological case of a slot held for too long by another process.
        """
        if len(key) != KEY_SIZE:
            raise ValueError(f"route key must be {KEY_SIZE} bytes, got {len(key)}")
        if not 0 <= transceiver_id <= 0xFFFF:
            raise ValueError(f"transceiver id must fit in 16 bits, got {transceiver_id}")
        if now_ms < 0:
            raise ValueError(f"now_ms must be a unix time in ms, got {now_ms}")
        key = bytes(key)
        pid = os.getpid()
        for _ in range(_INSERT_ATTEMPTS):
            found, free, free_tag = self._probe_for_insert(key)
            if found >= 0:
                if self._repoint(found, key, transceiver_id, now_ms, pid):
                    return found
                continue  # removed under us: the key is absent now
            if free < 0:
                self._refuse(
                    f"no free slot within {self._probe_limit} probes of the key's home slot"
                )
            if _load(self._live_addr) & _MASK32 >= self.capacity:
                self._refuse("capacity reached")
            tag_addr = self.base_address + HEADER_SIZE + free * SLOT_SIZE + SLOT_TAG
            if _cas(tag_addr, free_tag, CLAIMED | pid << OWNER_SHIFT):
                return self._fill_claimed(free, key, transceiver_id, now_ms, pid)
        raise SlotBusy(
            f"gave up inserting a route after {_INSERT_ATTEMPTS} attempts: its probe chain "
            "keeps changing under heavy contention"
        )

    def _probe_for_insert(self, key: bytes) -> tuple[int, int, int]:
        """(slot holding key or -1, slot to claim or -1, that slot's expected tag)."""
        words, buffer, slot_count = self.words, self.buffer, self.slot_count
        slot = (zlib.crc32(key) * slot_count) >> 32
        free, free_tag = -1, EMPTY
        for _ in range(self._probe_limit):
            offset = HEADER_SIZE + slot * SLOT_SIZE
            tag = words[(offset >> 3) + 1]
            state = tag & STATE_MASK
            if state == EMPTY:
                return (-1, slot, EMPTY) if free < 0 else (-1, free, free_tag)
            if state == LIVE:
                if buffer[
                    offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE
                ] == key and self._live_key_matches(offset, key):
                    return slot, -1, EMPTY
            elif tag == DELETED and free < 0:  # an unheld tombstone
                free, free_tag = slot, DELETED
            slot += 1
            if slot == slot_count:
                slot = 0
        # Every slot the key could occupy was checked: a tombstone may be reused.
        return -1, free, free_tag

    def _refuse(self, why: str) -> None:
        _fetch_add(self._refused_addr, 1)
        raise TableFull(
            f"routing table full ({why}; {self.live_count()}/{self.capacity} live routes): "
            "new route refused, live routes are never evicted; raise the capacity or "
            "shorten the idle timeout"
        )

    def _fill_claimed(
        self, slot: int, key: bytes, transceiver_id: int, now_ms: int, pid: int
    ) -> int:
        offset = HEADER_SIZE + slot * SLOT_SIZE
        seq_addr = self.base_address + offset
        tag_addr = seq_addr + SLOT_TAG
        # Reserve room while holding the slot, so reclaim can tell what a dead writer did:
        # an odd seq below means the reservation was made.
        if _fetch_add(self._live_addr, _LIVE_ADD) & _MASK32 >= self.capacity:
            _fetch_add(self._live_addr, _LIVE_SUB)
            # Never back to EMPTY: another insert may have probed past our claim.
            _store(tag_addr, DELETED)
            self._refuse("capacity reached")
        seq = _load(seq_addr)
        _store(seq_addr, seq + 1)
        _fence()
        _BODY.pack_into(self.buffer, offset + SLOT_KEY, key, transceiver_id, now_ms, now_ms)
        _store(tag_addr, LIVE | pid << OWNER_SHIFT)
        _store(seq_addr, seq + 2)
        # Full fence: our publication must be visible before we look for a rival copy.
        _fence()
        return self._settle_duplicates(slot, key, transceiver_id, now_ms, pid)

    def _live_copies(self, key: bytes) -> list[int]:
        """Slots holding ``key`` LIVE, in probe order."""
        words, buffer, slot_count = self.words, self.buffer, self.slot_count
        slot = (zlib.crc32(key) * slot_count) >> 32
        copies = []
        for _ in range(self._probe_limit):
            offset = HEADER_SIZE + slot * SLOT_SIZE
            state = words[(offset >> 3) + 1] & STATE_MASK
            if state == EMPTY:
                break
            if (
                state == LIVE
                and buffer[offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE] == key
                and self._live_key_matches(offset, key)
            ):
                copies.append(slot)
            slot += 1
            if slot == slot_count:
                slot = 0
        return copies

    def _settle_duplicates(
        self, mine: int, key: bytes, transceiver_id: int, now_ms: int, pid: int
    ) -> int:
        """Keep only the first LIVE copy of ``key``; we still hold ``mine`` (LIVE).

        Waits only ever go forward in probe order (we wait for later copies while holding
        ours, and release ours before touching an earlier one), so racing inserts of one
        key cannot wait for each other in a cycle.
        """
        tag_addr = self.base_address + HEADER_SIZE + mine * SLOT_SIZE + SLOT_TAG
        copies = self._live_copies(key)
        if not copies or copies[0] == mine:
            for later in copies[1:]:
                self._remove_copy(later, key, pid)
            _store(tag_addr, LIVE)
            return mine
        self._retire_held(mine, pid)
        canonical = copies[0]
        for later in copies[1:]:
            if later != mine:
                self._remove_copy(later, key, pid)
        with contextlib.suppress(SlotBusy):
            self._repoint(canonical, key, transceiver_id, now_ms, pid)
        return canonical

    def _acquire_live(self, slot: int, pid: int) -> bool:
        """Hold a LIVE slot; False if it is not LIVE. SlotBusy if held too long."""
        tag_addr = self.base_address + HEADER_SIZE + slot * SLOT_SIZE + SLOT_TAG
        backoff: _Backoff | None = None
        while True:
            tag = _load(tag_addr)
            if tag & STATE_MASK != LIVE:
                return False
            if tag == LIVE:
                if _cas(tag_addr, LIVE, LIVE | pid << OWNER_SHIFT):
                    return True
                continue
            holder = tag >> OWNER_SHIFT
            if backoff is None:
                backoff = _Backoff()
            if not backoff.wait(holder):
                state = "died holding it" if not _pid_exists(holder) else "still holds it"
                raise SlotBusy(
                    f"route slot {slot} is held by pid {holder}, which {state}; the "
                    "supervisor's reclaim() frees slots of dead processes"
                )

    def _repoint(self, slot: int, key: bytes, transceiver_id: int, now_ms: int, pid: int) -> bool:
        """Point the route in ``slot`` at ``transceiver_id``; False if it vanished."""
        offset = HEADER_SIZE + slot * SLOT_SIZE
        seq_addr = self.base_address + offset
        if self.words[(offset + SLOT_TRANSCEIVER) >> 3] == transceiver_id:
            _store(seq_addr + SLOT_LAST_SEEN, now_ms)
            return True
        if not self._acquire_live(slot, pid):
            return False
        if self.buffer[offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE] != key:
            _store(seq_addr + SLOT_TAG, LIVE)  # recycled for another key meanwhile
            return False
        seq = _load(seq_addr)
        _store(seq_addr, seq + 1)
        _fence()
        _REPOINT.pack_into(self.buffer, offset + SLOT_TRANSCEIVER, transceiver_id, now_ms)
        _store(seq_addr, seq + 2)
        _store(seq_addr + SLOT_TAG, LIVE)
        return True

    def _retire_held(self, slot: int, pid: int) -> None:
        """Turn a LIVE slot we hold into an unheld tombstone and release its room.

        Order matters to reclaim: DELETED with an odd seq means the live counter was not
        decremented yet.
        """
        seq_addr = self.base_address + HEADER_SIZE + slot * SLOT_SIZE
        tag_addr = seq_addr + SLOT_TAG
        seq = _load(seq_addr)
        _store(seq_addr, seq + 1)
        _fence()
        _store(tag_addr, DELETED | pid << OWNER_SHIFT)
        _store(seq_addr, seq + 2)
        _fetch_add(self._live_addr, _LIVE_SUB)
        _store(tag_addr, DELETED)

    def _remove_copy(self, slot: int, key: bytes, pid: int) -> None:
        """Best-effort removal of a duplicate of ``key`` (checked under our hold)."""
        try:
            if not self._acquire_live(slot, pid):
                return
        except SlotBusy:
            return
        offset = HEADER_SIZE + slot * SLOT_SIZE
        if self.buffer[offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE] != key:
            _store(self.base_address + offset + SLOT_TAG, LIVE)
            return
        self._retire_held(slot, pid)

    def remove(self, slot: int, expected_version: int | None = None) -> bool:
        """Delete the route in ``slot``; False if it is not LIVE or its version moved.

        With ``expected_version`` (a Route.version or a cached seq), only that exact
        route is removed, never a newer occupant of the slot. Raises SlotBusy if another
        process holds the slot for too long (or died holding it).
        """
        offset = self.slot_offset(slot)
        pid = os.getpid()
        if not self._acquire_live(slot, pid):
            return False
        seq_addr = self.base_address + offset
        if expected_version is not None and _load(seq_addr) != expected_version:
            _store(seq_addr + SLOT_TAG, LIVE)
            return False
        self._retire_held(slot, pid)
        return True

    def expire(self, now_ms: int, idle_ms: int) -> list[Route]:
        """Remove LIVE routes not seen for ``idle_ms`` (last seen <= now - idle) and return them.

        A route touched between the scan and its removal is kept. Slots held by another
        process are skipped until the next call.
        """
        cutoff = now_ms - idle_ms
        # Only LIVE slots are visited (found by bytes.find over one strided copy of the
        # state bytes), so a scan of a large, mostly empty table costs next to nothing.
        states = self._states()
        live = _LIVE_BYTE
        words = self.words
        expired = []
        pid = os.getpid()
        slot = states.find(live)
        while slot >= 0:
            if words[_FIRST_LAST_SEEN_WORD + slot * _WORDS_PER_SLOT] <= cutoff:
                route = self._remove_idle(slot, cutoff, pid)
                if route is not None:
                    expired.append(route)
            slot = states.find(live, slot + 1)
        return expired

    def _remove_idle(self, slot: int, cutoff: int, pid: int) -> Route | None:
        route = self.read(slot)
        if route is None or route.last_seen_ms > cutoff:
            return None
        try:
            if not self._acquire_live(slot, pid):
                return None
        except SlotBusy:
            return None
        seq_addr = self.base_address + HEADER_SIZE + slot * SLOT_SIZE
        last_seen = _load(seq_addr + SLOT_LAST_SEEN)
        if _load(seq_addr) != route.version or last_seen > cutoff:
            _store(seq_addr + SLOT_TAG, LIVE)
            return None
        self._retire_held(slot, pid)
        return Route(
            slot, route.key, route.transceiver_id, last_seen, route.created_ms, route.version
        )

    # --- crash recovery ----------------------------------------------------------------

    def reclaim(self, is_alive: Callable[[int], bool]) -> int:
        """Repair slots held by dead processes; returns how many were repaired.

        The supervisor calls this after a worker dies. An interrupted insert becomes a
        tombstone (never EMPTY: others may have probed past it), an interrupted re-point
        or removal leaves the route LIVE (its key was never touched), a removal that got
        as far as DELETED completes. The live counter is then recounted when the table is
        momentarily quiet, which also repairs a reservation lost at the instant of death.
        """
        me = os.getpid()
        repaired = 0
        tags = self._tags()
        if max(tags, default=0) > STATE_MASK:
            for slot, tag in enumerate(tags):
                holder = tag >> OWNER_SHIFT
                if holder and not is_alive(holder) and self._repair(slot, tag, me):
                    repaired += 1
        if repaired:
            _fetch_add(self._reclaimed_addr, repaired)
        self._resync_live_count()
        return repaired

    def _repair(self, slot: int, dead_tag: int, me: int) -> bool:
        offset = HEADER_SIZE + slot * SLOT_SIZE
        seq_addr = self.base_address + offset
        tag_addr = seq_addr + SLOT_TAG
        state = dead_tag & STATE_MASK
        if not _cas(tag_addr, dead_tag, state | me << OWNER_SHIFT):
            return False  # someone else repaired it
        seq = _load(seq_addr)
        interrupted = bool(seq & 1)
        if interrupted:
            _store(seq_addr, seq + 1)
        if state == LIVE:
            # Fields are whole: an insert sets LIVE after writing them, re-points and
            # removals never write the key. Publish it and finish the duplicate check
            # the dead insert may not have done.
            key = bytes(self.buffer[offset + SLOT_KEY : offset + SLOT_KEY + KEY_SIZE])
            _store(tag_addr, LIVE)
            copies = self._live_copies(key)
            for later in copies[1:]:
                self._remove_copy(later, key, me)
            return True
        # CLAIMED with an odd seq had reserved room; DELETED with an odd seq had not yet
        # given its room back. With an even seq the counter step may or may not have
        # happened; assuming it did not (CLAIMED) or did (DELETED) can only leave the
        # count too high, never let it pass capacity, and the resync below fixes it.
        if interrupted:
            _fetch_add(self._live_addr, _LIVE_SUB)
        _store(tag_addr, DELETED)
        return True

    def _resync_live_count(self) -> bool:
        """Recount the live counter from the slots if the table is quiet for a moment.

        The count is exact when, between two reads of the counter word, neither the word
        (whose high half counts every change) moved nor any slot was held: every counter
        step happens while its writer holds a slot.
        """
        for attempt in range(_RESYNC_ATTEMPTS):
            if attempt:
                time.sleep(0.001)
            before = _load(self._live_addr)
            tags = self._tags()
            _fence()
            if _load(self._live_addr) != before or max(tags, default=0) > STATE_MASK:
                continue
            live = tags.count(LIVE)
            if live == before & _MASK32:
                return True
            changes = ((before >> 32) + 1) & _MASK32
            if _cas(self._live_addr, before, changes << 32 | live):
                return True
        return False

    # --- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the segment in this process (the table itself lives on)."""
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self.words.release()
        self.buffer.release()
        try:
            shm.close()
        except BufferError as exc:
            self._shm = shm
            raise TableError(
                "cannot unmap the routing table: memoryviews taken from it (key_view(), "
                "slices of buffer or words) are still alive; release them first"
            ) from exc

    def unlink(self) -> None:
        """Destroy the segment (the supervisor, at shutdown); mappings stay valid."""
        if self._tracked and self._shm is not None:
            self._shm.unlink()
            return
        # Unlink through a tracked handle so the tracker's books stay balanced.
        handle = SharedMemory(name=self.name)
        try:
            handle.unlink()
        finally:
            handle.close()

    def __enter__(self) -> RoutingTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __reduce__(self) -> tuple[Callable[[str], RoutingTable], tuple[str]]:
        # A table passed to a spawned process re-attaches by name.
        return RoutingTable.attach, (self.name,)

    def __repr__(self) -> str:
        state = "closed" if self._shm is None else f"{self.live_count()}/{self.capacity} live"
        return f"<RoutingTable {self.name!r} {state}, {self.slot_count} slots>"
