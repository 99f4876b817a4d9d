"""The transceiver process: every call's ICE, DTLS and SRTP on one shared UDP socket.

One asyncio loop runs the UDP socket, the calls' timers and the signaling server
(:mod:`.signaling`). Datagrams arrive two ways on the same socket, told apart by the first
byte (docs/internals.md):

* **relay mode**: from a relay worker, prefixed with the 24-byte relay header naming the
  client (first byte 1, which no datagram a client may send us starts with: STUN requests
  start with 0, DTLS with 20-63, RTP with 128-191). Replies go back to the worker that
  forwarded the client's latest datagram, with the header naming the client. A worker may
  bundle several clients' datagrams into one (first byte 2): each record is handled as if
  it had come alone.
* **direct mode**: straight from the client, no header; replies go straight back.

A datagram is matched to its call by client address once an ICE check from that address
passed; before that only a STUN request can find the call, by the server half of its
USERNAME (the ufrag token we minted in the answer). Everything else is dropped and counted.

The protocol work is sans-IO in :class:`voxrelay.proto.session.CallSession`; this module
only moves bytes, runs timers and hands events to the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson

from voxrelay.engine.backends import Backend, EchoBackend
from voxrelay.engine.processes import (
    HEAP_TRIM_INTERVAL,
    TERMINATE_WAIT_SECONDS,
    die_with_parent,
    trim_heap_every,
)
from voxrelay.proto.dtls import DtlsCertificate, generate_certificate, load_certificate
from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.ice_lite import Address
from voxrelay.proto.relay_header import (
    BUNDLE_MARKER,
    HEADER_SIZE,
    RECORD_OVERHEAD,
    RelayBundleError,
    bundle_of_records,
    bundle_records,
    decode_header,
    header_from_address,
)
from voxrelay.proto.sdp import Offer, build_answer, parse_offer
from voxrelay.proto.session import (
    SAMPLES_PER_FRAME,
    AudioReceived,
    CallSession,
    CallSettings,
    Closed,
    Connected,
    IceConnected,
    random_ssrc,
)
from voxrelay.proto.stun import StunError, read_username, split_username
from voxrelay.proto.token import TokenVerifier

log = logging.getLogger("voxrelay.transceiver")

__all__ = ["CallHandle", "Transceiver", "TransceiverFull", "TransceiverSettings", "main"]

_RELAY_HEADER_FIRST_BYTE = 1


@dataclass
class TransceiverSettings:
    """Everything a transceiver process needs; passed as JSON on stdin (secrets stay off argv)."""

    transceiver_id: int
    cluster_id: int
    token_secrets: list[str]  # hex; current first
    bind: str = "127.0.0.1"
    port: int = 0
    candidate_address: str = "127.0.0.1"
    """The one ICE candidate of every answer: the relay's public address (or ours, direct)."""
    candidate_port: int = 0
    """0 means this transceiver's own UDP port (direct mode)."""
    signaling_bind: str = "127.0.0.1"
    signaling_port: int = 0
    signaling_token: str | None = None
    signaling_reuse_port: bool = False
    max_sessions: int = 10_000
    consent_timeout: float = 30.0
    setup_timeout: float = 20.0
    heap_trim_interval: float = HEAP_TRIM_INTERVAL
    """Seconds between :func:`~voxrelay.engine.processes.trim_heap` calls; 0 never."""
    rtcp_interval: float = 5.0
    recv_buffer_bytes: int = 4 << 20
    send_buffer_bytes: int = 4 << 20
    certificate_path: str | None = None
    private_key_path: str | None = None
    runtime_dir: str | None = None
    """Where to publish ``transceiver-<id>.json`` (ports, pid) for the supervisor and peers."""
    redis_url: str | None = None
    advertise_address: str | None = None
    heartbeat_interval: float = 2.0
    log_level: str = "info"
    log_format: str = "json"
    backend: dict | None = None
    """WebSocketBackendSettings keyword arguments ([backend] kind = "websocket"), or None
    for the in-process echo."""
    relay_bundle_max_bytes: int = 1472
    """Replies to one relay worker that are ready together leave as one bundle datagram of
    at most this many bytes (the relay's ``bundle_max_bytes``, capped by its
    ``max_datagram``); 0 sends one datagram per reply."""
    supervised: bool = False
    """Started by a supervisor: ignore Ctrl-C's SIGINT (the supervisor drains, then sends
    SIGTERM), so calls keep flowing through the drain grace period."""
    parent_pid: int | None = None
    """The supervisor's pid: we stop when it exits, and a SIGTERM that reaches us with its
    own (a signal to the whole service) waits for its drain (see
    :data:`~voxrelay.engine.processes.TERMINATE_WAIT_SECONDS`)."""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_json(cls, data: bytes) -> TransceiverSettings:
        return cls(**orjson.loads(data))


class TransceiverFull(Exception):
    """No room for another call (``max_sessions``), or the transceiver is draining."""


class CallHandle:
    """One call as the transceiver and its backend see it (the backend's ``Call``)."""

    __slots__ = (
        "_transceiver",
        "addresses",
        "created_wall",
        "headers",
        "id",
        "session",
        "timer",
        "timer_at",
        "ufrag",
    )

    def __init__(self, transceiver: Transceiver, call_id: str, session: CallSession) -> None:
        self._transceiver = transceiver
        self.id = call_id
        self.session = session
        self.ufrag = session.answer.ice_ufrag.encode("ascii")
        self.addresses: set[Address] = set()
        self.headers: dict[Address, bytes] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.created_wall = time.time()

    def send_audio(self, payload: bytes, samples: int = SAMPLES_PER_FRAME) -> bool:
        sent = self.session.send_audio(payload, self._transceiver.now(), samples)
        if sent:
            self._transceiver._flush(self)
        return sent

    def close(self, reason: str) -> None:
        self._transceiver.end_call(self.id, reason)


class Transceiver:
    """All calls of one transceiver process, on one UDP socket."""

    def __init__(
        self,
        settings: TransceiverSettings,
        backend: Backend | None = None,
        certificate: DtlsCertificate | None = None,
    ) -> None:
        self.settings = settings
        self.backend: Backend = backend or EchoBackend()
        self.certificate = certificate or _certificate(settings)
        self.fingerprint = self.certificate.fingerprint("sha-256")
        self._certificate_born = time.time()
        self.tokens = TokenVerifier(
            [bytes.fromhex(secret) for secret in settings.token_secrets], settings.cluster_id
        )
        self.call_settings = CallSettings(
            consent_timeout=settings.consent_timeout,
            setup_timeout=settings.setup_timeout,
            rtcp_interval=settings.rtcp_interval,
        )
        self.calls: dict[str, CallHandle] = {}
        self._by_ufrag: dict[bytes, CallHandle] = {}
        self._by_address: dict[Address, CallHandle] = {}
        # Validated relayed clients by relay header (their route key): a known client's
        # media skips decoding the header into address text.
        self._by_header: dict[bytes, tuple[CallHandle, Address]] = {}
        self._via: dict[Address, tuple] = {}  # client -> relay worker that last forwarded it
        self.transport: _UdpEndpoint | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.draining = False
        self.started_at = time.time()
        # Counters for /metrics and /status.
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bundles_out = 0
        # Datagrams waiting for send_queued(): per relay worker, and direct to clients.
        self._relay_out: dict[tuple, _RelayQueue] = {}
        self._direct_out: list[tuple[bytes, Address]] = []
        self._bundle_limit = settings.relay_bundle_max_bytes
        self._batching = False  # inside a read batch, which sends at its end
        self._send_armed = False
        self.drops: Counter[str] = Counter()
        self.calls_started = 0
        self.routes_released = 0
        self.calls_ended: Counter[str] = Counter()
        self.handshake_times: list[float] = []
        self.connect_times: list[float] = []

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Bind the UDP socket (``port`` 0 picks a free one, see :attr:`port`)."""
        self.loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.settings.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        for option, size in (
            (socket.SO_RCVBUF, self.settings.recv_buffer_bytes),
            (socket.SO_SNDBUF, self.settings.send_buffer_bytes),
        ):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, size)
        sock.bind((self.settings.bind, self.settings.port))
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.transport = _UdpEndpoint(sock, self.loop, self)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (a client went away) must not disturb other calls.
        self.drops["socket_error"] += 1

    def now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def close(self, reason: str = "transceiver stopping") -> None:
        """End every call politely, then close the socket."""
        for call_id in list(self.calls):
            self.end_call(call_id, reason)
        self.send_queued()  # the calls' goodbyes and route releases
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ calls

    def create_call(self, offer_sdp: str | bytes) -> tuple[CallHandle, str]:
        """Answer an offer: returns the new call and the answer SDP.

        Raises :class:`voxrelay.proto.sdp.SdpError` (a ProtocolError) for an offer we
        cannot accept, :class:`TransceiverFull` when there is no room.
        """
        if self.draining:
            raise TransceiverFull("this transceiver is draining and takes no new calls")
        if len(self.calls) >= self.settings.max_sessions:
            raise TransceiverFull(f"this transceiver is full ({self.settings.max_sessions} calls)")
        offer: Offer = parse_offer(offer_sdp)
        self._renew_certificate()
        ufrag = self.tokens.mint(self.settings.transceiver_id)
        ssrc = random_ssrc()
        answer = build_answer(
            offer,
            ice_ufrag=ufrag,
            fingerprint_sha256=self.fingerprint,
            candidate_address=self.settings.candidate_address,
            candidate_port=self.settings.candidate_port or self.port,
            ssrc=ssrc,
            cname=secrets.token_urlsafe(12),
            session_id=secrets.randbits(62),
        )
        now = self.now()
        session = CallSession(
            answer,
            self.certificate,
            ssrc=ssrc,
            cname=f"voxrelay-{self.settings.transceiver_id}",
            now=now,
            settings=self.call_settings,
            wall_offset=time.time() - now,
        )
        call_id = secrets.token_urlsafe(16)
        call = CallHandle(self, call_id, session)
        self.calls[call_id] = call
        self._by_ufrag[call.ufrag] = call
        self.calls_started += 1
        self._schedule(call)
        log.info(
            "call created",
            extra={"call": call_id, "dtls_role": answer.dtls_role, "mid": answer.mid},
        )
        self.backend.call_started(call)
        return call, answer.sdp

    def _renew_certificate(self) -> None:
        """Generated certificates last 30 days; new calls get a fresh one after a week.

        Calls in progress keep the certificate their answer fingerprinted.
        """
        if self.settings.certificate_path or time.time() - self._certificate_born < 7 * 86400:
            return
        self.certificate = generate_certificate(time.time())
        self.fingerprint = self.certificate.fingerprint("sha-256")
        self._certificate_born = time.time()

    def end_call(self, call_id: str, reason: str) -> bool:
        """Close a call politely (WHIP DELETE, shutdown); False if no such call."""
        call = self.calls.get(call_id)
        if call is None:
            return False
        call.session.close(self.now(), reason)
        self._after_input(call)
        return True

    def _forget(self, call: CallHandle, reason: str) -> None:
        self.calls.pop(call.id, None)
        self._by_ufrag.pop(call.ufrag, None)
        for address in call.addresses:
            if self._by_address.get(address) is call:
                del self._by_address[address]
                header = call.headers.get(address)
                if header is not None and self._by_header.get(header, (None,))[0] is call:
                    del self._by_header[header]
                via = self._via.pop(address, None)
                if via is not None and self.transport is not None:
                    # A bare relay header releases the client's route at once, instead of
                    # leaving it to the relay's idle timeout (docs/internals.md). Queued
                    # behind the call's last datagrams, which still need the route.
                    self._queue_relayed(via, header_from_address(address), b"")
                    self._arm_send()
                    self.routes_released += 1
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        for reason_name, count in call.session.drops.items():
            self.drops[reason_name] += count
        self.calls_ended[_reason_label(reason)] += 1
        log.info(
            "call ended",
            extra={
                "call": call.id,
                "reason": reason,
                "seconds": round(time.time() - call.created_wall, 3),
                "received": call.session.packets_received,
                "sent": call.session.packets_sent,
            },
        )
        try:
            self.backend.call_ended(call, reason)
        except Exception:
            log.exception("backend failed in call_ended", extra={"call": call.id})

    # ------------------------------------------------------------------ datagrams

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.datagrams_in += 1
        if not data:
            self.drops["empty"] += 1
            return
        first = data[0]
        if first == BUNDLE_MARKER:
            # Several clients' datagrams from one relay worker: a malformed record ends the
            # bundle, the records before it stand.
            try:
                for header, payload in bundle_records(data):
                    if not self._relayed_datagram(header, payload, addr):
                        self.drops["bad_relay_bundle"] += 1
                        return
            except RelayBundleError:
                self.drops["bad_relay_bundle"] += 1
            return
        if first == _RELAY_HEADER_FIRST_BYTE:
            if not self._relayed_datagram(data[:HEADER_SIZE], data[HEADER_SIZE:], addr):
                self.drops["bad_relay_header"] += 1
            return
        self._client_datagram((addr[0], addr[1]), data, None)

    def _relayed_datagram(self, header: bytes, payload: bytes, via: tuple) -> bool:
        """One datagram of the client ``header`` names, forwarded by relay worker ``via``;
        False if the header is malformed."""
        known = self._by_header.get(header)
        if known is not None and payload and payload[0] > 3:
            # Media of a validated client, the hot path. STUN takes the long way: it finds
            # its call by ufrag, which may have moved to a newer call.
            self._deliver(known[0], known[1], payload, via)
            return True
        try:
            client = decode_header(header)
        except ProtocolError:
            return False
        self._client_datagram(client, payload, via)
        return True

    def _client_datagram(self, client: Address, payload: bytes, via: tuple | None) -> None:
        """One datagram of ``client``: direct (``via`` None) or through the relay worker ``via``."""
        if not payload:
            self.drops["empty"] += 1
            return
        if payload[0] <= 3:
            # STUN finds its call by ufrag, so a check for a new call from an address an
            # older call still holds reaches the right one.
            call = self._call_for_stun(payload)
        else:
            call = self._by_address.get(client)
            if call is None:
                self.drops["unknown_address"] += 1
        if call is not None:
            self._deliver(call, client, payload, via)

    def _deliver(
        self, call: CallHandle, client: Address, payload: bytes, via: tuple | None
    ) -> None:
        if via is not None:
            self._via[client] = via
        else:
            self._via.pop(client, None)
        session = call.session
        session.receive_datagram(payload, client, self.now())
        if payload[0] <= 3 and client not in call.addresses and session.ice.is_validated(client):
            self._adopt_address(call, client, relayed=via is not None)
        self._after_input(call)

    def _adopt_address(self, call: CallHandle, client: Address, *, relayed: bool) -> None:
        """``client`` passed an ICE check of ``call``: its media now finds the call."""
        previous = self._by_address.get(client)
        if previous is not None and previous is not call:
            previous.addresses.discard(client)
            stale = previous.headers.get(client)
            if stale is not None:
                self._by_header.pop(stale, None)
        call.addresses.add(client)
        self._by_address[client] = call
        if relayed:
            header = call.headers.get(client)
            if header is None:
                header = call.headers[client] = header_from_address(client)
            self._by_header[header] = (call, client)

    def _call_for_stun(self, payload: bytes) -> CallHandle | None:
        try:
            server_ufrag, _ = split_username(read_username(payload, len(payload)))
        except StunError:
            self.drops["bad_stun"] += 1
            return None
        call = self._by_ufrag.get(server_ufrag)
        if call is None:
            self.drops["unknown_ufrag"] += 1
        return call

    def _after_input(self, call: CallHandle) -> None:
        """Hand the call's events to the backend, send its datagrams, re-arm its timer."""
        session = call.session
        while (event := session.next_event()) is not None:
            if isinstance(event, AudioReceived):
                try:
                    self.backend.audio_received(call, event)
                except Exception:
                    log.exception("backend failed in audio_received", extra={"call": call.id})
                    session.close(self.now(), "backend error")
            elif isinstance(event, Connected):
                call_connected = getattr(self.backend, "call_connected", None)
                if call_connected is not None:
                    call_connected(call)  # playout may start before the caller's first frame
                self.handshake_times.append(event.handshake_time)
                self.connect_times.append(event.elapsed)
                del self.handshake_times[:-1000], self.connect_times[:-1000]
                log.info(
                    "call connected",
                    extra={
                        "call": call.id,
                        "client": f"{event.address[0]}:{event.address[1]}",
                        "srtp": event.srtp_profile.name if event.srtp_profile else None,
                        "suite": event.cipher_suite,
                        "connect_ms": round(event.elapsed * 1000, 1),
                        "handshake_ms": round(event.handshake_time * 1000, 1),
                    },
                )
            elif isinstance(event, IceConnected):
                log.debug("ice connected", extra={"call": call.id})
            elif isinstance(event, Closed):
                self._flush(call)
                self._forget(call, event.reason)
                return
        self._flush(call)
        self._schedule(call)

    def _flush(self, call: CallHandle) -> None:
        """Queue the call's datagrams; :meth:`send_queued` sends them.

        Relayed replies are grouped by relay worker so those that are ready together (one
        read batch, one timer round) leave as one bundle datagram: the kernel's cost per
        UDP send, on both ends, dominates the cost of an echoed packet.
        """
        datagrams = call.session.datagrams_to_send()
        if not datagrams or self.transport is None:
            return
        for datagram, client in datagrams:
            via = self._via.get(client)
            if via is None:
                self._direct_out.append((datagram, client))
            else:
                header = call.headers.get(client)
                if header is None:
                    header = call.headers[client] = header_from_address(client)
                self._queue_relayed(via, header, datagram)
            self.datagrams_out += 1
        self._arm_send()

    def _queue_relayed(self, via: tuple, header: bytes, datagram: bytes) -> None:
        """Queue one reply (an empty ``datagram`` releases the route) for relay worker ``via``."""
        queued = self._relay_out.get(via)
        if queued is None:
            self._relay_out[via] = queued = _RelayQueue()
        size = RECORD_OVERHEAD + len(datagram)
        if queued.records and queued.size + size > self._bundle_limit:
            self._send_relayed(via, queued)
        queued.records.append((header, datagram))
        queued.size += size

    def _arm_send(self) -> None:
        """Outside a read batch (timers, the backend, signaling), send at the loop's next
        turn: whatever else is queued in this turn goes out with it."""
        if not self._batching and not self._send_armed and self.loop is not None:
            self._send_armed = True
            self.loop.call_soon(self.send_queued)

    def send_queued(self) -> None:
        """Send every queued datagram: direct ones as they are, relayed ones bundled."""
        self._send_armed = False
        transport = self.transport
        if transport is None:
            return
        if self._direct_out:
            direct, self._direct_out = self._direct_out, []
            for datagram, client in direct:
                transport.sendto(datagram, client)
        if self._relay_out:
            relay_out, self._relay_out = self._relay_out, {}
            for via, queued in relay_out.items():  # a worker gone for good leaves no entry
                if queued.records:
                    self._send_relayed(via, queued)

    def _send_relayed(self, via: tuple, queued: _RelayQueue) -> None:
        records = queued.records
        assert self.transport is not None
        if len(records) == 1:
            header, datagram = records[0]
            self.transport.sendto(header + datagram, via)
        else:
            self.transport.sendto(bundle_of_records(records), via)
            self.bundles_out += 1
        records.clear()
        queued.size = 0

    # ------------------------------------------------------------------ timers

    def _schedule(self, call: CallHandle) -> None:
        due = call.session.get_timer()
        if due is None:
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
            return
        if call.timer is not None and call.timer_at <= due + 0.0005:
            return  # the armed timer fires first; it re-arms from there
        if call.timer is not None:
            call.timer.cancel()
        assert self.loop is not None
        call.timer_at = due
        call.timer = self.loop.call_at(due, self._on_timer, call)

    def _on_timer(self, call: CallHandle) -> None:
        call.timer = None
        if call.id not in self.calls:
            return
        call.session.handle_timer(self.now())
        self._after_input(call)

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        connected = sum(1 for call in self.calls.values() if call.session.is_connected)
        return {
            "id": self.settings.transceiver_id,
            "pid": os.getpid(),
            "port": self.port,
            "calls": len(self.calls),
            "connected": connected,
            "calls_started": self.calls_started,
            "calls_ended": dict(self.calls_ended),
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.datagrams_out,
            "bundles_out": self.bundles_out,
            "drops": dict(self.drops),
            "routes_released": self.routes_released,
            "backend": dict(getattr(self.backend, "counters", {})),
            "draining": self.draining,
            "uptime_s": round(time.time() - self.started_at, 1),
        }


class _UdpEndpoint:
    """The transceiver's one UDP socket, read in batches.

    asyncio's datagram transport reads one datagram per readiness event, so every packet
    pays a trip through the event loop's selector. Under load many datagrams wait at
    once; reading until the socket is empty (up to a bound, to stay fair to timers and
    HTTP) pays that trip once per batch. Sends go straight to the socket: UDP never
    blocks for long, and a full send buffer drops the datagram (counted), as the network
    would.
    """

    __slots__ = ("_loop", "_owner", "_sock", "closed")

    _BATCH = 64
    _MAX_DATAGRAM = 65_535

    def __init__(
        self, sock: socket.socket, loop: asyncio.AbstractEventLoop, owner: Transceiver
    ) -> None:
        self._sock = sock
        self._loop = loop
        self._owner = owner
        self.closed = False
        loop.add_reader(sock.fileno(), self._read_ready)

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        owner = self._owner
        received = owner.datagram_received
        owner._batching = True  # replies wait for the end of the batch, then leave together
        try:
            for _ in range(self._BATCH):
                try:
                    data, addr = recvfrom(self._MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:  # an ICMP error queued on the socket (a client went away)
                    owner.drops["socket_error"] += 1
                    continue
                try:
                    received(data, addr)
                except Exception:  # a bug must cost one datagram, never the socket
                    owner.drops["internal_error"] += 1
                    log.exception("datagram handling failed")
        finally:
            owner._batching = False
            owner.send_queued()

    def sendto(self, data: bytes, addr: tuple) -> None:
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._owner.drops["send_buffer_full"] += 1
        except OSError:
            self._owner.drops["send_error"] += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


class _RelayQueue:
    """Replies waiting for one relay worker: (relay header, datagram) records and their
    size as a bundle."""

    __slots__ = ("records", "size")

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes]] = []
        self.size = 0


def _reason_label(reason: str) -> str:
    """A bounded label for metrics: the reason up to its first colon."""
    return reason.split(":", 1)[0][:40]


def _certificate(settings: TransceiverSettings) -> DtlsCertificate:
    if settings.certificate_path:
        with open(settings.certificate_path, "rb") as cert_file:
            certificate_pem = cert_file.read()
        with open(settings.private_key_path or settings.certificate_path, "rb") as key_file:
            key_pem = key_file.read()
        return load_certificate(certificate_pem, key_pem)
    return generate_certificate(time.time())


# ---------------------------------------------------------------------- process


async def run(settings: TransceiverSettings, stop: asyncio.Event | None = None) -> None:
    """Run a transceiver until ``stop`` is set or SIGTERM/SIGINT arrives."""
    from voxrelay.engine.signaling import SignalingServer

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if settings.parent_pid is not None and not die_with_parent(settings.parent_pid):
        return  # the supervisor is gone already
    backend = None
    if settings.backend:
        from voxrelay.engine.backend_client import WebSocketBackend, WebSocketBackendSettings

        backend = WebSocketBackend(WebSocketBackendSettings(**settings.backend))
    transceiver = Transceiver(settings, backend=backend)

    def on_terminate() -> None:
        # A signal sent to the whole service (systemd's default KillMode) reaches us with
        # the supervisor's: wait for its drain (SIGUSR1), which keeps the calls up through
        # the grace period; it sends SIGTERM again after. Otherwise the signal is ours.
        parent = settings.parent_pid
        if parent is None or os.getppid() != parent or transceiver.draining:
            stop.set()
        else:
            loop.call_later(
                TERMINATE_WAIT_SECONDS,
                lambda: None if transceiver.draining else stop.set(),
            )

    if settings.supervised:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM,) if settings.supervised else (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_terminate)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGUSR1, setattr, transceiver, "draining", True)
    await transceiver.open()
    server = SignalingServer(transceiver)
    await server.start()
    heartbeat = _start_heartbeat(settings, transceiver)
    trimmer = (
        loop.create_task(trim_heap_every(settings.heap_trim_interval))
        if settings.heap_trim_interval > 0
        else None
    )
    _publish(settings, transceiver, server)
    log.info(
        "transceiver started",
        extra={
            "id": settings.transceiver_id,
            "udp": f"{settings.bind}:{transceiver.port}",
            "signaling": server.url,
            "candidate": f"{settings.candidate_address}:"
            f"{settings.candidate_port or transceiver.port}",
        },
    )
    try:
        await stop.wait()
    finally:
        transceiver.draining = True
        transceiver.close()
        if backend is not None:
            await backend.close()  # the calls' session.ended goodbyes, bounded
        await asyncio.sleep(0.05)  # let the close_notify/BYE datagrams leave
        await server.stop()
        if heartbeat is not None:
            heartbeat.stop()
        if trimmer is not None:
            trimmer.cancel()
        _unpublish(settings)


def _start_heartbeat(settings: TransceiverSettings, transceiver: Transceiver):
    if not settings.redis_url:
        return None
    from voxrelay.engine.registry import RedisRegistry, TransceiverHeartbeat, TransceiverInfo

    registry = RedisRegistry(cluster_id=settings.cluster_id, url=settings.redis_url)
    info = TransceiverInfo(
        settings.transceiver_id,
        settings.advertise_address or settings.bind,
        transceiver.port,
    )
    heartbeat = TransceiverHeartbeat(
        registry,
        info,
        interval=settings.heartbeat_interval,
        load=lambda: float(len(transceiver.calls)),
    )
    heartbeat.start()
    return heartbeat


def _state_path(settings: TransceiverSettings) -> str | None:
    if not settings.runtime_dir:
        return None
    return os.path.join(settings.runtime_dir, f"transceiver-{settings.transceiver_id}.json")


def _publish(settings: TransceiverSettings, transceiver: Transceiver, server) -> None:
    """Write ports and pid where the supervisor and sibling transceivers can read them."""
    path = _state_path(settings)
    if path is None:
        return
    state = {
        "id": settings.transceiver_id,
        "pid": os.getpid(),
        "udp_port": transceiver.port,
        "signaling_url": server.url,
        "private_url": server.private_url,
    }
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(orjson.dumps(state))
    os.replace(tmp, path)


def _unpublish(settings: TransceiverSettings) -> None:
    path = _state_path(settings)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main() -> None:
    from voxrelay.engine.logs import setup_logging

    settings = TransceiverSettings.from_json(sys.stdin.buffer.read())
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
