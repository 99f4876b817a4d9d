"""SDP offers from WebRTC clients, and the ICE-lite answers a voxrelay transceiver sends.

Signaling (WHIP) hands :func:`parse_offer` the client's offer, and :func:`build_answer`
turns it into the answer: one audio m-line carrying Opus over DTLS-SRTP, ICE-lite with
our ufrag (the routing token) and password, and the relay's public address as the only
candidate. Every other m-line (video, data channel, a second audio) is rejected with
port 0 as RFC 3264 section 6 allows, so a client offering more than audio still
connects.

Guarantees:

* :func:`parse_offer` checks syntax (RFC 8866) and the grammar of the attributes WebRTC
  relies on (RFC 8839 ICE, RFC 8122 fingerprints, RFC 4145 setup, RFC 8843 BUNDLE,
  RFC 8285 header extensions), and raises :class:`SdpError` (a
  :class:`~voxrelay.proto.errors.ProtocolError`) for anything else, including bodies
  over :data:`MAX_SDP_BYTES` or :data:`MAX_LINES`, bytes that are not UTF-8, and
  control characters. Its work is linear in the (bounded) input.
* :func:`build_answer` raises :class:`SdpError` with a message fit for a 4xx response
  body when the offer asks for something voxrelay cannot do (no audio, no Opus, no
  DTLS fingerprint, no ICE credentials, another RTP profile, no rtcp-mux, an ICE-lite
  offerer). It raises :class:`ValueError` for bad arguments from our own code.
* Whatever reaches the answer from the offer (mid, payload type, Opus parameters,
  rejected m-lines' profile and formats) has been checked against its grammar first,
  so an offer cannot inject lines into our answer.
"""

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from typing import Final, Literal, cast

from voxrelay.proto.errors import ProtocolError

__all__ = [
    "DTLS_SRTP_PROFILE",
    "ICE_PWD_LENGTH",
    "MAX_LINES",
    "MAX_LINE_LENGTH",
    "MAX_SDP_BYTES",
    "STREAM_ID",
    "Answer",
    "Attribute",
    "Candidate",
    "Codec",
    "Fingerprint",
    "HeaderExtension",
    "MediaSection",
    "Offer",
    "Origin",
    "SdpError",
    "build_answer",
    "generate_ice_pwd",
    "parse_candidate",
    "parse_offer",
]

MAX_SDP_BYTES: Final = 64 * 1024
"""Largest session description accepted, in UTF-8 bytes.

A browser's audio-only offer is about 2 KiB; one with audio, video and a data channel
and a dozen candidates stays under 10 KiB.
"""
MAX_LINES: Final = 2048
"""Most lines accepted in a session description."""
MAX_LINE_LENGTH: Final = 4096
"""Longest line accepted, in characters (a candidate line is about 150)."""

DTLS_SRTP_PROFILE: Final = "UDP/TLS/RTP/SAVPF"
"""The only RTP profile answered: SRTP keyed by DTLS, over UDP, with RTCP feedback."""

ICE_PWD_LENGTH: Final = 32
"""Characters in a generated ice-pwd: 32 of the 64 ICE characters carry 192 bits."""

STREAM_ID: Final = "voxrelay"
"""The msid stream id of the audio track we send."""

Direction = Literal["sendrecv", "sendonly", "recvonly", "inactive"]
Setup = Literal["active", "passive", "actpass", "holdconn"]

_DIRECTIONS: Final = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})
_SETUPS: Final = frozenset({"active", "passive", "actpass", "holdconn"})
_REVERSED_DIRECTION: Final[dict[str, Direction]] = {
    "sendrecv": "sendrecv",
    "sendonly": "recvonly",
    "recvonly": "sendonly",
    "inactive": "inactive",
}
# Line types of RFC 8866 section 5; a description with any other type must be rejected.
_KNOWN_LINE_TYPES: Final = frozenset("vosiuepcbtrzkam")
_SESSION_ONLY_LINE_TYPES: Final = frozenset("vosuepzrt")

# Digest sizes of the hash functions a DTLS certificate fingerprint may use that are
# strong enough to accept (RFC 8122 section 5); sha-1 and md5 are not.
_FINGERPRINT_DIGEST_SIZES: Final = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
_WEAK_FINGERPRINT_DIGEST_SIZES: Final = {"sha-1": 20, "md5": 16, "md2": 16, "sha-224": 28}

# Payload types of RFC 3551 that need no a=rtpmap line (audio ones a browser may offer).
_STATIC_PAYLOAD_TYPES: Final = {
    0: ("PCMU", 8000, 1),
    3: ("GSM", 8000, 1),
    4: ("G723", 8000, 1),
    8: ("PCMA", 8000, 1),
    9: ("G722", 8000, 1),
    13: ("CN", 8000, 1),
    18: ("G729", 8000, 1),
}

# Opus parameters (RFC 7587 section 6.1) that say how we want to receive, and that we
# keep when the offer has them: the backend decodes in-band FEC, and accepts 10 ms
# frames. Everything else (stereo, bitrates, DTX, ...) is left at its default.
_OPUS_ANSWER_PARAMETERS: Final = {
    "minptime": re.compile(r"[0-9]{1,3}"),
    "useinbandfec": re.compile(r"[01]"),
}

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_ICE_CHARS: Final = re.compile(r"[A-Za-z0-9+/]+")
_HOSTNAME: Final = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?"
)
_HEX_PAIRS: Final = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*")
_CONTROL_CHARACTER: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_RTPMAP: Final = re.compile(
    r"(?P<pt>[0-9]{1,3}) (?P<name>[^\s/]{1,64})/(?P<clock>[0-9]{1,10})"
    r"(?:/(?P<channels>[0-9]{1,3}))?"
)
_EXTMAP: Final = re.compile(
    r"(?P<id>[0-9]{1,5})(?:/(?P<direction>[a-z]+))? (?P<uri>\S+)(?: (?P<attributes>.*))?"
)
_DIGITS: Final = re.compile(r"[0-9]{1,10}")
_PORT: Final = re.compile(r"(?P<port>[0-9]{1,5})(?:/(?P<count>[0-9]{1,5}))?")

_MAX_MID_LENGTH: Final = 256
_MAX_ICE_CREDENTIAL_LENGTH: Final = 256  # for ufrag and pwd alike (RFC 8839)
_MIN_ICE_UFRAG_LENGTH: Final = 4
_MIN_ICE_PWD_LENGTH: Final = 22
_MAX_CNAME_LENGTH: Final = 255
_UINT32_MAX: Final = 0xFFFFFFFF
_SESSION_ID_MAX: Final = (1 << 63) - 1
# Host candidate priority (RFC 8445 section 5.1.2.1): type preference 126, local
# preference 65535, component 1.
_HOST_CANDIDATE_PRIORITY: Final = (126 << 24) | (65535 << 8) | (256 - 1)


class SdpError(ProtocolError):
    """A session description we cannot parse, or an offer we cannot answer.

    The message says what is wrong (with the line number for syntax errors) in words a
    client developer can act on, and is meant to be sent back as a 4xx response body.
    """


@dataclass(frozen=True, slots=True)
class Attribute:
    """One ``a=`` line as written: ``a=name:value``, or ``a=name`` (``value`` None)."""

    name: str
    value: str | None


@dataclass(frozen=True, slots=True)
class Origin:
    """The ``o=`` line (RFC 8866 section 5.2)."""

    username: str
    session_id: str
    session_version: str
    network_type: str
    address_type: str
    address: str


@dataclass(frozen=True, slots=True)
class Codec:
    """One RTP payload format of an m-line, from ``a=rtpmap`` (or the static table)."""

    payload_type: int
    name: str
    clock_rate: int
    channels: int = 1
    """Audio channels; 1 when the rtpmap line leaves it out (RFC 8866 section 6.6)."""
    fmtp: str = ""
    """The raw ``a=fmtp`` parameters, e.g. ``minptime=10;useinbandfec=1``."""
    rtcp_feedback: tuple[str, ...] = ()
    """``a=rtcp-fb`` values for this payload type (or ``*``), e.g. ``transport-cc``."""

    @property
    def parameters(self) -> dict[str, str]:
        """The ``key=value`` items of :attr:`fmtp`, keys lowercased, in offer order."""
        parameters: dict[str, str] = {}
        for item in self.fmtp.split(";"):
            key, equals, value = item.strip().partition("=")
            if equals and key:
                parameters[key.strip().lower()] = value.strip()
        return parameters

    @property
    def is_opus(self) -> bool:
        """Whether this is Opus as RFC 7587 requires it to be written: opus/48000/2."""
        return self.name.lower() == "opus" and self.clock_rate == 48000 and self.channels == 2


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A DTLS certificate fingerprint (RFC 8122): hash function and colon-separated hex."""

    algorithm: str
    """Hash function name, lowercased, e.g. ``sha-256``."""
    value: str
    """Upper-case hex pairs separated by colons."""

    @property
    def digest(self) -> bytes:
        """The fingerprint as bytes, to compare with a hash of the peer's certificate."""
        return bytes.fromhex(self.value.replace(":", ""))


@dataclass(frozen=True, slots=True)
class Candidate:
    """An ICE candidate (RFC 8839 section 5.1)."""

    foundation: str
    component: int
    transport: str
    """Lowercased: ``udp`` or ``tcp`` (Firefox writes upper case)."""
    priority: int
    address: str
    """An IP literal, or an mDNS name like ``<uuid>.local`` that hides a host address."""
    port: int
    type: str
    """``host``, ``srflx``, ``prflx`` or ``relay``."""
    related_address: str | None = None
    related_port: int | None = None
    tcptype: str | None = None
    """``active``, ``passive`` or ``so`` for TCP candidates (RFC 6544)."""
    extensions: tuple[tuple[str, str], ...] = ()
    """Other name/value pairs in order, e.g. ``("generation", "0")``."""

    @property
    def is_mdns(self) -> bool:
        """Whether the address is an mDNS name rather than an IP literal."""
        return self.address.lower().rstrip(".").endswith(".local")

    def to_sdp(self) -> str:
        """The attribute value, as written after ``a=candidate:``."""
        parts = [
            self.foundation,
            str(self.component),
            self.transport,
            str(self.priority),
            self.address,
            str(self.port),
            "typ",
            self.type,
        ]
        if self.related_address is not None:
            parts += ["raddr", self.related_address]
        if self.related_port is not None:
            parts += ["rport", str(self.related_port)]
        if self.tcptype is not None:
            parts += ["tcptype", self.tcptype]
        for name, value in self.extensions:
            parts += [name, value]
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class HeaderExtension:
    """An RTP header extension offered with ``a=extmap`` (RFC 8285)."""

    id: int
    uri: str
    direction: str | None = None
    attributes: str = ""


@dataclass(frozen=True, slots=True)
class MediaSection:
    """One m-line and its attributes.

    ICE credentials and options, fingerprints, setup and direction are the values in
    effect for this section: its own, or else the session-level ones (RFC 8839,
    RFC 8122, RFC 4145, RFC 8866 allow each at either level).
    """

    kind: str
    """``audio``, ``video``, ``application``, ..."""
    port: int
    protocol: str
    formats: tuple[str, ...]
    mid: str | None
    direction: Direction
    codecs: tuple[Codec, ...]
    """RTP payload formats in m-line (preference) order; empty for non-RTP m-lines."""
    ice_ufrag: str | None
    ice_pwd: str | None
    ice_options: tuple[str, ...]
    fingerprints: tuple[Fingerprint, ...]
    setup: Setup | None
    candidates: tuple[Candidate, ...]
    end_of_candidates: bool
    rtcp_mux: bool
    rtcp_rsize: bool
    bundle_only: bool
    header_extensions: tuple[HeaderExtension, ...]
    ssrcs: tuple[int, ...]
    """SSRCs named by ``a=ssrc`` lines, in order of first appearance."""
    connection_address: str | None
    """The address of this section's ``c=`` line (or the session's), without TTL."""
    attributes: tuple[Attribute, ...]
    """Every ``a=`` line of the section, in order, parsed or not."""

    @property
    def trickle(self) -> bool:
        """Whether the client trickles candidates (RFC 8838 ``a=ice-options:trickle``)."""
        return "trickle" in self.ice_options

    @property
    def disabled(self) -> bool:
        """Whether the offerer turned this m-line off (port 0 and not bundle-only)."""
        return self.port == 0 and not self.bundle_only


@dataclass(frozen=True, slots=True)
class Offer:
    """A parsed session description: session-level fields and the m-lines in order."""

    origin: Origin | None
    session_name: str
    ice_lite: bool
    bundle_groups: tuple[tuple[str, ...], ...]
    """Mids of each ``a=group:BUNDLE`` line (RFC 8843)."""
    attributes: tuple[Attribute, ...]
    """Every session-level ``a=`` line, in order."""
    media: tuple[MediaSection, ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """Our answer and the parameters negotiated by it, for the session to use."""

    sdp: str
    media_index: int
    """Index of the accepted audio m-line in the offer (and the answer)."""
    mid: str | None
    opus_payload_type: int
    opus_fmtp: str
    """The Opus parameters in the answer (a subset of the offer's)."""
    direction: Direction
    """Our direction for the audio m-line, the mirror of the offer's."""
    setup: Literal["active", "passive"]
    dtls_role: Literal["client", "server"]
    """``server`` when we are passive (we await the ClientHello), else ``client``."""
    ice_ufrag: str
    ice_pwd: str
    remote_ice_ufrag: str
    remote_ice_pwd: str
    remote_fingerprints: tuple[Fingerprint, ...]
    """The offer's fingerprints with its strongest supported hash function; the peer's
    DTLS certificate must match one of them (RFC 8122 section 5)."""
    remote_candidates: tuple[Candidate, ...]
    remote_ssrcs: tuple[int, ...]
    rtcp_rsize: bool
    bundle_mids: tuple[str, ...]
    """The answer's BUNDLE group: the accepted mid when the offer bundled it, else empty."""


# ---------------------------------------------------------------------------- parsing


def parse_offer(text: str | bytes) -> Offer:
    """Parse a session description (an offer, or for tests our own answer).

    Raises :class:`SdpError` for input over the size limits, bytes that are not UTF-8,
    control characters, unknown line types, a missing ``v=0`` first line, and malformed
    lines of the types and attributes that WebRTC negotiation uses.
    """
    lines = _split_lines(text)
    parser = _Parser()
    for number, line in enumerate(lines, start=1):
        if not line:
            continue  # tolerated: many clients end the body with a blank line
        try:
            parser.feed(line, first=number == 1)
        except SdpError as error:
            raise SdpError(f"line {number}: {error}") from None
    return parser.finish()


def parse_candidate(value: str) -> Candidate:
    """Parse a candidate attribute value, with or without its ``candidate:`` prefix.

    Also for trickled candidates (RFC 8840), which arrive without the ``a=``.
    """
    if value.startswith(("a=candidate:", "candidate:")):
        value = value.partition(":")[2]
    parts = value.split()
    if len(parts) < 8 or parts[6] != "typ":
        raise SdpError(
            f"candidate {value[:80]!r} is not "
            "'foundation component transport priority address port typ type ...'"
        )
    foundation, component, transport, priority, address, port, _, candidate_type = parts[:8]
    if not _ICE_CHARS.fullmatch(foundation) or len(foundation) > 32:
        raise SdpError(f"candidate foundation {foundation[:40]!r} is not 1-32 ICE characters")
    component_id = _bounded_int(component, 1, 256, "candidate component")
    if not _TOKEN.fullmatch(transport):
        raise SdpError(f"candidate transport {transport[:40]!r} is not a token")
    priority_value = _bounded_int(priority, 1, _UINT32_MAX, "candidate priority")
    _check_candidate_address(address)
    port_value = _bounded_int(port, 0, 65535, "candidate port")
    if not _TOKEN.fullmatch(candidate_type):
        raise SdpError(f"candidate type {candidate_type[:40]!r} is not a token")

    extras = parts[8:]
    if len(extras) % 2:
        raise SdpError(f"candidate extension {extras[-1][:40]!r} has no value")
    related_address: str | None = None
    related_port: int | None = None
    tcptype: str | None = None
    extensions: list[tuple[str, str]] = []
    for name, extension_value in zip(extras[::2], extras[1::2], strict=True):
        if name == "raddr":
            _check_candidate_address(extension_value)
            related_address = extension_value
        elif name == "rport":
            related_port = _bounded_int(extension_value, 0, 65535, "candidate rport")
        elif name == "tcptype":
            tcptype = extension_value
        else:
            extensions.append((name, extension_value))
    return Candidate(
        foundation=foundation,
        component=component_id,
        transport=transport.lower(),
        priority=priority_value,
        address=address,
        port=port_value,
        type=candidate_type,
        related_address=related_address,
        related_port=related_port,
        tcptype=tcptype,
        extensions=tuple(extensions),
    )


def _split_lines(text: str | bytes) -> list[str]:
    """Check size and encoding, and split into lines without their CR LF or LF ends."""
    too_long = SdpError(f"session description is longer than {MAX_SDP_BYTES} bytes")
    if isinstance(text, str):
        # A character is at least one UTF-8 byte: check the cheap bound before encoding.
        if len(text) > MAX_SDP_BYTES:
            raise too_long
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise SdpError("session description is not valid Unicode") from None
        if size > MAX_SDP_BYTES:
            raise too_long
    elif isinstance(text, bytes | bytearray | memoryview):
        if len(text) > MAX_SDP_BYTES:
            raise too_long
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise SdpError(
                f"session description is not UTF-8 (byte {error.start}: {error.reason})"
            ) from None
    else:
        raise TypeError(f"session description must be str or bytes, not {type(text).__name__}")
    if not text:
        raise SdpError("session description is empty")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final line's end, not a line of its own
    if len(lines) > MAX_LINES:
        raise SdpError(f"session description has more than {MAX_LINES} lines")
    for number, line in enumerate(lines, start=1):
        if line.endswith("\r"):
            line = line[:-1]
            lines[number - 1] = line
        if len(line) > MAX_LINE_LENGTH:
            raise SdpError(f"line {number} is longer than {MAX_LINE_LENGTH} characters")
        control = _CONTROL_CHARACTER.search(line)
        if control:
            raise SdpError(f"line {number} contains control character 0x{ord(control.group()):02x}")
    return lines


@dataclass
class _SectionBuilder:
    """Mutable state of one section (the session, or an m-line) while lines arrive."""

    kind: str = ""
    port: int = 0
    protocol: str = ""
    formats: tuple[str, ...] = ()
    connection_address: str | None = None
    attributes: list[Attribute] = field(default_factory=list)
    mid: str | None = None
    direction: Direction | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    ice_options: tuple[str, ...] | None = None
    fingerprints: list[Fingerprint] = field(default_factory=list)
    setup: Setup | None = None
    candidates: list[Candidate] = field(default_factory=list)
    end_of_candidates: bool = False
    rtcp_mux: bool = False
    rtcp_rsize: bool = False
    bundle_only: bool = False
    ice_lite: bool = False
    header_extensions: list[HeaderExtension] = field(default_factory=list)
    rtpmaps: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    fmtps: dict[int, str] = field(default_factory=dict)
    rtcp_feedback: dict[str, list[str]] = field(default_factory=dict)
    ssrcs: dict[int, None] = field(default_factory=dict)
    bundle_groups: list[tuple[str, ...]] = field(default_factory=list)


class _Parser:
    """Line-by-line state machine: session-level lines, then one section per m-line."""

    def __init__(self) -> None:
        self.session = _SectionBuilder()
        self.media: list[_SectionBuilder] = []
        self.origin: Origin | None = None
        self.session_name = ""
        self.seen_session_types: set[str] = set()
        self.seen_version = False

    @property
    def current(self) -> _SectionBuilder:
        return self.media[-1] if self.media else self.session

    def feed(self, line: str, *, first: bool) -> None:
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"{line[:40]!r} is not '<type>=<value>'")
        line_type, value = line[0], line[2:]
        if line_type not in _KNOWN_LINE_TYPES:
            raise SdpError(f"unknown line type {line_type!r}")
        if first and line_type != "v":
            raise SdpError("a session description must start with v=0")
        if line_type in _SESSION_ONLY_LINE_TYPES:
            if self.media:
                raise SdpError(f"{line_type}= is a session-level line but comes after an m= line")
            if line_type in self.seen_session_types and line_type in "vos":
                raise SdpError(f"more than one {line_type}= line")
            self.seen_session_types.add(line_type)
        if line_type == "v":
            if value != "0":
                raise SdpError(f"unsupported SDP version v={value[:20]}; only v=0 exists")
            self.seen_version = True
        elif line_type == "o":
            self.origin = _parse_origin(value)
        elif line_type == "s":
            self.session_name = value
        elif line_type == "m":
            self.media.append(_parse_media_line(value))
        elif line_type == "c":
            self.current.connection_address = _parse_connection(value)
        elif line_type == "a":
            name, colon, attribute_value = value.partition(":")
            if not _TOKEN.fullmatch(name):
                raise SdpError(f"attribute name {name[:40]!r} is not a token")
            attribute = Attribute(name, attribute_value if colon else None)
            _apply_attribute(self.current, attribute)
            self.current.attributes.append(attribute)
        # i=, u=, e=, p=, b=, t=, r=, z=, k=: nothing in them matters to WebRTC.

    def finish(self) -> Offer:
        if not self.seen_version:
            raise SdpError("a session description must start with v=0")
        session = self.session
        media = tuple(self._finish_section(section) for section in self.media)
        _check_mids_and_groups(media, session.bundle_groups)
        return Offer(
            origin=self.origin,
            session_name=self.session_name,
            ice_lite=session.ice_lite,
            bundle_groups=tuple(session.bundle_groups),
            attributes=tuple(session.attributes),
            media=media,
        )

    def _finish_section(self, section: _SectionBuilder) -> MediaSection:
        session = self.session
        feedback_for_all = section.rtcp_feedback.get("*", [])
        codecs: list[Codec] = []
        if _is_rtp(section.protocol):
            for payload_format in section.formats:
                payload_type = int(payload_format)  # checked by _parse_media_line
                rtpmap = section.rtpmaps.get(payload_type) or _STATIC_PAYLOAD_TYPES.get(
                    payload_type
                )
                if rtpmap is None:
                    continue  # a dynamic payload type without a=rtpmap names no codec
                name, clock_rate, channels = rtpmap
                codecs.append(
                    Codec(
                        payload_type=payload_type,
                        name=name,
                        clock_rate=clock_rate,
                        channels=channels,
                        fmtp=section.fmtps.get(payload_type, ""),
                        rtcp_feedback=tuple(
                            section.rtcp_feedback.get(str(payload_type), []) + feedback_for_all
                        ),
                    )
                )
        return MediaSection(
            kind=section.kind,
            port=section.port,
            protocol=section.protocol,
            formats=section.formats,
            mid=section.mid,
            direction=section.direction or session.direction or "sendrecv",
            codecs=tuple(codecs),
            ice_ufrag=section.ice_ufrag if section.ice_ufrag is not None else session.ice_ufrag,
            ice_pwd=section.ice_pwd if section.ice_pwd is not None else session.ice_pwd,
            ice_options=(
                section.ice_options
                if section.ice_options is not None
                else session.ice_options or ()
            ),
            fingerprints=tuple(section.fingerprints or session.fingerprints),
            setup=section.setup or session.setup,
            candidates=tuple(section.candidates),
            end_of_candidates=section.end_of_candidates or session.end_of_candidates,
            rtcp_mux=section.rtcp_mux,
            rtcp_rsize=section.rtcp_rsize,
            bundle_only=section.bundle_only,
            header_extensions=tuple(section.header_extensions),
            ssrcs=tuple(section.ssrcs),
            connection_address=section.connection_address or session.connection_address,
            attributes=tuple(section.attributes),
        )


def _parse_origin(value: str) -> Origin:
    parts = value.split(" ")
    if len(parts) != 6 or not all(parts):
        raise SdpError("o= must be 'username session-id session-version nettype addrtype address'")
    return Origin(*parts)


def _parse_media_line(value: str) -> _SectionBuilder:
    parts = value.split(" ")
    if len(parts) < 4 or not all(parts):
        raise SdpError("m= must be 'media port protocol format ...'")
    kind, port_field, protocol, *formats = parts
    if not _TOKEN.fullmatch(kind):
        raise SdpError(f"m= media {kind[:40]!r} is not a token")
    port_match = _PORT.fullmatch(port_field)
    if port_match is None:
        raise SdpError(f"m= port {port_field[:40]!r} is not a number")
    port = _bounded_int(port_match["port"], 0, 65535, "m= port")
    if port_match["count"] is not None:
        _bounded_int(port_match["count"], 1, 65535, "m= port count")
    if not re.fullmatch(r"[A-Za-z0-9/_.\-]+", protocol):
        raise SdpError(f"m= protocol {protocol[:40]!r} is not a protocol name")
    for payload_format in formats:
        if _is_rtp(protocol):
            _bounded_int(payload_format, 0, 127, "m= payload type")
        elif not _TOKEN.fullmatch(payload_format):
            raise SdpError(f"m= format {payload_format[:40]!r} is not a token")
    return _SectionBuilder(kind=kind, port=port, protocol=protocol, formats=tuple(formats))


def _parse_connection(value: str) -> str:
    parts = value.split(" ")
    if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
        raise SdpError("c= must be 'IN IP4 address' or 'IN IP6 address'")
    address = parts[2].split("/", 1)[0]
    if not address:
        raise SdpError("c= has an empty address")
    return address


def _apply_attribute(section: _SectionBuilder, attribute: Attribute) -> None:
    """Record what an attribute means for ``section``; unknown attributes are only kept."""
    name, value = attribute.name, attribute.value
    if name in _DIRECTIONS:
        if section.direction is not None:
            raise SdpError(f"a={name} after a={section.direction}: more than one direction")
        section.direction = cast(Direction, name)
        return
    if name in _FLAG_ATTRIBUTES:
        setattr(section, _FLAG_ATTRIBUTES[name], True)
        return
    handler = _VALUE_ATTRIBUTES.get(name)
    if handler is None:
        return
    if value is None:
        raise SdpError(f"a={name} needs a value (a={name}:...)")
    handler(section, value)


def _set_mid(section: _SectionBuilder, value: str) -> None:
    _once(section.mid, "mid")
    if not _TOKEN.fullmatch(value) or len(value) > _MAX_MID_LENGTH:
        raise SdpError(
            f"a=mid {value[:40]!r} is not a token of at most {_MAX_MID_LENGTH} characters"
        )
    section.mid = value


def _set_ice_ufrag(section: _SectionBuilder, value: str) -> None:
    _once(section.ice_ufrag, "ice-ufrag")
    section.ice_ufrag = value


def _set_ice_pwd(section: _SectionBuilder, value: str) -> None:
    _once(section.ice_pwd, "ice-pwd")
    section.ice_pwd = value


def _set_ice_options(section: _SectionBuilder, value: str) -> None:
    options = tuple(value.split())
    if not all(_TOKEN.fullmatch(option) for option in options):
        raise SdpError(f"a=ice-options {value[:60]!r} is not a list of tokens")
    section.ice_options = (section.ice_options or ()) + options


def _add_fingerprint(section: _SectionBuilder, value: str) -> None:
    algorithm, _, digest = value.strip().partition(" ")
    algorithm = algorithm.lower()
    digest = digest.strip()
    if not _TOKEN.fullmatch(algorithm) or not _HEX_PAIRS.fullmatch(digest):
        raise SdpError(f"a=fingerprint {value[:60]!r} is not 'hash-function XX:XX:...' (RFC 8122)")
    expected_size = _FINGERPRINT_DIGEST_SIZES.get(algorithm) or _WEAK_FINGERPRINT_DIGEST_SIZES.get(
        algorithm
    )
    actual_size = (len(digest) + 1) // 3
    if expected_size is not None and actual_size != expected_size:
        raise SdpError(
            f"a=fingerprint {algorithm} has {actual_size} bytes; {algorithm} has {expected_size}"
        )
    section.fingerprints.append(Fingerprint(algorithm, digest.upper()))


def _set_setup(section: _SectionBuilder, value: str) -> None:
    _once(section.setup, "setup")
    if value not in _SETUPS:
        raise SdpError(f"a=setup:{value[:40]} is not active, passive, actpass or holdconn")
    section.setup = cast(Setup, value)


def _add_candidate(section: _SectionBuilder, value: str) -> None:
    section.candidates.append(parse_candidate(value))


def _add_rtpmap(section: _SectionBuilder, value: str) -> None:
    match = _RTPMAP.fullmatch(value.strip())
    if match is None:
        raise SdpError(f"a=rtpmap {value[:60]!r} is not 'pt name/clock[/channels]'")
    payload_type = _bounded_int(match["pt"], 0, 127, "a=rtpmap payload type")
    if payload_type in section.rtpmaps:
        raise SdpError(f"a=rtpmap for payload type {payload_type} appears twice")
    clock_rate = _bounded_int(match["clock"], 1, _UINT32_MAX, "a=rtpmap clock rate")
    channels = (
        _bounded_int(match["channels"], 1, 255, "a=rtpmap channels") if match["channels"] else 1
    )
    section.rtpmaps[payload_type] = (match["name"], clock_rate, channels)


def _add_fmtp(section: _SectionBuilder, value: str) -> None:
    payload_format, _, parameters = value.partition(" ")
    payload_type = _bounded_int(payload_format, 0, 127, "a=fmtp payload type")
    if payload_type in section.fmtps:
        raise SdpError(f"a=fmtp for payload type {payload_type} appears twice")
    section.fmtps[payload_type] = parameters.strip()


def _add_rtcp_feedback(section: _SectionBuilder, value: str) -> None:
    payload_format, _, feedback = value.partition(" ")
    if payload_format != "*":
        _bounded_int(payload_format, 0, 127, "a=rtcp-fb payload type")
    if not feedback.strip():
        raise SdpError(f"a=rtcp-fb:{payload_format[:10]} names no feedback type")
    section.rtcp_feedback.setdefault(payload_format, []).append(feedback.strip())


def _add_extmap(section: _SectionBuilder, value: str) -> None:
    match = _EXTMAP.fullmatch(value)
    if match is None:
        raise SdpError(f"a=extmap {value[:60]!r} is not 'id[/direction] uri [attributes]'")
    direction = match["direction"]
    if direction is not None and direction not in _DIRECTIONS:
        raise SdpError(f"a=extmap direction {direction[:20]!r} is not a direction")
    section.header_extensions.append(
        HeaderExtension(
            id=_bounded_int(match["id"], 1, 4351, "a=extmap id"),
            uri=match["uri"],
            direction=direction,
            attributes=match["attributes"] or "",
        )
    )


def _add_ssrc(section: _SectionBuilder, value: str) -> None:
    ssrc, _, ssrc_attribute = value.partition(" ")
    section.ssrcs[_bounded_int(ssrc, 0, _UINT32_MAX, "a=ssrc")] = None
    if not ssrc_attribute:
        raise SdpError("a=ssrc needs 'ssrc attribute[:value]'")


def _add_group(section: _SectionBuilder, value: str) -> None:
    semantics, *mids = value.split(" ")
    if not _TOKEN.fullmatch(semantics) or not all(_TOKEN.fullmatch(mid) for mid in mids):
        raise SdpError(f"a=group {value[:60]!r} is not 'semantics mid ...'")
    if semantics == "BUNDLE":
        section.bundle_groups.append(tuple(mids))


_FLAG_ATTRIBUTES: Final = {
    "rtcp-mux": "rtcp_mux",
    "rtcp-rsize": "rtcp_rsize",
    "bundle-only": "bundle_only",
    "end-of-candidates": "end_of_candidates",
    "ice-lite": "ice_lite",
}
_VALUE_ATTRIBUTES: Final = {
    "mid": _set_mid,
    "ice-ufrag": _set_ice_ufrag,
    "ice-pwd": _set_ice_pwd,
    "ice-options": _set_ice_options,
    "fingerprint": _add_fingerprint,
    "setup": _set_setup,
    "candidate": _add_candidate,
    "rtpmap": _add_rtpmap,
    "fmtp": _add_fmtp,
    "rtcp-fb": _add_rtcp_feedback,
    "extmap": _add_extmap,
    "ssrc": _add_ssrc,
    "group": _add_group,
}


def _check_mids_and_groups(
    media: tuple[MediaSection, ...], bundle_groups: list[tuple[str, ...]]
) -> None:
    mids = [section.mid for section in media if section.mid is not None]
    if len(set(mids)) != len(mids):
        duplicate = next(mid for mid in mids if mids.count(mid) > 1)
        raise SdpError(f"a=mid:{duplicate} names more than one m-line")
    bundled: set[str] = set()
    for group in bundle_groups:
        for mid in group:
            if mid not in mids:
                raise SdpError(f"a=group:BUNDLE names mid {mid!r}, which no m-line has")
            if mid in bundled:
                raise SdpError(f"mid {mid!r} is in more than one BUNDLE group")
            bundled.add(mid)


def _once(current: object, name: str) -> None:
    if current is not None:
        raise SdpError(f"a={name} appears twice in one section")


def _bounded_int(text: str, low: int, high: int, what: str) -> int:
    """Parse decimal digits (bounded in count, so no huge-int work) within low..high."""
    if not _DIGITS.fullmatch(text):
        raise SdpError(f"{what} {text[:20]!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise SdpError(f"{what} {value} is out of range {low}..{high}")
    return value


def _check_candidate_address(address: str) -> None:
    if ":" in address:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise SdpError(f"candidate address {address[:60]!r} is not an IPv6 address") from None
    elif re.fullmatch(r"[0-9.]+", address):
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise SdpError(f"candidate address {address[:60]!r} is not an IPv4 address") from None
    elif not _HOSTNAME.fullmatch(address):
        raise SdpError(f"candidate address {address[:60]!r} is not an IP address or host name")


def _is_rtp(protocol: str) -> bool:
    """Whether an m-line protocol is an RTP profile, whose formats are payload types."""
    return "RTP/" in protocol


# ---------------------------------------------------------------------------- answering


def generate_ice_pwd() -> str:
    """Return a fresh ice-pwd: :data:`ICE_PWD_LENGTH` random ICE characters (192 bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return "".join(secrets.choice(alphabet) for _ in range(ICE_PWD_LENGTH))


def build_answer(
    offer: Offer,
    *,
    ice_ufrag: str,
    ice_pwd: str | None = None,
    fingerprint_sha256: str,
    candidate_address: str,
    candidate_port: int,
    ssrc: int,
    cname: str,
    session_id: int,
) -> Answer:
    """Answer ``offer``: accept its first usable audio m-line, reject every other one.

    ``ice_ufrag`` is our ufrag (the routing token); ``ice_pwd`` is generated when None.
    ``fingerprint_sha256`` is our DTLS certificate's SHA-256 fingerprint (hex pairs,
    colons optional). The relay's public ``candidate_address``/``candidate_port`` is the
    answer's only candidate. ``ssrc`` and ``cname`` name the audio stream we send.

    Raises :class:`SdpError` when no audio m-line can be accepted (the message says why,
    for the first audio m-line that was tried), :class:`ValueError` for bad arguments.
    """
    local_pwd = generate_ice_pwd() if ice_pwd is None else ice_pwd
    _check_ice_credential(ice_ufrag, _MIN_ICE_UFRAG_LENGTH, _MAX_ICE_CREDENTIAL_LENGTH, "ice_ufrag")
    _check_ice_credential(local_pwd, _MIN_ICE_PWD_LENGTH, _MAX_ICE_CREDENTIAL_LENGTH, "ice_pwd")
    local_fingerprint = _normalize_sha256_fingerprint(fingerprint_sha256)
    address = ipaddress.ip_address(candidate_address)  # ValueError for anything but an IP
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"candidate_address {candidate_address!r} has a scope; it must be public")
    if not 1 <= candidate_port <= 65535:
        raise ValueError(f"candidate_port {candidate_port} is not in 1..65535")
    if not 0 <= ssrc <= _UINT32_MAX:
        raise ValueError(f"ssrc {ssrc} is not a 32-bit unsigned integer")
    if not 1 <= len(cname) <= _MAX_CNAME_LENGTH or not re.fullmatch(r"[\x21-\x7e]+", cname):
        raise ValueError(f"cname {cname[:40]!r} is not 1-255 printable ASCII characters")
    if not 0 <= session_id <= _SESSION_ID_MAX:
        raise ValueError(f"session_id {session_id} is not in 0..2**63-1")

    if offer.ice_lite:
        raise SdpError(
            "the offer is ICE-lite (a=ice-lite); so is voxrelay, so neither side would "
            "run connectivity checks: offer as a full ICE agent"
        )
    index, audio, opus, transport = _choose_audio(offer)
    remote_fingerprints = _strongest_fingerprints(transport.fingerprints)
    # RFC 5763 section 5: the answerer picks the role an actpass offerer leaves open;
    # passive makes us the DTLS server, the usual choice for a server. An offer without
    # a=setup is active by RFC 4145's default.
    setup: Literal["active", "passive"] = "active" if transport.setup == "passive" else "passive"
    direction = _REVERSED_DIRECTION[audio.direction]
    bundle_mids: tuple[str, ...] = ()
    if audio.mid is not None and any(audio.mid in group for group in offer.bundle_groups):
        bundle_mids = (audio.mid,)
    opus_fmtp = _answer_opus_fmtp(opus)

    assert transport.ice_ufrag is not None and transport.ice_pwd is not None
    lines = [
        "v=0",
        f"o=- {session_id} 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=ice-lite",
    ]
    if bundle_mids:
        lines.append("a=group:BUNDLE " + " ".join(bundle_mids))
    for section_index, section in enumerate(offer.media):
        if section_index == index:
            lines += _audio_lines(
                audio,
                opus,
                opus_fmtp,
                direction=direction,
                setup=setup,
                ice_ufrag=ice_ufrag,
                ice_pwd=local_pwd,
                fingerprint=local_fingerprint,
                address=address,
                port=candidate_port,
                ssrc=ssrc,
                cname=cname,
            )
        else:
            lines += _rejected_lines(section)
    return Answer(
        sdp="\r\n".join(lines) + "\r\n",
        media_index=index,
        mid=audio.mid,
        opus_payload_type=opus.payload_type,
        opus_fmtp=opus_fmtp,
        direction=direction,
        setup=setup,
        dtls_role="server" if setup == "passive" else "client",
        ice_ufrag=ice_ufrag,
        ice_pwd=local_pwd,
        remote_ice_ufrag=transport.ice_ufrag,
        remote_ice_pwd=transport.ice_pwd,
        remote_fingerprints=remote_fingerprints,
        remote_candidates=transport.candidates,
        remote_ssrcs=audio.ssrcs,
        rtcp_rsize=audio.rtcp_rsize,
        bundle_mids=bundle_mids,
    )


def _choose_audio(offer: Offer) -> tuple[int, MediaSection, Codec, MediaSection]:
    """Return the first acceptable audio m-line: index, section, Opus, transport section.

    The transport section holds the ICE credentials and fingerprints: the audio m-line
    itself, or for a bundle-only one without its own, its BUNDLE group's first m-line.
    When none is acceptable, raise the reason the first enabled audio m-line was not.
    """
    audio_sections = [
        (index, section) for index, section in enumerate(offer.media) if section.kind == "audio"
    ]
    if not audio_sections:
        kinds = ", ".join(section.kind for section in offer.media) or "none"
        raise SdpError(
            f"the offer has no audio m-line (m-lines: {kinds}); voxrelay carries voice only"
        )
    enabled = [(index, section) for index, section in audio_sections if not section.disabled]
    if not enabled:
        raise SdpError("every audio m-line in the offer is disabled (port 0)")
    first_error: SdpError | None = None
    for index, section in enabled:
        try:
            opus, transport = _check_audio(offer, section)
        except SdpError as error:
            first_error = first_error or error
            continue
        return index, section, opus, transport
    assert first_error is not None
    raise first_error


def _check_audio(offer: Offer, audio: MediaSection) -> tuple[Codec, MediaSection]:
    if audio.protocol != DTLS_SRTP_PROFILE:
        raise SdpError(
            f"the audio m-line uses profile {audio.protocol}; voxrelay supports only "
            f"{DTLS_SRTP_PROFILE} (DTLS-SRTP over UDP)"
        )
    opus = next((codec for codec in audio.codecs if codec.is_opus), None)
    if opus is None:
        offered = ", ".join(
            f"{codec.name}/{codec.clock_rate}/{codec.channels}" for codec in audio.codecs
        )
        raise SdpError(
            f"the audio m-line offers no Opus (opus/48000/2); offered: {offered or 'nothing'}"
        )
    if not audio.rtcp_mux:
        raise SdpError(
            "the audio m-line lacks a=rtcp-mux, so it cannot be bundled: voxrelay carries "
            "RTP, RTCP, DTLS and STUN on one port"
        )
    transport = audio
    if audio.ice_ufrag is None and audio.bundle_only:
        group = next((group for group in offer.bundle_groups if audio.mid in group), None)
        if group is None:
            raise SdpError(
                "the audio m-line is bundle-only but in no BUNDLE group, so it has no "
                "transport to share"
            )
        transport = next(section for section in offer.media if section.mid == group[0])
    if transport.ice_ufrag is None or transport.ice_pwd is None:
        raise SdpError("the audio m-line has no a=ice-ufrag and a=ice-pwd (ICE credentials)")
    _check_offered_credential(transport.ice_ufrag, _MIN_ICE_UFRAG_LENGTH, "a=ice-ufrag")
    _check_offered_credential(transport.ice_pwd, _MIN_ICE_PWD_LENGTH, "a=ice-pwd")
    if not transport.fingerprints:
        raise SdpError(
            "the audio m-line has no a=fingerprint, so the DTLS certificate of the client "
            "could not be authenticated"
        )
    _strongest_fingerprints(transport.fingerprints)
    if transport.setup == "holdconn":
        raise SdpError("the audio m-line has a=setup:holdconn; offer a=setup:actpass")
    return opus, transport


def _check_offered_credential(value: str, minimum: int, what: str) -> None:
    if not minimum <= len(value) <= _MAX_ICE_CREDENTIAL_LENGTH or not _ICE_CHARS.fullmatch(value):
        raise SdpError(
            f"{what} {value[:40]!r} is not {minimum}-{_MAX_ICE_CREDENTIAL_LENGTH} ICE characters "
            "(A-Z a-z 0-9 + /, RFC 8839)"
        )


def _strongest_fingerprints(fingerprints: tuple[Fingerprint, ...]) -> tuple[Fingerprint, ...]:
    supported = [fp for fp in fingerprints if fp.algorithm in _FINGERPRINT_DIGEST_SIZES]
    if not supported:
        offered = ", ".join(sorted({fp.algorithm for fp in fingerprints}))
        raise SdpError(
            f"the offer's a=fingerprint uses {offered}; voxrelay needs sha-256, sha-384 or sha-512"
        )
    strongest = max(_FINGERPRINT_DIGEST_SIZES[fp.algorithm] for fp in supported)
    return tuple(fp for fp in supported if _FINGERPRINT_DIGEST_SIZES[fp.algorithm] == strongest)


def _answer_opus_fmtp(opus: Codec) -> str:
    kept = [
        f"{key}={value}"
        for key, value in opus.parameters.items()
        if key in _OPUS_ANSWER_PARAMETERS and _OPUS_ANSWER_PARAMETERS[key].fullmatch(value)
    ]
    return ";".join(kept)


def _audio_lines(
    audio: MediaSection,
    opus: Codec,
    opus_fmtp: str,
    *,
    direction: Direction,
    setup: str,
    ice_ufrag: str,
    ice_pwd: str,
    fingerprint: str,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    ssrc: int,
    cname: str,
) -> list[str]:
    pt = opus.payload_type
    track_id = f"{STREAM_ID}-audio-{ssrc}"
    candidate = Candidate(
        foundation="1",
        component=1,
        transport="udp",
        priority=_HOST_CANDIDATE_PRIORITY,
        address=str(address),
        port=port,
        type="host",
    )
    lines = [
        f"m=audio {port} {DTLS_SRTP_PROFILE} {pt}",
        f"c=IN IP{address.version} {address}",
    ]
    if audio.mid is not None:
        lines.append(f"a=mid:{audio.mid}")
    lines += [
        f"a=ice-ufrag:{ice_ufrag}",
        f"a=ice-pwd:{ice_pwd}",
        f"a=fingerprint:sha-256 {fingerprint}",
        f"a=setup:{setup}",
        f"a={direction}",
        "a=rtcp-mux",
    ]
    if audio.rtcp_rsize:
        lines.append("a=rtcp-rsize")
    lines.append(f"a=rtpmap:{pt} opus/48000/2")
    if opus_fmtp:
        lines.append(f"a=fmtp:{pt} {opus_fmtp}")
    if direction in ("sendrecv", "sendonly"):
        lines.append(f"a=msid:{STREAM_ID} {track_id}")
    lines.append(f"a=ssrc:{ssrc} cname:{cname}")
    if direction in ("sendrecv", "sendonly"):
        lines.append(f"a=ssrc:{ssrc} msid:{STREAM_ID} {track_id}")
    lines += [f"a=candidate:{candidate.to_sdp()}", "a=end-of-candidates"]
    return lines


def _rejected_lines(section: MediaSection) -> list[str]:
    # RFC 3264 section 6: port 0, same media, protocol and formats; JSEP (RFC 8829
    # section 5.3.1) keeps the mid so the offerer can match the m-line.
    lines = [
        f"m={section.kind} 0 {section.protocol} {' '.join(section.formats)}",
        "c=IN IP4 0.0.0.0",
    ]
    if section.mid is not None:
        lines.append(f"a=mid:{section.mid}")
    return lines


def _check_ice_credential(value: str, minimum: int, maximum: int, what: str) -> None:
    if not minimum <= len(value) <= maximum or not _ICE_CHARS.fullmatch(value):
        raise ValueError(
            f"{what} {value[:40]!r} is not {minimum}-{maximum} ICE characters (A-Z a-z 0-9 + /)"
        )


def _normalize_sha256_fingerprint(value: str) -> str:
    digest = value.replace(":", "")
    if len(digest) != 64 or not re.fullmatch(r"[0-9A-Fa-f]{64}", digest):
        raise ValueError(f"fingerprint_sha256 {value[:100]!r} is not 32 hex bytes")
    digest = digest.upper()
    return ":".join(digest[i : i + 2] for i in range(0, 64, 2))
