"""DTLS 1.2 record layer framing (RFC 6347 4.1) and the anti-replay window (4.1.2.6).

A datagram carries one or more records, each with a 13-byte header: content type,
version, epoch, 48-bit sequence number and length. This module only frames; record
protection lives in :mod:`.crypto` and the policy of what to do with a record in
:mod:`.connection`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .constants import AlertDescription
from .errors import DtlsDecodeError, DtlsProtocolError

RECORD_HEADER_SIZE = 13
MAX_PLAINTEXT_LENGTH = 1 << 14
# RFC 5246 6.2.3: a protected fragment may exceed the plaintext limit by at most 2048.
MAX_CIPHERTEXT_LENGTH = MAX_PLAINTEXT_LENGTH + 2048
MAX_SEQUENCE_NUMBER = (1 << 48) - 1
MAX_EPOCH = (1 << 16) - 1


@dataclass(frozen=True, slots=True)
class Record:
    content_type: int
    version: int
    epoch: int
    sequence_number: int
    fragment: bytes

    def encode(self) -> bytes:
        return encode_record(
            self.content_type, self.version, self.epoch, self.sequence_number, self.fragment
        )


def encode_record_header(
    content_type: int, version: int, epoch: int, sequence_number: int, length: int
) -> bytes:
    return (
        content_type.to_bytes(1, "big")
        + version.to_bytes(2, "big")
        + epoch.to_bytes(2, "big")
        + sequence_number.to_bytes(6, "big")
        + length.to_bytes(2, "big")
    )


def encode_record(
    content_type: int, version: int, epoch: int, sequence_number: int, fragment: bytes
) -> bytes:
    header = encode_record_header(content_type, version, epoch, sequence_number, len(fragment))
    return header + fragment


def iter_records(datagram: bytes) -> Iterator[Record]:
    """Yield the records of a datagram in order; raise at the first malformed one.

    Records before the malformed one have already been yielded, so a caller can act on
    them before handling the error.
    """
    position = 0
    while position < len(datagram):
        if len(datagram) - position < RECORD_HEADER_SIZE:
            raise DtlsDecodeError(
                f"record header truncated: {len(datagram) - position} bytes left at offset "
                f"{position}, a header needs {RECORD_HEADER_SIZE}"
            )
        header = datagram[position : position + RECORD_HEADER_SIZE]
        version = int.from_bytes(header[1:3], "big")
        if version >> 8 != 0xFE:
            raise DtlsDecodeError(f"record version 0x{version:04x} is not a DTLS version")
        length = int.from_bytes(header[11:13], "big")
        if length > MAX_CIPHERTEXT_LENGTH:
            raise DtlsProtocolError(
                AlertDescription.RECORD_OVERFLOW,
                f"record length {length} exceeds the DTLS limit of {MAX_CIPHERTEXT_LENGTH}",
            )
        start = position + RECORD_HEADER_SIZE
        if start + length > len(datagram):
            raise DtlsDecodeError(
                f"record at offset {position} claims {length} bytes, datagram has "
                f"{len(datagram) - start}"
            )
        yield Record(
            content_type=header[0],
            version=version,
            epoch=int.from_bytes(header[3:5], "big"),
            sequence_number=int.from_bytes(header[5:11], "big"),
            fragment=datagram[start : start + length],
        )
        position = start + length


def parse_records(datagram: bytes) -> list[Record]:
    """All records of a datagram, or :class:`DtlsProtocolError` if any is malformed."""
    return list(iter_records(datagram))


class ReplayWindow:
    """64-record sliding window of RFC 6347 4.1.2.6, one per epoch.

    Check with :meth:`is_replay` before spending a decryption on a record, and call
    :meth:`accept` only once the record authenticated, so forged records cannot move it.
    """

    SIZE = 64

    __slots__ = ("_bitmap", "_highest")

    def __init__(self) -> None:
        self._highest = -1
        self._bitmap = 0  # bit i set: sequence number (highest - i) was received

    def is_replay(self, sequence_number: int) -> bool:
        if sequence_number > self._highest:
            return False
        offset = self._highest - sequence_number
        if offset >= self.SIZE:
            return True  # too old to tell: treat as a replay
        return bool(self._bitmap >> offset & 1)

    def accept(self, sequence_number: int) -> None:
        if sequence_number > self._highest:
            shift = sequence_number - self._highest
            # A jump past the window clears it; shifting by up to 2**48 would not fit memory.
            if shift >= self.SIZE:
                self._bitmap = 1
            else:
                self._bitmap = ((self._bitmap << shift) | 1) & ((1 << self.SIZE) - 1)
            self._highest = sequence_number
        else:
            self._bitmap |= 1 << (self._highest - sequence_number)
