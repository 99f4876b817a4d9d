"""The relay header (docs/internals.md, "Relay header"): exact bytes, canonical route keys,
and a decoder that rejects every malformed header with RelayHeaderError alone."""

import contextlib
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.errors import ProtocolError
from voxrelay.proto.relay_header import (
    BUNDLE_MARKER,
    FAMILY_IPV4,
    FAMILY_IPV6,
    HEADER_SIZE,
    MAX_RECORD_PAYLOAD,
    RECORD_OVERHEAD,
    RECORD_PREFIX_SIZE,
    VERSION,
    RelayBundleError,
    RelayHeaderError,
    bundle_decode,
    bundle_encode,
    bundle_of_records,
    bundle_records,
    decode_header,
    encode_header,
    encode_record,
    header_from_address,
    route_key_from_sockaddr,
)

ports = st.integers(min_value=1, max_value=65535)


def raw_header(
    version: int = VERSION,
    family: int = FAMILY_IPV4,
    port: int = 5004,
    reserved: int = 0,
    address: bytes = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]),
) -> bytes:
    """Lay out a header field by field, independently of the module under test."""
    return struct.pack("!BBHI", version, family, port, reserved) + address


def test_constants_match_the_contract() -> None:
    assert HEADER_SIZE == 24
    assert VERSION == 1


def test_ipv4_client_is_family_4_with_a_v4_mapped_address() -> None:
    assert encode_header("192.0.2.1", 5004) == bytes.fromhex(
        "01 04 138c 00000000 00000000000000000000ffff c0000201"
    )


def test_ipv6_client_is_family_6() -> None:
    assert encode_header("2001:db8::7", 65535) == bytes.fromhex(
        "01 06 ffff 00000000 20010db8000000000000000000000007"
    )


def test_ipv4_mapped_ipv6_text_gives_the_same_key_as_ipv4_text() -> None:
    assert encode_header("::ffff:192.0.2.1", 5004) == encode_header("192.0.2.1", 5004)
    assert encode_header("::FFFF:c000:201", 5004) == encode_header("192.0.2.1", 5004)


@pytest.mark.parametrize(
    ("host", "port", "decoded_host"),
    [
        ("192.0.2.1", 1, "192.0.2.1"),
        ("0.0.0.0", 80, "0.0.0.0"),
        ("255.255.255.255", 65535, "255.255.255.255"),
        ("::ffff:10.0.0.1", 3478, "10.0.0.1"),
        ("::1", 9, "::1"),
        ("::", 9, "::"),
        ("2001:DB8:0:0:0:0:0:1", 40000, "2001:db8::1"),
        # IPv4-compatible (deprecated) is plain IPv6; the text is spelled as recvfrom does.
        ("::102:304", 7, "::1.2.3.4"),
    ],
)
def test_round_trip(host: str, port: int, decoded_host: str) -> None:
    header = encode_header(host, port)
    assert len(header) == HEADER_SIZE
    assert decode_header(header) == (decoded_host, port)


def test_decode_ignores_the_payload_after_the_header() -> None:
    datagram = encode_header("198.51.100.9", 443) + b"\x16\xfe\xfd payload"
    assert decode_header(datagram) == ("198.51.100.9", 443)


def test_decode_reads_a_memoryview_of_a_larger_buffer() -> None:
    buffer = bytearray(2048)
    buffer[:HEADER_SIZE] = encode_header("2001:db8::42", 1234)
    assert decode_header(memoryview(buffer)) == ("2001:db8::42", 1234)
    assert decode_header(buffer) == ("2001:db8::42", 1234)


def test_relay_header_error_is_a_protocol_error_and_a_value_error() -> None:
    assert issubclass(RelayHeaderError, ProtocolError)
    assert issubclass(RelayHeaderError, ValueError)


@pytest.mark.parametrize("length", range(HEADER_SIZE))
def test_decode_rejects_short_data(length: int) -> None:
    with pytest.raises(RelayHeaderError, match=f"need 24 bytes, got {length}"):
        decode_header(raw_header()[:length])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_decode_rejects_another_version(version: int) -> None:
    with pytest.raises(RelayHeaderError, match=f"version {version}"):
        decode_header(raw_header(version=version))


@pytest.mark.parametrize("family", [0, 2, 5, 10, 41, 255])
def test_decode_rejects_an_unknown_family(family: int) -> None:
    with pytest.raises(RelayHeaderError, match=f"must be 4 or 6, got {family}"):
        decode_header(raw_header(family=family))


def test_decode_rejects_port_zero() -> None:
    with pytest.raises(RelayHeaderError, match="port is 0"):
        decode_header(raw_header(port=0))


@pytest.mark.parametrize("reserved", [1, 0x100, 0x10000, 0x1000000, 0xFFFFFFFF])
def test_decode_rejects_a_nonzero_reserved_field(reserved: int) -> None:
    with pytest.raises(RelayHeaderError, match="reserved field must be zero"):
        decode_header(raw_header(reserved=reserved))


@pytest.mark.parametrize(
    "address",
    [
        bytes(16),
        ipaddress.IPv6Address("2001:db8::1").packed,
        bytes(10) + b"\xff\xfe" + bytes(4),
        b"\x01" + bytes(9) + b"\xff\xff" + bytes(4),
    ],
)
def test_decode_rejects_family_4_without_a_v4_mapped_address(address: bytes) -> None:
    with pytest.raises(RelayHeaderError, match="family 4 needs an IPv4-mapped address"):
        decode_header(raw_header(family=FAMILY_IPV4, address=address))


def test_decode_rejects_family_6_with_a_v4_mapped_address() -> None:
    # Two keys for one client would split its routes; v1 encoders always say family 4.
    with pytest.raises(RelayHeaderError, match="IPv4 clients must be family 4"):
        decode_header(raw_header(family=FAMILY_IPV6))


@pytest.mark.parametrize("port", [0, -1, 65536, 2**64, "5004", 5004.0, None])
def test_encode_rejects_a_port_outside_1_to_65535(port: object) -> None:
    with pytest.raises(RelayHeaderError, match=r"port must be an integer in 1..65535"):
        encode_header("192.0.2.1", port)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "host",
    ["", "localhost", "192.0.2", "192.0.2.256", "1.2.3.4.5", "::g", "1::2::3", "192.0.2.1\x00"],
)
def test_encode_rejects_text_that_is_not_an_address(host: str) -> None:
    with pytest.raises(RelayHeaderError, match="is not an IPv4 or IPv6 address"):
        encode_header(host, 5004)


@pytest.mark.parametrize("host", [b"192.0.2.1", None, 3221225985])
def test_encode_rejects_a_host_that_is_not_text(host: object) -> None:
    with pytest.raises(RelayHeaderError, match="must be IP address text"):
        encode_header(host, 5004)  # type: ignore[arg-type]


def test_encode_rejects_a_scoped_link_local_address() -> None:
    with pytest.raises(RelayHeaderError, match="scope id"):
        encode_header("fe80::1%eth0", 5004)


def test_route_key_from_sockaddr_is_the_relay_header() -> None:
    assert route_key_from_sockaddr(socket.AF_INET, "192.0.2.1", 9) == encode_header("192.0.2.1", 9)
    assert route_key_from_sockaddr(socket.AF_INET6, "2001:db8::1", 9) == encode_header(
        "2001:db8::1", 9
    )
    assert route_key_from_sockaddr(socket.AF_INET6, "::ffff:192.0.2.1", 9) == encode_header(
        "192.0.2.1", 9
    )


def test_route_key_from_sockaddr_rejects_a_family_that_disagrees_with_the_host() -> None:
    with pytest.raises(RelayHeaderError, match="is not IPv4 text"):
        route_key_from_sockaddr(socket.AF_INET, "::1", 9)
    with pytest.raises(RelayHeaderError, match="is not IPv6 text"):
        route_key_from_sockaddr(socket.AF_INET6, "192.0.2.1", 9)


@pytest.mark.parametrize("family", [0, 4, 6, socket.AF_UNIX])
def test_route_key_from_sockaddr_rejects_other_socket_families(family: int) -> None:
    with pytest.raises(RelayHeaderError, match="socket family must be AF_INET"):
        route_key_from_sockaddr(family, "192.0.2.1", 9)


@pytest.mark.parametrize(
    "addr", [("192.0.2.1",), ("::1", 9, 0), "192.0.2.1:9", None, ["192.0.2.1", 9]]
)
def test_header_from_address_rejects_what_recvfrom_never_returns(addr: object) -> None:
    with pytest.raises(RelayHeaderError, match="expected a"):
        header_from_address(addr)  # type: ignore[arg-type]


def test_header_from_address_rejects_a_scope_id() -> None:
    with pytest.raises(RelayHeaderError, match="scope id 2"):
        header_from_address(("fe80::1", 5004, 0, 2))


def _received_from(receiver: socket.socket, sender: socket.socket, target: tuple) -> tuple:
    """Send one datagram over loopback and return the sender address recvfrom reports."""
    sender.sendto(b"ping", target)
    receiver.settimeout(5)
    data, addr = receiver.recvfrom(64)
    assert data == b"ping"
    return addr


def test_header_from_an_ipv4_recvfrom_address_names_the_sender() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        addr = _received_from(receiver, sender, receiver.getsockname())
        assert len(addr) == 2
        assert decode_header(header_from_address(addr)) == sender.getsockname()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
def test_header_from_an_ipv6_recvfrom_address_names_the_sender() -> None:
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(("::1", 0))
        sender.bind(("::1", 0))
        addr = _received_from(receiver, sender, receiver.getsockname()[:2])
        assert len(addr) == 4
        header = header_from_address(addr)
        assert header[1] == FAMILY_IPV6
        assert decode_header(header) == ("::1", sender.getsockname()[1])


@needs_ipv6
def test_an_ipv4_client_of_a_dual_stack_socket_gets_its_ipv4_route_key() -> None:
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        receiver.bind(("::", 0))
        sender.bind(("127.0.0.1", 0))
        addr = _received_from(receiver, sender, ("127.0.0.1", receiver.getsockname()[1]))
        assert addr[0] == "::ffff:127.0.0.1"
        assert header_from_address(addr) == header_from_address(sender.getsockname())
        assert header_from_address(addr)[1] == FAMILY_IPV4


@given(address=st.ip_addresses(v=4), port=ports)
def test_any_ipv4_client_round_trips(address: ipaddress.IPv4Address, port: int) -> None:
    header = encode_header(str(address), port)
    assert header[1] == FAMILY_IPV4
    assert header[8:] == ipaddress.IPv6Address(f"::ffff:{address}").packed
    assert decode_header(header) == (str(address), port)


@given(address=st.ip_addresses(v=6), port=ports)
def test_any_ipv6_client_round_trips(address: ipaddress.IPv6Address, port: int) -> None:
    header = encode_header(str(address), port)
    assert header[8:] == address.packed
    if address.ipv4_mapped is None:
        assert header[1] == FAMILY_IPV6
        host, decoded_port = decode_header(header)
        assert (ipaddress.IPv6Address(host), decoded_port) == (address, port)
    else:
        assert header[1] == FAMILY_IPV4
        assert decode_header(header) == (str(address.ipv4_mapped), port)


def _decode_or_reject(data: bytes) -> tuple[str, int] | None:
    """Decode, letting only RelayHeaderError through as a rejection."""
    try:
        return decode_header(data)
    except RelayHeaderError:
        return None


@settings(max_examples=300)
@given(data=st.binary(max_size=40))
def test_random_bytes_raise_only_relay_header_error(data: bytes) -> None:
    _decode_or_reject(data)


@given(
    address=st.ip_addresses(),
    port=ports,
    edits=st.lists(st.tuples(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255)), max_size=4),
)
def test_a_mutated_header_is_rejected_or_is_the_canonical_key_of_what_it_decodes_to(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    edits: list[tuple[int, int]],
) -> None:
    mutated = bytearray(encode_header(str(address), port))
    for offset, value in edits:
        mutated[offset] = value
    decoded = _decode_or_reject(bytes(mutated))
    if decoded is not None:
        # Whatever a receiver accepts re-encodes to the very same 24 bytes: one key per client.
        assert encode_header(*decoded) == bytes(mutated)


@given(address=st.ip_addresses(), port=ports)
def test_every_truncation_is_rejected(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    header = encode_header(str(address), port)
    for length in range(HEADER_SIZE):
        with pytest.raises(RelayHeaderError):
            decode_header(header[:length])
        with pytest.raises(RelayHeaderError):
            decode_header(memoryview(header)[:length])


# -- bundles (docs/internals.md, "Bundles") ---------------------------------------------------

clients = st.tuples(st.ip_addresses().map(str), ports)
records = st.lists(st.tuples(clients, st.binary(max_size=300)), min_size=1, max_size=12)


def raw_record(header: bytes, payload: bytes, marker: int = 2, reserved: int = 0) -> bytes:
    """Lay out a record field by field, independently of the module under test."""
    return struct.pack("!BBH", marker, reserved, len(payload)) + header + payload


def _canonical(client: tuple[str, int]) -> tuple[str, int]:
    """What a receiver decodes for ``client`` (IPv4-mapped IPv6 comes back as IPv4)."""
    return decode_header(encode_header(*client))


def test_bundle_constants_match_the_contract() -> None:
    assert (BUNDLE_MARKER, RECORD_PREFIX_SIZE, RECORD_OVERHEAD) == (2, 4, 28)
    assert MAX_RECORD_PAYLOAD == 65535


def test_bundle_bytes_are_prefix_header_payload_per_record() -> None:
    bundle = bundle_encode([(("192.0.2.1", 5004), b"\x80abc"), (("2001:db8::7", 9), b"")])
    ipv6 = bytes.fromhex("20010db8" + "00" * 11 + "07")
    assert bundle == raw_record(raw_header(), b"\x80abc") + raw_record(
        raw_header(family=FAMILY_IPV6, port=9, address=ipv6), b""
    )
    assert bundle[0] == BUNDLE_MARKER  # a bundle datagram starts with 2, a v1 one with 1
    assert bundle[:4] == bytes.fromhex("02 00 0004")


def test_bundle_decode_yields_records_in_order_with_payload_slices() -> None:
    bundle = bundle_encode([(("192.0.2.1", 1), b"one"), (("192.0.2.2", 2), b"two!")])
    assert list(bundle_decode(bundle)) == [(("192.0.2.1", 1), b"one"), (("192.0.2.2", 2), b"two!")]
    view = memoryview(bytearray(b"junk" + bundle))[4:]
    decoded = list(bundle_decode(view))
    assert all(isinstance(payload, memoryview) for _, payload in decoded)  # no copies
    assert [(c, bytes(p)) for c, p in decoded] == list(bundle_decode(bundle))


def test_bundle_records_yield_headers_as_route_keys_and_check_framing_only() -> None:
    clients = [("192.0.2.1", 1), ("2001:db8::7", 9)]
    bundle = bundle_encode([(clients[0], b"one"), (clients[1], b"")])
    assert list(bundle_records(bundle)) == [
        (encode_header(*clients[0]), b"one"),
        (encode_header(*clients[1]), b""),
    ]
    # The header's contents are the receiver's to check (it decodes unknown ones) ...
    odd = raw_record(raw_header(version=3), b"x")
    assert list(bundle_records(odd)) == [(raw_header(version=3), b"x")]
    # ... the framing is checked as bundle_decode checks it.
    with pytest.raises(RelayBundleError, match="claims 3 payload bytes") as caught:
        list(bundle_records(GOOD + raw_record(raw_header(), b"abc")[:-1]))
    assert (caught.value.index, caught.value.offset) == (1, len(GOOD))


def test_encode_record_is_what_bundle_encode_joins() -> None:
    header = encode_header("198.51.100.4", 40000)
    assert encode_record(header, b"xy") == b"\x02\x00\x00\x02" + header + b"xy"
    assert bundle_encode([(("198.51.100.4", 40000), b"xy")]) == encode_record(header, b"xy")


def test_bundle_of_records_takes_made_headers_and_encodes_as_bundle_encode() -> None:
    """What a transceiver sends (headers it already holds) is a bundle like any other; an
    empty payload (a route release) is a record too."""
    clients = [("198.51.100.4", 40000), ("2001:db8::7", 9)]
    records = [(encode_header(*clients[0]), b"\x80rtp"), (encode_header(*clients[1]), b"")]
    bundle = bundle_of_records(records)
    assert bundle == bundle_encode([(clients[0], b"\x80rtp"), (clients[1], b"")])
    assert list(bundle_decode(bundle)) == [(clients[0], b"\x80rtp"), (clients[1], b"")]
    with pytest.raises(RelayBundleError, match="at least one record"):
        bundle_of_records([])
    with pytest.raises(RelayBundleError, match="24 bytes"):
        bundle_of_records([(b"short", b"")])


def test_bundle_encode_rejects_what_no_bundle_can_carry() -> None:
    with pytest.raises(RelayBundleError, match="at least one record"):
        bundle_encode([])
    with pytest.raises(RelayBundleError, match="at most 65535"):
        bundle_encode([(("192.0.2.1", 1), bytes(MAX_RECORD_PAYLOAD + 1))])
    with pytest.raises(RelayBundleError, match="24 bytes"):
        encode_record(b"short", b"")
    with pytest.raises(RelayHeaderError):
        bundle_encode([(("not an address", 1), b"")])


def test_relay_bundle_error_is_a_relay_header_error() -> None:
    assert issubclass(RelayBundleError, RelayHeaderError)
    assert issubclass(RelayBundleError, ProtocolError)


GOOD = raw_record(raw_header(), b"\x80good")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"", "empty"),
        (b"\x02", "truncated"),
        (raw_record(raw_header(), b"")[:-1], "truncated"),
        (raw_record(raw_header(), b"", marker=1), "starts with 0100"),
        (raw_record(raw_header(), b"", reserved=7), "starts with 0207"),
        (raw_record(raw_header(), b"abc")[:-1], "claims 3 payload bytes, only 2 left"),
        (raw_record(raw_header(version=3), b"x"), "version"),
        (raw_record(raw_header(reserved=1), b"x"), "reserved"),
        (raw_record(raw_header(family=FAMILY_IPV6), b"x"), "family 6"),
    ],
)
def test_a_malformed_record_ends_the_bundle_after_the_good_ones(bad: bytes, reason: str) -> None:
    decoded = []
    with pytest.raises(RelayBundleError, match=reason) as caught:
        for record in bundle_decode(GOOD + GOOD + bad if bad else b""):
            decoded.append(record)
    if bad:
        assert decoded == [(("192.0.2.1", 5004), b"\x80good")] * 2  # the records before stand
        assert (caught.value.index, caught.value.offset) == (2, 2 * len(GOOD))
    else:
        assert decoded == []


@given(records=records)
def test_any_bundle_round_trips(records: list[tuple[tuple[str, int], bytes]]) -> None:
    bundle = bundle_encode(records)
    assert len(bundle) == sum(RECORD_OVERHEAD + len(p) for _, p in records)
    assert list(bundle_decode(bundle)) == [(_canonical(c), p) for c, p in records]


def _decode_until_rejected(data: bytes) -> tuple[list, bool]:
    """Records up to the first malformed one; True if one was. Only RelayBundleError passes."""
    decoded: list = []
    try:
        for record in bundle_decode(data):
            decoded.append(record)
    except RelayBundleError:
        return decoded, True
    return decoded, False


@settings(max_examples=300)
@given(data=st.binary(max_size=120).map(lambda b: b"\x02" + b))
def test_random_bundles_raise_only_relay_bundle_error(data: bytes) -> None:
    decoded, _ = _decode_until_rejected(data)
    framed: list = []
    with contextlib.suppress(RelayBundleError):
        framed.extend(bundle_records(data))
    # Records bundle_decode accepted are the ones whose framing bundle_records accepted.
    assert [payload for _, payload in decoded] == [p for _, p in framed][: len(decoded)]


@settings(max_examples=300)
@given(
    records=records,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
)
def test_a_mutated_bundle_yields_only_records_that_re_encode_to_its_bytes(
    records: list[tuple[tuple[str, int], bytes]], edits: list[tuple[int, int]], cut: int
) -> None:
    mutated = bytearray(bundle_encode(records))
    for offset, value in edits:
        mutated[offset % len(mutated)] = value
    if cut % 3 == 0:
        del mutated[cut % (len(mutated) + 1) :]
    decoded, rejected = _decode_until_rejected(bytes(mutated))
    # Whatever a receiver accepts is exactly a prefix of the datagram, record by record.
    accepted = b"".join(encode_record(encode_header(*c), p) for c, p in decoded)
    assert bytes(mutated).startswith(accepted)
    assert rejected or accepted == bytes(mutated)
