"""Error base classes shared by every codec in ``voxrelay.proto``.

Each parser raises its own subclass of :class:`ProtocolError` (``StunError``,
``TokenError``, ``RelayHeaderError``, ...), so a caller can catch one codec's errors
precisely, or every malformed-input error at once with ``except ProtocolError``. The base
derives from :class:`ValueError` because bad bytes are a bad value, and code that already
guards a conversion with ``except ValueError`` keeps working.
"""


class ProtocolError(ValueError):
    """Input bytes (or a value to encode) that break a wire format's rules.

    Parsers in ``voxrelay.proto`` raise only subclasses of this for malformed input; an
    ``IndexError``, ``struct.error`` or ``UnicodeDecodeError`` escaping one is a bug.
    """
