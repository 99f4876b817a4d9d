"""libopus through ctypes: the transcoding of PCM backends, per call, without FFmpeg.

The transceiver decodes a caller's Opus to PCM and encodes a backend's PCM to Opus for
every call of a ``pcm16`` backend, 50 times a second each way. Through PyAV each call
needed an FFmpeg decoder, an encoder and two filter graphs (one resamples 48 kHz to the
session rate, one hidden in the encoder cuts frames to size), about 400 KiB and four
threads per call, plus a Python frame object and a graph trip per packet. libopus decodes
straight to any session rate (8, 12, 16, 24 or 48 kHz) and encodes from it, so a call
needs only libopus's own two states (about 50 KiB at 16 kHz), held in Python buffers, and
one C call per packet.

The library is the copy PyAV's wheel ships (so ``pip install`` alone is enough) or, failing
that, the system's ``libopus.so.0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import threading
from functools import cache
from typing import Final

__all__ = [
    "OPUS_RATES",
    "OpusDecoder",
    "OpusEncoder",
    "OpusError",
    "OpusUnavailable",
    "libopus_version",
]

OPUS_RATES: Final = (8_000, 12_000, 16_000, 24_000, 48_000)
"""The sample rates libopus decodes to and encodes from."""

_OK: Final = 0
_APPLICATION_VOIP: Final = 2048
_SET_BITRATE: Final = 4002
_SET_COMPLEXITY: Final = 4010
_MAX_PACKET_MS: Final = 120
_MAX_PACKET_BYTES: Final = 1275 * 3 + 7  # the largest packet libopus writes (120 ms)


class OpusError(Exception):
    """libopus refused a packet, a frame or a setting; the message is libopus's reason."""


class OpusUnavailable(OpusError):
    """No libopus could be loaded: neither the system's nor the one in PyAV's wheel."""


def _candidates() -> list[str]:
    """PyAV's bundled copy first (a recent libopus, 1.5+ encodes about a quarter faster
    than the 1.3 many distributions ship), then the system's."""
    names: list[str] = []
    spec = importlib.util.find_spec("av")  # its location only: importing av loads FFmpeg
    if spec is not None and spec.origin is not None:
        package_parent = os.path.dirname(os.path.dirname(spec.origin))
        names += sorted(glob.glob(os.path.join(package_parent, "av.libs", "libopus*.so*")))
        names += sorted(glob.glob(os.path.join(package_parent, "av", ".dylibs", "libopus*")))
    found = ctypes.util.find_library("opus")
    if found:
        names.append(found)
    names.append("libopus.so.0")
    return names


@cache
def _lib() -> ctypes.CDLL:
    tried: list[str] = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            lib.opus_encode  # noqa: B018  (a library without libopus's symbols is no use)
        except (OSError, AttributeError) as error:
            tried.append(f"{name}: {error}")
            continue
        _declare(lib)
        return lib
    raise OpusUnavailable(
        "libopus not found (install libopus0, or PyAV whose wheel ships it); tried "
        + "; ".join(tried)
    )


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_int32 = ctypes.c_int, ctypes.c_int32
    c_void_p, c_char_p = ctypes.c_void_p, ctypes.c_char_p
    lib.opus_get_version_string.restype = c_char_p
    lib.opus_strerror.argtypes = [c_int]
    lib.opus_strerror.restype = c_char_p
    lib.opus_encoder_get_size.argtypes = [c_int]
    lib.opus_encoder_get_size.restype = c_int
    lib.opus_encoder_init.argtypes = [c_void_p, c_int32, c_int, c_int]
    lib.opus_encoder_init.restype = c_int
    lib.opus_encode.argtypes = [c_void_p, c_char_p, c_int, c_void_p, c_int32]
    lib.opus_encode.restype = c_int32
    lib.opus_encoder_ctl.restype = c_int  # variadic: arguments are passed as c_int
    lib.opus_decoder_get_size.argtypes = [c_int]
    lib.opus_decoder_get_size.restype = c_int
    lib.opus_decoder_init.argtypes = [c_void_p, c_int32, c_int]
    lib.opus_decoder_init.restype = c_int
    lib.opus_decode.argtypes = [c_void_p, c_char_p, c_int32, c_void_p, c_int, c_int]
    lib.opus_decode.restype = c_int


def libopus_version() -> str:
    """The loaded library's version string; raises :class:`OpusUnavailable` without one."""
    return _lib().opus_get_version_string().decode()


def _reason(code: int) -> str:
    return _lib().opus_strerror(code).decode(errors="replace")


class _Scratch(threading.local):
    """Output buffers libopus writes into, one pair per thread rather than per call: a
    call's PCM or packet is copied out at once, so thousands of calls need not each hold
    ~8 KiB of buffers."""

    def __init__(self) -> None:
        self.pcm = ctypes.create_string_buffer(max(OPUS_RATES) * _MAX_PACKET_MS // 1000 * 2)
        self.packet = ctypes.create_string_buffer(_MAX_PACKET_BYTES)


_scratch = _Scratch()


def _check_rate(sample_rate: int) -> None:
    if sample_rate not in OPUS_RATES:
        raise OpusError(f"sample rate must be one of {OPUS_RATES}, got {sample_rate!r}")


class OpusDecoder:
    """Opus packets -> mono int16 PCM at ``sample_rate``, whatever rate they were coded at
    (stereo packets are mixed down)."""

    __slots__ = ("_decode", "_state", "max_samples", "sample_rate")

    def __init__(self, sample_rate: int) -> None:
        _check_rate(sample_rate)
        lib = _lib()
        self.sample_rate = sample_rate
        self._state = ctypes.create_string_buffer(lib.opus_decoder_get_size(1))
        code = lib.opus_decoder_init(self._state, sample_rate, 1)
        if code != _OK:
            raise OpusError(f"decoder init failed: {_reason(code)}")
        self.max_samples = sample_rate * _MAX_PACKET_MS // 1000
        self._decode = lib.opus_decode

    def decode(self, packet: bytes | bytearray | memoryview) -> bytes:
        """One packet's PCM (its whole duration, 2.5-120 ms); :class:`OpusError` if corrupt."""
        if not isinstance(packet, bytes):
            packet = bytes(packet)
        if not packet:
            raise OpusError("empty packet (a lost packet is not decoded here)")
        out = _scratch.pcm
        samples = self._decode(self._state, packet, len(packet), out, self.max_samples, 0)
        if samples < 0:
            raise OpusError(_reason(samples))
        return ctypes.string_at(out, samples * 2)


class OpusEncoder:
    """20 ms frames of mono int16 PCM at ``sample_rate`` -> one Opus packet each (VoIP mode)."""

    __slots__ = ("_encode", "_state", "frame_bytes", "frame_samples", "sample_rate")

    def __init__(self, sample_rate: int, bitrate: int, complexity: int = 10) -> None:
        _check_rate(sample_rate)
        if not 500 <= bitrate <= 512_000:
            raise OpusError(f"bitrate must be 500-512000 bit/s, got {bitrate!r}")
        if not 0 <= complexity <= 10:
            raise OpusError(f"complexity must be 0-10, got {complexity!r}")
        lib = _lib()
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate // 50
        self.frame_bytes = self.frame_samples * 2
        self._state = ctypes.create_string_buffer(lib.opus_encoder_get_size(1))
        code = lib.opus_encoder_init(self._state, sample_rate, 1, _APPLICATION_VOIP)
        if code != _OK:
            raise OpusError(f"encoder init failed: {_reason(code)}")
        for request, value in (
            (_SET_BITRATE, bitrate),
            (_SET_COMPLEXITY, complexity),
        ):
            code = lib.opus_encoder_ctl(self._state, ctypes.c_int(request), ctypes.c_int(value))
            if code != _OK:
                raise OpusError(f"encoder setting {request} = {value} refused: {_reason(code)}")
        self._encode = lib.opus_encode

    def encode(self, pcm: bytes | bytearray | memoryview) -> bytes:
        """One 20 ms frame (``frame_bytes`` of int16) -> one Opus packet."""
        if not isinstance(pcm, bytes):
            pcm = bytes(pcm)
        if len(pcm) != self.frame_bytes:
            raise OpusError(
                f"a 20 ms frame at {self.sample_rate} Hz holds {self.frame_bytes} bytes, "
                f"got {len(pcm)}"
            )
        out = _scratch.packet
        size = self._encode(self._state, pcm, self.frame_samples, out, _MAX_PACKET_BYTES)
        if size < 0:
            raise OpusError(_reason(size))
        return ctypes.string_at(out, size)
