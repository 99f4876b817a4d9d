"""Interop with a real DTLS 1.2 stack: OpenSSL through pyOpenSSL's memory BIOs.

OpenSSL is the peer in both roles; datagrams move in memory (a memory BIO does not keep
datagram boundaries, but every read holds whole records, which a DTLS receiver accepts).
We check that the handshake completes, that OpenSSL's RFC 5705 exporter agrees with our
SRTP keys, and that application data flows both ways.
"""

from __future__ import annotations

import contextlib

import pytest

from voxrelay.proto.dtls import (
    CLIENT,
    SERVER,
    AlertDescription,
    ApplicationData,
    CipherSuite,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    HandshakeCompleted,
    NamedGroup,
    SrtpProfile,
    generate_certificate,
)

SSL = pytest.importorskip("OpenSSL.SSL", reason="pyOpenSSL is needed for interop tests")
from OpenSSL._util import lib as _openssl_lib  # noqa: E402 - after the importorskip

NOW = 50.0
OURS = generate_certificate(1.7e9)
THEIRS = generate_certificate(1.7e9)

OPENSSL_SUITES = {
    CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256: b"ECDHE-ECDSA-AES128-GCM-SHA256",
    CipherSuite.ECDHE_ECDSA_WITH_AES_256_GCM_SHA384: b"ECDHE-ECDSA-AES256-GCM-SHA384",
    CipherSuite.ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: b"ECDHE-ECDSA-CHACHA20-POLY1305",
}
OPENSSL_GROUPS = {
    NamedGroup.X25519: b"X25519",
    NamedGroup.SECP256R1: b"P-256",
    NamedGroup.SECP384R1: b"P-384",
}
OPENSSL_SRTP = {
    SrtpProfile.AEAD_AES_128_GCM: b"SRTP_AEAD_AES_128_GCM",
    SrtpProfile.AEAD_AES_256_GCM: b"SRTP_AEAD_AES_256_GCM",
    SrtpProfile.AES128_CM_HMAC_SHA1_80: b"SRTP_AES128_CM_SHA1_80",
}


def openssl_context(
    suite: CipherSuite = CipherSuite.ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    group: NamedGroup | None = None,
    srtp: bytes = b"SRTP_AEAD_AES_128_GCM:SRTP_AES128_CM_SHA1_80",
):
    context = SSL.Context(SSL.DTLS_METHOD)
    context.use_certificate(THEIRS.certificate)
    context.use_privatekey(THEIRS.private_key)
    # WebRTC peers are self-signed; identity is the fingerprint, which we check ourselves.
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: True)
    context.set_cipher_list(OPENSSL_SUITES[suite])
    context.set_tlsext_use_srtp(srtp)
    if group is not None:
        # pyOpenSSL has no groups setter; the binding's SSL_CTX_set1_curves_list is it.
        # An OpenSSL TLS 1.2 client also wants the curve of our P-256 certificate listed.
        groups = OPENSSL_GROUPS[group] + b":P-256"
        assert _openssl_lib.SSL_CTX_set1_curves_list(context._context, groups) == 1
    return context


def ours(role, **kwargs) -> DtlsConnection:
    return DtlsConnection(
        role, OURS, expected_remote_fingerprint=("sha-256", THEIRS.fingerprint()), **kwargs
    )


def pump(openssl, connection: DtlsConnection, events: list | None = None, rounds: int = 12):
    """Alternate between the two until neither has anything to say."""
    events = [] if events is None else events
    for _ in range(rounds):
        with contextlib.suppress(SSL.WantReadError):
            openssl.do_handshake()
        moved = False
        while True:
            try:
                data = openssl.bio_read(65536)
            except SSL.WantReadError:
                break
            moved = True
            connection.receive_datagram(data, NOW)
        for datagram in connection.datagrams_to_send(NOW):
            moved = True
            openssl.bio_write(datagram)
        while (event := connection.next_event()) is not None:
            events.append(event)
        if not moved:
            break
    return events


def openssl_handshake_done(openssl) -> bool:
    try:
        openssl.do_handshake()
    except SSL.WantReadError:
        return False
    return True


def completed(events) -> HandshakeCompleted:
    (done,) = [e for e in events if isinstance(e, HandshakeCompleted)]
    return done


def assert_exporter_agrees(openssl, connection: DtlsConnection, done: HandshakeCompleted):
    profile = done.srtp_profile
    length = 2 * (profile.key_length + profile.salt_length)
    theirs = openssl.export_keying_material(b"EXTRACTOR-dtls_srtp", length)
    assert theirs == connection.export_keying_material(b"EXTRACTOR-dtls_srtp", length)
    local_first = connection.role is CLIENT
    client_key = done.local_srtp_key if local_first else done.remote_srtp_key
    server_key = done.remote_srtp_key if local_first else done.local_srtp_key
    assert theirs.startswith(client_key + server_key)


def assert_application_data_flows(openssl, connection: DtlsConnection) -> None:
    connection.send_application_data(b"from voxrelay")
    for datagram in connection.datagrams_to_send(NOW):
        openssl.bio_write(datagram)
    assert openssl.recv(1500) == b"from voxrelay"
    openssl.send(b"from openssl")
    connection.receive_datagram(openssl.bio_read(65536), NOW)
    assert connection.next_event() == ApplicationData(b"from openssl")


@pytest.mark.parametrize("suite", list(CipherSuite))
@pytest.mark.parametrize("group", list(NamedGroup))
def test_openssl_client_against_our_server(suite, group):
    openssl = SSL.Connection(openssl_context(suite, group), None)
    openssl.set_connect_state()
    server = ours(SERVER, configuration=DtlsConfiguration(groups=(group,)))
    events = pump(openssl, server)
    assert openssl_handshake_done(openssl)
    done = completed(events)
    assert (done.cipher_suite, done.group) == (suite, group)
    assert openssl.get_protocol_version_name() == "DTLSv1.2"
    assert openssl.get_selected_srtp_profile() == b"SRTP_AEAD_AES_128_GCM"
    assert done.extended_master_secret
    assert_exporter_agrees(openssl, server, done)
    assert_application_data_flows(openssl, server)


@pytest.mark.parametrize("suite", list(CipherSuite))
@pytest.mark.parametrize("profile", list(OPENSSL_SRTP))
def test_our_client_against_openssl_server(suite, profile):
    openssl = SSL.Connection(openssl_context(suite, srtp=OPENSSL_SRTP[profile]), None)
    openssl.set_accept_state()
    client = ours(CLIENT, srtp_profiles=[profile])
    client.start_handshake(NOW)
    events = pump(openssl, client)
    assert openssl_handshake_done(openssl)
    done = completed(events)
    assert done.cipher_suite is suite and done.srtp_profile is profile
    assert openssl.get_selected_srtp_profile() == OPENSSL_SRTP[profile]
    assert_exporter_agrees(openssl, client, done)
    assert_application_data_flows(openssl, client)


def test_our_client_through_openssl_cookie_exchange():
    context = openssl_context()
    context.set_options(SSL.OP_COOKIE_EXCHANGE)
    context.set_cookie_generate_callback(lambda connection: b"openssl-cookie")
    context.set_cookie_verify_callback(lambda connection, cookie: cookie == b"openssl-cookie")
    openssl = SSL.Connection(context, None)
    openssl.set_accept_state()
    client = ours(CLIENT)
    client.start_handshake(NOW)
    events = pump(openssl, client)
    assert openssl_handshake_done(openssl)
    assert_exporter_agrees(openssl, client, completed(events))


def test_openssl_client_through_our_cookie_exchange():
    openssl = SSL.Connection(openssl_context(), None)
    openssl.set_connect_state()
    server = ours(
        SERVER,
        configuration=DtlsConfiguration(cookie_exchange=True, cookie_secret=bytes(32)),
        peer_address=b"127.0.0.1:5000",
    )
    events = pump(openssl, server)
    assert openssl_handshake_done(openssl)
    assert_exporter_agrees(openssl, server, completed(events))


def test_openssl_client_with_wrong_fingerprint_is_refused():
    openssl = SSL.Connection(openssl_context(), None)
    openssl.set_connect_state()
    server = DtlsConnection(
        SERVER, OURS, expected_remote_fingerprint=("sha-256", OURS.fingerprint())
    )
    events: list = []
    with pytest.raises(SSL.Error, match="bad certificate"):
        pump(openssl, server, events)
    closed = events[-1]
    assert isinstance(closed, ConnectionClosed)
    assert closed.alert is AlertDescription.BAD_CERTIFICATE


def test_close_notify_reaches_openssl():
    openssl = SSL.Connection(openssl_context(), None)
    openssl.set_connect_state()
    server = ours(SERVER)
    pump(openssl, server)
    server.close(NOW)
    for datagram in server.datagrams_to_send(NOW):
        openssl.bio_write(datagram)
    with pytest.raises(SSL.ZeroReturnError):
        openssl.recv(100)
