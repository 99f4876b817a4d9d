"""Sans-IO DTLS 1.2 connection for DTLS-SRTP, client or server role.

Inputs: :meth:`DtlsConnection.start_handshake` (client), :meth:`receive_datagram`,
:meth:`handle_timer`, :meth:`send_application_data` and :meth:`close`, each given the
current time ``now`` (seconds, any monotonic origin). Outputs:
:meth:`datagrams_to_send`, :meth:`get_timer` and :meth:`next_event`. The connection never
owns a socket and never reads a clock, so one transceiver socket can drive thousands.

Design rules of the state machine:

* One full handshake per connection (RFC 6347 4.2 with RFC 5246 7.3): ECDHE_ECDSA
  suites, mutual authentication, no resumption, no renegotiation.
* A peer is authenticated only by the SDP fingerprint of its certificate, checked right
  after it proved possession of the key (its CertificateVerify, or the signed
  ServerKeyExchange for a server) and before any key is exported.
* Invalid records are dropped silently and counted in
  :attr:`DtlsConnection.dropped_records` (RFC 6347 4.1.2.7, RFC 9147 4.5.2): UDP
  sources are forged at will, so a record we cannot attribute to the peer must never end
  the association. That covers record-layer garbage (a truncated header or length, a
  version that is not DTLS, an unknown content type, an epoch we have no keys for,
  an oversized plaintext record), replays, records that fail authentication (4.1.2.1),
  and, once the handshake is complete, every plaintext epoch-0 record: handshake,
  alert or anything else, well-formed or not, since only epoch-1 records can come from
  the peer then.
* Every other protocol violation raises :class:`DtlsProtocolError` inside; the input
  method turns it into a fatal alert and a :class:`ConnectionClosed` event, never an
  exception to the caller. These are errors inside well-framed records we accept: a
  malformed or unexpected handshake message, alert or ChangeCipherSpec during the
  handshake, or anything wrong in an authenticated epoch-1 record. During the handshake
  an epoch-0 message is authenticated only later, by the Finished transcript, so a
  forger could already end it with a well-formed fatal alert; dropping its malformed
  messages would buy no safety and would cost a broken peer its diagnosis.
* Handshake messages are reassembled from fragments in any order; a repeat of the tail
  of the peer's previous flight makes us retransmit ours (RFC 6347 4.2.4), and flights
  we are waiting on are retransmitted on a doubling timer.

The handlers table below lists every (state, message) pair we accept; anything else is
an ``unexpected_message``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from .certificate import (
    DtlsCertificate,
    Fingerprint,
    certificate_fingerprint,
    fingerprint_matches,
    load_peer_public_key,
    normalize_fingerprint,
)
from .constants import (
    DTLS_1_0,
    DTLS_1_2,
    EC_POINT_FORMAT_UNCOMPRESSED,
    EMPTY_RENEGOTIATION_INFO_SCSV,
    EXPORTER_LABEL_DTLS_SRTP,
    AlertDescription,
    AlertLevel,
    CipherSuite,
    ClientCertificateType,
    ContentType,
    ExtensionType,
    HandshakeType,
    NamedGroup,
    SignatureScheme,
    SrtpProfile,
    describe,
)
from .cookie import HelloCookies
from .crypto import (
    ECDSA_SCHEMES,
    SUITES,
    VERIFIABLE_SCHEMES,
    EphemeralKey,
    RecordProtection,
    SuiteParameters,
    compute_master_secret,
    derive_traffic_keys,
    export_keying_material,
    finished_verify_data,
    sign,
    signing_schemes_for,
    transcript_hash,
    verify_signature,
)
from .errors import DtlsDecodeError, DtlsError, DtlsProtocolError, DtlsStateError
from .events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    DtlsEvent,
    HandshakeCompleted,
)
from .handshake import (
    HANDSHAKE_HEADER_SIZE,
    RANDOM_SIZE,
    Certificate,
    CertificateRequest,
    CertificateVerify,
    ClientHello,
    ClientKeyExchange,
    Extension,
    Finished,
    HandshakeFragment,
    HandshakeMessage,
    HandshakeReassembler,
    HelloVerifyRequest,
    ReassembledMessage,
    ServerHello,
    ServerHelloDone,
    ServerKeyExchange,
    encode_ec_point_formats,
    encode_ecdh_params,
    encode_handshake_fragment,
    encode_handshake_message,
    encode_signature_algorithms,
    encode_supported_groups,
    encode_use_srtp,
    find_extension,
    parse_ec_point_formats,
    parse_handshake_body,
    parse_handshake_fragments,
    parse_renegotiation_info,
    parse_signature_algorithms,
    parse_supported_groups,
    parse_use_srtp,
)
from .record import (
    MAX_PLAINTEXT_LENGTH,
    MAX_SEQUENCE_NUMBER,
    RECORD_HEADER_SIZE,
    Record,
    ReplayWindow,
    encode_record,
    iter_records,
)


class DtlsRole(Enum):
    CLIENT = "client"
    SERVER = "server"


CLIENT = DtlsRole.CLIENT
SERVER = DtlsRole.SERVER

DEFAULT_CIPHER_SUITES: tuple[CipherSuite, ...] = (
    CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
)
DEFAULT_GROUPS: tuple[NamedGroup, ...] = (
    NamedGroup.X25519,
    NamedGroup.SECP256R1,
    NamedGroup.SECP384R1,
)
DEFAULT_SRTP_PROFILES: tuple[SrtpProfile, ...] = (
    SrtpProfile.AEAD_AES_128_GCM,
    SrtpProfile.AEAD_AES_256_GCM,
    SrtpProfile.AES128_CM_HMAC_SHA1_80,
)
MIN_DATAGRAM_SIZE = 64
# Fragments smaller than this are not squeezed into the tail of a datagram.
_MIN_USEFUL_FRAGMENT = 48
_MAX_BUFFERED_FUTURE_RECORDS = 32
_CONTENT_TYPES = frozenset(ContentType)


@dataclass(frozen=True)
class DtlsConfiguration:
    """Tunables shared by many connections; the defaults suit WebRTC."""

    cipher_suites: tuple[CipherSuite, ...] = DEFAULT_CIPHER_SUITES
    groups: tuple[NamedGroup, ...] = DEFAULT_GROUPS
    max_datagram_size: int = 1200
    # RFC 6347 4.2.4.1: start at 1 s, double on each expiry, cap at 60 s.
    initial_retransmit_timeout: float = 1.0
    max_retransmit_timeout: float = 60.0
    max_retransmissions: int = 7
    # Cookie exchange costs a round trip; WebRTC's ICE already proved the address.
    cookie_exchange: bool = False
    cookie_secret: bytes | None = None
    cookie_bucket_seconds: float = 30.0
    require_extended_master_secret: bool = True
    max_handshake_message_size: int = 32 * 1024

    def __post_init__(self) -> None:
        if not self.cipher_suites or any(s not in SUITES for s in self.cipher_suites):
            raise ValueError(f"cipher_suites must be a non-empty subset of {list(SUITES)}")
        if not self.groups or any(g not in DEFAULT_GROUPS for g in self.groups):
            raise ValueError(f"groups must be a non-empty subset of {list(DEFAULT_GROUPS)}")
        if self.max_datagram_size < MIN_DATAGRAM_SIZE:
            raise ValueError(f"max_datagram_size must be at least {MIN_DATAGRAM_SIZE}")
        if not 0 < self.initial_retransmit_timeout <= self.max_retransmit_timeout:
            raise ValueError("need 0 < initial_retransmit_timeout <= max_retransmit_timeout")
        if self.max_retransmissions < 0:
            raise ValueError("max_retransmissions must not be negative")


class _State(Enum):
    IDLE = auto()
    CLIENT_WAIT_SERVER_HELLO = auto()
    CLIENT_WAIT_CERTIFICATE = auto()
    CLIENT_WAIT_SERVER_KEY_EXCHANGE = auto()
    CLIENT_WAIT_CERTIFICATE_REQUEST = auto()  # or ServerHelloDone
    CLIENT_WAIT_SERVER_HELLO_DONE = auto()
    CLIENT_WAIT_FINISHED = auto()
    SERVER_WAIT_CLIENT_HELLO = auto()
    SERVER_WAIT_CERTIFICATE = auto()
    SERVER_WAIT_CLIENT_KEY_EXCHANGE = auto()
    SERVER_WAIT_CERTIFICATE_VERIFY = auto()
    SERVER_WAIT_FINISHED = auto()
    CONNECTED = auto()
    CLOSED = auto()


@dataclass(slots=True)
class _WriteEpoch:
    epoch: int
    protection: RecordProtection | None
    next_sequence_number: int = 0


@dataclass(slots=True)
class _ReadEpoch:
    epoch: int
    protection: RecordProtection | None
    window: ReplayWindow = field(default_factory=ReplayWindow)


@dataclass(frozen=True, slots=True)
class _FlightEntry:
    """A message of our current flight, kept to rebuild its records on retransmission."""

    epoch: int
    msg_type: int | None  # None: ChangeCipherSpec
    message_seq: int = 0
    body: bytes = b""


class DtlsConnection:
    """One DTLS 1.2 association with one peer; see the module docstring."""

    # One per call for its whole life: slots rather than a dict (~1.3 KiB less each).
    __slots__ = (
        "_certificate_requested",
        "_client_random",
        "_client_signature_scheme",
        "_config",
        "_cookie",
        "_cookies",
        "_ephemeral",
        "_events",
        "_expected_fingerprints",
        "_extended_master_secret",
        "_flight",
        "_future_records",
        "_group",
        "_handshake_started_at",
        "_local",
        "_master_secret",
        "_outgoing",
        "_peer_address",
        "_peer_certificate",
        "_peer_ephemeral_public",
        "_peer_fingerprint",
        "_peer_flight_tail_seq",
        "_peer_public_key",
        "_read_epochs",
        "_reassembler",
        "_record_version",
        "_retransmissions",
        "_retransmit_timeout",
        "_role",
        "_send_message_seq",
        "_server_random",
        "_srtp_profile",
        "_srtp_profiles",
        "_state",
        "_suite",
        "_timer_at",
        "_transcript",
        "_write_epoch",
        "_write_epochs",
        "dropped_records",
    )

    def __init__(
        self,
        role: DtlsRole,
        certificate: DtlsCertificate | x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        expected_remote_fingerprint: Fingerprint | Sequence[Fingerprint],
        srtp_profiles: Sequence[SrtpProfile] = DEFAULT_SRTP_PROFILES,
        configuration: DtlsConfiguration | None = None,
        peer_address: bytes = b"",
    ) -> None:
        if isinstance(certificate, DtlsCertificate):
            if private_key is not None and private_key is not certificate.private_key:
                raise ValueError("private_key given twice (DtlsCertificate holds one)")
            self._local = certificate
        else:
            if private_key is None:
                raise ValueError("private_key is required with an x509.Certificate")
            self._local = DtlsCertificate(certificate, private_key)
        self._role = DtlsRole(role)
        self._expected_fingerprints = _normalize_expected(expected_remote_fingerprint)
        self._srtp_profiles = tuple(SrtpProfile(p) for p in srtp_profiles)
        self._config = configuration or DtlsConfiguration()
        self._peer_address = peer_address
        self._cookies: HelloCookies | None = None
        if self._role is SERVER and self._config.cookie_exchange:
            secret = self._config.cookie_secret or os.urandom(32)
            self._cookies = HelloCookies(secret, self._config.cookie_bucket_seconds)

        self._state = _State.IDLE if self._role is CLIENT else _State.SERVER_WAIT_CLIENT_HELLO
        self._events: list[DtlsEvent] = []  # a deque would hold a 64-slot block per call
        self.dropped_records: Counter[str] = Counter()
        """Records dropped without effect, by reason (see :meth:`_drop`): a forger's
        garbage shows up here instead of ending the connection."""
        self._outgoing: list[bytearray] = []

        # Record layer.
        self._record_version = DTLS_1_0 if self._role is CLIENT else DTLS_1_2
        self._write_epochs = {0: _WriteEpoch(0, None)}
        self._write_epoch = 0
        self._read_epochs = {0: _ReadEpoch(0, None)}
        self._future_records: list[Record] = []

        # Handshake layer.
        self._reassembler = HandshakeReassembler(self._config.max_handshake_message_size)
        self._send_message_seq = 0
        self._transcript = bytearray()
        self._flight: list[_FlightEntry] = []
        self._peer_flight_tail_seq: int | None = None
        self._timer_at: float | None = None
        self._retransmit_timeout = self._config.initial_retransmit_timeout
        self._retransmissions = 0
        self._handshake_started_at: float | None = None

        # Negotiated parameters and secrets.
        self._client_random = b""
        self._server_random = b""
        self._cookie = b""
        self._suite: SuiteParameters | None = None
        self._group: NamedGroup | None = None
        self._srtp_profile: SrtpProfile | None = None
        self._extended_master_secret = False
        self._ephemeral: EphemeralKey | None = None
        self._peer_ephemeral_public = b""
        self._master_secret = b""
        self._peer_certificate = b""
        self._peer_public_key: object = None
        self._peer_fingerprint: Fingerprint | None = None
        self._client_signature_scheme: SignatureScheme | None = None
        self._certificate_requested = False

    # --- public API ---------------------------------------------------------------------

    @property
    def role(self) -> DtlsRole:
        return self._role

    @property
    def is_connected(self) -> bool:
        return self._state is _State.CONNECTED

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    def start_handshake(self, now: float) -> None:
        """Client only: send the first ClientHello."""
        if self._role is not CLIENT or self._state is not _State.IDLE:
            raise DtlsStateError("start_handshake() is for a client that has not started")
        self._handshake_started_at = now
        self._client_random = os.urandom(RANDOM_SIZE)
        self._state = _State.CLIENT_WAIT_SERVER_HELLO
        self._send_client_hello(now)

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Process one UDP payload (one or more DTLS records)."""
        if self._state is _State.CLOSED or self._state is _State.IDLE:
            return
        try:
            for record in self._framed_records(bytes(data)):
                self._handle_record(record, now)
                if self._state is _State.CLOSED:
                    return
                self._drain_future_records(now)
        except DtlsProtocolError as error:
            self._fail(error)
        except Exception as error:  # a bug must never escape to the caller as an exception
            self._fail(
                DtlsProtocolError(
                    AlertDescription.INTERNAL_ERROR, f"{type(error).__name__}: {error}"
                )
            )

    def handle_timer(self, now: float) -> None:
        """Retransmit the pending flight if its timer expired, or give up."""
        if self._timer_at is None or now < self._timer_at:
            return
        if self._retransmissions >= self._config.max_retransmissions:
            self._close(
                f"handshake timed out after {self._retransmissions} retransmissions",
                alert=None,
                by_peer=False,
            )
            return
        self._retransmissions += 1
        self._retransmit_timeout = min(
            self._retransmit_timeout * 2, self._config.max_retransmit_timeout
        )
        self._transmit_flight()
        self._timer_at = now + self._retransmit_timeout

    def send_application_data(self, data: bytes) -> None:
        """Queue one record of application data (at most 16384 bytes)."""
        if self._state is not _State.CONNECTED:
            raise DtlsStateError(
                f"cannot send application data in state {self._state.name.lower()}: "
                "wait for HandshakeCompleted"
            )
        if len(data) > MAX_PLAINTEXT_LENGTH:
            raise ValueError(
                f"application data of {len(data)} bytes exceeds one record "
                f"({MAX_PLAINTEXT_LENGTH}); split it"
            )
        self._queue_record(ContentType.APPLICATION_DATA, bytes(data), self._current_write())

    def close(self, now: float) -> None:
        """Send close_notify and end the connection."""
        if self._state is _State.CLOSED:
            return
        if self._state is not _State.IDLE:
            self._queue_alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
        self._close("closed locally", AlertDescription.CLOSE_NOTIFY, by_peer=False)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Datagrams due now, each at most ``max_datagram_size`` bytes (but for oversized
        application records, which travel alone)."""
        datagrams = [bytes(d) for d in self._outgoing]
        self._outgoing.clear()
        return datagrams

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called, or ``None``."""
        return self._timer_at

    def next_event(self) -> DtlsEvent | None:
        return self._events.pop(0) if self._events else None

    def export_keying_material(
        self, label: bytes, length: int, context: bytes | None = None
    ) -> bytes:
        """RFC 5705 exporter, available once the handshake completed."""
        if self._state is not _State.CONNECTED or self._suite is None:
            raise DtlsStateError("keying material is exported only after the handshake")
        return export_keying_material(
            self._suite,
            self._master_secret,
            self._client_random,
            self._server_random,
            label,
            length,
            context,
        )

    # --- record layer -------------------------------------------------------------------

    def _framed_records(self, datagram: bytes) -> Iterator[Record]:
        """The records of a datagram up to the first that does not frame.

        Unframeable bytes (a truncated header or length, a version that is not DTLS, a
        length over the DTLS limit) leave no record boundary to trust, so the rest of the
        datagram is dropped (RFC 6347 4.1.2.7); the records before them still count.
        """
        try:
            yield from iter_records(datagram)
        except DtlsProtocolError:
            self._drop("malformed")

    def _drop(self, reason: str) -> None:
        """Discard a record silently, as RFC 6347 4.1.2.7 asks, and count it.

        Reasons: ``malformed`` (the rest of a datagram that does not frame as records),
        ``unknown_content_type``, ``unknown_epoch``, ``replayed``, ``unauthenticated``
        (AEAD tag check failed), ``oversized`` (a plaintext record over 2^14 bytes),
        ``plaintext_after_handshake`` (any epoch-0 record once connected) and
        ``early_application_data``.
        """
        self.dropped_records[reason] += 1

    def _handle_record(self, record: Record, now: float) -> None:
        if record.content_type not in _CONTENT_TYPES:
            # Checked before decryption: unknown types are never worth an AEAD open.
            self._drop("unknown_content_type")
            return
        if record.epoch == 0 and self._state is _State.CONNECTED:
            # Plaintext after the handshake is unauthenticated: anyone could have sent it.
            # A retransmitted final flight of the peer still reaches us: its Finished is
            # in epoch 1 and makes us repeat our own flight.
            self._drop("plaintext_after_handshake")
            return
        if record.content_type == ContentType.APPLICATION_DATA and (
            self._state is not _State.CONNECTED
        ):
            # Not worth a decryption, nor a move of the replay window.
            self._drop("early_application_data")
            return
        read = self._read_epochs.get(record.epoch)
        if read is None:
            # During the handshake, keys for the next epoch may arrive in a message still
            # in flight; once connected no new epoch ever comes (no renegotiation).
            if (
                self._state is not _State.CONNECTED
                and record.epoch == max(self._read_epochs) + 1
                and len(self._future_records) < _MAX_BUFFERED_FUTURE_RECORDS
            ):
                self._future_records.append(record)
            else:
                self._drop("unknown_epoch")
            return
        if read.window.is_replay(record.sequence_number):
            self._drop("replayed")
            return
        if read.protection is None:
            payload = record.fragment
        else:
            opened = read.protection.open(
                record.content_type,
                record.version,
                record.epoch,
                record.sequence_number,
                record.fragment,
            )
            if opened is None:
                self._drop("unauthenticated")  # RFC 6347 4.1.2.1
                return
            payload = opened
        if len(payload) > MAX_PLAINTEXT_LENGTH:
            if read.protection is None:
                self._drop("oversized")  # only an authenticated record speaks for the peer
                return
            raise DtlsProtocolError(
                AlertDescription.RECORD_OVERFLOW,
                f"record plaintext of {len(payload)} bytes exceeds {MAX_PLAINTEXT_LENGTH}",
            )
        read.window.accept(record.sequence_number)

        content_type = record.content_type
        if content_type == ContentType.HANDSHAKE:
            for fragment in parse_handshake_fragments(payload):
                self._handle_fragment(fragment, record, now)
                if self._state is _State.CLOSED:
                    return
        elif content_type == ContentType.CHANGE_CIPHER_SPEC:
            # The peer's switch to the new epoch is proven by its epoch-1 Finished, which
            # we can only decrypt with the new keys; the marker itself carries nothing.
            if payload != b"\x01":
                raise DtlsDecodeError(f"ChangeCipherSpec must be 0x01, got {payload.hex()}")
        elif content_type == ContentType.ALERT:
            self._handle_alert(payload)
        else:  # application data in epoch 1 of a connected association, as checked above
            self._events.append(ApplicationData(payload))

    def _drain_future_records(self, now: float) -> None:
        while self._future_records and self._future_records[0].epoch in self._read_epochs:
            buffered, self._future_records = self._future_records, []
            for record in buffered:
                if self._state is _State.CLOSED:
                    return
                self._handle_record(record, now)

    def _handle_alert(self, payload: bytes) -> None:
        # Epoch-0 alerts after the handshake never get here (see _handle_record).
        if not payload or len(payload) % 2:
            raise DtlsDecodeError(f"alert record of {len(payload)} bytes (alerts are 2 bytes)")
        for offset in range(0, len(payload), 2):
            level, description = payload[offset], payload[offset + 1]
            level_value: AlertLevel | int = _enum_or_int(AlertLevel, level)
            description_value = _enum_or_int(AlertDescription, description)
            self._events.append(AlertReceived(level_value, description_value))
            if description == AlertDescription.CLOSE_NOTIFY:
                self._queue_alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
                self._close("peer sent close_notify", description_value, by_peer=True)
                return
            if level != AlertLevel.WARNING:
                self._close(
                    f"peer sent fatal alert {describe(AlertDescription, description)}",
                    description_value,
                    by_peer=True,
                )
                return

    def _current_write(self) -> _WriteEpoch:
        return self._write_epochs[self._write_epoch]

    def _payload_space(self, write: _WriteEpoch, fresh: bool) -> int:
        """Bytes of record payload that still fit the current datagram (or a fresh one)."""
        used = 0 if fresh or not self._outgoing else len(self._outgoing[-1])
        overhead = RECORD_HEADER_SIZE + (
            write.protection.suite.record_overhead if write.protection else 0
        )
        return self._config.max_datagram_size - used - overhead

    def _queue_record(
        self,
        content_type: int,
        payload: bytes,
        write: _WriteEpoch,
        sequence_number: int | None = None,
    ) -> None:
        if sequence_number is None:
            sequence_number = write.next_sequence_number
            if sequence_number > MAX_SEQUENCE_NUMBER:
                raise DtlsStateError("record sequence numbers of this epoch are exhausted")
        write.next_sequence_number = max(write.next_sequence_number, sequence_number + 1)
        if write.protection is None:
            fragment = payload
        else:
            fragment = write.protection.seal(
                content_type, self._record_version, write.epoch, sequence_number, payload
            )
        record = encode_record(
            content_type, self._record_version, write.epoch, sequence_number, fragment
        )
        if self._outgoing and len(self._outgoing[-1]) + len(record) <= (
            self._config.max_datagram_size
        ):
            self._outgoing[-1] += record
        else:
            self._outgoing.append(bytearray(record))

    def _queue_alert(self, level: AlertLevel, description: AlertDescription) -> None:
        payload = bytes((level, description))
        self._queue_record(ContentType.ALERT, payload, self._current_write())

    # --- flights and timers -------------------------------------------------------------

    def _begin_flight(self) -> None:
        self._flight = []

    def _add_message(self, message: HandshakeMessage, epoch: int = 0) -> None:
        """Append one of our messages to the flight and to the transcript."""
        body = message.encode()
        seq = self._send_message_seq
        self._send_message_seq += 1
        self._transcript += encode_handshake_message(message.msg_type, seq, body)
        self._flight.append(_FlightEntry(epoch, int(message.msg_type), seq, body))

    def _add_change_cipher_spec(self) -> None:
        self._flight.append(_FlightEntry(0, None))

    def _send_flight(self, now: float, retransmit_on_timer: bool) -> None:
        self._transmit_flight()
        self._retransmissions = 0
        self._retransmit_timeout = self._config.initial_retransmit_timeout
        self._timer_at = now + self._retransmit_timeout if retransmit_on_timer else None

    def _transmit_flight(self, record_sequence_number: int | None = None) -> None:
        """Serialize the flight into records, fragmenting to the datagram size.

        Each transmission uses fresh record sequence numbers, as RFC 6347 4.2.4 requires.
        """
        for entry in self._flight:
            write = self._write_epochs[entry.epoch]
            if entry.msg_type is None:
                self._queue_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01", write)
                continue
            body, offset = entry.body, 0
            while True:
                remaining = len(body) - offset
                space = self._payload_space(write, fresh=False) - HANDSHAKE_HEADER_SIZE
                if self._outgoing and space < min(remaining, _MIN_USEFUL_FRAGMENT):
                    self._outgoing.append(bytearray())
                    space = self._payload_space(write, fresh=True) - HANDSHAKE_HEADER_SIZE
                chunk = body[offset : offset + max(space, 0)]
                fragment = encode_handshake_fragment(
                    entry.msg_type, len(body), entry.message_seq, offset, chunk
                )
                self._queue_record(ContentType.HANDSHAKE, fragment, write, record_sequence_number)
                record_sequence_number = None
                offset += len(chunk)
                if offset >= len(body):
                    break
        # Drop a trailing empty datagram opened for a fragment that then fitted nowhere.
        self._outgoing = [d for d in self._outgoing if d]

    def _retransmit_for_peer(self, now: float) -> None:
        """The peer repeated its last flight, so ours was lost: send it again."""
        if not self._flight:
            return
        self._transmit_flight()
        if self._timer_at is not None:
            self._timer_at = now + self._retransmit_timeout

    # --- handshake layer ----------------------------------------------------------------

    def _handle_fragment(self, fragment: HandshakeFragment, record: Record, now: float) -> None:
        reassembler = self._reassembler
        if (
            self._state is _State.SERVER_WAIT_CLIENT_HELLO
            and fragment.msg_type == HandshakeType.CLIENT_HELLO
            and fragment.message_seq > reassembler.next_seq
        ):
            # A ClientHello answering a HelloVerifyRequest that a stateless front end
            # (or an earlier connection object) sent: its message_seq starts our count.
            reassembler.reset(fragment.message_seq)
        if fragment.message_seq < reassembler.next_seq:
            if fragment.message_seq == self._peer_flight_tail_seq and fragment.is_last_fragment:
                if self._state is _State.SERVER_WAIT_CLIENT_HELLO:
                    self._retransmit_hello_verify(record)
                else:
                    self._retransmit_for_peer(now)
            return
        reassembler.add(fragment, record.epoch)
        while self._state is not _State.CLOSED:
            message = reassembler.pop()
            if message is None:
                return
            self._handle_message(message, record, now)

    def _handle_message(self, message: ReassembledMessage, record: Record, now: float) -> None:
        if self._state is _State.CONNECTED and message.epoch == 0:
            return  # plaintext handshake after the handshake: anyone could have sent it
        handler = self._HANDLERS.get((self._state, message.msg_type))
        if handler is None:
            raise DtlsProtocolError(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"{describe(HandshakeType, message.msg_type)} is not expected in state "
                f"{self._state.name.lower()}",
            )
        # Only Finished travels under the new keys; anything else there, or a Finished
        # in the clear, is a forgery or a broken peer.
        expected_epoch = 1 if message.msg_type == HandshakeType.FINISHED else 0
        if message.epoch != expected_epoch and self._state is not _State.CONNECTED:
            raise DtlsProtocolError(
                AlertDescription.UNEXPECTED_MESSAGE,
                f"{describe(HandshakeType, message.msg_type)} arrived in epoch "
                f"{message.epoch}, expected {expected_epoch}",
            )
        parsed = parse_handshake_body(message.msg_type, message.body)
        transcript_before = bytes(self._transcript)
        self._transcript += encode_handshake_message(
            message.msg_type, message.message_seq, message.body
        )
        handler(self, parsed, _Context(message.message_seq, record, transcript_before, now))

    # client ---------------------------------------------------------------------------

    def _send_client_hello(self, now: float) -> None:
        extensions: list[Extension] = [
            (ExtensionType.SUPPORTED_GROUPS, encode_supported_groups(self._config.groups)),
            (
                ExtensionType.EC_POINT_FORMATS,
                encode_ec_point_formats(bytes([EC_POINT_FORMAT_UNCOMPRESSED])),
            ),
            (
                ExtensionType.SIGNATURE_ALGORITHMS,
                encode_signature_algorithms(tuple(s for s in VERIFIABLE_SCHEMES)),
            ),
            (ExtensionType.EXTENDED_MASTER_SECRET, b""),
            (ExtensionType.RENEGOTIATION_INFO, b"\x00"),
        ]
        if self._srtp_profiles:
            extensions.append((ExtensionType.USE_SRTP, encode_use_srtp(self._srtp_profiles)))
        hello = ClientHello(
            client_version=DTLS_1_2,
            random=self._client_random,
            cookie=self._cookie,
            cipher_suites=tuple(self._config.cipher_suites),
            compression_methods=b"\x00",
            extensions=tuple(extensions),
        )
        self._begin_flight()
        self._add_message(hello)
        self._send_flight(now, retransmit_on_timer=True)

    def _client_hello_verify_request(self, message: HelloVerifyRequest, ctx: _Context) -> None:
        if not message.cookie:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER, "HelloVerifyRequest with an empty cookie"
            )
        # RFC 6347 4.2.1: neither the first ClientHello nor the HelloVerifyRequest is part
        # of the transcript.
        self._transcript.clear()
        self._cookie = message.cookie
        self._peer_flight_tail_seq = ctx.message_seq
        self._send_client_hello(ctx.now)

    def _client_server_hello(self, message: ServerHello, ctx: _Context) -> None:
        if message.server_version != DTLS_1_2:
            raise DtlsProtocolError(
                AlertDescription.PROTOCOL_VERSION,
                f"server chose version 0x{message.server_version:04x}; we speak DTLS 1.2 only",
            )
        if message.cipher_suite not in self._config.cipher_suites:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"server chose cipher suite 0x{message.cipher_suite:04x}, which we did not offer",
            )
        if message.compression_method != 0:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER, "server chose a compression method"
            )
        offered = {
            ExtensionType.EC_POINT_FORMATS,
            ExtensionType.EXTENDED_MASTER_SECRET,
            ExtensionType.RENEGOTIATION_INFO,
            ExtensionType.USE_SRTP,
        }
        for kind, data in message.extensions:
            if kind not in offered or (kind == ExtensionType.USE_SRTP and not self._srtp_profiles):
                raise DtlsProtocolError(
                    AlertDescription.UNSUPPORTED_EXTENSION,
                    f"ServerHello carries extension {describe(ExtensionType, kind)} "
                    "that we did not offer",
                )
            if kind == ExtensionType.EXTENDED_MASTER_SECRET and data:
                raise DtlsDecodeError("extended_master_secret extension must be empty")
            if kind == ExtensionType.RENEGOTIATION_INFO and parse_renegotiation_info(data):
                raise DtlsProtocolError(
                    AlertDescription.HANDSHAKE_FAILURE,
                    "renegotiation_info must be empty in an initial handshake",
                )
            if kind == ExtensionType.EC_POINT_FORMATS and (
                EC_POINT_FORMAT_UNCOMPRESSED not in parse_ec_point_formats(data)
            ):
                raise DtlsProtocolError(
                    AlertDescription.ILLEGAL_PARAMETER, "server does not accept uncompressed points"
                )
        self._extended_master_secret = (
            find_extension(message.extensions, ExtensionType.EXTENDED_MASTER_SECRET) is not None
        )
        if not self._extended_master_secret and self._config.require_extended_master_secret:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "server does not support extended_master_secret (RFC 7627), which we require",
            )
        srtp = find_extension(message.extensions, ExtensionType.USE_SRTP)
        if self._srtp_profiles:
            if srtp is None:
                raise DtlsProtocolError(
                    AlertDescription.HANDSHAKE_FAILURE, "server did not negotiate use_srtp"
                )
            profiles, mki = parse_use_srtp(srtp)
            if len(profiles) != 1 or profiles[0] not in self._srtp_profiles or mki:
                raise DtlsProtocolError(
                    AlertDescription.ILLEGAL_PARAMETER,
                    f"server's use_srtp answer {[hex(p) for p in profiles]} (MKI "
                    f"{mki.hex() or 'none'}) is not one profile we offered without MKI",
                )
            self._srtp_profile = SrtpProfile(profiles[0])
        self._suite = SUITES[CipherSuite(message.cipher_suite)]
        self._server_random = message.random
        self._record_version = DTLS_1_2
        self._state = _State.CLIENT_WAIT_CERTIFICATE

    def _client_certificate(self, message: Certificate, ctx: _Context) -> None:
        self._accept_peer_certificate(message)
        if not isinstance(self._peer_public_key, ec.EllipticCurvePublicKey):
            raise DtlsProtocolError(
                AlertDescription.UNSUPPORTED_CERTIFICATE,
                "server certificate is not ECDSA, which ECDHE_ECDSA suites require",
            )
        self._state = _State.CLIENT_WAIT_SERVER_KEY_EXCHANGE

    def _client_server_key_exchange(self, message: ServerKeyExchange, ctx: _Context) -> None:
        if message.named_group not in self._config.groups:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"server chose group {describe(NamedGroup, message.named_group)}, "
                "which we did not offer",
            )
        if message.signature_scheme not in ECDSA_SCHEMES:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"server signed with {describe(SignatureScheme, message.signature_scheme)}",
            )
        signed = self._client_random + self._server_random + message.params
        verify_signature(self._peer_public_key, message.signature_scheme, signed, message.signature)
        self._check_peer_fingerprint()
        self._group = NamedGroup(message.named_group)
        self._ephemeral = EphemeralKey(self._group)
        self._peer_ephemeral_public = message.public_key
        self._state = _State.CLIENT_WAIT_CERTIFICATE_REQUEST

    def _client_certificate_request(self, message: CertificateRequest, ctx: _Context) -> None:
        if ClientCertificateType.ECDSA_SIGN not in message.certificate_types:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "server does not accept ECDSA client certificates",
            )
        for scheme in signing_schemes_for(self._local.private_key):
            if scheme in message.signature_schemes:
                self._client_signature_scheme = scheme
                break
        else:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "server accepts no ECDSA signature scheme that our key can make",
            )
        self._certificate_requested = True
        self._state = _State.CLIENT_WAIT_SERVER_HELLO_DONE

    def _client_server_hello_done(self, message: ServerHelloDone, ctx: _Context) -> None:
        assert self._ephemeral is not None and self._suite is not None
        self._peer_flight_tail_seq = ctx.message_seq
        premaster = self._ephemeral.exchange(self._peer_ephemeral_public)
        self._begin_flight()
        if self._certificate_requested:
            self._add_message(Certificate((self._local.der,)))
        self._add_message(ClientKeyExchange(self._ephemeral.public_bytes))
        self._derive_keys(premaster)
        if self._certificate_requested:
            assert self._client_signature_scheme is not None
            signature = sign(
                self._local.private_key, self._client_signature_scheme, bytes(self._transcript)
            )
            self._add_message(CertificateVerify(self._client_signature_scheme, signature))
        self._add_change_cipher_spec()
        verify_data = finished_verify_data(
            self._suite,
            self._master_secret,
            b"client finished",
            transcript_hash(self._suite.prf_hash, bytes(self._transcript)),
        )
        self._write_epoch = 1
        self._add_message(Finished(verify_data), epoch=1)
        self._send_flight(ctx.now, retransmit_on_timer=True)
        self._state = _State.CLIENT_WAIT_FINISHED

    def _client_finished(self, message: Finished, ctx: _Context) -> None:
        self._check_finished(message, b"server finished", ctx.transcript_before)
        self._complete(ctx.now)

    # server ---------------------------------------------------------------------------

    def _server_client_hello(self, message: ClientHello, ctx: _Context) -> None:
        if self._handshake_started_at is None:
            self._handshake_started_at = ctx.now
        # DTLS versions count down: 0xFEFD (1.2) and below are 1.2 or newer.
        if message.client_version > DTLS_1_2:
            raise DtlsProtocolError(
                AlertDescription.PROTOCOL_VERSION,
                f"client offers at most version 0x{message.client_version:04x}; "
                "we require DTLS 1.2",
            )
        if self._cookies is not None and not self._cookies.verify(
            message, self._peer_address, ctx.now
        ):
            self._send_hello_verify_request(message, ctx)
            return
        choices = self._negotiate(message)
        self._peer_flight_tail_seq = ctx.message_seq
        self._client_random = message.random
        self._server_random = os.urandom(RANDOM_SIZE)
        self._suite = SUITES[choices.suite]
        self._group = choices.group
        self._extended_master_secret = choices.extended_master_secret
        self._srtp_profile = choices.srtp_profile
        self._ephemeral = EphemeralKey(choices.group)

        params = encode_ecdh_params(choices.group, self._ephemeral.public_bytes)
        signature = sign(
            self._local.private_key,
            choices.signature_scheme,
            self._client_random + self._server_random + params,
        )
        # The server's first message_seq mirrors the ClientHello's (RFC 6347 4.2.2), which
        # keeps a stateless cookie exchange consistent.
        self._send_message_seq = ctx.message_seq
        self._begin_flight()
        self._add_message(
            ServerHello(
                server_version=DTLS_1_2,
                random=self._server_random,
                session_id=b"",
                cipher_suite=choices.suite,
                compression_method=0,
                extensions=choices.extensions,
            )
        )
        self._add_message(Certificate((self._local.der,)))
        self._add_message(
            ServerKeyExchange(
                choices.group, self._ephemeral.public_bytes, choices.signature_scheme, signature
            )
        )
        self._add_message(
            CertificateRequest(
                certificate_types=bytes(
                    (ClientCertificateType.ECDSA_SIGN, ClientCertificateType.RSA_SIGN)
                ),
                signature_schemes=VERIFIABLE_SCHEMES,
            )
        )
        self._add_message(ServerHelloDone())
        self._send_flight(ctx.now, retransmit_on_timer=True)
        self._state = _State.SERVER_WAIT_CERTIFICATE

    def _negotiate(self, message: ClientHello) -> _ServerChoices:
        """Pick suite, group, signature scheme and SRTP profile by our preference order,
        and check the extensions a DTLS-SRTP server must insist on."""
        extensions = message.extensions
        if 0 not in message.compression_methods:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER, "client does not offer null compression"
            )
        suite = next((s for s in self._config.cipher_suites if s in message.cipher_suites), None)
        if suite is None:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "no common cipher suite: we need one of "
                + ", ".join(s.name for s in self._config.cipher_suites),
            )
        # RFC 8422 4: without supported_groups, the client accepts any group.
        groups_data = find_extension(extensions, ExtensionType.SUPPORTED_GROUPS)
        client_groups = (
            parse_supported_groups(groups_data) if groups_data is not None else self._config.groups
        )
        group = next((g for g in self._config.groups if g in client_groups), None)
        if group is None:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "no common ECDHE group: we support "
                + ", ".join(g.name.lower() for g in self._config.groups),
            )
        point_formats = find_extension(extensions, ExtensionType.EC_POINT_FORMATS)
        if point_formats is not None and (
            EC_POINT_FORMAT_UNCOMPRESSED not in parse_ec_point_formats(point_formats)
        ):
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER, "client does not accept uncompressed points"
            )
        schemes_data = find_extension(extensions, ExtensionType.SIGNATURE_ALGORITHMS)
        our_schemes = signing_schemes_for(self._local.private_key)
        if schemes_data is None:
            signature_scheme: SignatureScheme | None = our_schemes[0]
        else:
            client_schemes = parse_signature_algorithms(schemes_data)
            signature_scheme = next((s for s in our_schemes if s in client_schemes), None)
        if signature_scheme is None:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "client accepts no ECDSA signature scheme that our key can make",
            )
        ems = find_extension(extensions, ExtensionType.EXTENDED_MASTER_SECRET)
        if ems:
            raise DtlsDecodeError("extended_master_secret extension must be empty")
        if ems is None and self._config.require_extended_master_secret:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "client does not offer extended_master_secret (RFC 7627), which we require",
            )
        renegotiation = find_extension(extensions, ExtensionType.RENEGOTIATION_INFO)
        if renegotiation is not None and parse_renegotiation_info(renegotiation):
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "renegotiation_info must be empty in an initial handshake",
            )
        srtp_profile = None
        if self._srtp_profiles:
            srtp = find_extension(extensions, ExtensionType.USE_SRTP)
            offered_profiles = parse_use_srtp(srtp)[0] if srtp is not None else ()
            srtp_profile = next((p for p in self._srtp_profiles if p in offered_profiles), None)
            if srtp_profile is None:
                raise DtlsProtocolError(
                    AlertDescription.HANDSHAKE_FAILURE,
                    "no common SRTP protection profile: we support "
                    + ", ".join(p.name for p in self._srtp_profiles),
                )

        response: list[Extension] = []
        if renegotiation is not None or EMPTY_RENEGOTIATION_INFO_SCSV in message.cipher_suites:
            response.append((ExtensionType.RENEGOTIATION_INFO, b"\x00"))
        if ems is not None:
            response.append((ExtensionType.EXTENDED_MASTER_SECRET, b""))
        if point_formats is not None:
            uncompressed = bytes([EC_POINT_FORMAT_UNCOMPRESSED])
            response.append((ExtensionType.EC_POINT_FORMATS, encode_ec_point_formats(uncompressed)))
        if srtp_profile is not None:
            response.append((ExtensionType.USE_SRTP, encode_use_srtp((srtp_profile,))))
        return _ServerChoices(
            suite=suite,
            group=group,
            signature_scheme=signature_scheme,
            extended_master_secret=ems is not None,
            srtp_profile=srtp_profile,
            extensions=tuple(response),
        )

    def _send_hello_verify_request(self, message: ClientHello, ctx: _Context) -> None:
        assert self._cookies is not None
        cookie = self._cookies.make(message, self._peer_address, ctx.now)
        # RFC 6347 4.2.1: DTLS 1.0 in the HelloVerifyRequest, message_seq and record
        # sequence number copied from the ClientHello, nothing remembered.
        self._send_message_seq = ctx.message_seq
        self._begin_flight()
        self._add_message(HelloVerifyRequest(DTLS_1_0, cookie))
        self._transcript.clear()
        self._peer_flight_tail_seq = ctx.message_seq
        self._retransmit_hello_verify(ctx.record)

    def _retransmit_hello_verify(self, record: Record) -> None:
        if not self._flight:
            return
        self._record_version = DTLS_1_0
        self._transmit_flight(record_sequence_number=record.sequence_number)
        self._record_version = DTLS_1_2

    def _server_certificate(self, message: Certificate, ctx: _Context) -> None:
        if not message.certificates:
            raise DtlsProtocolError(
                AlertDescription.HANDSHAKE_FAILURE,
                "client sent no certificate; DTLS-SRTP requires one",
            )
        self._accept_peer_certificate(message)
        self._state = _State.SERVER_WAIT_CLIENT_KEY_EXCHANGE

    def _server_client_key_exchange(self, message: ClientKeyExchange, ctx: _Context) -> None:
        assert self._ephemeral is not None
        premaster = self._ephemeral.exchange(message.public_key)
        self._derive_keys(premaster)
        self._state = _State.SERVER_WAIT_CERTIFICATE_VERIFY

    def _server_certificate_verify(self, message: CertificateVerify, ctx: _Context) -> None:
        if message.signature_scheme not in VERIFIABLE_SCHEMES:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"client signed with {describe(SignatureScheme, message.signature_scheme)}, "
                "which we did not offer",
            )
        verify_signature(
            self._peer_public_key,
            message.signature_scheme,
            ctx.transcript_before,
            message.signature,
        )
        self._check_peer_fingerprint()
        self._state = _State.SERVER_WAIT_FINISHED

    def _server_finished(self, message: Finished, ctx: _Context) -> None:
        assert self._suite is not None
        self._check_finished(message, b"client finished", ctx.transcript_before)
        self._peer_flight_tail_seq = ctx.message_seq
        verify_data = finished_verify_data(
            self._suite,
            self._master_secret,
            b"server finished",
            transcript_hash(self._suite.prf_hash, bytes(self._transcript)),
        )
        self._begin_flight()
        self._add_change_cipher_spec()
        self._write_epoch = 1
        self._add_message(Finished(verify_data), epoch=1)
        # We send the last flight: no timer; it is repeated when the client repeats its own.
        self._send_flight(ctx.now, retransmit_on_timer=False)
        self._complete(ctx.now)

    def _server_renegotiation(self, message: ClientHello, ctx: _Context) -> None:
        self._queue_alert(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION)

    # shared ---------------------------------------------------------------------------

    def _accept_peer_certificate(self, message: Certificate) -> None:
        if not message.certificates:
            raise DtlsProtocolError(AlertDescription.BAD_CERTIFICATE, "empty certificate chain")
        leaf = message.certificates[0]
        try:
            self._peer_public_key = load_peer_public_key(leaf)
        except ValueError as error:
            raise DtlsProtocolError(
                AlertDescription.BAD_CERTIFICATE, f"peer certificate does not parse: {error}"
            ) from None
        self._peer_certificate = leaf

    def _check_peer_fingerprint(self) -> None:
        matched = fingerprint_matches(self._peer_certificate, self._expected_fingerprints)
        if matched is None:
            algorithm = self._expected_fingerprints[0][0]
            actual = certificate_fingerprint(self._peer_certificate, algorithm)
            raise DtlsProtocolError(
                AlertDescription.BAD_CERTIFICATE,
                f"peer certificate {algorithm} fingerprint {actual} does not match the "
                "fingerprint signalled in SDP",
            )
        self._peer_fingerprint = matched

    def _derive_keys(self, premaster: bytes) -> None:
        """Master secret (extended when negotiated) and the epoch-1 record keys."""
        assert self._suite is not None
        session_hash = (
            transcript_hash(self._suite.prf_hash, bytes(self._transcript))
            if self._extended_master_secret
            else None
        )
        self._master_secret = compute_master_secret(
            self._suite, premaster, self._client_random, self._server_random, session_hash
        )
        keys = derive_traffic_keys(
            self._suite, self._master_secret, self._client_random, self._server_random
        )
        client = RecordProtection(self._suite, keys.client_key, keys.client_iv)
        server = RecordProtection(self._suite, keys.server_key, keys.server_iv)
        local, remote = (client, server) if self._role is CLIENT else (server, client)
        self._write_epochs[1] = _WriteEpoch(1, local)
        self._read_epochs[1] = _ReadEpoch(1, remote)

    def _check_finished(self, message: Finished, label: bytes, transcript: bytes) -> None:
        assert self._suite is not None
        expected = finished_verify_data(
            self._suite,
            self._master_secret,
            label,
            transcript_hash(self._suite.prf_hash, transcript),
        )
        if not hmac.compare_digest(expected, message.verify_data):
            raise DtlsProtocolError(
                AlertDescription.DECRYPT_ERROR, "peer's Finished verify_data is wrong"
            )

    def _complete(self, now: float) -> None:
        assert self._suite is not None and self._group is not None
        assert self._peer_fingerprint is not None
        if self._role is CLIENT:
            self._flight = []
            self._timer_at = None
        self._state = _State.CONNECTED
        # What only the handshake needed; a connection lives for the whole call. (The
        # master secret and randoms stay: export_keying_material needs them.)
        self._transcript = bytearray()
        self._ephemeral = None
        self._peer_ephemeral_public = b""
        local_key = local_salt = remote_key = remote_salt = b""
        if self._srtp_profile is not None:
            key_length = self._srtp_profile.key_length
            salt_length = self._srtp_profile.salt_length
            material = export_keying_material(
                self._suite,
                self._master_secret,
                self._client_random,
                self._server_random,
                EXPORTER_LABEL_DTLS_SRTP,
                2 * (key_length + salt_length),
            )
            # RFC 5764 4.2: client key, server key, client salt, server salt.
            client_key = material[:key_length]
            server_key = material[key_length : 2 * key_length]
            client_salt = material[2 * key_length : 2 * key_length + salt_length]
            server_salt = material[2 * key_length + salt_length :]
            if self._role is CLIENT:
                local_key, local_salt = client_key, client_salt
                remote_key, remote_salt = server_key, server_salt
            else:
                local_key, local_salt = server_key, server_salt
                remote_key, remote_salt = client_key, client_salt
        started = self._handshake_started_at if self._handshake_started_at is not None else now
        self._events.append(
            HandshakeCompleted(
                cipher_suite=self._suite.suite,
                group=self._group,
                srtp_profile=self._srtp_profile,
                local_srtp_key=local_key,
                local_srtp_salt=local_salt,
                remote_srtp_key=remote_key,
                remote_srtp_salt=remote_salt,
                remote_fingerprint=self._peer_fingerprint,
                remote_certificate=self._peer_certificate,
                extended_master_secret=self._extended_master_secret,
                handshake_time=now - started,
            )
        )

    def _fail(self, error: DtlsProtocolError) -> None:
        if self._state is _State.CLOSED:
            return
        # If sequence numbers are exhausted, close without the alert.
        with contextlib.suppress(DtlsError):
            self._queue_alert(AlertLevel.FATAL, error.alert)
        self._close(str(error), error.alert, by_peer=False)

    def _close(self, reason: str, alert: AlertDescription | int | None, by_peer: bool) -> None:
        self._state = _State.CLOSED
        self._timer_at = None
        self._flight = []
        self._future_records = []
        self._events.append(ConnectionClosed(reason=reason, alert=alert, by_peer=by_peer))

    _HANDLERS: dict[tuple[_State, int], Callable[[DtlsConnection, object, _Context], None]]


@dataclass(frozen=True, slots=True)
class _ServerChoices:
    """What the server decided from a ClientHello."""

    suite: CipherSuite
    group: NamedGroup
    signature_scheme: SignatureScheme
    extended_master_secret: bool
    srtp_profile: SrtpProfile | None
    extensions: tuple[Extension, ...]  # of our ServerHello


@dataclass(frozen=True, slots=True)
class _Context:
    """What a handshake handler knows besides the message itself."""

    message_seq: int
    record: Record
    transcript_before: bytes  # the transcript without this message
    now: float


DtlsConnection._HANDLERS = {  # type: ignore[assignment]
    (_State.CLIENT_WAIT_SERVER_HELLO, HandshakeType.HELLO_VERIFY_REQUEST): (
        DtlsConnection._client_hello_verify_request
    ),
    (_State.CLIENT_WAIT_SERVER_HELLO, HandshakeType.SERVER_HELLO): (
        DtlsConnection._client_server_hello
    ),
    (_State.CLIENT_WAIT_CERTIFICATE, HandshakeType.CERTIFICATE): (
        DtlsConnection._client_certificate
    ),
    (_State.CLIENT_WAIT_SERVER_KEY_EXCHANGE, HandshakeType.SERVER_KEY_EXCHANGE): (
        DtlsConnection._client_server_key_exchange
    ),
    (_State.CLIENT_WAIT_CERTIFICATE_REQUEST, HandshakeType.CERTIFICATE_REQUEST): (
        DtlsConnection._client_certificate_request
    ),
    (_State.CLIENT_WAIT_CERTIFICATE_REQUEST, HandshakeType.SERVER_HELLO_DONE): (
        DtlsConnection._client_server_hello_done
    ),
    (_State.CLIENT_WAIT_SERVER_HELLO_DONE, HandshakeType.SERVER_HELLO_DONE): (
        DtlsConnection._client_server_hello_done
    ),
    (_State.CLIENT_WAIT_FINISHED, HandshakeType.FINISHED): DtlsConnection._client_finished,
    (_State.SERVER_WAIT_CLIENT_HELLO, HandshakeType.CLIENT_HELLO): (
        DtlsConnection._server_client_hello
    ),
    (_State.SERVER_WAIT_CERTIFICATE, HandshakeType.CERTIFICATE): (
        DtlsConnection._server_certificate
    ),
    (_State.SERVER_WAIT_CLIENT_KEY_EXCHANGE, HandshakeType.CLIENT_KEY_EXCHANGE): (
        DtlsConnection._server_client_key_exchange
    ),
    (_State.SERVER_WAIT_CERTIFICATE_VERIFY, HandshakeType.CERTIFICATE_VERIFY): (
        DtlsConnection._server_certificate_verify
    ),
    (_State.SERVER_WAIT_FINISHED, HandshakeType.FINISHED): DtlsConnection._server_finished,
    (_State.CONNECTED, HandshakeType.CLIENT_HELLO): DtlsConnection._server_renegotiation,
}


def _normalize_expected(
    expected: Fingerprint | Sequence[Fingerprint],
) -> tuple[Fingerprint, ...]:
    if (
        isinstance(expected, tuple)
        and len(expected) == 2
        and all(isinstance(part, str) for part in expected)
    ):
        candidates: Sequence[Fingerprint] = (expected,)  # type: ignore[assignment]
    else:
        candidates = expected  # type: ignore[assignment]
    normalized = tuple(normalize_fingerprint(f) for f in candidates)
    if not normalized:
        raise ValueError("expected_remote_fingerprint needs at least one fingerprint")
    return normalized


def _enum_or_int(enum_type: type[AlertLevel] | type[AlertDescription], value: int) -> int:
    try:
        return enum_type(value)
    except ValueError:
        return value
