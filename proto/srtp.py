"""SRTP and SRTCP of one direction of a call, through libsrtp, cheaply per packet.

pylibsrtp's ``Session.protect`` and friends check the argument's type, allocate a length
cell and go through two more Python calls for every packet: on a 100-byte Opus packet
that costs more than libsrtp's own work. :class:`SrtpContext` keeps a length cell from
one call to the next and calls libsrtp through pylibsrtp's cffi binding directly, in the
session's own packet buffer, with the same results and the same :class:`pylibsrtp.Error`
on failure.

That binding is pylibsrtp's private module. Should a release reshape it, the context falls
back to the public methods (:attr:`SrtpContext.direct` tells which is in use), slower but
the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import pylibsrtp

__all__ = ["MAX_PACKET", "SrtpContext"]

_BUFFER_SIZE: Final = 1500
_MAX_SRTCP_TRAILER: Final = 4 + 16 + 128  # SRTCP index, auth tag, MKI: libsrtp's worst case
MAX_PACKET: Final = _BUFFER_SIZE - _MAX_SRTCP_TRAILER
"""Longest plaintext RTP or RTCP packet a context protects (ours are under 300 bytes)."""

try:
    from pylibsrtp._binding import ffi as _ffi
    from pylibsrtp._binding import lib as _lib

    _BINDING = all(
        hasattr(_lib, f"srtp_{name}")
        for name in ("protect", "unprotect", "protect_rtcp", "unprotect_rtcp")
    )
except ImportError:  # pragma: no cover - a reshaped pylibsrtp
    _BINDING = False

_ERRORS: Final = getattr(pylibsrtp, "ERRORS", ())


def _error(status: int) -> pylibsrtp.Error:
    reason = _ERRORS[status] if 0 <= status < len(_ERRORS) else "unknown status"
    return pylibsrtp.Error(f"{reason} (libsrtp status {status})")


def _operation(name: str, doc: str) -> Callable[[SrtpContext, bytes], bytes]:
    """The :class:`SrtpContext` method ``name``: libsrtp's ``srtp_<name>`` on the packet,
    in place in the session's buffer, else pylibsrtp's method of that name.

    Made by this function rather than written out four times; each runs for every packet,
    so the work is in the method's own frame: in a process that shares its cores with
    callers and relay workers, every frame a packet goes through costs cache misses.
    """
    function = getattr(_lib, f"srtp_{name}") if _BINDING else None

    def operation(self: SrtpContext, packet: bytes) -> bytes:
        if not self.direct:
            return getattr(self._session, name)(packet)
        size = len(packet)
        if size > MAX_PACKET:
            raise ValueError(f"packet of {size} bytes is over the {MAX_PACKET}-byte limit")
        buffer = self._buffer
        buffer[0:size] = packet
        length = self._length
        length[0] = size
        status = function(self._srtp, self._cdata, length)  # type: ignore[misc]
        if status:
            raise _error(status)
        return buffer[0 : length[0]]

    operation.__name__ = name
    operation.__qualname__ = f"SrtpContext.{name}"
    operation.__doc__ = doc
    return operation


class SrtpContext:
    """One libsrtp session (one direction of a call) for a :class:`pylibsrtp.Policy`.

    Methods take ``bytes`` and return ``bytes``; they raise :class:`pylibsrtp.Error` when
    libsrtp refuses (authentication, replay) and ``ValueError`` for a packet over
    :data:`MAX_PACKET` bytes.
    """

    __slots__ = ("_buffer", "_cdata", "_length", "_session", "_srtp", "direct")

    def __init__(self, policy: pylibsrtp.Policy, *, direct: bool = True) -> None:
        """``direct=False`` uses pylibsrtp's public methods (for tests of the fallback)."""
        self._session = pylibsrtp.Session(policy)  # owns the srtp_t and frees it
        self.direct = False
        if direct and _BINDING:
            # The session's own packet buffer, which its methods use too: a session is
            # not for concurrent threads either way (libsrtp runs without the GIL).
            srtp = getattr(self._session, "_srtp", None)
            cdata = getattr(self._session, "_cdata", None)
            if srtp is not None and cdata is not None and _ffi.sizeof(cdata) >= _BUFFER_SIZE:
                self._srtp = srtp[0]
                self._cdata = cdata
                self._buffer = _ffi.buffer(cdata, _BUFFER_SIZE)
                self._length = _ffi.new("int *")
                self.direct = True

    protect = _operation("protect", "Encrypt and authenticate one RTP packet.")
    unprotect = _operation(
        "unprotect", "Authenticate and decrypt one SRTP packet (with the replay check)."
    )
    protect_rtcp = _operation("protect_rtcp", "Encrypt and authenticate one RTCP compound packet.")
    unprotect_rtcp = _operation(
        "unprotect_rtcp", "Authenticate and decrypt one SRTCP compound packet."
    )
