"""Caller processes for ``voxrelay bench sessions``: hundreds of real calls per process.

Why a process of its own, and why not aiortc: a load generator must not be the bottleneck
it measures. aiortc runs a socket, an ICE agent with its own timers and several tasks per
call, which costs about what the server under test does. Here each call is a sans-IO
:class:`~voxrelay.proto.caller.CallerSession` (full ICE checks, DTLS handshake, SRTP) on one
non-blocking UDP socket of its own (relays route by the client's address, so every call
needs its own port), read with ``loop.add_reader``; one event loop serves every call of the
process. Media is sent by one global tick per process, not a timer per call: every 5 ms the
calls of one of four slots each send one Opus packet, so each call sends 50 packets/s and
the process's packets are spread over the 20 ms frame instead of leaving in one burst.

The payload is valid Opus (a tone encoded once with libopus, ~24 kbit/s) turned into a
code-3 packet (RFC 6716 3.2.5) whose padding carries a trailer: magic, the call's sequence
number and the CLOCK_REALTIME send time in ns. A passthrough echo returns it unchanged, so
each echo gives one round trip (same host, same clock), loss and reordering. The echo's
arrival is the kernel's receive timestamp (SO_TIMESTAMPNS, also CLOCK_REALTIME), so a
caller process that is late to read its sockets does not lengthen the round trip it
reports; a transcoding
echo (decode + re-encode) drops the padding, and such echoes are only counted ("foreign").
RFC 6716 asks encoders for zero padding but requires decoders to accept any, so transcoding
peers decode these packets like any other.

Driven by ``voxrelay.bench.sessions_bench`` over pipes: commands as JSON lines on stdin
(``{"id": n, "cmd": ...}``), replies (``{"reply": n, ...}``) and events (``{"event": ...}``)
as JSON lines on stdout. Commands: ``dial``, ``measure``, ``hangup``, ``status`` and
``exit``; see :class:`CallerProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import math
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from aioice import stun as aioice_stun

from voxrelay.proto.caller import (
    AudioReceived,
    CallerSession,
    Closed,
    Connected,
    IceCompleted,
)
from voxrelay.proto.dtls import DtlsCertificate, generate_certificate

TICK_SECONDS: Final = 0.005
SLOTS: Final = 4  # TICK_SECONDS * SLOTS = 20 ms: every call sends 50 packets/s
FRAME_SAMPLES: Final = 960
SAMPLE_RATE: Final = 48_000
OPUS_BITRATE: Final = 24_000
TONE_FRAMES: Final = 50  # one second of tone, replayed
MAGIC: Final = b"VXRB"
TRAILER: Final = struct.Struct("!4sQQ")  # magic, sequence number, send time (realtime ns)
# RTT histogram: bucket k holds round trips in [BASE**k, BASE**(k+1)) µs, 1% wide.
RTT_BUCKET_BASE: Final = 1.01
_LOG_BASE: Final = math.log(RTT_BUCKET_BASE)
MEDIA_FIRST: Final = range(128, 192)
SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python lacks the name
_TIMESPEC: Final = struct.Struct("@qq")
_TIMESTAMP_SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)
_BINDING_REQUEST: Final = b"\x00\x01"  # STUN message type of a binding request
DELETE_CONCURRENCY: Final = 32
CLOSE_FLUSH_SECONDS: Final = 0.05


# -- payloads --------------------------------------------------------------------------------


def opus_tone(frames: int = TONE_FRAMES, bitrate: int = OPUS_BITRATE) -> list[bytes]:
    """20 ms Opus packets of a 440 Hz tone, encoded once (libopus via PyAV) for every call."""
    import array

    import av

    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = SAMPLE_RATE
    encoder.layout = "mono"
    encoder.format = "s16"
    encoder.bit_rate = bitrate
    encoder.options = {"application": "voip", "frame_duration": "20"}
    encoder.open()
    packets: list[bytes] = []
    index = 0
    while len(packets) < frames:
        first = index * FRAME_SAMPLES
        pcm = array.array(
            "h",
            (
                int(8000 * math.sin(2 * math.pi * 440 * (first + n) / SAMPLE_RATE))
                for n in range(FRAME_SAMPLES)
            ),
        )
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts = first
        packets.extend(bytes(packet) for packet in encoder.encode(frame))
        index += 1
    return packets[:frames]


def padded_prefix(packet: bytes, padding: int = TRAILER.size) -> bytes:
    """A one-frame Opus packet (code 0) as a code-3 packet, less its ``padding`` bytes.

    Code 3 (RFC 6716 3.2.5): TOC with c=3, a frame count byte (CBR, padding flag, M=1), the
    padding length, the frame, then the padding, which the caller fills with its trailer.
    """
    if not packet or packet[0] & 3 != 0:
        raise ValueError("expected a one-frame (code 0) Opus packet")
    if not 0 < padding < 255:
        raise ValueError("padding must be 1..254 bytes (one length byte)")
    return bytes((packet[0] | 3, 0x41, padding)) + packet[1:]


def read_trailer(payload: bytes) -> tuple[int, int] | None:
    """(sequence, send time ns) of a payload that carries our trailer, else None."""
    if len(payload) < TRAILER.size:
        return None
    magic, sequence, sent_ns = TRAILER.unpack_from(payload, len(payload) - TRAILER.size)
    if magic != MAGIC:
        return None
    return sequence, sent_ns


def binding_response(data: bytes, local_pwd: str, source: tuple[str, int] | None) -> bytes | None:
    """A success response to a peer's connectivity check signed with our ice-pwd, or None
    for anything that is not a binding request signed with it."""
    if source is None:
        return None
    try:
        request = aioice_stun.parse_message(data)
    except (ValueError, struct.error, IndexError, KeyError):
        return None
    if request.message_method != aioice_stun.Method.BINDING:
        return None
    if request.message_class != aioice_stun.Class.REQUEST:
        return None
    key = local_pwd.encode("ascii")
    if not request.check_message_integrity(key):
        return None
    response = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        aioice_stun.Class.RESPONSE,
        transaction_id=request.transaction_id,
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = source
    response.add_message_integrity(key)
    return bytes(response)


def rtt_bucket(rtt_ns: int) -> int:
    return int(math.log(max(rtt_ns, 1000) / 1000) / _LOG_BASE)


def bucket_value_us(bucket: int) -> float:
    """The geometric middle of a bucket, in µs."""
    return RTT_BUCKET_BASE ** (bucket + 0.5)


def histogram_percentile(histogram: dict[int, int], fraction: float) -> float | None:
    """The ``fraction`` quantile (µs) of a merged RTT histogram; None when empty."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_value_us(bucket)
    return bucket_value_us(max(histogram))


# -- one call -------------------------------------------------------------------------------


class BenchCall:
    """One call of the process: its socket, its sans-IO session, its setup milestones."""

    __slots__ = (
        "answer_at",
        "closed_reason",
        "connected_at",
        "done",
        "due",
        "error",
        "first_echo_at",
        "ice_at",
        "index",
        "location",
        "max_sequence",
        "post_at",
        "sequence",
        "session",
        "slot",
        "sock",
        "tag",
    )

    def __init__(self, index: int, sock: socket.socket, session: CallerSession, tag: str) -> None:
        self.index = index
        self.slot = index % SLOTS
        self.sock = sock
        self.session = session
        self.tag = tag
        self.post_at = 0.0
        self.answer_at: float | None = None
        self.ice_at: float | None = None
        self.connected_at: float | None = None
        self.first_echo_at: float | None = None
        self.due: float | None = None
        self.location: str | None = None
        self.sequence = 0
        self.max_sequence = -1
        self.error = ""
        self.closed_reason: str | None = None
        self.done: asyncio.Future[None] | None = None

    def setup_record(self) -> dict[str, Any]:
        def ms(at: float | None) -> float | None:
            return None if at is None else round((at - self.post_at) * 1000, 3)

        return {
            "tag": self.tag,
            "ok": not self.error and self.first_echo_at is not None,
            "error": self.error or None,
            "ms": {
                "answer": ms(self.answer_at),
                "ice": ms(self.ice_at),
                "connected": ms(self.connected_at),
                "first_echo": ms(self.first_echo_at),
            },
        }


class Window:
    """Counters of one measurement window: packets sent and echoed in [start_ns, end_ns)."""

    def __init__(self, start_ns: int, end_ns: int) -> None:
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.sent = 0
        self.echoed = 0
        self.reordered = 0
        self.foreign = 0  # echoes without our trailer (a transcoding peer), by arrival time
        self.histogram: Counter[int] = Counter()
        self.rtt_sum_ns = 0
        self.rtt_min_ns: int | None = None
        self.rtt_max_ns = 0
        self.late_ticks = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "echoed": self.echoed,
            "reordered": self.reordered,
            "foreign": self.foreign,
            "late_ticks": self.late_ticks,
            "rtt_histogram": {str(k): v for k, v in self.histogram.items()},
            "rtt_sum_ns": self.rtt_sum_ns,
            "rtt_min_ns": self.rtt_min_ns,
            "rtt_max_ns": self.rtt_max_ns,
        }


# -- the process ----------------------------------------------------------------------------


class CallerProcess:
    """Every call of this process, one tick, and the command handlers."""

    def __init__(self, certificate: DtlsCertificate) -> None:
        self.loop = asyncio.get_running_loop()
        self.certificate = certificate
        self.prefixes = [padded_prefix(packet) for packet in opus_tone()]
        self.calls: dict[int, BenchCall] = {}
        self.media: list[list[BenchCall]] = [[] for _ in range(SLOTS)]
        self.next_index = 0
        self.window: Window | None = None
        self.closed_reasons: Counter[str] = Counter()
        self.tick_count = 0
        self.tick_started = time.monotonic()
        self.http: Any = None
        self._tick_handle: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- tick

    def start_ticking(self) -> None:
        self.tick_started = time.monotonic()
        self._tick_handle = self.loop.call_at(self.tick_started, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        # Drift-free: the n-th tick is due at start + n * TICK; ticks missed are skipped.
        due = self.tick_started + self.tick_count * TICK_SECONDS
        missed = int((now - due) / TICK_SECONDS)
        if missed > 0 and self.window is not None:
            self.window.late_ticks += missed
        self.tick_count += max(missed, 0) + 1
        slot = self.tick_count % SLOTS
        for call in self.media[slot]:
            self._send_media(call, now)
        if slot == 0:
            for call in list(self.calls.values()):
                if call.due is not None and call.due <= now:
                    call.session.handle_timer(now)
                    self._after_input(call, now, 0, timers_changed=True)
        self._tick_handle = self.loop.call_at(
            self.tick_started + self.tick_count * TICK_SECONDS, self._tick
        )

    def _send_media(self, call: BenchCall, now: float) -> None:
        now_ns = time.time_ns()
        prefix = self.prefixes[call.sequence % len(self.prefixes)]
        payload = prefix + TRAILER.pack(MAGIC, call.sequence, now_ns)
        call.sequence += 1
        session = call.session
        if session.send_audio(payload, now):
            window = self.window
            if window is not None and window.start_ns <= now_ns < window.end_ns:
                window.sent += 1
        for datagram in session.datagrams_to_send():
            with contextlib.suppress(OSError):  # a full buffer: counted as loss
                call.sock.send(datagram)

    # ---------------------------------------------------------------- input

    def _on_readable(self, call: BenchCall) -> None:
        now = time.monotonic()
        sock, session = call.sock, call.session
        # One datagram per wake-up: the selector is level-triggered, so a socket with more
        # waiting is ready again at once, and the usual single echo costs no second recv.
        try:
            data, ancillary, _flags, _address = sock.recvmsg(4096, _TIMESTAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # ICMP port unreachable on a connected socket: the peer went away
            return
        # The kernel's arrival time: a caller process late to read adds nothing to the RTT.
        arrival_ns = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                arrival_ns = seconds * 1_000_000_000 + nanoseconds
        if not arrival_ns:
            arrival_ns = time.time_ns()
        if data[:2] == _BINDING_REQUEST:
            # A full ICE peer (aiortc) checks us too and completes only once answered;
            # CallerSession answers nothing (voxrelay's transceiver is ICE-lite).
            response = binding_response(data, session.local_pwd, session.remote_address)
            if response is not None:
                with contextlib.suppress(OSError):
                    sock.send(response)
            return
        session.receive_datagram(data, now)
        self._after_input(
            call, now, arrival_ns, timers_changed=not data or data[0] not in MEDIA_FIRST
        )

    def _after_input(
        self, call: BenchCall, now: float, arrival_ns: int, *, timers_changed: bool
    ) -> None:
        """Handle the session's events; ``arrival_ns`` (CLOCK_REALTIME) stamps its echoes."""
        session = call.session
        while (event := session.next_event()) is not None:
            if isinstance(event, AudioReceived):
                self._echo(call, event.payload, now, arrival_ns)
            elif isinstance(event, Connected):
                call.connected_at = now
                self.media[call.slot].append(call)
                self._send_media(call, now)  # now, not at the next tick: setup time
            elif isinstance(event, IceCompleted):
                call.ice_at = now
            elif isinstance(event, Closed):
                self._closed(call, event.reason)
                timers_changed = True
        for datagram in session.datagrams_to_send():
            with contextlib.suppress(OSError):
                call.sock.send(datagram)
        if timers_changed:
            call.due = session.get_timer()

    def _echo(self, call: BenchCall, payload: bytes, now: float, arrival_ns: int) -> None:
        if call.first_echo_at is None:
            call.first_echo_at = now
            if call.done is not None and not call.done.done():
                call.done.set_result(None)
        window = self.window
        trailer = read_trailer(payload)
        if trailer is None:
            if window is not None and window.start_ns <= arrival_ns < window.end_ns:
                window.foreign += 1
            return
        sequence, sent_ns = trailer
        reordered = sequence < call.max_sequence
        if not reordered:
            call.max_sequence = sequence
        if window is None or not window.start_ns <= sent_ns < window.end_ns:
            return
        rtt = arrival_ns - sent_ns
        window.echoed += 1
        window.reordered += reordered
        window.histogram[rtt_bucket(rtt)] += 1
        window.rtt_sum_ns += rtt
        if window.rtt_min_ns is None or rtt < window.rtt_min_ns:
            window.rtt_min_ns = rtt
        if rtt > window.rtt_max_ns:
            window.rtt_max_ns = rtt

    def _closed(self, call: BenchCall, reason: str) -> None:
        if call.closed_reason is None:
            call.closed_reason = reason
            self.closed_reasons[reason] += 1
        with contextlib.suppress(ValueError):
            self.media[call.slot].remove(call)
        if call.done is not None and not call.done.done():
            call.error = call.error or f"closed: {reason}"
            call.done.set_result(None)

    # ---------------------------------------------------------------- dialling

    async def dial(
        self,
        whip_url: str,
        count: int,
        rate: float,
        tag: str,
        timeout: float,
        token: str | None,
    ) -> dict[str, Any]:
        """Dial ``count`` calls, ``rate`` per second (0: all at once); each reports once its
        first echo arrived or it failed. Returns every call's setup record."""
        await self.reap()
        started = time.monotonic()
        tasks = []
        for n in range(count):
            if rate > 0:
                delay = started + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(self._dial_one(whip_url, tag, timeout, token)))
        records = await asyncio.gather(*tasks)
        return {"calls": records, "live": self.live_calls()}

    async def _dial_one(
        self, whip_url: str, tag: str, timeout: float, token: str | None
    ) -> dict[str, Any]:
        from aiohttp import ClientError

        local_ip = _local_address_for(whip_url)
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # else arrival is stamped when we read
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.bind((local_ip, 0))
        port = sock.getsockname()[1]
        now = time.monotonic()
        session = CallerSession(self.certificate, now=now)
        call = BenchCall(self.next_index, sock, session, tag)
        self.next_index += 1
        call.done = self.loop.create_future()
        headers = {"Content-Type": "application/sdp"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        call.post_at = time.monotonic()
        try:
            offer = session.offer_sdp(local_ip, port)
            async with self.http.post(whip_url, data=offer, headers=headers) as response:
                answer = await response.text()
                call.answer_at = time.monotonic()
                if response.status != 201:
                    raise RuntimeError(f"WHIP answered {response.status}: {answer.strip()[:120]}")
                location = response.headers.get("Location")
                call.location = str(response.url.join(_url(location))) if location else None
            now = time.monotonic()
            session.accept_answer(_loopback_candidates_only(answer, local_ip), now)
            assert session.remote_address is not None
            sock.connect(session.remote_address)
            self.calls[call.index] = call
            self.loop.add_reader(sock.fileno(), self._on_readable, call)
            self._after_input(call, now, time.time_ns(), timers_changed=True)
            try:
                await asyncio.wait_for(asyncio.shield(call.done), timeout)
            except TimeoutError:
                reached = [
                    name
                    for name, at in (
                        ("answer", call.answer_at),
                        ("ice", call.ice_at),
                        ("connected", call.connected_at),
                    )
                    if at is not None
                ]
                last = reached[-1] if reached else "POST"
                call.error = f"no echo within {timeout:g} s (reached {last})"
        except (ClientError, OSError, TimeoutError, ValueError, RuntimeError) as exc:
            call.error = call.error or f"{type(exc).__name__}: {exc}"
        if call.error:
            await self._hang_up(call, delete=True)
        record = call.setup_record()
        emit({"event": "dialed", "ok": record["ok"]})
        return record

    # ---------------------------------------------------------------- hanging up

    async def reap(self) -> None:
        """Forget the calls that ended on their own (consent expired, BYE from the peer)."""
        for call in [c for c in self.calls.values() if c.closed_reason is not None]:
            await self._hang_up(call, delete=True)

    async def hang_up(self, count: int | None, delete: bool) -> dict[str, Any]:
        """Hang up the ``count`` most recent calls (all with None)."""
        await self.reap()
        calls = sorted(self.calls.values(), key=lambda c: c.index, reverse=True)
        if count is not None:
            calls = calls[:count]
        gate = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def one(call: BenchCall) -> None:
            async with gate:
                await self._hang_up(call, delete=delete)

        await asyncio.gather(*(one(call) for call in calls))
        return {"hung_up": len(calls), "live": self.live_calls()}

    async def _hang_up(self, call: BenchCall, *, delete: bool) -> None:
        """BYE and close_notify, then WHIP DELETE (errors ignored: the peer may be gone)."""
        from aiohttp import ClientError

        now = time.monotonic()
        if call.closed_reason is None:
            call.session.close(now, "benchmark hang-up")
            self._after_input(call, now, time.time_ns(), timers_changed=True)
        if self.calls.pop(call.index, None) is not None:
            self.loop.remove_reader(call.sock.fileno())
        with contextlib.suppress(ValueError):
            self.media[call.slot].remove(call)
        call.sock.close()
        location, call.location = call.location, None
        if delete and location:
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                async with self.http.delete(location) as response:
                    await response.read()

    # ---------------------------------------------------------------- windows

    async def measure(self, start_ns: int, end_ns: int, grace: float) -> dict[str, Any]:
        """Count packets sent in [start_ns, end_ns) and their echoes, which still count for
        ``grace`` s after the end; reply then. Both ends are given up front (CLOCK_REALTIME
        is shared by every process on the host), so every process counts the same window
        whenever the command reaches it."""
        window = self.window = Window(start_ns, end_ns)
        wait = (end_ns - time.time_ns()) / 1e9 + grace
        if wait > 0:
            await asyncio.sleep(wait)
        if self.window is window:
            self.window = None
        return {"window": window.as_dict(), "live": self.live_calls()}

    def live_calls(self) -> int:
        return sum(1 for call in self.calls.values() if call.closed_reason is None)

    def status(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "live": self.live_calls(),
            "calls": len(self.calls),
            "media": sum(len(slot) for slot in self.media),
            "closed_reasons": dict(self.closed_reasons),
            "cpu_s": usage.ru_utime + usage.ru_stime,
        }


def _url(location: str) -> Any:
    from yarl import URL

    return URL(location)


def _local_address_for(url: str) -> str:
    """The local address the kernel would send from to reach ``url``'s host."""
    host = urlsplit(url).hostname or "127.0.0.1"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # no datagram is sent: this only picks a route
        return probe.getsockname()[0]


def _loopback_candidates_only(answer: str, local_ip: str) -> str:
    """Drop the answer's candidates that are not loopback when we call from loopback.

    aiortc offers every interface's address; a benchmark on loopback must never send to
    the machine's LAN address, and CallerSession takes the first candidate it finds.
    """
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(local_ip).is_loopback:
            return answer
    kept = []
    for line in answer.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            try:
                if not ipaddress.ip_address(fields[4]).is_loopback:
                    continue
            except (IndexError, ValueError):
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


# -- the command loop -----------------------------------------------------------------------


def emit(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def serve(http_limit: int) -> None:
    """Read commands from stdin until ``exit`` or end of input; answer each on stdout."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the benchmark decides
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    process = CallerProcess(generate_certificate(time.time()))
    connector = TCPConnector(limit=http_limit, force_close=False)
    async with ClientSession(connector=connector, timeout=ClientTimeout(total=30)) as http:
        process.http = http
        process.start_ticking()
        emit({"event": "ready", "pid": os.getpid()})
        pending: set[asyncio.Task] = set()
        while line := await reader.readline():
            request = orjson.loads(line)
            if request.get("cmd") == "exit":
                break
            task = asyncio.ensure_future(_handle(process, request))
            pending.add(task)
            task.add_done_callback(pending.discard)
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(process.hang_up(None, delete=True), 10)
        await asyncio.sleep(CLOSE_FLUSH_SECONDS)


async def _handle(process: CallerProcess, request: dict[str, Any]) -> None:
    command, ident = request.get("cmd"), request.get("id")
    try:
        if command == "dial":
            result = await process.dial(
                request["url"],
                int(request["count"]),
                float(request.get("rate", 0)),
                str(request.get("tag", "")),
                float(request.get("timeout", 10)),
                request.get("token"),
            )
        elif command == "measure":
            result = await process.measure(
                int(request["start_ns"]), int(request["end_ns"]), float(request["grace"])
            )
        elif command == "hangup":
            count = request.get("count")
            result = await process.hang_up(
                None if count is None else int(count), bool(request.get("delete", True))
            )
        elif command == "status":
            result = process.status()
        else:
            result = {"error": f"unknown command {command!r}"}
    except Exception as exc:  # reported to the benchmark, which stops the run
        result = {"error": f"{type(exc).__name__}: {exc}"}
    emit({"reply": ident, **result})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--http-limit", type=int, default=0, help="HTTP connections (0: any)")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Fewer, later collections: the hot path allocates many short-lived objects, and a
    # full collection over hundreds of sessions would stall every call's echo at once.
    gc.set_threshold(50_000, 50, 100)
    asyncio.run(serve(args.http_limit))


if __name__ == "__main__":
    main()
