"""The server side of ICE-lite for one session: answer connectivity checks, track consent.

voxrelay is an ICE-lite agent (RFC 8445 sections 2.5 and 6.1.1): it has one host
candidate (the relay's public address), always takes the controlled role, and never
sends checks of its own. The client runs full ICE: it sends STUN binding requests
(RFC 8489) to that candidate, nominates one address with USE-CANDIDATE, and keeps
sending checks at least every few seconds, which gives us consent freshness (RFC 7675)
for free: an address that stops checking in for ``consent_timeout`` seconds has lost
consent.

:class:`IceLiteSession` is sans-IO. :meth:`~IceLiteSession.receive_stun` takes a
datagram, the client address it came from (what the relay saw) and ``now``, and returns
the datagram to send back, or None. Events (:class:`CandidatePairValidated`,
:class:`Nominated`, :class:`ConsentExpired`) queue up for
:meth:`~IceLiteSession.next_event`; :meth:`~IceLiteSession.get_timer` says when to call
:meth:`~IceLiteSession.handle_timer`. Media and DTLS should be accepted only from an
address for which :meth:`~IceLiteSession.is_validated` is true.

Which request gets which answer (RFC 8489 sections 6.3 and 9.1.3, RFC 8445 section 7.3):

* silence: not STUN, not a request (indications, responses, errors: we never send
  requests, so no response can be ours), or no valid FINGERPRINT, which ICE requires
  (RFC 8445 section 7.2.2) and without which the datagram is not proven to be STUN.
  Not answering unproven datagrams also keeps the port useless as a reflector.
* 400 Bad Request: a malformed attribute, a method other than Binding, no USERNAME or
  no MESSAGE-INTEGRITY; unsigned.
* 401 Unauthorized: USERNAME is not ``local_ufrag:remote_ufrag``, or MESSAGE-INTEGRITY
  does not verify with ``local_pwd``; unsigned, since the client's key is in doubt.
* 420 Unknown Attribute (with UNKNOWN-ATTRIBUTES), 487 Role Conflict (the client
  claims ICE-CONTROLLED; a lite agent cannot switch to controlling), 400 for a check
  without PRIORITY: these passed authentication, so they carry MESSAGE-INTEGRITY.
* success: XOR-MAPPED-ADDRESS (the client address as given), MESSAGE-INTEGRITY and
  FINGERPRINT.

STUN messages are decoded and encoded with aioice's codec (``aioice.stun``), after a
framing check of our own so that none of its exceptions can escape.
"""

import hmac
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from aioice import stun as aioice_stun

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "DEFAULT_CONSENT_TIMEOUT",
    "MAX_VALIDATED_ADDRESSES",
    "Address",
    "CandidatePairValidated",
    "ConsentExpired",
    "IceError",
    "IceEvent",
    "IceLiteSession",
    "Nominated",
]

DEFAULT_CONSENT_TIMEOUT: Final = 30.0
"""Seconds without a valid check after which an address loses consent (RFC 7675)."""

MAX_VALIDATED_ADDRESSES: Final = 8
"""Most client addresses a session tracks at once.

A client checks from each of its candidates (Chromium: one per interface and address
family); past this, the least recently checked address that is not selected is dropped.
"""

Address = tuple[str, int]

_HEADER: Final = struct.Struct("!HHI")
_ATTRIBUTE_HEADER: Final = struct.Struct("!HH")
_HEADER_LENGTH: Final = 20
_FINGERPRINT_TYPE: Final = 0x8028
_FINGERPRINT_ATTRIBUTE_LENGTH: Final = 8
_FINGERPRINT_HEADER: Final = _ATTRIBUTE_HEADER.pack(_FINGERPRINT_TYPE, 4)
_MESSAGE_INTEGRITY_TYPE: Final = 0x0008
_UNKNOWN_ATTRIBUTES_TYPE: Final = 0x000A
_COMPREHENSION_OPTIONAL: Final = 0x8000
_MAX_UNKNOWN_ATTRIBUTES_LISTED: Final = 32

# Comprehension-required attributes (below 0x8000) that a connectivity check may carry
# and that we act on; any other one in a request gets a 420 (RFC 8489 section 6.3.1).
_UNDERSTOOD_ATTRIBUTES: Final = frozenset(
    {
        0x0006,  # USERNAME
        0x0008,  # MESSAGE-INTEGRITY
        0x0024,  # PRIORITY
        0x0025,  # USE-CANDIDATE
    }
)

_REASONS: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    420: "Unknown Attribute",
    487: "Role Conflict",
}
_CLASS_NAMES: Final = {0x010: "indication", 0x100: "success response", 0x110: "error response"}


class IceError(ProtocolError):
    """Why a datagram was not answered with success (see ``IceLiteSession.last_error``).

    ``error_code`` is the STUN error code sent back (400, 401, 420, 487), or None when
    the datagram was dropped without a response.
    """

    def __init__(self, reason: str, error_code: int | None = None) -> None:
        super().__init__(reason)
        self.error_code = error_code


@dataclass(frozen=True, slots=True)
class CandidatePairValidated:
    """A check from ``address`` succeeded: it may now send media and DTLS.

    Emitted again if the address lost consent and later checks in anew.
    """

    address: Address


@dataclass(frozen=True, slots=True)
class Nominated:
    """The client nominated ``address`` (USE-CANDIDATE): send media and DTLS there."""

    address: Address


@dataclass(frozen=True, slots=True)
class ConsentExpired:
    """The selected ``address`` sent no valid check for ``consent_timeout`` seconds.

    Stop sending to it (RFC 7675 section 5.1); ``selected_address`` is now None. A new
    nomination would restore it; otherwise the session is over.
    """

    address: Address


IceEvent = CandidatePairValidated | Nominated | ConsentExpired


class _Rejection(IceError):
    """A request that gets an error response; ``signed`` once it passed authentication."""

    def __init__(
        self,
        reason: str,
        error_code: int,
        transaction_id: bytes,
        *,
        signed: bool = False,
        unknown_attributes: tuple[int, ...] = (),
    ) -> None:
        super().__init__(reason, error_code)
        self.transaction_id = transaction_id
        self.signed = signed
        self.unknown_attributes = unknown_attributes


class IceLiteSession:
    """ICE-lite state of one session: which client addresses passed a check, and when.

    Inputs: :meth:`receive_stun` and :meth:`handle_timer`, each with ``now`` (seconds on
    any monotonic clock). Outputs: the return value of :meth:`receive_stun` (a datagram
    to send to the same address), :meth:`next_event`, :meth:`get_timer`. It never reads a
    clock or touches a socket.
    """

    def __init__(
        self,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        remote_pwd: str,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
    ) -> None:
        for name, value in (
            ("local_ufrag", local_ufrag),
            ("local_pwd", local_pwd),
            ("remote_ufrag", remote_ufrag),
        ):
            if not value or ":" in value or not value.isascii():
                raise ValueError(f"{name} {value[:40]!r} is not a non-empty ICE string")
        if not consent_timeout > 0:
            raise ValueError(f"consent_timeout {consent_timeout} is not positive")
        self.local_ufrag = local_ufrag
        self.remote_ufrag = remote_ufrag
        # Unused by a lite agent, which never sends a check of its own; kept so the
        # session holds the credentials the answer negotiated.
        self.remote_pwd = remote_pwd
        self.consent_timeout = consent_timeout
        self.last_error: IceError | None = None
        """Why the latest datagram got an error response or none; None after a success."""
        self._key = local_pwd.encode("ascii")
        self._expected_username = f"{local_ufrag}:{remote_ufrag}".encode("ascii")
        # Address -> time of its latest valid check, least recently checked first.
        self._last_check: dict[Address, float] = {}
        self._selected: Address | None = None
        self._events: list[IceEvent] = []  # a deque would hold a 64-slot block per call

    # ------------------------------------------------------------------ inputs

    def receive_stun(self, data: bytes, addr: tuple, now: float) -> bytes | None:
        """Handle a STUN datagram from ``addr``; return the response to send, or None.

        ``addr`` is ``(ip, port, ...)`` as the relay saw it; an IPv4-mapped IPv6 address
        counts as IPv4. Never raises for any ``data``; raises :class:`ValueError` if
        ``addr`` is not an IP address and port.
        """
        address = _normalize_address(addr)
        self._expire(now)
        try:
            message, unknown = _decode_request(data)
            self._authenticate(message)
            _check_connectivity_request(message, unknown)
        except _Rejection as rejection:
            self.last_error = rejection
            return self._error_response(rejection)
        except IceError as error:
            self.last_error = error
            return None
        self.last_error = None
        self._validate(address, now, nominated="USE-CANDIDATE" in message.attributes)
        return self._success_response(message.transaction_id, address)

    def handle_timer(self, now: float) -> None:
        """Withdraw consent from addresses whose last valid check is too old."""
        self._expire(now)

    # ----------------------------------------------------------------- outputs

    def next_event(self) -> IceEvent | None:
        """Return the oldest event not yet returned, or None."""
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        """Return when :meth:`handle_timer` is next due (the earliest consent expiry)."""
        if not self._last_check:
            return None
        return min(self._last_check.values()) + self.consent_timeout

    def is_validated(self, addr: tuple) -> bool:
        """Whether ``addr`` passed a check and has not lost consent since."""
        if (addr[0], addr[1]) in self._last_check:
            return True
        try:
            return _normalize_address(addr) in self._last_check
        except ValueError:
            return False

    @property
    def selected_address(self) -> Address | None:
        """The address the client nominated, while it has consent; else None."""
        return self._selected

    @property
    def validated_addresses(self) -> tuple[Address, ...]:
        """Every address with consent, least recently checked first."""
        return tuple(self._last_check)

    # ------------------------------------------------------------------- inside

    def _authenticate(self, message: aioice_stun.Message) -> None:
        # RFC 8489 section 9.1.3, in its order.
        transaction_id = message.transaction_id
        username = message.attributes.get("USERNAME")
        if username is None or "MESSAGE-INTEGRITY" not in message.attributes:
            missing = "USERNAME" if username is None else "MESSAGE-INTEGRITY"
            raise _Rejection(f"binding request has no {missing}", 400, transaction_id)
        if not hmac.compare_digest(username.encode("utf-8"), self._expected_username):
            raise _Rejection(
                f"USERNAME {username[:80]!r} is not {self._expected_username.decode('ascii')!r}",
                401,
                transaction_id,
            )
        if not message.check_message_integrity(self._key):
            raise _Rejection(
                "MESSAGE-INTEGRITY does not verify with this session's ice-pwd",
                401,
                transaction_id,
            )

    def _validate(self, address: Address, now: float, *, nominated: bool) -> None:
        is_new = self._last_check.pop(address, None) is None
        self._last_check[address] = now
        if is_new:
            self._events.append(CandidatePairValidated(address))
            if len(self._last_check) > MAX_VALIDATED_ADDRESSES:
                oldest = next(a for a in self._last_check if a not in (address, self._selected))
                del self._last_check[oldest]
        if nominated and self._selected != address:
            self._selected = address
            self._events.append(Nominated(address))

    def _expire(self, now: float) -> None:
        # The same sum get_timer() returns: ``now - consent_timeout`` rounds differently
        # (1000.1 + 30.0 - 30.0 < 1000.1), so handle_timer at the due time would do nothing
        # and a driver would spin on a timer that never clears.
        for address, last_check in list(self._last_check.items()):
            if last_check + self.consent_timeout <= now:
                del self._last_check[address]
                if address == self._selected:
                    self._selected = None
                    self._events.append(ConsentExpired(address))

    def _success_response(self, transaction_id: bytes, address: Address) -> bytes:
        response = aioice_stun.Message(
            message_method=aioice_stun.Method.BINDING,
            message_class=aioice_stun.Class.RESPONSE,
            transaction_id=transaction_id,
            attributes={"XOR-MAPPED-ADDRESS": address},
        )
        return _seal(bytes(response), self._key)

    def _error_response(self, rejection: _Rejection) -> bytes:
        code = rejection.error_code
        assert code is not None
        response = aioice_stun.Message(
            message_method=aioice_stun.Method.BINDING,
            message_class=aioice_stun.Class.ERROR,
            transaction_id=rejection.transaction_id,
            attributes={"ERROR-CODE": (code, _REASONS[code])},
        )
        data = bytes(response)
        if rejection.unknown_attributes:
            value = b"".join(struct.pack("!H", t) for t in rejection.unknown_attributes)
            data = _append_attribute(data, _UNKNOWN_ATTRIBUTES_TYPE, value)
        return _seal(data, self._key if rejection.signed else None)


def _decode_request(data: bytes) -> tuple[aioice_stun.Message, tuple[int, ...]]:
    """Decode a binding request; return it and its unknown comprehension-required types.

    Raises :class:`IceError` (drop silently) or :class:`_Rejection` (answer with 400).
    """
    data = bytes(data)
    if len(data) < _HEADER_LENGTH:
        raise IceError(f"{len(data)} bytes is shorter than a STUN header")
    message_type, length, cookie = _HEADER.unpack_from(data)
    if message_type & 0xC000 or cookie != aioice_stun.COOKIE:
        raise IceError("not a STUN message (RFC 7983 first bits or magic cookie)")
    if length != len(data) - _HEADER_LENGTH or length % 4:
        raise IceError(f"STUN length {length} does not match the {len(data)}-byte datagram")
    message_class = message_type & 0x0110
    if message_class != aioice_stun.Class.REQUEST:
        raise IceError(
            f"a STUN {_CLASS_NAMES[message_class]}, not a request: ICE-lite never sends "
            "requests, so there is nothing to answer"
        )
    if (
        length < _FINGERPRINT_ATTRIBUTE_LENGTH
        or data[-_FINGERPRINT_ATTRIBUTE_LENGTH:-4] != _FINGERPRINT_HEADER
    ):
        raise IceError("STUN request does not end with FINGERPRINT, which ICE requires")
    (fingerprint,) = struct.unpack_from("!I", data, len(data) - 4)
    if fingerprint != aioice_stun.message_fingerprint(data[:-_FINGERPRINT_ATTRIBUTE_LENGTH]):
        raise IceError("STUN FINGERPRINT does not match the message")

    # The datagram is STUN and the client can be told what is wrong with it.
    transaction_id = data[8:_HEADER_LENGTH]
    unknown = _unknown_attributes(data, transaction_id)
    method = message_type & 0x3EEF
    if method != aioice_stun.Method.BINDING:
        raise _Rejection(f"STUN method 0x{method:03x} is not Binding", 400, transaction_id)
    try:
        message = aioice_stun.parse_message(data)
    except (ValueError, struct.error) as error:
        raise _Rejection(f"malformed STUN attribute: {error}", 400, transaction_id) from None
    return message, unknown


def _unknown_attributes(data: bytes, transaction_id: bytes) -> tuple[int, ...]:
    """Walk the attributes: check each fits, FINGERPRINT is last, and list unknown types.

    Only attributes before MESSAGE-INTEGRITY count: later ones are ignored, as RFC 8489
    section 14.5 requires.
    """
    end = len(data)
    offset = _HEADER_LENGTH
    unknown: list[int] = []
    integrity_seen = False
    while offset < end:
        if offset + 4 > end:
            raise _Rejection("truncated STUN attribute header", 400, transaction_id)
        attribute_type, attribute_length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        value_end = offset + 4 + attribute_length
        if value_end > end:
            raise _Rejection(
                f"STUN attribute 0x{attribute_type:04x} runs past the end of the message",
                400,
                transaction_id,
            )
        if attribute_type == _FINGERPRINT_TYPE and value_end != end:
            raise _Rejection("STUN FINGERPRINT is not the last attribute", 400, transaction_id)
        if attribute_type == _MESSAGE_INTEGRITY_TYPE:
            integrity_seen = True
        elif (
            not integrity_seen
            and attribute_type < _COMPREHENSION_OPTIONAL
            and attribute_type not in _UNDERSTOOD_ATTRIBUTES
            and attribute_type not in unknown
            and len(unknown) < _MAX_UNKNOWN_ATTRIBUTES_LISTED
        ):
            unknown.append(attribute_type)
        offset = value_end + (-attribute_length % 4)
    return tuple(unknown)


def _check_connectivity_request(message: aioice_stun.Message, unknown: tuple[int, ...]) -> None:
    """Checks that follow authentication, so their errors are signed."""
    transaction_id = message.transaction_id
    if unknown:
        names = ", ".join(f"0x{t:04x}" for t in unknown)
        raise _Rejection(
            f"unknown comprehension-required attributes: {names}",
            420,
            transaction_id,
            signed=True,
            unknown_attributes=unknown,
        )
    if "ICE-CONTROLLED" in message.attributes:
        raise _Rejection(
            "the client claims ICE-CONTROLLED, but an ICE-lite agent is always controlled",
            487,
            transaction_id,
            signed=True,
        )
    if "PRIORITY" not in message.attributes:
        raise _Rejection(
            "connectivity check has no PRIORITY (RFC 8445 section 7.1.1)",
            400,
            transaction_id,
            signed=True,
        )


def _append_attribute(data: bytes, attribute_type: int, value: bytes) -> bytes:
    """Append one attribute (zero-padded) and update the header's message length."""
    data = data + _ATTRIBUTE_HEADER.pack(attribute_type, len(value)) + value
    data += bytes(-len(value) % 4)
    return data[:2] + struct.pack("!H", len(data) - _HEADER_LENGTH) + data[4:]


def _seal(data: bytes, key: bytes | None) -> bytes:
    """Append MESSAGE-INTEGRITY (when ``key`` is given) and FINGERPRINT, via aioice."""
    if key is not None:
        data = _append_attribute(
            data, _MESSAGE_INTEGRITY_TYPE, aioice_stun.message_integrity(data, key)
        )
    fingerprint = aioice_stun.message_fingerprint(data)
    return _append_attribute(data, _FINGERPRINT_TYPE, struct.pack("!I", fingerprint))


def _normalize_address(addr: tuple) -> Address:
    """``(ip, port)`` with the IP in canonical form; IPv4-mapped IPv6 becomes IPv4."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = int(addr[1])
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    return (str(ip), port)
