"""Fleet state in shared memory: the transceiver directory, per-worker stats, fleet flags.

Why a second segment beside the routing table: relay workers must learn about transceivers
and report counters without any IPC on the hot path. The supervisor writes the directory
(seqlocked entries plus a generation counter that workers poll once per wake-up); each worker
writes its own stats block once per batch, so reading stats never needs the worker's
cooperation and survives the worker's death (counters continue after a respawn).

Layout (all u64 words, native order): a 4 KiB header, then ``DIRECTORY_ENTRIES`` directory
entries of 64 bytes indexed by transceiver id, then ``max_workers`` stats blocks of 512 bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

from voxrelay.engine import _atomics

MAGIC = int.from_bytes(b"VOXFLT01", "little")
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
DIRECTORY_ENTRIES = 65536
ENTRY_SIZE = 64
STATS_SIZE = 512

# Header words.
H_MAGIC, H_LAYOUT, H_MAX_WORKERS, H_GENERATION, H_FLAGS, H_CREATED_MS = 0, 1, 2, 3, 4, 5
H_PUBLIC_PORT, H_SUPERVISOR_PID, H_CLUSTER_ID = 6, 7, 8

FLAG_DRAINING = 1

# Directory entry words (offset within entry / 8).
D_SEQ, D_STATE, D_FAMILY, D_PORT, D_ADDR_HI, D_ADDR_LO, D_LOAD_MILLI, D_HEARTBEAT_MS = range(8)
TRANSCEIVER_ABSENT, TRANSCEIVER_HEALTHY, TRANSCEIVER_UNHEALTHY = 0, 1, 2
_STATE_NAMES = {
    TRANSCEIVER_ABSENT: "absent",
    TRANSCEIVER_HEALTHY: "healthy",
    TRANSCEIVER_UNHEALTHY: "unhealthy",
}

# Worker stats block words.
W_PID, W_STATE, W_STARTED_MS, W_HEARTBEAT_MS, W_INTERNAL_PORT, W_CPU, W_RCVBUF, W_SNDBUF = range(8)
W_RESTARTS, W_CPU_TIME_US = 8, 9
W_COUNTERS = 16  # first counter word
COUNTER_NAMES = (
    "rx_public",  # datagrams read from the public socket
    "tx_public",  # datagrams sent to clients
    "rx_internal",  # datagrams read from transceivers
    "tx_internal",  # client datagrams forwarded to transceivers (bundled or not)
    "bytes_in",
    "bytes_out",
    "routes_created",
    "routes_repointed",
    "recovery_requests",
    "batches",
    "routes_released",  # a transceiver ended the call and released its client's route
    "bundles_out",  # internal datagrams that carried a bundle of 2+ client datagrams
)
DROP_REASONS = (
    "no_route",  # not STUN, unknown client (after a Redis recovery request, if configured)
    "bad_stun",  # looked like STUN but malformed / not a binding request / no USERNAME
    "bad_token",  # forged, garbage, stale-key or malformed routing token
    "wrong_cluster",
    "unknown_transceiver",  # token names a transceiver the directory lacks or marks unhealthy
    "table_full",
    "draining",  # new route refused while the fleet drains
    "oversize",  # datagram larger than max_datagram (truncated by the kernel)
    "internal_unknown_source",  # internal packet not from a registered transceiver
    "internal_bad_header",
    "internal_no_route",  # transceiver names a client without a route
    "internal_wrong_transceiver",  # route exists but belongs to another transceiver
    "send_error",
)
W_DROPS = W_COUNTERS + len(COUNTER_NAMES)
WORKER_ABSENT, WORKER_STARTING, WORKER_RUNNING, WORKER_DRAINING, WORKER_EXITED = range(5)
_WORKER_STATE_NAMES = ("absent", "starting", "running", "draining", "exited")


class FleetStateError(Exception):
    """The segment is missing, foreign or of another layout version."""


@dataclass(frozen=True)
class DirectoryEntry:
    transceiver_id: int
    state: str
    host: str
    port: int
    load: float
    heartbeat_ms: int


@dataclass(frozen=True)
class WorkerStats:
    index: int
    pid: int
    state: str
    started_ms: int
    heartbeat_ms: int
    internal_port: int
    cpu: int | None
    rcvbuf: int
    sndbuf: int
    restarts: int
    counters: dict[str, int]
    drops: dict[str, int]


def _segment_size(max_workers: int) -> int:
    return HEADER_SIZE + DIRECTORY_ENTRIES * ENTRY_SIZE + max_workers * STATS_SIZE


class FleetState:
    """Typed access to the fleet segment; cheap enough to read from a hot loop."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm = shm
        self._closed = False
        self.owner = owner
        self.name = shm.name
        self.buffer = shm.buf
        self.words = shm.buf.cast("Q")
        self.base_address = _atomics.address(shm.buf)
        self.max_workers = self.words[H_MAX_WORKERS]
        self.directory_word = HEADER_SIZE // 8
        self.stats_word = (HEADER_SIZE + DIRECTORY_ENTRIES * ENTRY_SIZE) // 8

    @classmethod
    def create(cls, max_workers: int, name: str | None = None, cluster_id: int = 0) -> FleetState:
        if not 1 <= max_workers <= 1024:
            raise ValueError(f"max_workers must be 1..1024, got {max_workers}")
        shm = shared_memory.SharedMemory(name=name, create=True, size=_segment_size(max_workers))
        words = shm.buf.cast("Q")
        words[H_LAYOUT] = LAYOUT_VERSION
        words[H_MAX_WORKERS] = max_workers
        words[H_CREATED_MS] = int(time.time() * 1000)
        words[H_CLUSTER_ID] = cluster_id
        words[H_SUPERVISOR_PID] = os.getpid()
        words[H_MAGIC] = MAGIC  # last: a reader that sees the magic sees a complete header
        words.release()
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> FleetState:
        try:
            shm = shared_memory.SharedMemory(name=name, create=False)
        except FileNotFoundError as exc:
            raise FleetStateError(f"fleet state segment {name!r} does not exist") from exc
        # Attaching must never make this process's exit unlink the segment.
        with contextlib.suppress(Exception):  # the tracker may not know it: nothing to undo
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        if shm.size < HEADER_SIZE:
            shm.close()
            raise FleetStateError(f"fleet state segment {name!r} is too small ({shm.size} bytes)")
        words = shm.buf.cast("Q")
        magic, layout, max_workers = words[H_MAGIC], words[H_LAYOUT], words[H_MAX_WORKERS]
        words.release()
        if magic != MAGIC:
            shm.close()
            raise FleetStateError(f"segment {name!r} is not a voxrelay fleet state")
        if layout != LAYOUT_VERSION:
            shm.close()
            raise FleetStateError(
                f"fleet state {name!r} has layout {layout}, this build expects {LAYOUT_VERSION}"
            )
        if shm.size < _segment_size(max_workers):
            shm.close()
            raise FleetStateError(f"fleet state segment {name!r} is truncated")
        return cls(shm, owner=False)

    def close(self) -> None:
        """Unmap the segment in this process (idempotent; the segment itself lives on).

        ``words`` is a cast of the segment's buffer: it is released first, since the
        mapping cannot be closed while any view of it is alive.
        """
        if self._closed:
            return
        self.words.release()
        try:
            self._shm.close()
        except BufferError as exc:
            raise FleetStateError(
                f"cannot unmap fleet state {self.name!r}: memoryviews taken from its buffer "
                "are still alive; release them first"
            ) from exc
        self.buffer = None  # type: ignore[assignment]
        self._closed = True

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    # -- fleet flags -------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return bool(self.words[H_FLAGS] & FLAG_DRAINING)

    def set_draining(self, value: bool) -> None:
        address = self.base_address + H_FLAGS * 8
        while True:
            old = _atomics.load(address)
            new = (old | FLAG_DRAINING) if value else (old & ~FLAG_DRAINING)
            if _atomics.cas(address, old, new):
                return

    @property
    def public_port(self) -> int:
        return self.words[H_PUBLIC_PORT]

    @public_port.setter
    def public_port(self, port: int) -> None:
        self.words[H_PUBLIC_PORT] = port

    @property
    def supervisor_pid(self) -> int:
        """Pid of the process that created the segment (the supervisor)."""
        return self.words[H_SUPERVISOR_PID]

    @property
    def generation(self) -> int:
        return self.words[H_GENERATION]

    # -- transceiver directory ---------------------------------------------------------
    def _entry_word(self, transceiver_id: int) -> int:
        if not 1 <= transceiver_id < DIRECTORY_ENTRIES:
            raise ValueError(f"transceiver id must be 1..65535, got {transceiver_id}")
        return self.directory_word + transceiver_id * (ENTRY_SIZE // 8)

    def publish_transceiver(
        self,
        transceiver_id: int,
        host: str,
        port: int,
        *,
        healthy: bool = True,
        load: float = 0.0,
        heartbeat_ms: int = 0,
    ) -> None:
        """Write one directory entry under its seqlock (supervisor only: single writer)."""
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv4Address):
            family, packed = 4, ipaddress.IPv6Address(f"::ffff:{address}").packed
        else:
            family, packed = 6, address.packed
        word = self._entry_word(transceiver_id)
        seq_address = self.base_address + word * 8
        seq = _atomics.load(seq_address)
        _atomics.store(seq_address, seq | 1)
        words = self.words
        words[word + D_STATE] = TRANSCEIVER_HEALTHY if healthy else TRANSCEIVER_UNHEALTHY
        words[word + D_FAMILY] = family
        words[word + D_PORT] = port
        words[word + D_ADDR_HI] = int.from_bytes(packed[:8], "big")
        words[word + D_ADDR_LO] = int.from_bytes(packed[8:], "big")
        words[word + D_LOAD_MILLI] = max(0, int(load * 1000))
        words[word + D_HEARTBEAT_MS] = heartbeat_ms
        _atomics.store(seq_address, (seq | 1) + 1)

    def withdraw_transceiver(self, transceiver_id: int) -> None:
        word = self._entry_word(transceiver_id)
        seq_address = self.base_address + word * 8
        seq = _atomics.load(seq_address)
        _atomics.store(seq_address, seq | 1)
        self.words[word + D_STATE] = TRANSCEIVER_ABSENT
        _atomics.store(seq_address, (seq | 1) + 1)

    def bump_generation(self) -> None:
        """Tell workers the directory changed; they rebuild their local maps once."""
        _atomics.fetch_add(self.base_address + H_GENERATION * 8, 1)

    def read_transceiver(self, transceiver_id: int) -> DirectoryEntry | None:
        word = self._entry_word(transceiver_id)
        words = self.words
        for _ in range(1000):
            seq = words[word + D_SEQ]
            if seq & 1:
                continue
            state = words[word + D_STATE]
            family = words[word + D_FAMILY]
            port = words[word + D_PORT]
            hi, lo = words[word + D_ADDR_HI], words[word + D_ADDR_LO]
            load, heartbeat = words[word + D_LOAD_MILLI], words[word + D_HEARTBEAT_MS]
            if words[word + D_SEQ] != seq:
                continue
            if state == TRANSCEIVER_ABSENT:
                return None
            address = ipaddress.IPv6Address(((hi << 64) | lo).to_bytes(16, "big"))
            host = str(address.ipv4_mapped) if family == 4 and address.ipv4_mapped else str(address)
            return DirectoryEntry(
                transceiver_id,
                _STATE_NAMES.get(state, "unknown"),
                host,
                port,
                load / 1000,
                heartbeat,
            )
        return None  # a writer died mid-update; the supervisor rewrites the entry

    def transceivers(self) -> Iterator[DirectoryEntry]:
        words, stride = self.words, ENTRY_SIZE // 8
        for transceiver_id in range(1, DIRECTORY_ENTRIES):
            if words[self.directory_word + transceiver_id * stride + D_STATE]:
                entry = self.read_transceiver(transceiver_id)
                if entry is not None:
                    yield entry

    # -- worker stats ------------------------------------------------------------------
    def worker_word(self, index: int) -> int:
        if not 0 <= index < self.max_workers:
            raise ValueError(f"worker index must be 0..{self.max_workers - 1}, got {index}")
        return self.stats_word + index * (STATS_SIZE // 8)

    def read_worker(self, index: int) -> WorkerStats:
        base = self.worker_word(index)
        words = self.words
        cpu = words[base + W_CPU]
        return WorkerStats(
            index=index,
            pid=words[base + W_PID],
            state=_WORKER_STATE_NAMES[min(words[base + W_STATE], WORKER_EXITED)],
            started_ms=words[base + W_STARTED_MS],
            heartbeat_ms=words[base + W_HEARTBEAT_MS],
            internal_port=words[base + W_INTERNAL_PORT],
            cpu=cpu - 1 if cpu else None,
            rcvbuf=words[base + W_RCVBUF],
            sndbuf=words[base + W_SNDBUF],
            restarts=words[base + W_RESTARTS],
            counters={n: words[base + W_COUNTERS + i] for i, n in enumerate(COUNTER_NAMES)},
            drops={n: words[base + W_DROPS + i] for i, n in enumerate(DROP_REASONS)},
        )

    def note_restart(self, index: int) -> None:
        self.words[self.worker_word(index) + W_RESTARTS] += 1

    def mark_worker_exited(self, index: int) -> None:
        self.words[self.worker_word(index) + W_STATE] = WORKER_EXITED
