"""Bounds-checked big-endian reading and writing of TLS presentation-language fields.

The reader raises :class:`DtlsDecodeError` naming the structure being parsed, so a
truncated or overlong field never surfaces as an ``IndexError``.
"""

from __future__ import annotations

from .errors import DtlsDecodeError


class Reader:
    """Cursor over one structure; ``what`` names it in error messages."""

    __slots__ = ("_data", "_position", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._position = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self._data) - self._position

    def _take(self, length: int) -> bytes:
        end = self._position + length
        if end > len(self._data):
            raise DtlsDecodeError(
                f"{self.what} is truncated: needs {length} more bytes at offset "
                f"{self._position}, has {self.remaining}"
            )
        chunk = self._data[self._position : end]
        self._position = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self._take(size), "big")

    def uint8(self) -> int:
        return self.uint(1)

    def uint16(self) -> int:
        return self.uint(2)

    def uint24(self) -> int:
        return self.uint(3)

    def raw(self, length: int) -> bytes:
        return self._take(length)

    def vector(self, length_size: int, minimum: int = 0, maximum: int | None = None) -> bytes:
        """Read ``opaque x<minimum..maximum>`` with a ``length_size``-byte length prefix."""
        length = self.uint(length_size)
        if length < minimum or (maximum is not None and length > maximum):
            bound = "" if maximum is None else f"..{maximum}"
            raise DtlsDecodeError(f"{self.what}: vector length {length} outside <{minimum}{bound}>")
        return self._take(length)

    def uint16_list(self, length_size: int, minimum_items: int = 0) -> tuple[int, ...]:
        """Read a vector of uint16 values (cipher suites, groups, signature schemes)."""
        data = self.vector(length_size)
        if len(data) % 2:
            raise DtlsDecodeError(f"{self.what}: list of uint16 has odd length {len(data)}")
        if len(data) // 2 < minimum_items:
            raise DtlsDecodeError(f"{self.what}: list needs at least {minimum_items} entries")
        return tuple(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))

    def rest(self) -> bytes:
        return self._take(self.remaining)

    def expect_end(self) -> None:
        if self.remaining:
            raise DtlsDecodeError(f"{self.what} has {self.remaining} unexpected trailing bytes")


def uint(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def vector(data: bytes, length_size: int) -> bytes:
    if len(data) >= 1 << (8 * length_size):
        raise ValueError(f"{len(data)} bytes do not fit a {length_size}-byte length prefix")
    return len(data).to_bytes(length_size, "big") + data


def uint16_list(values: tuple[int, ...] | list[int], length_size: int) -> bytes:
    return vector(b"".join(v.to_bytes(2, "big") for v in values), length_size)
