"""Relay worker: the hot loop that forwards client datagrams to transceivers and back.

One process per worker; every worker binds its own socket to the public port with
SO_REUSEPORT, so the kernel spreads clients over workers. The worker keeps no session state:
routes live in the shared-memory routing table (engine/routing.py), so a worker killed at any
moment loses nothing and its replacement picks the flows up at the next packet.

Why the loop looks the way it does: syscalls dominate the cost of a Python forwarder, so it
reads and writes batches with recvmmsg/sendmmsg through ctypes over arrays preallocated at
start (mmsghdr, iovec, sockaddr and payload buffers). Per packet it reads the source
sockaddr's first word, probes one dict (a local cache validated against the slot's seqlock
word in shared memory), and fills three or four words of the outgoing mmsghdr/iovec arrays.
The relay header sent to a transceiver is not built per packet: an iovec points straight at
the route key stored in the shared slot, which *is* the header. No buffer objects are created
per packet, nothing is logged per packet, and Redis is never called from the loop (recovery
lookups are handed to a background thread).

Bundling (``bundle_max_bytes`` > 0, the default): most of a flat-out worker's time is the
kernel's per-datagram cost of the internal send, so the packets of one read batch that go
to the same transceiver leave as one *bundle* datagram of records (docs/internals.md): per
record a 4-byte prefix from preallocated memory, the key iovec into shared memory and the
payload iovec into the receive buffer - still no copy and no allocation per packet. A
transceiver with a single packet in the batch gets a plain v1 datagram.

Wake-ups: at a light load nearly every wake-up finds one datagram, so the loop keeps a
wake-up's own cost down (counters flush and the directory is checked once per tick, not
per wake-up) and, while the rate is steady, makes fewer of them: with ``coalesce_us`` a
wake-up that read only a few datagrams is followed by a short sleep, and what arrived
meanwhile goes out with one call per socket (docs/internals.md).

Miss path (the first packet of a flow, rare): a STUN binding request whose USERNAME carries
a valid routing token creates the route; anything else is dropped and counted by reason.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from voxrelay.engine import _atomics
from voxrelay.engine.fleetstate import (
    COUNTER_NAMES,
    D_ADDR_HI,
    D_ADDR_LO,
    D_FAMILY,
    D_PORT,
    D_SEQ,
    D_STATE,
    DIRECTORY_ENTRIES,
    DROP_REASONS,
    ENTRY_SIZE,
    H_GENERATION,
    TRANSCEIVER_HEALTHY,
    W_COUNTERS,
    W_CPU,
    W_CPU_TIME_US,
    W_DROPS,
    W_HEARTBEAT_MS,
    W_INTERNAL_PORT,
    W_PID,
    W_RCVBUF,
    W_SNDBUF,
    W_STARTED_MS,
    W_STATE,
    WORKER_DRAINING,
    WORKER_EXITED,
    WORKER_RUNNING,
    WORKER_STARTING,
    FleetState,
)
from voxrelay.engine.processes import (
    TERMINATE_WAIT_SECONDS,
    TIMER_SLACK_NS,
    die_with_parent,
    set_timer_slack,
)
from voxrelay.engine.routing import HEADER_SIZE as ROUTING_HEADER_SIZE
from voxrelay.engine.routing import (
    SLOT_KEY,
    SLOT_LAST_SEEN,
    SLOT_SEQ,
    SLOT_SIZE,
    RoutingTable,
    SlotBusy,
    TableFull,
)
from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.relay_header import (
    BUNDLE_MARKER,
    HEADER_SIZE,
    RECORD_OVERHEAD,
    RECORD_PREFIX_SIZE,
)
from voxrelay.proto.stun import is_stun, server_ufrag
from voxrelay.proto.token import TokenError, TokenVerifier, WrongClusterError

if TYPE_CHECKING:
    from voxrelay.engine.redis_mirror import RouteRecovery

MMSGHDR_SIZE = 64  # struct mmsghdr on 64-bit Linux: msghdr (56) + msg_len (4) + padding
IOVEC_SIZE = 16
SOCKADDR_STRIDE = 32  # room for sockaddr_in6 (28), 8-byte aligned
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
IOV_MAX = 1024  # iovecs per message (Linux UIO_MAXIOV); a bundle record takes three
CACHE_LIMIT = 1 << 16  # local cache entries; cleared when exceeded so memory stays bounded
TOUCH_INTERVAL_MS = 1000  # how stale a route's last-seen may get before a worker rewrites it
# Per tick, not per wake-up (at a light load nearly every wake-up finds one datagram): the
# counters flush into shared memory and the directory's generation word is checked.
TICK_SECONDS = 0.005
IDLE_POLL_SECONDS = 0.2  # the poll timeout with nothing left to flush
# Interrupt coalescing (``coalesce_us``): a wake-up that read fewer than COALESCE_BELOW
# datagrams is followed by a sleep of coalesce_us, while the last tick's rate says such a
# sleep gathers COALESCE_MIN datagrams or more on average.
COALESCE_BELOW = 8
COALESCE_MIN = 2

_COUNTER = {name: i for i, name in enumerate(COUNTER_NAMES)}
_NO_FAILURES: list[int] = []  # shared, never appended to: what a clean send returns
_DROP = {name: i for i, name in enumerate(DROP_REASONS)}
_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

# The loop's two foreign calls. At a light load every wake-up makes one of each, so their
# fixed cost counts as much as the kernel's: no argtypes (converting four arguments through
# from_param costs more than the conversion ctypes does by itself for ints and c_void_p
# objects: every pointer is passed as a prebuilt c_void_p), and PyDLL, which keeps the GIL
# across the call instead of releasing and retaking it (both calls never block: the
# sockets are non-blocking). Arguments: fd, c_void_p mmsghdr array, count, flags[, NULL].
_libc = ctypes.PyDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.restype = ctypes.c_int


@dataclass
class WorkerSettings:
    """Everything a worker process needs, passed as JSON on its stdin (secrets stay out of argv)."""

    index: int
    table_name: str
    fleet_name: str
    bind: str
    port: int
    internal_bind: str
    internal_port: int
    cluster_id: int
    token_secrets: list[str]  # hex
    batch_size: int = 32
    max_datagram: int = 1500
    bundle_max_bytes: int = 1472  # 0: one v1 datagram per packet to transceivers
    coalesce_us: int = 100  # 0: never sleep to gather datagrams (engine/config.py)
    recv_buffer_bytes: int = 4 << 20
    send_buffer_bytes: int = 4 << 20
    pin_cpu: int | None = None
    redis_url: str | None = None
    recovery_rate: float = 200.0
    negative_cache_seconds: float = 5.0
    redis_socket_timeout: float = 0.2
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_json(cls, data: bytes) -> WorkerSettings:
        return cls(**orjson.loads(data))


def route_key_from_sockaddr(raw: bytes | memoryview) -> bytes:
    """The 24-byte relay header (== route key) for a native sockaddr_in / sockaddr_in6."""
    family = int.from_bytes(raw[0:2], sys.byteorder)
    port = bytes(raw[2:4])
    if family == socket.AF_INET:
        return b"\x01\x04" + port + b"\x00\x00\x00\x00" + _V4_MAPPED_PREFIX + bytes(raw[4:8])
    if family == socket.AF_INET6:
        address = bytes(raw[8:24])
        kind = b"\x04" if address.startswith(_V4_MAPPED_PREFIX) else b"\x06"
        return b"\x01" + kind + port + b"\x00\x00\x00\x00" + address
    raise ValueError(f"unsupported address family {family}")


def sockaddr_from_route_key(key: bytes | memoryview, socket_family: int) -> bytes | None:
    """Native sockaddr for a route key, for a socket of ``socket_family``; None if unreachable."""
    port = bytes(key[2:4])
    address = bytes(key[8:24])
    if socket_family == socket.AF_INET:
        if key[1] != 4 or not address.startswith(_V4_MAPPED_PREFIX):
            return None
        return struct.pack("=H", socket.AF_INET) + port + address[12:] + b"\x00" * 8
    return struct.pack("=H", socket.AF_INET6) + port + b"\x00" * 4 + address + b"\x00" * 4


def sockaddr_for(host: str, port: int, socket_family: int) -> bytes:
    """Native sockaddr bytes for a host/port on a socket of ``socket_family``."""
    if socket_family == socket.AF_INET:
        return (
            struct.pack("=H", socket.AF_INET)
            + port.to_bytes(2, "big")
            + socket.inet_pton(socket.AF_INET, host)
            + b"\x00" * 8
        )
    if ":" not in host:
        host = "::ffff:" + host
    return (
        struct.pack("=H", socket.AF_INET6)
        + port.to_bytes(2, "big")
        + b"\x00" * 4
        + socket.inet_pton(socket.AF_INET6, host)
        + b"\x00" * 4
    )


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_public_socket(host: str, port: int, rcvbuf: int, sndbuf: int) -> socket.socket:
    """A socket on the shared public port; every worker binds its own with SO_REUSEPORT."""
    family = _family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    _set_buffers(sock, rcvbuf, sndbuf)
    sock.bind((host, port))
    return sock


def _set_buffers(sock: socket.socket, rcvbuf: int, sndbuf: int) -> None:
    # SO_RCVBUFFORCE lets root exceed net.core.rmem_max; fall back to the capped option.
    for force, plain, size in (
        (33, socket.SO_RCVBUF, rcvbuf),  # SO_RCVBUFFORCE
        (32, socket.SO_SNDBUF, sndbuf),  # SO_SNDBUFFORCE
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class _Batch:
    """Preallocated recvmmsg or sendmmsg arrays for one socket direction.

    ``headers`` is the mmsghdr array, ``iovecs`` two iovecs per message, ``names`` one
    sockaddr per message, ``payloads`` one max-size buffer per message (receive side only).
    Everything is viewed as u64 words so the loop reads and writes fields without packing.
    """

    def __init__(self, count: int, payload_size: int, *, receive: bool, namelen: int) -> None:
        self.count = count
        self.payload_size = payload_size
        size = count * (MMSGHDR_SIZE + 2 * IOVEC_SIZE + SOCKADDR_STRIDE)
        size += count * payload_size if receive else 0
        self.memory = mmap.mmap(-1, max(size, mmap.PAGESIZE))
        self.words = memoryview(self.memory).cast("Q")
        self.bytes = memoryview(self.memory)
        base = _atomics.address(self.memory)
        self.headers_address = base
        iov_off = count * MMSGHDR_SIZE
        name_off = iov_off + count * 2 * IOVEC_SIZE
        payload_off = name_off + count * SOCKADDR_STRIDE
        self.iov_word = iov_off // 8
        self.name_word = name_off // 8
        self.name_offset = name_off
        self.payload_offset = payload_off
        self.payload_addresses = [base + payload_off + i * payload_size for i in range(count)]
        self.name_addresses = [base + name_off + i * SOCKADDR_STRIDE for i in range(count)]
        words = self.words
        for i in range(count):
            h = i * 8
            words[h + 0] = self.name_addresses[i]  # msg_name
            words[h + 1] = namelen  # msg_namelen (+ padding)
            words[h + 2] = base + iov_off + i * 2 * IOVEC_SIZE  # msg_iov
            words[h + 3] = 1  # msg_iovlen
            if receive:
                iov = self.iov_word + i * 4
                words[iov + 0] = self.payload_addresses[i]
                words[iov + 1] = payload_size
        self.vector = ctypes.c_void_p(base)

    def close(self) -> None:
        if self.memory.closed:
            return
        self.words.release()
        self.bytes.release()
        self.memory.close()


class _BundleBatch:
    """Preallocated sendmmsg arrays for bundles: ``count`` messages of ``per_bundle`` records.

    Message ``m`` owns a region of ``3 * per_bundle`` iovecs, a record's three being its
    prefix, its key (the relay header, in shared memory) and its payload (in the receive
    buffer). The prefix iovecs point at a preallocated prefix area (one 48-byte stride per
    record slot, the same stride as the record's iovecs, so a record's prefix word sits at
    ``prefix_delta`` words from its first iovec word) and the prefix and key lengths are
    fixed here, once: filling a record is three word writes and its prefix word. A message
    of one record is sent as a v1 datagram by pointing ``msg_iov`` past that record's prefix.
    """

    def __init__(self, count: int, per_bundle: int, max_payload: int, namelen: int) -> None:
        self.count = count
        self.per_bundle = per_bundle
        slots = count * per_bundle
        region = per_bundle * 3 * IOVEC_SIZE
        iov_off = count * MMSGHDR_SIZE
        prefix_off = iov_off + count * region
        self.memory = mmap.mmap(-1, prefix_off + count * region)
        self.words = memoryview(self.memory).cast("Q")
        base = _atomics.address(self.memory)
        self.headers_address = base
        self.vector = ctypes.c_void_p(base)
        self.prefix_delta = (prefix_off - iov_off) // 8
        # Per message: the word index of its first iovec, and the msg_iov of it as a bundle
        # and as a v1 datagram (past the first record's prefix iovec).
        self.region_start = [(iov_off + m * region) // 8 for m in range(count)]
        self.bundle_iov = [base + iov_off + m * region for m in range(count)]
        self.single_iov = [address + IOVEC_SIZE for address in self.bundle_iov]
        words = self.words
        for m in range(count):
            words[m * 8 + 1] = namelen
        for slot in range(slots):
            o = iov_off // 8 + slot * 6
            words[o] = base + prefix_off + slot * 3 * IOVEC_SIZE
            words[o + 1] = RECORD_PREFIX_SIZE
            words[o + 3] = HEADER_SIZE
        # The prefix of a record of each payload length, as the u64 word the loop stores.
        self.prefix_words = [
            int.from_bytes(
                bytes((BUNDLE_MARKER, 0)) + length.to_bytes(2, "big") + bytes(4), sys.byteorder
            )
            for length in range(max_payload + 1)
        ]

    def close(self) -> None:
        if self.memory.closed:
            return
        self.words.release()
        self.memory.close()


def bundle_shape(batch_size: int, bundle_max_bytes: int) -> tuple[int, int]:
    """Records per bundle region and the byte limit a worker enforces for ``bundle_max_bytes``.

    A record takes at least ``RECORD_OVERHEAD`` bytes and a bundle holds records of one
    batch, so ``min(batch_size, limit // RECORD_OVERHEAD)`` record slots per message always
    suffice, and a byte check alone bounds a bundle. Only when that exceeds the kernel's
    iovec limit is the byte limit lowered to what ``IOV_MAX // 3`` records can carry.
    """
    per_bundle = max(1, min(batch_size, bundle_max_bytes // RECORD_OVERHEAD))
    if per_bundle > IOV_MAX // 3:
        per_bundle = IOV_MAX // 3
        bundle_max_bytes = (per_bundle + 1) * RECORD_OVERHEAD - 1
    return per_bundle, bundle_max_bytes


class RelayWorker:
    """Forwards datagrams between the public socket and transceivers, by the routing table."""

    def __init__(
        self,
        settings: WorkerSettings,
        table: RoutingTable,
        fleet: FleetState,
        verifier: TokenVerifier,
        recovery: object | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.fleet = fleet
        self.verifier = verifier
        self.recovery = recovery  # RouteRecovery-like: request(key: bytes) -> None
        self.public: socket.socket | None = None
        self.internal: socket.socket | None = None
        self._stop = False
        self._stop_at: float | None = None
        """Monotonic time to stop at unless the fleet starts draining (see stop_unless_draining)."""
        # Local counters, flushed into shared memory once per wake-up. Arrays of the
        # shared words' own type, so a flush is two slice copies, not a store per counter.
        self.counters = array("Q", bytes(8 * len(COUNTER_NAMES)))
        self.drops = array("Q", bytes(8 * len(DROP_REASONS)))
        self._stats_word = fleet.worker_word(settings.index)
        counters_word = self._stats_word + W_COUNTERS
        drops_word = self._stats_word + W_DROPS
        self._counter_words = slice(counters_word, counters_word + len(COUNTER_NAMES))
        self._drop_words = slice(drops_word, drops_word + len(DROP_REASONS))
        # Caches: public sockaddr key -> [seq word, version, transceiver id, key address,
        # last-touch ms, last_seen word]; route key int -> [seq word, version, transceiver id,
        # client sockaddr words...].
        self._cache: dict[int, list] = {}
        self._reverse: dict[int, list] = {}
        self._directory_generation = -1
        self._transceiver_name: list[int] = [0] * DIRECTORY_ENTRIES  # sockaddr address or 0
        self._transceiver_sources: dict[int, int] = {}  # internal sockaddr key -> id
        self._transceiver_names: mmap.mmap | None = None  # sockaddrs the iovecs point at
        self._batches: list[_Batch | _BundleBatch] = []  # closed by close()
        self._open_bundles: dict[int, int] = {}  # transceiver id -> message index, per batch
        self._bundle_cursor: list[int] = []  # per message: the next record's first iovec word
        self.bundles: _BundleBatch | None = None

    # -- setup -----------------------------------------------------------------------
    def open(self) -> None:
        s = self.settings
        self.public = open_public_socket(s.bind, s.port, s.recv_buffer_bytes, s.send_buffer_bytes)
        self.public_family = self.public.family
        self.internal = socket.socket(_family_of(s.internal_bind), socket.SOCK_DGRAM)
        self.internal.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _set_buffers(self.internal, s.recv_buffer_bytes, s.send_buffer_bytes)
        self.internal.bind((s.internal_bind, s.internal_port))
        self.internal_family = self.internal.family
        public_namelen = 16 if self.public_family == socket.AF_INET else 28
        internal_namelen = 16 if self.internal_family == socket.AF_INET else 28
        # One spare byte detects oversize datagrams; 8-byte alignment lets the loop read
        # the relay header of an internal datagram as three words.
        n, size = s.batch_size, (s.max_datagram + 1 + 7) & ~7
        self.public_in = _Batch(n, size, receive=True, namelen=public_namelen)
        self.internal_in = _Batch(n, size, receive=True, namelen=internal_namelen)
        self.to_transceivers = _Batch(n, 0, receive=False, namelen=internal_namelen)
        self.to_clients = _Batch(n, 0, receive=False, namelen=public_namelen)
        self._batches = [self.public_in, self.internal_in, self.to_transceivers, self.to_clients]
        self.bundle_limit = 0
        if s.bundle_max_bytes > 0:
            per_bundle, self.bundle_limit = bundle_shape(n, s.bundle_max_bytes)
            self.bundles = _BundleBatch(n, per_bundle, s.max_datagram, internal_namelen)
            self._batches.append(self.bundles)
        # To transceivers: two iovecs (header in shared memory, payload); to clients: one.
        for i in range(n):
            self.to_transceivers.words[i * 8 + 3] = 2
            self.to_transceivers.words[self.to_transceivers.iov_word + i * 4 + 1] = HEADER_SIZE
        self._transceiver_names = mmap.mmap(-1, DIRECTORY_ENTRIES * SOCKADDR_STRIDE)
        self._transceiver_names_address = _atomics.address(self._transceiver_names)
        self._write_worker_info()
        self._bind_loop_locals()

    def _bind_loop_locals(self) -> None:
        """Gather what the drain loops read into two tuples, unpacked once per wake-up.

        A light load wakes the worker for one or two datagrams at a time, so the dozen
        attribute lookups a drain call needs cost as much as the datagrams themselves.
        Everything here is fixed once open() is done (caches are cleared, never replaced);
        ``_transceiver_sources`` is replaced on directory changes and is read per call.
        """
        inbound, out = self.public_in, self.to_transceivers
        bundles = self.bundles
        self._bundle_cursor = [0] * inbound.count
        self._bundle_locals = (
            self.bundle_limit,
            self._open_bundles,
            self._open_bundles.get,
            [0] * inbound.count,  # bytes used, per message
            self._bundle_cursor,
            bundles.region_start if bundles else [],
            bundles.prefix_delta if bundles else 0,
            bundles.prefix_words if bundles else [],
            bundles.words if bundles else out.words,
        )
        self._public_locals = (
            self.public.fileno(),
            self.internal.fileno(),
            inbound,
            out,
            inbound.words,
            out.words,
            inbound.payload_addresses,
            inbound.bytes,
            inbound.payload_offset,
            inbound.payload_size,
            self._cache.get,
            self.table.words,
            self._transceiver_name,
            inbound.name_word,
            out.iov_word,
            self.public_family == socket.AF_INET,
            self.settings.max_datagram,
            self.counters,
            self.drops,
        )
        inbound, out = self.internal_in, self.to_clients
        self._internal_locals = (
            self.internal.fileno(),
            self.public.fileno(),
            inbound,
            out,
            inbound.words,
            out.words,
            inbound.payload_addresses,
            self._reverse.get,
            self.table.words,
            inbound.name_word,
            out.iov_word,
            out.name_word,
            self.internal_family == socket.AF_INET,
            self.public_family == socket.AF_INET,
            inbound.payload_offset // 8,
            inbound.payload_size // 8,  # open() makes payload buffers 8-byte aligned
            self.settings.max_datagram,
            self.counters,
            self.drops,
        )

    def _write_worker_info(self) -> None:
        s, words, base = self.settings, self.fleet.words, self._stats_word
        words[base + W_PID] = os.getpid()
        words[base + W_STARTED_MS] = int(time.time() * 1000)
        words[base + W_HEARTBEAT_MS] = int(time.time() * 1000)
        words[base + W_INTERNAL_PORT] = self.internal.getsockname()[1]
        words[base + W_CPU] = (s.pin_cpu + 1) if s.pin_cpu is not None else 0
        words[base + W_RCVBUF] = self.public.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        words[base + W_SNDBUF] = self.public.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # Counters continue from what a previous incarnation of this worker left.
        self.counters = array("Q", words[self._counter_words].tolist())
        self.drops = array("Q", words[self._drop_words].tolist())
        words[base + W_STATE] = WORKER_STARTING

    def close(self) -> None:
        """Close the sockets and unmap the batch arrays (idempotent).

        Only this process's own buffers: the shared segments are closed by their owner
        (``serve``), after this.
        """
        for sock in (self.public, self.internal):
            if sock is not None:
                sock.close()
        self.public = self.internal = None
        for batch in self._batches:
            batch.close()
        self._batches = []
        if self._transceiver_names is not None:
            self._transceiver_names.close()
            self._transceiver_names = None

    def stop(self) -> None:
        self._stop = True

    def stop_unless_draining(self, deadline: float) -> None:
        """Stop at ``deadline`` (monotonic) unless the fleet starts draining first: then the
        supervisor stops us once the drain's grace period is over."""
        if self._stop_at is None:
            self._stop_at = deadline

    def _check_deferred_stop(self) -> None:
        if self._stop_at is None:
            return
        if self.fleet.draining:
            self._stop_at = None
        elif time.monotonic() >= self._stop_at:
            self._stop = True

    # -- directory ---------------------------------------------------------------------
    def _refresh_directory(self) -> None:
        """Rebuild the transceiver maps from the shared directory (rare: on generation change)."""
        fleet = self.fleet
        generation = fleet.generation
        words, stride = fleet.words, ENTRY_SIZE // 8
        names = memoryview(self._transceiver_names)
        sources: dict[int, int] = {}
        for tid in range(1, DIRECTORY_ENTRIES):
            word = fleet.directory_word + tid * stride
            state = words[word + D_STATE]
            if not state:
                if self._transceiver_name[tid]:
                    self._transceiver_name[tid] = 0
                continue
            for _ in range(100):  # seqlock read
                seq = words[word + D_SEQ]
                state, family = words[word + D_STATE], words[word + D_FAMILY]
                port, hi, lo = (
                    words[word + D_PORT],
                    words[word + D_ADDR_HI],
                    words[word + D_ADDR_LO],
                )
                if not seq & 1 and words[word + D_SEQ] == seq:
                    break
            else:
                continue
            packed = ((hi << 64) | lo).to_bytes(16, "big")
            if self.internal_family == socket.AF_INET:
                if family != 4:
                    self._transceiver_name[tid] = 0
                    continue
                raw = sockaddr_for(
                    socket.inet_ntop(socket.AF_INET, packed[12:]), port, socket.AF_INET
                )
            else:
                raw = sockaddr_for(socket.inet_ntop(socket.AF_INET6, packed), port, socket.AF_INET6)
            offset = tid * SOCKADDR_STRIDE
            names[offset : offset + len(raw)] = raw
            sources[self._source_key(raw)] = tid
            healthy = state == TRANSCEIVER_HEALTHY
            self._transceiver_name[tid] = self._transceiver_names_address + offset if healthy else 0
        names.release()
        self._transceiver_sources = sources
        self._directory_generation = generation

    def _source_key(self, raw: bytes | memoryview) -> int:
        """Cache key of a native sockaddr (what the loop computes from the recv names array)."""
        w = struct.unpack_from("=QQQ", bytes(raw).ljust(24, b"\x00"))
        if int.from_bytes(raw[0:2], sys.byteorder) == socket.AF_INET:
            return w[0]
        return (((w[1] << 64) | w[2]) << 16) | ((w[0] >> 16) & 0xFFFF)

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until stop(); the caller installs signal handlers that call stop()."""
        s = self.settings
        if s.pin_cpu is not None:
            os.sched_setaffinity(0, {s.pin_cpu})
        poller = select.epoll()
        public_fd, internal_fd = self.public.fileno(), self.internal.fileno()
        self.public.setblocking(False)
        self.internal.setblocking(False)
        poller.register(public_fd, select.EPOLLIN)
        poller.register(internal_fd, select.EPOLLIN)
        fleet_words, stats = self.fleet.words, self._stats_word
        fleet_words[stats + W_STATE] = WORKER_RUNNING
        self._refresh_directory()
        next_tick = next_housekeeping = 0.0
        timeout = IDLE_POLL_SECONDS
        poll, clock = poller.poll, time.time
        drain_public, drain_internal = self._drain_public, self._drain_internal
        coalesce = s.coalesce_us / 1e6
        if coalesce:
            set_timer_slack(TIMER_SLACK_NS)
        counters, sleep = self.counters, time.sleep
        pacing = False
        seen = tick_seen = 0  # datagrams read (both sockets) at the last wake-up, last tick
        last_tick = clock()
        try:
            while not self._stop:
                # At most two events: maxevents sizes the array the call allocates.
                events = poll(timeout, 2)
                now = clock()
                if events:
                    now_ms = int(now * 1000)
                    for fd, _ in events:
                        if fd == public_fd:
                            drain_public(now_ms)
                        else:
                            drain_internal(now_ms)
                    if pacing:
                        received = counters[0] + counters[2]  # rx_public + rx_internal
                        if received - seen < COALESCE_BELOW:
                            # A steady light load: let datagrams gather for a while, so the
                            # next wake-up reads and sends several with one call each.
                            sleep(coalesce)
                        seen = received
                    if now < next_tick:
                        # What this wake-up counted is flushed at the next tick, or at the
                        # next poll's timeout if the traffic stops before then.
                        timeout = TICK_SECONDS
                        continue
                # Pace wake-ups while the recent rate fills a coalescing sleep with at
                # least COALESCE_MIN datagrams on average; below that a sleep saves nothing.
                received = counters[0] + counters[2]
                pacing = coalesce > 0 and (received - tick_seen) * coalesce >= COALESCE_MIN * (
                    now - last_tick
                )
                seen = tick_seen = received
                last_tick = now
                next_tick = now + TICK_SECONDS
                timeout = IDLE_POLL_SECONDS
                if fleet_words[H_GENERATION] != self._directory_generation:
                    self._refresh_directory()
                if now >= next_housekeeping:
                    next_housekeeping = now + 0.5
                    self._housekeeping(int(now * 1000))
                else:
                    self._flush_counters()
        finally:
            poller.close()
            self._flush_counters()
            fleet_words[stats + W_STATE] = WORKER_EXITED

    def _housekeeping(self, now_ms: int) -> None:
        words, base = self.fleet.words, self._stats_word
        words[base + W_HEARTBEAT_MS] = now_ms
        words[base + W_CPU_TIME_US] = int(time.process_time() * 1_000_000)
        if self.fleet.draining and words[base + W_STATE] == WORKER_RUNNING:
            words[base + W_STATE] = WORKER_DRAINING
        self._check_deferred_stop()
        self._flush_counters()

    def _flush_counters(self) -> None:
        words = self.fleet.words
        words[self._counter_words] = self.counters
        words[self._drop_words] = self.drops

    def _drain_public(self, now_ms: int) -> None:
        """Read batches from clients until the socket is empty; forward each to its transceiver.

        With bundling, a packet joins the bundle its transceiver has open in this batch when
        it fits in ``bundle_limit`` bytes, else opens a new one (message order is send order,
        so each client's packets stay in order); ``_send_bundles`` finishes the messages. A
        batch of one datagram (a light load's usual wake-up) cannot bundle: it takes the v1
        path, which costs less per call.
        """
        (
            fd,
            out_fd,
            batch,
            out,
            recv_words,
            out_words,
            payload_addresses,
            payload_bytes,
            payload_offset,
            payload_size,
            cache_get,
            table_words,
            names,
            name_word,
            out_iov,
            v4,
            max_datagram,
            counters,
            drops,
        ) = self._public_locals
        (
            limit,
            open_bundles,
            open_get,
            used,
            cursor,
            region_start,
            prefix_delta,
            prefix_words,
            bundle_words,
        ) = self._bundle_locals
        vec, count, out_vec = batch.vector, batch.count, out.vector
        touch_before = now_ms - TOUCH_INTERVAL_MS
        while True:
            received = _recvmmsg(fd, vec, count, MSG_DONTWAIT, None)
            if received <= 0:
                return
            counters[0] += received  # rx_public
            counters[9] += 1  # batches
            sent = bytes_in = 0
            bundling = limit and received > 1
            for i in range(received):
                length = recv_words[i * 8 + 7] & 0xFFFFFFFF
                bytes_in += length
                if length > max_datagram:
                    drops[7] += 1  # oversize
                    continue
                n = name_word + i * 4
                if v4:
                    key = recv_words[n]
                else:
                    key = (((recv_words[n + 1] << 64) | recv_words[n + 2]) << 16) | (
                        (recv_words[n] >> 16) & 0xFFFF
                    )
                entry = cache_get(key)
                if entry is None or table_words[entry[0]] != entry[1]:
                    entry = self._public_miss(key, i, length, now_ms)
                    if entry is None:
                        continue
                elif payload_bytes[payload_offset + i * payload_size] < 2:
                    # A STUN request on a known route: may carry a token for another
                    # transceiver (a new session from the same address). Rare: once per
                    # consent check.
                    entry = self._public_stun_on_route(entry, key, i, length, now_ms)
                    if entry is None:
                        continue
                tid = entry[2]
                name = names[tid]
                if not name:
                    drops[4] += 1  # unknown_transceiver (withdrawn or unhealthy)
                    continue
                if entry[4] < touch_before:
                    entry[4] = now_ms
                    table_words[entry[5]] = now_ms
                if bundling:
                    size = length + RECORD_OVERHEAD
                    m = open_get(tid)
                    if m is not None:
                        size += used[m]
                        if size <= limit:  # joins the transceiver's open bundle
                            used[m] = size
                            o = cursor[m]
                            cursor[m] = o + 6
                            bundle_words[o + prefix_delta] = prefix_words[length]
                            bundle_words[o + 2] = entry[3]
                            bundle_words[o + 4] = payload_addresses[i]
                            bundle_words[o + 5] = length
                            continue
                        size -= used[m]
                    # The first record of a new message (alone if it exceeds the limit).
                    open_bundles[tid] = sent
                    used[sent] = size
                    o = region_start[sent]
                    cursor[sent] = o + 6
                    bundle_words[sent * 8] = name
                    bundle_words[o + 2] = entry[3]
                    bundle_words[o + 4] = payload_addresses[i]
                    bundle_words[o + 5] = length
                    sent += 1
                    continue
                h = sent * 8
                out_words[h] = name
                o = out_iov + sent * 4
                out_words[o] = entry[3]
                out_words[o + 2] = payload_addresses[i]
                out_words[o + 3] = length
                sent += 1
            counters[4] += bytes_in
            if sent:
                if bundling:
                    self._send_bundles(out_fd, sent)
                else:
                    done = _sendmmsg(out_fd, out_vec, sent, 0)
                    if done == sent:
                        counters[3] += sent  # tx_internal
                    else:
                        self._send_rest(out_fd, out, sent, done, 3)
            if received < count:
                return

    def _send_bundles(self, fd: int, count: int) -> None:
        """Finish the ``count`` messages built by ``_drain_public`` and sendmmsg them.

        A message of several records becomes a bundle (its first record's prefix is written
        now, the others' as they joined); a message of one record goes as v1. Counts
        client packets in tx_internal, bundle datagrams in bundles_out; a refused message
        drops all of its records.
        """
        bundles = self.bundles
        words, region_start, cursor = bundles.words, bundles.region_start, self._bundle_cursor
        bundle_iov, single_iov = bundles.bundle_iov, bundles.single_iov
        prefix_words, prefix_delta = bundles.prefix_words, bundles.prefix_delta
        packets = bundled = 0
        for m in range(count):
            start = region_start[m]
            records = (cursor[m] - start) // 6
            packets += records
            h = m * 8
            if records == 1:
                words[h + 2] = single_iov[m]
                words[h + 3] = 2
            else:
                words[h + 2] = bundle_iov[m]
                words[h + 3] = 3 * records
                words[start + prefix_delta] = prefix_words[words[start + 5]]
                bundled += 1
        self._open_bundles.clear()
        done = _sendmmsg(fd, bundles.vector, count, 0)
        failed = (
            _NO_FAILURES
            if done == count
            else self._sendmmsg_all(fd, bundles.headers_address, count, done)
        )
        if failed:
            for m in failed:
                records = (cursor[m] - region_start[m]) // 6
                packets -= records
                self.drops[12] += records  # send_error
                if records > 1:
                    bundled -= 1
        self.counters[3] += packets  # tx_internal
        self.counters[11] += bundled  # bundles_out

    def _drain_internal(self, now_ms: int) -> None:
        """Read batches from transceivers; send each payload to its client from the public port."""
        (
            fd,
            out_fd,
            batch,
            out,
            recv_words,
            out_words,
            payload_addresses,
            reverse_get,
            table_words,
            name_word,
            out_iov,
            out_name,
            v4_internal,
            v4_public,
            payload_word,
            payload_stride_words,
            max_datagram,
            counters,
            drops,
        ) = self._internal_locals
        vec, count, out_vec = batch.vector, batch.count, out.vector
        sources = self._transceiver_sources
        first_bytes = batch.bytes
        while True:
            received = _recvmmsg(fd, vec, count, MSG_DONTWAIT, None)
            if received <= 0:
                return
            counters[2] += received  # rx_internal
            sent = bytes_out = 0
            for i in range(received):
                length = recv_words[i * 8 + 7] & 0xFFFFFFFF
                if length > max_datagram:
                    drops[7] += 1
                    continue
                n = name_word + i * 4
                if v4_internal:
                    source = recv_words[n]
                else:
                    source = (((recv_words[n + 1] << 64) | recv_words[n + 2]) << 16) | (
                        (recv_words[n] >> 16) & 0xFFFF
                    )
                tid = sources.get(source)
                if tid is None:
                    drops[8] += 1  # internal_unknown_source
                    continue
                if length < HEADER_SIZE:
                    drops[9] += 1  # internal_bad_header
                    continue
                p = payload_word + i * payload_stride_words
                if first_bytes[p * 8] == BUNDLE_MARKER:
                    # Several clients' replies in one datagram: one send per record.
                    sent, added = self._unbundle_internal(out_fd, i, length, tid, sent)
                    bytes_out += added
                    continue
                if sent == count:
                    self._send_to_clients(out_fd, out, sent)
                    sent = 0
                rkey = recv_words[p] | (recv_words[p + 1] << 64) | (recv_words[p + 2] << 128)
                entry = reverse_get(rkey)
                if entry is None or table_words[entry[0]] != entry[1]:
                    entry = self._internal_miss(rkey, i)
                    if entry is None:
                        continue
                if entry[2] != tid:
                    drops[11] += 1  # internal_wrong_transceiver: no open reflector
                    continue
                if length == HEADER_SIZE:
                    # A header alone: the owning transceiver ended the call (rare).
                    self._release_route(entry, rkey)
                    continue
                nw = out_name + sent * 4
                out_words[nw] = entry[3]
                if not v4_public:
                    out_words[nw + 1] = entry[4]
                    out_words[nw + 2] = entry[5]
                    out_words[nw + 3] = 0
                o = out_iov + sent * 4
                out_words[o] = payload_addresses[i] + HEADER_SIZE
                out_words[o + 1] = length - HEADER_SIZE
                bytes_out += length - HEADER_SIZE
                sent += 1
            counters[5] += bytes_out
            if sent:
                done = _sendmmsg(out_fd, out_vec, sent, 0)
                if done == sent:
                    counters[1] += sent  # tx_public
                else:
                    self._send_rest(out_fd, out, sent, done, 1)
            if received < count:
                return

    def _send_to_clients(self, fd: int, out: _Batch, count: int) -> None:
        """Send the ``count`` messages queued for clients (the batch is full; rare)."""
        done = _sendmmsg(fd, out.vector, count, 0)
        if done == count:
            self.counters[1] += count  # tx_public
        else:
            self._send_rest(fd, out, count, done, 1)

    def _unbundle_internal(
        self, out_fd: int, i: int, length: int, tid: int, sent: int
    ) -> tuple[int, int]:
        """Queue each record of the bundle in message ``i`` (from transceiver ``tid``) for
        its client (sent from ``out_fd``); returns the new count of queued messages and the
        payload bytes queued.

        Called once per bundle, so the per-record work stays small: the record's header is
        read as one integer from the receive buffer (no copy of the payload), and its
        payload goes out through an iovec pointing into that buffer. A malformed record ends
        the bundle (one internal_bad_header drop); the records before it stand.
        """
        batch, out = self.internal_in, self.to_clients
        view, out_words = batch.bytes, out.words
        reverse_get, table_words = self._reverse.get, self.table.words
        v4_public = self.public_family == socket.AF_INET
        out_iov, out_name, capacity = out.iov_word, out.name_word, out.count
        base = batch.payload_offset + i * batch.payload_size
        address = batch.payload_addresses[i] - base
        offset, end = base, base + length
        queued_bytes = 0
        while offset < end:
            start = offset + RECORD_OVERHEAD
            if start > end or view[offset] != BUNDLE_MARKER or view[offset + 1]:
                self.drops[9] += 1  # internal_bad_header
                break
            size = (view[offset + 2] << 8) | view[offset + 3]
            if start + size > end:
                self.drops[9] += 1
                break
            rkey = int.from_bytes(view[offset + RECORD_PREFIX_SIZE : start], sys.byteorder)
            entry = reverse_get(rkey)
            if entry is None or table_words[entry[0]] != entry[1]:
                entry = self._internal_miss_header(
                    rkey, bytes(view[offset + RECORD_PREFIX_SIZE : start])
                )
            if entry is None:
                pass
            elif entry[2] != tid:
                self.drops[11] += 1  # internal_wrong_transceiver
            elif size == 0:
                self._release_route(entry, rkey)  # the transceiver ended the call
            else:
                if sent == capacity:
                    self._send_to_clients(out_fd, out, sent)
                    sent = 0
                nw = out_name + sent * 4
                out_words[nw] = entry[3]
                if not v4_public:
                    out_words[nw + 1] = entry[4]
                    out_words[nw + 2] = entry[5]
                    out_words[nw + 3] = 0
                o = out_iov + sent * 4
                out_words[o] = address + start
                out_words[o + 1] = size
                queued_bytes += size
                sent += 1
            offset = start + size
        return sent, queued_bytes

    def _send_rest(self, fd: int, out: _Batch, count: int, first: int, counter: int) -> None:
        """Finish a sendmmsg whose first call returned ``first`` < ``count`` (rare).

        A message the kernel refuses is counted as a drop and skipped.
        """
        failed = self._sendmmsg_all(fd, out.headers_address, count, first)
        self.drops[12] += len(failed)
        self.counters[counter] += count - len(failed)

    def _sendmmsg_all(self, fd: int, base: int, count: int, first: int) -> list[int]:
        """Go on sending the ``count`` messages at ``base`` after a first sendmmsg that
        returned ``first`` (the loop makes that call itself); the indices the kernel refused.

        The sockets are non-blocking so a full send buffer cannot wedge the loop: on EAGAIN
        the worker waits briefly for room once, then drops what still does not fit.
        """
        done = 0
        failed = _NO_FAILURES
        waited = False
        result = first
        while True:
            if result > 0:
                done += result
            else:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK) and not waited:
                    waited = True
                    select.select([], [fd], [], 0.005)
                elif err != errno.EINTR:
                    # The message at `done` failed (unreachable, no buffer room): skip it.
                    if failed is _NO_FAILURES:
                        failed = []
                    failed.append(done)
                    done += 1
            if done >= count:
                return failed
            address = ctypes.c_void_p(base + done * MMSGHDR_SIZE)
            result = _sendmmsg(fd, address, count - done, 0)

    # -- slow paths --------------------------------------------------------------------
    def _raw_name(self, batch: _Batch, i: int) -> bytes:
        offset = batch.name_offset + i * SOCKADDR_STRIDE
        return bytes(batch.bytes[offset : offset + SOCKADDR_STRIDE])

    def _payload(self, batch: _Batch, i: int, length: int) -> memoryview:
        offset = batch.payload_offset + i * batch.payload_size
        return batch.bytes[offset : offset + length]

    def _verify_stun_token(self, payload: memoryview, length: int) -> int | None:
        """Transceiver id named by a STUN binding request's token, or None (drop counted)."""
        try:
            ufrag = server_ufrag(payload, length)
        except ProtocolError:
            self.drops[1] += 1  # bad_stun
            return None
        try:
            claim = self.verifier.verify(ufrag)
        except WrongClusterError:
            self.drops[3] += 1
            return None
        except TokenError:
            self.drops[2] += 1
            return None
        if not self._transceiver_name[claim.transceiver_id]:
            # The loop reads the directory once per tick: a transceiver added since then
            # is known to the shared directory already.
            if self.fleet.words[H_GENERATION] != self._directory_generation:
                self._refresh_directory()
            if not self._transceiver_name[claim.transceiver_id]:
                self.drops[4] += 1
                return None
        return claim.transceiver_id

    def _public_miss(self, key: int, i: int, length: int, now_ms: int) -> list | None:
        batch = self.public_in
        raw = self._raw_name(batch, i)
        route_key = route_key_from_sockaddr(raw)
        table = self.table
        slot = table.find(route_key)
        if slot >= 0:
            return self._cache_route(key, slot)
        payload = self._payload(batch, i, length)
        try:
            if not is_stun(payload, length):
                if self.recovery is not None:
                    self.counters[8] += 1
                    self.recovery.request(route_key)
                self.drops[0] += 1  # no_route
                return None
            if self.fleet.draining:
                self.drops[6] += 1
                return None
            tid = self._verify_stun_token(payload, length)
            if tid is None:
                return None
            try:
                slot = table.insert(route_key, tid, now_ms)
            except TableFull:
                self.drops[5] += 1
                return None
            self.counters[6] += 1  # routes_created
            return self._cache_route(key, slot)
        finally:
            payload.release()

    def _public_stun_on_route(
        self, entry: list, key: int, i: int, length: int, now_ms: int
    ) -> list | None:
        payload = self._payload(self.public_in, i, length)
        try:
            if not is_stun(payload, length):
                return entry  # RTP/RTCP/DTLS start with other bytes; first byte <2 is STUN
            try:
                ufrag = server_ufrag(payload, length)
                claim = self.verifier.verify(ufrag)
            except (ProtocolError, TokenError):
                return entry  # responses/indications and odd requests follow the route
            if claim.transceiver_id == entry[2] or self.fleet.draining:
                return entry
            if not self._transceiver_name[claim.transceiver_id]:
                return entry
            route_key = route_key_from_sockaddr(self._raw_name(self.public_in, i))
            try:
                slot = self.table.insert(route_key, claim.transceiver_id, now_ms)
            except TableFull:
                return entry
            self.counters[7] += 1  # routes_repointed
            return self._cache_route(key, slot)
        finally:
            payload.release()

    def _cache_route(self, key: int, slot: int) -> list | None:
        route = self.table.read(slot)
        if route is None:
            return None
        offset = self.table.slot_offset(slot)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        entry = [
            (offset + SLOT_SEQ) // 8,
            route.version,
            route.transceiver_id,
            self.table.base_address + offset + SLOT_KEY,
            route.last_seen_ms,
            (offset + SLOT_LAST_SEEN) // 8,
        ]
        self._cache[key] = entry
        return entry

    def _release_route(self, entry: list, rkey: int) -> None:
        """Remove exactly the route ``entry`` cached (not a newer one in the same slot)."""
        slot = (entry[0] * 8 - SLOT_SEQ - ROUTING_HEADER_SIZE) // SLOT_SIZE
        try:
            removed = self.table.remove(slot, expected_version=entry[1])
        except SlotBusy:
            removed = False
        self._reverse.pop(rkey, None)
        if removed:
            self.counters[10] += 1  # routes_released

    def _internal_miss(self, rkey: int, i: int) -> list | None:
        batch = self.internal_in
        offset = batch.payload_offset + i * batch.payload_size
        return self._internal_miss_header(rkey, bytes(batch.bytes[offset : offset + HEADER_SIZE]))

    def _internal_miss_header(self, rkey: int, header: bytes) -> list | None:
        """Look the route of relay header ``header`` (a transceiver reply's) up in the table
        and cache it under ``rkey``; None (drop counted) for a bad header or no route."""
        if header[0] != 1 or header[1] not in (4, 6) or header[4:8] != b"\x00\x00\x00\x00":
            self.drops[9] += 1
            return None
        slot = self.table.find(header)
        route = self.table.read(slot) if slot >= 0 else None
        if route is None:
            self.drops[10] += 1  # internal_no_route
            return None
        raw = sockaddr_from_route_key(header, self.public_family)
        if raw is None:
            self.drops[9] += 1
            return None
        w = struct.unpack_from("=QQQQ", raw.ljust(32, b"\x00"))
        slot_offset = self.table.slot_offset(slot)
        if len(self._reverse) >= CACHE_LIMIT:
            self._reverse.clear()
        entry = [
            (slot_offset + SLOT_SEQ) // 8,
            route.version,
            route.transceiver_id,
            w[0],
            w[1],
            w[2],
        ]
        self._reverse[rkey] = entry
        return entry


def serve(settings: WorkerSettings) -> int:
    """Entry point of a worker process: attach shared state, bind, run until SIGTERM/SIGINT.

    On the way out the shared segments are closed explicitly, once nothing reads them any
    more: left to the garbage collector at interpreter exit, a ``SharedMemory`` may be
    finalized while a ``cast`` of its buffer is still alive, which prints "Exception
    ignored ... BufferError: cannot close exported pointers exist".
    """
    table = RoutingTable.attach(settings.table_name)
    fleet: FleetState | None = None
    recovery = None
    try:
        fleet = FleetState.attach(settings.fleet_name)
        supervisor_pid = fleet.supervisor_pid
        if not die_with_parent(supervisor_pid):
            return 0  # the supervisor is gone already
        verifier = TokenVerifier(
            [bytes.fromhex(secret) for secret in settings.token_secrets], settings.cluster_id
        )
        if settings.redis_url:
            recovery = _start_recovery(settings, table, fleet)
        worker = RelayWorker(settings, table, fleet, verifier, recovery)

        def on_terminate(signum: int, frame: object) -> None:
            # A signal sent to the whole service (systemd's default KillMode) reaches us
            # with the supervisor's: it is the supervisor's cue to drain, and stopping now
            # would cut the flows the drain keeps alive. While the fleet drains, a SIGTERM
            # is the supervisor's own, after the grace period.
            if os.getppid() == supervisor_pid and not fleet.draining:
                worker.stop_unless_draining(time.monotonic() + TERMINATE_WAIT_SECONDS)
            else:
                worker.stop()

        signal.signal(signal.SIGTERM, on_terminate)
        signal.signal(signal.SIGINT, on_terminate)
        try:
            worker.open()
            worker.run()
        finally:
            worker.close()
    finally:
        # A recovery thread still inside a Redis call may write the table next, and
        # unmapping under it would crash the process: then leave the mappings to exit.
        if recovery is None or recovery.stop():
            if fleet is not None:
                fleet.close()
            table.close()
    return 0


def _start_recovery(
    settings: WorkerSettings, table: RoutingTable, fleet: FleetState
) -> RouteRecovery:
    """Start the background thread that looks unknown callers up in Redis."""
    from voxrelay.engine.redis_mirror import RouteRecovery

    recovery = RouteRecovery(
        table=table,
        cluster_id=settings.cluster_id,
        url=settings.redis_url,
        rate=settings.recovery_rate,
        negative_cache_seconds=settings.negative_cache_seconds,
        socket_timeout=settings.redis_socket_timeout,
        is_known_transceiver=lambda tid: fleet.read_transceiver(tid) is not None,
    )
    recovery.start()
    return recovery


def main() -> None:
    settings = WorkerSettings.from_json(sys.stdin.buffer.read())
    sys.exit(serve(settings))


if __name__ == "__main__":
    main()
