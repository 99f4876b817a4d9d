"""DTLS 1.2 handshake messages: the fragment header, message bodies and extensions.

Each message is a frozen dataclass with ``encode() -> bytes`` (the body, without the
12-byte DTLS handshake header) and ``parse(body)``; both follow RFC 5246 7.4 with the
DTLS additions of RFC 6347 4.2 (cookie in ClientHello, HelloVerifyRequest). Unknown
extensions are kept as raw ``(type, data)`` pairs and ignored by the state machine,
which is what lets us accept ClientHellos that also offer DTLS 1.3 and post-quantum
key shares.

:class:`HandshakeReassembler` turns fragments that arrive in any order, overlapping or
duplicated, back into whole messages delivered in ``message_seq`` order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import AlertDescription, ExtensionType, HandshakeType, describe
from .errors import DtlsDecodeError, DtlsProtocolError
from .wire import Reader, uint, uint16_list, vector

HANDSHAKE_HEADER_SIZE = 12
RANDOM_SIZE = 32
MAX_COOKIE_SIZE = 255
MAX_SESSION_ID_SIZE = 32


@dataclass(frozen=True, slots=True)
class HandshakeFragment:
    """One handshake fragment as carried in a record (RFC 6347 4.2.2)."""

    msg_type: int
    length: int
    message_seq: int
    fragment_offset: int
    body: bytes

    @property
    def fragment_length(self) -> int:
        return len(self.body)

    @property
    def is_last_fragment(self) -> bool:
        return self.fragment_offset + len(self.body) == self.length

    def encode(self) -> bytes:
        return encode_handshake_fragment(
            self.msg_type, self.length, self.message_seq, self.fragment_offset, self.body
        )


def encode_handshake_fragment(
    msg_type: int, length: int, message_seq: int, fragment_offset: int, body: bytes
) -> bytes:
    return (
        uint(msg_type, 1)
        + uint(length, 3)
        + uint(message_seq, 2)
        + uint(fragment_offset, 3)
        + uint(len(body), 3)
        + body
    )


def encode_handshake_message(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """A whole message as one fragment: the form hashed into the transcript (4.2.6)."""
    return encode_handshake_fragment(msg_type, len(body), message_seq, 0, body)


def parse_handshake_fragments(payload: bytes) -> list[HandshakeFragment]:
    """Split a handshake record's payload into its fragments."""
    reader = Reader(payload, "handshake fragment")
    fragments = []
    while reader.remaining:
        msg_type = reader.uint8()
        length = reader.uint24()
        message_seq = reader.uint16()
        fragment_offset = reader.uint24()
        fragment_length = reader.uint24()
        if fragment_offset + fragment_length > length:
            raise DtlsDecodeError(
                f"{describe(HandshakeType, msg_type)} fragment [{fragment_offset}, "
                f"{fragment_offset + fragment_length}) exceeds message length {length}"
            )
        body = reader.raw(fragment_length)
        fragments.append(HandshakeFragment(msg_type, length, message_seq, fragment_offset, body))
    if not fragments:
        raise DtlsDecodeError("handshake record carries no fragment")
    return fragments


# --- extensions -------------------------------------------------------------------------

Extension = tuple[int, bytes]


def encode_extensions(extensions: tuple[Extension, ...]) -> bytes:
    if not extensions:
        return b""
    return vector(b"".join(uint(kind, 2) + vector(data, 2) for kind, data in extensions), 2)


def parse_extensions(reader: Reader) -> tuple[Extension, ...]:
    """Parse the optional extensions block that ends a hello message."""
    if not reader.remaining:
        return ()
    block = Reader(reader.vector(2), f"{reader.what} extensions")
    reader.expect_end()
    extensions: list[Extension] = []
    seen: set[int] = set()
    while block.remaining:
        kind = block.uint16()
        data = block.vector(2)
        if kind in seen:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"{reader.what} repeats extension {describe(ExtensionType, kind)}",
            )
        seen.add(kind)
        extensions.append((kind, data))
    return tuple(extensions)


def find_extension(extensions: tuple[Extension, ...], kind: int) -> bytes | None:
    for extension_type, data in extensions:
        if extension_type == kind:
            return data
    return None


def parse_supported_groups(data: bytes) -> tuple[int, ...]:
    reader = Reader(data, "supported_groups extension")
    groups = reader.uint16_list(2, minimum_items=1)
    reader.expect_end()
    return groups


def encode_supported_groups(groups: tuple[int, ...]) -> bytes:
    return uint16_list(groups, 2)


def parse_signature_algorithms(data: bytes) -> tuple[int, ...]:
    reader = Reader(data, "signature_algorithms extension")
    schemes = reader.uint16_list(2, minimum_items=1)
    reader.expect_end()
    return schemes


def encode_signature_algorithms(schemes: tuple[int, ...]) -> bytes:
    return uint16_list(schemes, 2)


def parse_ec_point_formats(data: bytes) -> bytes:
    reader = Reader(data, "ec_point_formats extension")
    formats = reader.vector(1, minimum=1)
    reader.expect_end()
    return formats


def encode_ec_point_formats(formats: bytes) -> bytes:
    return vector(formats, 1)


def parse_use_srtp(data: bytes) -> tuple[tuple[int, ...], bytes]:
    """``(protection profiles, MKI)`` of a use_srtp extension (RFC 5764 4.1.1)."""
    reader = Reader(data, "use_srtp extension")
    profiles = reader.uint16_list(2, minimum_items=1)
    mki = reader.vector(1)
    reader.expect_end()
    return profiles, mki


def encode_use_srtp(profiles: tuple[int, ...], mki: bytes = b"") -> bytes:
    return uint16_list(profiles, 2) + vector(mki, 1)


def parse_renegotiation_info(data: bytes) -> bytes:
    reader = Reader(data, "renegotiation_info extension")
    renegotiated_connection = reader.vector(1)
    reader.expect_end()
    return renegotiated_connection


def expect_empty_extension(data: bytes, name: str) -> None:
    if data:
        raise DtlsDecodeError(f"{name} extension must be empty, has {len(data)} bytes")


# --- messages ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello:
    client_version: int
    random: bytes
    session_id: bytes = b""
    cookie: bytes = b""
    cipher_suites: tuple[int, ...] = ()
    compression_methods: bytes = b"\x00"
    extensions: tuple[Extension, ...] = ()

    msg_type = HandshakeType.CLIENT_HELLO

    def encode(self) -> bytes:
        return (
            uint(self.client_version, 2)
            + self.random
            + vector(self.session_id, 1)
            + vector(self.cookie, 1)
            + uint16_list(self.cipher_suites, 2)
            + vector(self.compression_methods, 1)
            + encode_extensions(self.extensions)
        )

    @classmethod
    def parse(cls, body: bytes) -> ClientHello:
        reader = Reader(body, "ClientHello")
        return cls(
            client_version=reader.uint16(),
            random=reader.raw(RANDOM_SIZE),
            session_id=reader.vector(1, maximum=MAX_SESSION_ID_SIZE),
            cookie=reader.vector(1, maximum=MAX_COOKIE_SIZE),
            cipher_suites=reader.uint16_list(2, minimum_items=1),
            compression_methods=reader.vector(1, minimum=1),
            extensions=parse_extensions(reader),
        )


@dataclass(frozen=True, slots=True)
class HelloVerifyRequest:
    server_version: int
    cookie: bytes

    msg_type = HandshakeType.HELLO_VERIFY_REQUEST

    def encode(self) -> bytes:
        return uint(self.server_version, 2) + vector(self.cookie, 1)

    @classmethod
    def parse(cls, body: bytes) -> HelloVerifyRequest:
        reader = Reader(body, "HelloVerifyRequest")
        message = cls(server_version=reader.uint16(), cookie=reader.vector(1))
        reader.expect_end()
        return message


@dataclass(frozen=True, slots=True)
class ServerHello:
    server_version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int = 0
    extensions: tuple[Extension, ...] = ()

    msg_type = HandshakeType.SERVER_HELLO

    def encode(self) -> bytes:
        return (
            uint(self.server_version, 2)
            + self.random
            + vector(self.session_id, 1)
            + uint(self.cipher_suite, 2)
            + uint(self.compression_method, 1)
            + encode_extensions(self.extensions)
        )

    @classmethod
    def parse(cls, body: bytes) -> ServerHello:
        reader = Reader(body, "ServerHello")
        return cls(
            server_version=reader.uint16(),
            random=reader.raw(RANDOM_SIZE),
            session_id=reader.vector(1, maximum=MAX_SESSION_ID_SIZE),
            cipher_suite=reader.uint16(),
            compression_method=reader.uint8(),
            extensions=parse_extensions(reader),
        )


@dataclass(frozen=True, slots=True)
class Certificate:
    """The sender's chain, leaf first, as DER (RFC 5246 7.4.2)."""

    certificates: tuple[bytes, ...]

    msg_type = HandshakeType.CERTIFICATE

    def encode(self) -> bytes:
        return vector(b"".join(vector(der, 3) for der in self.certificates), 3)

    @classmethod
    def parse(cls, body: bytes) -> Certificate:
        reader = Reader(body, "Certificate")
        chain = Reader(reader.vector(3), "Certificate list")
        reader.expect_end()
        certificates = []
        while chain.remaining:
            certificates.append(chain.vector(3, minimum=1))
        return cls(tuple(certificates))


@dataclass(frozen=True, slots=True)
class ServerKeyExchange:
    """ECDHE parameters signed by the server (RFC 8422 5.4, named curves only)."""

    named_group: int
    public_key: bytes
    signature_scheme: int
    signature: bytes

    msg_type = HandshakeType.SERVER_KEY_EXCHANGE

    @property
    def params(self) -> bytes:
        """The ServerECDHParams bytes, which the signature covers after both randoms."""
        return encode_ecdh_params(self.named_group, self.public_key)

    def encode(self) -> bytes:
        return self.params + uint(self.signature_scheme, 2) + vector(self.signature, 2)

    @classmethod
    def parse(cls, body: bytes) -> ServerKeyExchange:
        reader = Reader(body, "ServerKeyExchange")
        curve_type = reader.uint8()
        if curve_type != 3:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"ServerKeyExchange curve type {curve_type} is not named_curve (3)",
            )
        message = cls(
            named_group=reader.uint16(),
            public_key=reader.vector(1, minimum=1),
            signature_scheme=reader.uint16(),
            signature=reader.vector(2, minimum=1),
        )
        reader.expect_end()
        return message


def encode_ecdh_params(named_group: int, public_key: bytes) -> bytes:
    return uint(3, 1) + uint(named_group, 2) + vector(public_key, 1)


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    certificate_types: bytes
    signature_schemes: tuple[int, ...]
    certificate_authorities: tuple[bytes, ...] = ()

    msg_type = HandshakeType.CERTIFICATE_REQUEST

    def encode(self) -> bytes:
        authorities = b"".join(vector(name, 2) for name in self.certificate_authorities)
        return (
            vector(self.certificate_types, 1)
            + uint16_list(self.signature_schemes, 2)
            + vector(authorities, 2)
        )

    @classmethod
    def parse(cls, body: bytes) -> CertificateRequest:
        reader = Reader(body, "CertificateRequest")
        certificate_types = reader.vector(1, minimum=1)
        signature_schemes = reader.uint16_list(2, minimum_items=1)
        names = Reader(reader.vector(2), "CertificateRequest authorities")
        reader.expect_end()
        authorities = []
        while names.remaining:
            authorities.append(names.vector(2, minimum=1))
        return cls(certificate_types, signature_schemes, tuple(authorities))


@dataclass(frozen=True, slots=True)
class ServerHelloDone:
    msg_type = HandshakeType.SERVER_HELLO_DONE

    def encode(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, body: bytes) -> ServerHelloDone:
        Reader(body, "ServerHelloDone").expect_end()
        return cls()


@dataclass(frozen=True, slots=True)
class ClientKeyExchange:
    """The client's ephemeral ECDH public value (RFC 8422 5.7)."""

    public_key: bytes

    msg_type = HandshakeType.CLIENT_KEY_EXCHANGE

    def encode(self) -> bytes:
        return vector(self.public_key, 1)

    @classmethod
    def parse(cls, body: bytes) -> ClientKeyExchange:
        reader = Reader(body, "ClientKeyExchange")
        message = cls(public_key=reader.vector(1, minimum=1))
        reader.expect_end()
        return message


@dataclass(frozen=True, slots=True)
class CertificateVerify:
    signature_scheme: int
    signature: bytes

    msg_type = HandshakeType.CERTIFICATE_VERIFY

    def encode(self) -> bytes:
        return uint(self.signature_scheme, 2) + vector(self.signature, 2)

    @classmethod
    def parse(cls, body: bytes) -> CertificateVerify:
        reader = Reader(body, "CertificateVerify")
        message = cls(signature_scheme=reader.uint16(), signature=reader.vector(2, minimum=1))
        reader.expect_end()
        return message


@dataclass(frozen=True, slots=True)
class Finished:
    verify_data: bytes

    msg_type = HandshakeType.FINISHED

    def encode(self) -> bytes:
        return self.verify_data

    @classmethod
    def parse(cls, body: bytes) -> Finished:
        if len(body) != 12:
            raise DtlsDecodeError(f"Finished verify_data is {len(body)} bytes, expected 12")
        return cls(body)


HandshakeMessage = (
    ClientHello
    | HelloVerifyRequest
    | ServerHello
    | Certificate
    | ServerKeyExchange
    | CertificateRequest
    | ServerHelloDone
    | ClientKeyExchange
    | CertificateVerify
    | Finished
)

MESSAGE_TYPES: dict[int, type[HandshakeMessage]] = {
    HandshakeType.CLIENT_HELLO: ClientHello,
    HandshakeType.HELLO_VERIFY_REQUEST: HelloVerifyRequest,
    HandshakeType.SERVER_HELLO: ServerHello,
    HandshakeType.CERTIFICATE: Certificate,
    HandshakeType.SERVER_KEY_EXCHANGE: ServerKeyExchange,
    HandshakeType.CERTIFICATE_REQUEST: CertificateRequest,
    HandshakeType.SERVER_HELLO_DONE: ServerHelloDone,
    HandshakeType.CLIENT_KEY_EXCHANGE: ClientKeyExchange,
    HandshakeType.CERTIFICATE_VERIFY: CertificateVerify,
    HandshakeType.FINISHED: Finished,
}


def parse_handshake_body(msg_type: int, body: bytes) -> HandshakeMessage:
    """Decode a reassembled body; unknown types are an ``unexpected_message``."""
    message_class = MESSAGE_TYPES.get(msg_type)
    if message_class is None:
        raise DtlsProtocolError(
            AlertDescription.UNEXPECTED_MESSAGE,
            f"handshake message type {describe(HandshakeType, msg_type)} is not supported",
        )
    return message_class.parse(body)


# --- reassembly -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReassembledMessage:
    msg_type: int
    message_seq: int
    epoch: int
    body: bytes


@dataclass(slots=True)
class _PartialMessage:
    msg_type: int
    epoch: int
    body: bytearray
    ranges: list[tuple[int, int]] = field(default_factory=list)  # sorted, disjoint [start, end)

    def add(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        self.body[offset:end] = data
        merged: list[tuple[int, int]] = []
        start = offset
        for range_start, range_end in self.ranges:
            if range_end < start or range_start > end:
                merged.append((range_start, range_end))
            else:
                start, end = min(start, range_start), max(end, range_end)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged

    @property
    def complete(self) -> bool:
        if not self.body:
            return True
        return self.ranges == [(0, len(self.body))]


class HandshakeReassembler:
    """Collects fragments of the messages at and after ``next_seq``.

    Fragments of already delivered messages are the caller's business (they signal a
    retransmitted flight); fragments too far ahead are dropped to bound memory.
    """

    def __init__(self, max_message_size: int, lookahead: int = 16) -> None:
        self.next_seq = 0
        self._max_message_size = max_message_size
        self._lookahead = lookahead
        self._partial: dict[int, _PartialMessage] = {}

    def add(self, fragment: HandshakeFragment, epoch: int) -> None:
        seq = fragment.message_seq
        if seq < self.next_seq or seq >= self.next_seq + self._lookahead:
            return
        if fragment.length > self._max_message_size:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"{describe(HandshakeType, fragment.msg_type)} of {fragment.length} bytes "
                f"exceeds the {self._max_message_size}-byte limit",
            )
        partial = self._partial.get(seq)
        if partial is not None and partial.epoch != epoch:
            if epoch < partial.epoch:
                return  # a copy from an older epoch cannot extend this one
            # Fragments under newer keys are authenticated; plaintext ones may be forged.
            partial = None
        if partial is None:
            partial = _PartialMessage(fragment.msg_type, epoch, bytearray(fragment.length))
            self._partial[seq] = partial
        elif partial.msg_type != fragment.msg_type or len(partial.body) != fragment.length:
            raise DtlsProtocolError(
                AlertDescription.ILLEGAL_PARAMETER,
                f"fragments of message_seq {seq} disagree on type or length",
            )
        partial.add(fragment.fragment_offset, fragment.body)

    def pop(self) -> ReassembledMessage | None:
        """The next message in sequence, if all of its bytes have arrived."""
        partial = self._partial.get(self.next_seq)
        if partial is None or not partial.complete:
            return None
        del self._partial[self.next_seq]
        message = ReassembledMessage(
            partial.msg_type, self.next_seq, partial.epoch, bytes(partial.body)
        )
        self.next_seq += 1
        return message

    def reset(self, next_seq: int) -> None:
        self.next_seq = next_seq
        self._partial.clear()
