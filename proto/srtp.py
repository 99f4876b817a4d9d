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

    _PROTECT = _lib.srtp_protect
    _UNPROTECT = _lib.srtp_unprotect
    _PROTECT_RTCP = _lib.srtp_protect_rtcp
    _UNPROTECT_RTCP = _lib.srtp_unprotect_rtcp
    _BINDING = True
except (ImportError, AttributeError):  # pragma: no cover - a reshaped pylibsrtp
    _BINDING = False

_ERRORS: Final = getattr(pylibsrtp, "ERRORS", ())


def _error(status: int) -> pylibsrtp.Error:
    reason = _ERRORS[status] if 0 <= status < len(_ERRORS) else "unknown status"
    return pylibsrtp.Error(f"{reason} (libsrtp status {status})")


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

    # protect and unprotect run for every packet of every call, so they do the work of
    # _call inline: in a process that shares its cores, every Python frame a packet goes
    # through costs cache misses, far more than the frame itself.

    def protect(self, packet: bytes) -> bytes:
        """Encrypt and authenticate one RTP packet."""
        if not self.direct:
            return self._session.protect(packet)
        size = len(packet)
        if size > MAX_PACKET:
            raise ValueError(f"packet of {size} bytes is over the {MAX_PACKET}-byte limit")
        buffer = self._buffer
        buffer[0:size] = packet
        length = self._length
        length[0] = size
        status = _PROTECT(self._srtp, self._cdata, length)
        if status:
            raise _error(status)
        return buffer[0 : length[0]]

    def unprotect(self, packet: bytes) -> bytes:
        """Authenticate and decrypt one SRTP packet (with the replay check)."""
        if not self.direct:
            return self._session.unprotect(packet)
        size = len(packet)
        if size > MAX_PACKET:
            raise ValueError(f"packet of {size} bytes is over the {MAX_PACKET}-byte limit")
        buffer = self._buffer
        buffer[0:size] = packet
        length = self._length
        length[0] = size
        status = _UNPROTECT(self._srtp, self._cdata, length)
        if status:
            raise _error(status)
        return buffer[0 : length[0]]

    def protect_rtcp(self, packet: bytes) -> bytes:
        """Encrypt and authenticate one RTCP compound packet."""
        if not self.direct:
            return self._session.protect_rtcp(packet)
        return self._call(_PROTECT_RTCP, packet)

    def unprotect_rtcp(self, packet: bytes) -> bytes:
        """Authenticate and decrypt one SRTCP compound packet."""
        if not self.direct:
            return self._session.unprotect_rtcp(packet)
        return self._call(_UNPROTECT_RTCP, packet)

    def _call(self, function, packet: bytes) -> bytes:
        """Run the libsrtp ``function`` on ``packet`` in place in our buffer."""
        size = len(packet)
        if size > MAX_PACKET:
            raise ValueError(f"packet of {size} bytes is over the {MAX_PACKET}-byte limit")
        buffer = self._buffer
        buffer[0:size] = packet
        length = self._length
        length[0] = size
        status = function(self._srtp, self._cdata, length)
        if status:
            raise _error(status)
        return buffer[0 : length[0]]
