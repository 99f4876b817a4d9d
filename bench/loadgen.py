"""Load generator processes for the relay benchmark: many clients, and a sink.

Why separate processes: a forwarder benchmark measures the forwarder, so the traffic
source and the sink must not share its interpreter (or its GIL), and the source must
be able to outrun it. Two kinds of process live here, each started with
``python -m voxrelay.bench.loadgen <role>`` and driven by the benchmark over pipes:

``sink``
    One UDP socket standing in for a transceiver. It counts every datagram with
    recvmmsg and echoes back (with sendmmsg, to the sender) the ones that ask for it:
    STUN binding requests (so a client can confirm its route both ways) and latency
    probes. It tells relayed datagrams (relay header, version byte 1) from direct ones
    (first byte 0 for a STUN request, or a probe mark) and echoes relayed ones with
    their header, exactly as a transceiver replies through the relay. A relay bundle
    (first byte 2) counts as one relayed packet per record, and each record that asks
    for an echo gets its own v1 reply (header + payload), as a transceiver answers.

``clients``
    ``--clients`` UDP sockets, each connected to the target (a forwarder's public
    port), so every socket is one client source port. Commands arrive as JSON lines
    on stdin: ``establish`` (one real ICE binding request per socket, carrying the
    routing token, until every socket has its echo), ``flood`` (sendmmsg as fast as
    possible for a duration) and ``paced`` (evenly spaced probes at a fixed total rate;
    a forked receiver timestamps the echoes, so the send loop and the receive loop never
    wait on each other). With
    ``--direct`` a few more sockets send a tenth as many probes straight to the sink,
    interleaved in the same phase: the baseline RTT that "added latency" subtracts.

The payload of every generated datagram starts with an RTP-range byte (RFC 7983), so a
forwarder treats it as media, never as STUN. Probes carry a sequence number and the
CLOCK_MONOTONIC send time, which a forked receiver can compare with its own clock.

Counters are shared through :class:`CounterFile`, a small mmap'd file of u64 words that
the benchmark reads at any moment without asking the process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import math
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

# First payload bytes: both in the RTP range 128..191 of RFC 7983, so never STUN.
FLOOD_MARK = 0x80  # count only
PROBE_MARK = 0x90  # echo back: a latency probe
RELAY_HEADER_VERSION = 1  # first byte of a relayed datagram (proto/relay_header.py)
RELAY_HEADER_SIZE = 24
RELAY_BUNDLE_MARKER = 2  # first byte of a relay bundle and of each of its records
RELAY_RECORD_PREFIX = 4  # marker, zero, payload length (u16 big endian); then the header
RECORD_HEAD = RELAY_RECORD_PREFIX + RELAY_HEADER_SIZE
# mark, 7 pad bytes, sequence number, CLOCK_MONOTONIC send time in ns.
PROBE = struct.Struct("!B7xQQ")
MIN_DATAGRAM = PROBE.size
MAX_DATAGRAM = 1400

SOCKET_BUFFER_BYTES = 4 << 20
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
PR_SET_TIMERSLACK = 29
MSG_DONTWAIT = 0x40
FLOOD_BATCH = 8  # messages per sendmmsg call, per socket
GSO_SEGMENTS = 16  # datagrams per message when UDP GSO is available
SOL_UDP = 17
UDP_SEGMENT = 103
DIRECT_CLIENTS = 16  # baseline sockets aimed straight at the sink
DIRECT_EVERY = 10  # one direct probe per this many probes through the forwarder
SINK_BATCH = 256
SINK_DATAGRAM = 2048  # sink buffer per datagram; larger when relay bundles may be larger
SINK_NAP_AFTER = 32  # a drain this long means a flood: nap so the next drain batches well
SINK_NAP_SECONDS = 0.001
SOCKADDR_SPACE = 32  # room for a sockaddr_in6 (28 bytes), 8-byte aligned


class LoadgenError(Exception):
    """A load process could not start, answer, or do its job."""


# -- sendmmsg / recvmmsg ------------------------------------------------------------------


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


class ReceiveBatch:
    """Preallocated recvmmsg arrays: ``count`` messages of up to ``payload_size`` bytes.

    ``lengths(n)`` and ``first_byte(i)`` read results without building Python objects per
    field; ``echo`` queues message ``i`` back to its sender in a sendmmsg array that points
    at the same name and payload memory, so echoing copies nothing.
    """

    def __init__(self, count: int, payload_size: int, echo_capacity: int | None = None) -> None:
        self.count = count
        self.payload_size = payload_size
        self.echo_capacity = echo_capacity or count
        self.headers = (MMsgHdr * count)()
        self.iovecs = (IoVec * count)()
        self.names = ctypes.create_string_buffer(count * SOCKADDR_SPACE)
        self.payloads = ctypes.create_string_buffer(count * payload_size)
        self.payload_bytes = memoryview(self.payloads).cast("B")
        names_base = ctypes.addressof(self.names)
        payload_base = ctypes.addressof(self.payloads)
        for i in range(count):
            self.iovecs[i].iov_base = payload_base + i * payload_size
            self.iovecs[i].iov_len = payload_size
            header = self.headers[i].msg_hdr
            header.msg_name = names_base + i * SOCKADDR_SPACE
            header.msg_namelen = SOCKADDR_SPACE
            header.msg_iov = ctypes.addressof(self.iovecs[i])
            header.msg_iovlen = 1
        stride = ctypes.sizeof(MMsgHdr)
        self._length_words = memoryview(self.headers).cast("B").cast("I")
        self._length_index = [(i * stride + MMsgHdr.msg_len.offset) // 4 for i in range(count)]
        self._names_base = names_base
        self._payload_base = payload_base
        self.echo_headers = (MMsgHdr * self.echo_capacity)()
        self.echo_iovecs = (IoVec * self.echo_capacity)()
        for i in range(self.echo_capacity):
            self.echo_headers[i].msg_hdr.msg_iov = ctypes.addressof(self.echo_iovecs[i])
            self.echo_headers[i].msg_hdr.msg_iovlen = 1
        self.echo_count = 0
        self._address = ctypes.addressof(self.headers)
        self._filled = 0

    def receive(self, fd: int) -> int:
        """recvmmsg without blocking; the number of messages read (0 when none)."""
        headers = self.headers
        for i in range(self._filled):
            # Value-result field: the kernel overwrote it with the sender's address length.
            headers[i].msg_hdr.msg_namelen = SOCKADDR_SPACE
        received = _recvmmsg(fd, self._address, self.count, MSG_DONTWAIT, None)
        if received < 0:
            self._filled = 0
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        self._filled = received
        return received

    def length(self, i: int) -> int:
        return self._length_words[self._length_index[i]]

    def first_byte(self, i: int, offset: int = 0) -> int:
        return self.payload_bytes[i * self.payload_size + offset]

    def echo(self, i: int, length: int, offset: int = 0) -> None:
        """Queue ``length`` bytes of message ``i`` from ``offset`` back to its sender.

        The caller flushes when ``echo_count`` reaches ``echo_capacity``.
        """
        j = self.echo_count
        header = self.echo_headers[j].msg_hdr
        header.msg_name = self._names_base + i * SOCKADDR_SPACE
        header.msg_namelen = self.headers[i].msg_hdr.msg_namelen
        self.echo_iovecs[j].iov_base = self._payload_base + i * self.payload_size + offset
        self.echo_iovecs[j].iov_len = length
        self.echo_count = j + 1

    def flush_echoes(self, fd: int) -> int:
        """sendmmsg the queued echoes; returns how many the kernel took."""
        queued, self.echo_count = self.echo_count, 0
        done = 0
        while done < queued:
            address = ctypes.addressof(self.echo_headers) + done * ctypes.sizeof(MMsgHdr)
            sent = _sendmmsg(fd, address, queued - done, 0)
            if sent <= 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                done += 1  # skip the message the kernel refused
                continue
            done += sent
        return queued


class FloodBatch:
    """A sendmmsg array of ``count`` copies of one datagram, for connected sockets."""

    def __init__(self, count: int, datagram: bytes) -> None:
        self.count = count
        self.payload = ctypes.create_string_buffer(datagram, len(datagram))
        self.iovec = IoVec(ctypes.addressof(self.payload), len(datagram))
        self.headers = (MMsgHdr * count)()
        for i in range(count):
            self.headers[i].msg_hdr.msg_iov = ctypes.addressof(self.iovec)
            self.headers[i].msg_hdr.msg_iovlen = 1
        self.address = ctypes.addressof(self.headers)

    def send(self, fd: int) -> int:
        """One non-blocking sendmmsg; the number of messages sent (0 if none fit)."""
        sent = _sendmmsg(fd, self.address, self.count, MSG_DONTWAIT)
        return sent if sent > 0 else 0


# -- shared counters ----------------------------------------------------------------------


class CounterFile:
    """Named u64 counters in an mmap'd file: one process writes, anyone reads.

    A u64 store is atomic on 64-bit Linux, so a reader sees each counter either before or
    after an update, never torn; counters are not read as one consistent snapshot.
    """

    def __init__(self, path: str | os.PathLike, names: Sequence[str], *, create: bool) -> None:
        self.path = Path(path)
        self.names = tuple(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        size = max(8 * len(self.names), 8)
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        descriptor = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(descriptor, size)
            elif os.fstat(descriptor).st_size < size:
                raise LoadgenError(f"counter file {self.path} is shorter than {size} bytes")
            self._map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        self.words = memoryview(self._map).cast("Q")

    def read(self) -> dict[str, int]:
        words = self.words
        return {name: words[i] for i, name in enumerate(self.names)}

    def write(self, name: str, value: int) -> None:
        self.words[self.index[name]] = value

    def close(self) -> None:
        self.words.release()
        self._map.close()


SINK_COUNTERS = ("relayed", "direct", "echoed", "batches")


# -- small helpers --------------------------------------------------------------------------


def set_buffers(sock: socket.socket, size: int = SOCKET_BUFFER_BYTES) -> None:
    """Socket buffers of ``size`` bytes; root may exceed net.core.{r,w}mem_max."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def pin_to_cpus(cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))


def fine_timer_slack() -> None:
    """Ask for 1 µs timer slack (default 50 µs) so short sleeps can pace packets."""
    with contextlib.suppress(AttributeError, OSError):
        _libc.prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


def emit(message: dict[str, Any]) -> None:
    """One JSON line on stdout: how a load process answers the benchmark."""
    os.write(1, orjson.dumps(message) + b"\n")


def _percentile(sorted_values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0.0
    # The smallest rank covering ``fraction`` of the values; the epsilon absorbs float
    # error such as 0.999 * 1000 = 999.0000000000001.
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values) - 1e-9)))
    return float(sorted_values[rank - 1])


def latency_summary(samples_ns: array) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean of RTT samples, in microseconds."""
    values = sorted(samples_ns)
    if not values:
        return {
            "count": 0,
            "p50": 0.0,
            "p90": 0.0,
            "p99": 0.0,
            "p999": 0.0,
            "max": 0.0,
            "mean": 0.0,
        }
    return {
        "count": len(values),
        "p50": _percentile(values, 0.50) / 1000,
        "p90": _percentile(values, 0.90) / 1000,
        "p99": _percentile(values, 0.99) / 1000,
        "p999": _percentile(values, 0.999) / 1000,
        "max": values[-1] / 1000,
        "mean": sum(values) / len(values) / 1000,
    }


def binding_request(server_ufrag: str, client_ufrag: str) -> bytes:
    """A real ICE binding request, as a browser sends it first: the route creator."""
    from aioice import stun

    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    message.attributes["USERNAME"] = f"{server_ufrag}:{client_ufrag}"
    message.attributes["PRIORITY"] = 1853817087
    message.attributes["ICE-CONTROLLING"] = int.from_bytes(os.urandom(8), "big")
    message.add_message_integrity(b"benchmarkpassword00000")
    message.add_fingerprint()
    return bytes(message)


def ignore_interrupts() -> None:
    """Leave Ctrl-C to the benchmark: it stops its processes in order (stdin EOF, SIGTERM).

    Ctrl-C in a terminal reaches the whole process group; a sink or forwarder that died
    on it first would turn a clean interrupt into a confusing error mid-phase.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopFlag:
    """Set by SIGTERM so loops end between iterations, never mid-syscall-batch."""

    def __init__(self) -> None:
        self.stopped = False
        signal.signal(signal.SIGTERM, self._set)
        ignore_interrupts()

    def _set(self, signum: int, frame: Any) -> None:
        self.stopped = True


# -- the sink -----------------------------------------------------------------------------------


def run_sink(
    bind: str, stats_path: str, cpus: Sequence[int] | None, max_datagram: int = SINK_DATAGRAM
) -> None:
    """Count and echo until SIGTERM or until stdin closes (the benchmark went away)."""
    stop = _StopFlag()
    pin_to_cpus(cpus)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_buffers(sock)
    sock.bind((bind, 0))
    sock.setblocking(False)
    counters = CounterFile(stats_path, SINK_COUNTERS, create=True)
    batch = ReceiveBatch(SINK_BATCH, max_datagram, echo_capacity=2 * SINK_BATCH)
    payload_bytes, payload_size = batch.payload_bytes, batch.payload_size
    fd = sock.fileno()
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    poller.register(0, select.EPOLLIN | select.EPOLLHUP)
    emit({"event": "ready", "port": sock.getsockname()[1], "pid": os.getpid()})
    relayed = direct = echoed = batches = 0
    words, index = counters.words, counters.index
    try:
        while not stop.stopped:
            for ready, _ in poller.poll(0.2):
                if ready == 0:
                    if not os.read(0, 4096):
                        return
                    continue
                drained = 0
                while True:
                    received = batch.receive(fd)
                    if not received:
                        break
                    batches += 1
                    for i in range(received):
                        if batch.echo_count == batch.echo_capacity:  # bundles may fill it
                            echoed += batch.flush_echoes(fd)
                        length = batch.length(i)
                        first = batch.first_byte(i)
                        if first == RELAY_HEADER_VERSION and length > RELAY_HEADER_SIZE:
                            relayed += 1
                            inner = batch.first_byte(i, RELAY_HEADER_SIZE)
                            if inner == PROBE_MARK or inner < 4:  # probe, or STUN
                                batch.echo(i, length)
                        elif first == RELAY_BUNDLE_MARKER:
                            # Records: count each; echo probes and STUN as v1 datagrams.
                            base = i * payload_size
                            offset = 0
                            while offset + RECORD_HEAD <= length:
                                at = base + offset
                                size = (payload_bytes[at + 2] << 8) | payload_bytes[at + 3]
                                end = offset + RECORD_HEAD + size
                                if end > length:
                                    break  # cut short by a too small buffer: not counted
                                relayed += 1
                                at_header = offset + RELAY_RECORD_PREFIX
                                inner = payload_bytes[at + RECORD_HEAD] if size else 255
                                if inner == PROBE_MARK or inner < 4:
                                    if batch.echo_count == batch.echo_capacity:
                                        echoed += batch.flush_echoes(fd)
                                    batch.echo(i, end - at_header, at_header)
                                offset = end
                        else:
                            direct += 1
                            if first == PROBE_MARK or first == 0:  # probe, or STUN request
                                batch.echo(i, length)
                    if batch.echo_count:
                        echoed += batch.flush_echoes(fd)
                    words[index["relayed"]] = relayed
                    words[index["direct"]] = direct
                    words[index["echoed"]] = echoed
                    words[index["batches"]] = batches
                    drained += received
                    if received < batch.count:
                        break
                # Under a flood, waking for every few datagrams would cost the sink (and
                # the forwarder waking it) more than the forwarding; probes at a moderate
                # rate never drain this many at once, so their latency is untouched.
                if drained >= SINK_NAP_AFTER:
                    time.sleep(SINK_NAP_SECONDS)
    finally:
        poller.close()
        counters.close()
        sock.close()


# -- the clients ---------------------------------------------------------------------------------


class Clients:
    """``count`` sockets connected to ``target``: the client source ports of a phase."""

    def __init__(
        self,
        target: tuple[str, int],
        count: int,
        size: int,
        direct: tuple[str, int] | None = None,
    ) -> None:
        self.target = target
        self.direct = direct
        self.size = size
        self.sockets = [self._connected(target) for _ in range(count)]
        # Baseline clients: probes that skip the forwarder, sent during the same phase.
        self.direct_sockets = (
            [self._connected(direct) for _ in range(min(DIRECT_CLIENTS, count))] if direct else []
        )

    @staticmethod
    def _connected(peer: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_buffers(sock, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.connect(peer)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for sock in self.sockets + self.direct_sockets:
            sock.close()

    def _drain(self, sock: socket.socket, buffer: bytearray) -> int:
        got = 0
        while True:
            try:
                sock.recv_into(buffer)
            except (BlockingIOError, ConnectionRefusedError):
                return got
            got += 1

    def establish(self, token: str, timeout: float) -> dict[str, Any]:
        """Send each socket's binding request until each has its echo; creates the routes."""
        everyone = self.sockets + self.direct_sockets
        pending = {sock.fileno(): (i, sock) for i, sock in enumerate(everyone)}
        requests = {
            sock.fileno(): binding_request(token, f"b{i:05d}") for i, sock in enumerate(everyone)
        }
        poller = select.epoll()
        for fd in pending:
            poller.register(fd, select.EPOLLIN)
        buffer = bytearray(2048)
        deadline = time.monotonic() + timeout
        attempts = 0
        try:
            while pending and time.monotonic() < deadline:
                attempts += 1
                for fd, (_, sock) in pending.items():
                    with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                        sock.send(requests[fd])
                resend_at = time.monotonic() + 0.25
                while pending and time.monotonic() < min(resend_at, deadline):
                    for fd, _ in poller.poll(0.05):
                        entry = pending.get(fd)
                        if entry is not None and self._drain(entry[1], buffer):
                            del pending[fd]
            # Late duplicates of the requests must not leak into a measured phase.
            time.sleep(0.05)
            for sock in everyone:
                self._drain(sock, buffer)
        finally:
            poller.close()
        if pending:
            peers = {"{}:{}".format(*sock.getpeername()) for _, sock in pending.values()}
            raise LoadgenError(
                f"{len(pending)} of {len(everyone)} clients got no echo of their binding "
                f"request from {', '.join(sorted(peers))} within {timeout:g} s; is the "
                "forwarder running and the sink registered as its transceiver?"
            )
        return {"event": "established", "clients": len(everyone), "attempts": attempts}

    def flood(self, duration: float) -> dict[str, Any]:
        """Send copies of one media-shaped datagram from every socket in turn, flat out.

        Each sendmmsg call carries ``FLOOD_BATCH`` messages; with UDP GSO each message is
        ``GSO_SEGMENTS`` datagrams that the kernel splits before they reach the forwarder's
        socket, which it sees as separate datagrams. GSO makes the generator about three
        times cheaper per datagram, which a single process needs to outrun a forwarder
        on a 2-core machine.
        """
        datagram = bytes([FLOOD_MARK]) + bytes(self.size - 1)
        segments = GSO_SEGMENTS if self._enable_gso(self.size) else 1
        batch = FloodBatch(FLOOD_BATCH, datagram * segments)
        fds = [sock.fileno() for sock in self.sockets]
        send = batch.send
        calls = 0
        cpu_start = time.process_time()
        start = time.monotonic()
        end = start + duration
        try:
            while time.monotonic() < end:
                for fd in fds:
                    calls += send(fd)
        finally:
            if segments > 1:
                self._enable_gso(0)
        elapsed = time.monotonic() - start
        return {
            "event": "done",
            "sent": calls * segments,
            "gso_segments": segments,
            "elapsed_s": elapsed,
            "cpu_s": time.process_time() - cpu_start,
        }

    def _enable_gso(self, segment_size: int) -> bool:
        """Set UDP_SEGMENT on every socket (0 turns it off); False where unsupported."""
        try:
            for sock in self.sockets:
                sock.setsockopt(SOL_UDP, UDP_SEGMENT, segment_size)
        except OSError:
            return False
        return True

    def paced(self, duration: float, rate: float, grace: float) -> dict[str, Any]:
        """Probes at ``rate`` per second in total, round robin over the sockets.

        A forked receiver timestamps echoes as they arrive: a sender that also had to
        read would delay its sends, and a reader that had to pace would delay its reads.
        With a direct target, one probe per ``DIRECT_EVERY`` forwarder probes goes straight to
        the sink, so the baseline RTT shares the phase's conditions (a noisy neighbour hits
        both); those are extra and never pass through the forwarder.
        """
        fine_timer_slack()
        stop_read, stop_write = os.pipe()
        result_read, result_write = os.pipe()
        ready_read, ready_write = os.pipe()
        child = os.fork()
        if child == 0:  # the receiver
            code = 0
            try:
                os.close(stop_write)
                os.close(result_read)
                os.close(ready_read)
                summary = self._receive_probes(stop_read, ready_write)
                with os.fdopen(result_write, "wb") as out:
                    out.write(orjson.dumps(summary))
            except BrokenPipeError:
                code = 1  # the sender was stopped (the benchmark is shutting down)
            except BaseException:  # report, then leave without unwinding into the parent's code
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(stop_read)
        os.close(result_write)
        os.close(ready_write)
        try:
            os.read(ready_read, 1)  # the receiver is polling: probes will not go unseen
            sent, direct_sent, late, elapsed, cpu = self._send_probes(duration, rate)
            time.sleep(grace)  # echoes still in flight
        finally:
            os.close(ready_read)
            os.write(stop_write, b"x")
            os.close(stop_write)
            with os.fdopen(result_read, "rb") as results:
                data = results.read()
            _, status = os.waitpid(child, 0)
        if not data or os.waitstatus_to_exitcode(status) != 0:
            raise LoadgenError("the probe receiver failed; see its traceback above")
        received = orjson.loads(data)
        forwarded, direct = received["forwarded"], received["direct"]
        return {
            "event": "done",
            "sent": sent,
            "late": late,
            "elapsed_s": elapsed,
            "received": forwarded["count"],
            "rtt_us": forwarded,
            "direct": (
                {"sent": direct_sent, "received": direct["count"], "rtt_us": direct}
                if self.direct_sockets
                else None
            ),
            "cpu_s": cpu + received["cpu_s"],
        }

    def _send_probes(self, duration: float, rate: float) -> tuple[int, int, int, float, float]:
        interval_ns = round(1e9 / rate)
        # What a sleep overshoots by here; sleeping that much less keeps the pace.
        overshoot = []
        for _ in range(20):
            t = time.monotonic_ns()
            time.sleep(20e-6)
            overshoot.append(time.monotonic_ns() - t - 20_000)
        overshoot_ns = sorted(overshoot)[len(overshoot) // 2]
        socks, direct_socks = self.sockets, self.direct_sockets
        count, direct_count = len(socks), len(direct_socks)
        buffer = bytearray(self.size)
        pack = PROBE.pack_into
        clock = time.monotonic_ns
        sleep = time.sleep
        sent = late = direct_sent = 0
        cpu_start = time.process_time()
        start = clock()
        end = start + int(duration * 1e9)
        due = start
        # Direct probes sit half an interval between forwarder probes, so a baseline probe
        # never leaves in the same instant as the probe it is compared with.
        direct_interval = interval_ns * DIRECT_EVERY
        direct_due = start + interval_ns // 2 if direct_count else end + 1
        while True:
            now = clock()
            if now >= end:
                break
            next_due = min(due, direct_due)
            wait = next_due - now - overshoot_ns
            if wait > 0:
                sleep(wait / 1e9)
                now = clock()
            elif now - due > 50 * interval_ns:  # stalled (descheduled): skip, do not burst
                late += (now - due) // interval_ns
                due = now
                if direct_count:
                    direct_due = now + interval_ns // 2
                continue
            if direct_due < due:
                pack(buffer, 0, PROBE_MARK, direct_sent, now)
                with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                    direct_socks[direct_sent % direct_count].send(buffer)
                direct_sent += 1
                direct_due += direct_interval
                continue
            pack(buffer, 0, PROBE_MARK, sent, now)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                socks[sent % count].send(buffer)
            sent += 1
            due += interval_ns
        elapsed = (clock() - start) / 1e9
        return sent, direct_sent, late, elapsed, time.process_time() - cpu_start

    def _receive_probes(self, stop_fd: int, ready_fd: int) -> dict[str, Any]:
        poller = select.epoll()
        forwarded, direct = array("q"), array("q")
        by_fd = {sock.fileno(): (sock, forwarded) for sock in self.sockets}
        by_fd.update({sock.fileno(): (sock, direct) for sock in self.direct_sockets})
        for fd in by_fd:
            poller.register(fd, select.EPOLLIN)
        poller.register(stop_fd, select.EPOLLIN)
        buffer = bytearray(2048)
        unpack = PROBE.unpack_from
        clock = time.monotonic_ns
        cpu_start = time.process_time()
        os.write(ready_fd, b"r")
        os.close(ready_fd)
        running = True
        while running:
            for fd, _ in poller.poll():
                if fd == stop_fd:
                    running = False
                    continue
                sock, samples = by_fd[fd]
                while True:
                    try:
                        length = sock.recv_into(buffer)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    now = clock()
                    if length >= PROBE.size and buffer[0] == PROBE_MARK:
                        samples.append(now - unpack(buffer)[2])
        poller.close()
        return {
            "forwarded": latency_summary(forwarded),
            "direct": latency_summary(direct),
            "cpu_s": time.process_time() - cpu_start,
        }


def run_clients(
    target: tuple[str, int],
    count: int,
    size: int,
    direct: tuple[str, int] | None,
    cpus: Sequence[int] | None,
) -> None:
    """Serve the benchmark's commands (JSON lines on stdin) until ``quit`` or EOF."""
    ignore_interrupts()
    pin_to_cpus(cpus)
    clients = Clients(target, count, size, direct)
    emit({"event": "ready", "pid": os.getpid(), "clients": count})
    try:
        for line in sys.stdin.buffer:
            command = orjson.loads(line)
            name = command.get("cmd")
            try:
                if name == "establish":
                    emit(clients.establish(command["token"], float(command.get("timeout", 10))))
                elif name == "flood":
                    emit(clients.flood(float(command["duration"])))
                elif name == "paced":
                    emit(
                        clients.paced(
                            float(command["duration"]),
                            float(command["rate"]),
                            float(command.get("grace", 0.3)),
                        )
                    )
                elif name == "quit":
                    return
                else:
                    emit({"event": "error", "message": f"unknown command {name!r}"})
            except LoadgenError as exc:
                emit({"event": "error", "message": str(exc)})
    finally:
        clients.close()


# -- the benchmark's side: handles on the processes ------------------------------------------


class LineChannel:
    """Reads JSON lines from a child's stdout with a deadline (no blocking readline)."""

    def __init__(self, process: Any, what: str) -> None:
        self.process = process
        self.what = what
        self.fd = process.stdout.fileno()
        self._buffer = b""

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoadgenError(f"{self.what} did not answer within {timeout:g} s")
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.5))
            if not ready:
                if self.process.poll() is not None:
                    raise LoadgenError(f"{self.what} exited with status {self.process.returncode}")
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise LoadgenError(f"{self.what} closed its output (status {self.process.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = orjson.loads(line)
        if message.get("event") == "error":
            raise LoadgenError(f"{self.what}: {message.get('message')}")
        return message


def spawn(role_args: list[str], what: str, *, new_session: bool = False) -> tuple[Any, LineChannel]:
    """Start ``python -m voxrelay.bench.loadgen`` (or another module) with pipes.

    ``new_session``: in a session of its own, so with autogrouping (the Linux default) the
    scheduler gives the process a CPU share of its own instead of a part of this one's.
    """
    import subprocess

    process = subprocess.Popen(
        [sys.executable, *role_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=new_session,
    )
    return process, LineChannel(process, what)


def stop_process(process: Any, timeout: float = 3.0) -> None:
    """Close stdin, SIGTERM, then SIGKILL whatever is still running after ``timeout``."""
    import subprocess

    if process.poll() is None:
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


class SinkProcess:
    """The benchmark's handle on a running sink."""

    def __init__(
        self, workdir: Path, cpus: Sequence[int] | None = None, max_datagram: int = SINK_DATAGRAM
    ) -> None:
        self.stats_path = workdir / "sink.counters"
        args = ["-m", "voxrelay.bench.loadgen", "sink", "--stats", str(self.stats_path)]
        args += ["--max-datagram", str(max_datagram)]
        if cpus:
            args += ["--cpus", ",".join(map(str, cpus))]
        self.process, channel = spawn(args, "the sink")
        try:
            ready = channel.read(15)
            self.port: int = ready["port"]
            self.counters = CounterFile(self.stats_path, SINK_COUNTERS, create=False)
        except BaseException:
            stop_process(self.process)
            raise

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def read(self) -> dict[str, int]:
        return self.counters.read()

    def close(self) -> None:
        self.counters.close()
        stop_process(self.process)


class ClientsProcess:
    """The benchmark's handle on a ``clients`` process aimed at one target."""

    def __init__(
        self,
        target: tuple[str, int],
        count: int,
        size: int,
        cpus: Sequence[int] | None = None,
        direct: tuple[str, int] | None = None,
    ) -> None:
        args = [
            "-m", "voxrelay.bench.loadgen", "clients",
            "--target", f"{target[0]}:{target[1]}",
            "--clients", str(count),
            "--size", str(size),
        ]  # fmt: skip
        if cpus:
            args += ["--cpus", ",".join(map(str, cpus))]
        if direct:
            args += ["--direct", f"{direct[0]}:{direct[1]}"]
        self.process, self.channel = spawn(args, f"the clients for {target[0]}:{target[1]}")
        try:
            self.channel.read(20)
        except BaseException:
            stop_process(self.process)
            raise

    def command(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(orjson.dumps(message) + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise LoadgenError(f"{self.channel.what} is gone") from None
        return self.channel.read(timeout)

    def establish(self, token: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.command({"cmd": "establish", "token": token, "timeout": timeout}, timeout + 5)

    def flood(self, duration: float) -> dict[str, Any]:
        return self.command({"cmd": "flood", "duration": duration}, duration + 15)

    def paced(self, duration: float, rate: float, grace: float = 0.3) -> dict[str, Any]:
        message = {"cmd": "paced", "duration": duration, "rate": rate, "grace": grace}
        return self.command(message, duration + grace + 15)

    def close(self) -> None:
        with contextlib.suppress(OSError, LoadgenError):
            assert self.process.stdin is not None
            self.process.stdin.write(b'{"cmd": "quit"}\n')
            self.process.stdin.flush()
        stop_process(self.process)


@contextlib.contextmanager
def clients_process(
    target: tuple[str, int],
    count: int,
    size: int,
    cpus: Sequence[int] | None = None,
    direct: tuple[str, int] | None = None,
) -> Iterator[ClientsProcess]:
    handle = ClientsProcess(target, count, size, cpus, direct)
    try:
        yield handle
    finally:
        handle.close()


# -- entry point ----------------------------------------------------------------------------------


def cpu_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU ids like 0,1, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m voxrelay.bench.loadgen")
    roles = parser.add_subparsers(dest="role", required=True)
    sink = roles.add_parser("sink", help="count datagrams, echo probes and STUN")
    sink.add_argument("--bind", default="127.0.0.1")
    sink.add_argument("--stats", required=True, help="counter file to create")
    sink.add_argument("--cpus", type=cpu_list, default=None)
    sink.add_argument("--max-datagram", type=int, default=SINK_DATAGRAM)
    clients = roles.add_parser("clients", help="many client sockets driven over stdin")
    clients.add_argument("--target", type=parse_address, required=True)
    clients.add_argument("--clients", type=int, default=256)
    clients.add_argument("--size", type=int, default=100)
    clients.add_argument(
        "--direct", type=parse_address, default=None, help="sink host:port for baseline probes"
    )
    clients.add_argument("--cpus", type=cpu_list, default=None)
    args = parser.parse_args(argv)
    try:
        if args.role == "sink":
            run_sink(args.bind, args.stats, args.cpus, args.max_datagram)
        else:
            if not MIN_DATAGRAM <= args.size <= MAX_DATAGRAM:
                parser.error(f"--size must be in {MIN_DATAGRAM}..{MAX_DATAGRAM}")
            run_clients(args.target, args.clients, args.size, args.direct, args.cpus)
    except BrokenPipeError:
        sys.exit(0)  # the benchmark went away


if __name__ == "__main__":
    main()
