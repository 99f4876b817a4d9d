"""SrtpContext: libsrtp through pylibsrtp's binding, byte for byte what pylibsrtp gives."""

from __future__ import annotations

import contextlib
import os
import struct

import pylibsrtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxrelay.proto.srtp import MAX_PACKET, SrtpContext

PROFILES = {
    "aes128-cm-sha1-80": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "aes128-cm-sha1-32": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 30),
    "aead-aes-128-gcm": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "aead-aes-256-gcm": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
}


def policy(profile: int, key: bytes, *, outbound: bool) -> pylibsrtp.Policy:
    ssrc_type = (
        pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
    )
    return pylibsrtp.Policy(key=key, ssrc_type=ssrc_type, srtp_profile=profile)


def rtp(sequence: int, payload: bytes = b"opus frame") -> bytes:
    return struct.pack("!BBHII", 0x80, 111, sequence, sequence * 960, 0x1234) + payload


def rtcp_receiver_report() -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, 0x1234)


def test_the_direct_binding_is_in_use_with_the_installed_pylibsrtp() -> None:
    """If a pylibsrtp upgrade reshapes its binding, the context still works but slower:
    this fails so that the change is noticed, not discovered in a benchmark."""
    profile, key_size = PROFILES["aead-aes-128-gcm"]
    assert SrtpContext(policy(profile, os.urandom(key_size), outbound=True)).direct
    assert not SrtpContext(
        policy(profile, os.urandom(key_size), outbound=True), direct=False
    ).direct


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_both_paths_protect_byte_for_byte_like_pylibsrtp(name: str) -> None:
    profile, key_size = PROFILES[name]
    key = os.urandom(key_size)
    reference = pylibsrtp.Session(policy(profile, key, outbound=True))
    direct = SrtpContext(policy(profile, key, outbound=True))
    portable = SrtpContext(policy(profile, key, outbound=True), direct=False)
    for sequence in range(65_530, 65_540):  # across the rollover
        packet = rtp(sequence & 0xFFFF)
        expected = reference.protect(packet)
        assert direct.protect(packet) == expected
        assert portable.protect(packet) == expected
    report = rtcp_receiver_report()
    expected = reference.protect_rtcp(report)
    assert direct.protect_rtcp(report) == expected
    assert portable.protect_rtcp(report) == expected


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("direct", [True, False])
def test_what_one_end_protects_the_other_unprotects(name: str, direct: bool) -> None:
    profile, key_size = PROFILES[name]
    key = os.urandom(key_size)
    sender = pylibsrtp.Session(policy(profile, key, outbound=True))
    receiver = SrtpContext(policy(profile, key, outbound=False), direct=direct)
    for sequence in range(5):
        assert receiver.unprotect(sender.protect(rtp(sequence))) == rtp(sequence)
    assert receiver.unprotect_rtcp(sender.protect_rtcp(rtcp_receiver_report())) == (
        rtcp_receiver_report()
    )


@pytest.mark.parametrize("direct", [True, False])
def test_tampered_replayed_and_oversized_packets_are_refused(direct: bool) -> None:
    profile, key_size = PROFILES["aes128-cm-sha1-80"]
    key = os.urandom(key_size)
    sender = SrtpContext(policy(profile, key, outbound=True), direct=direct)
    receiver = SrtpContext(policy(profile, key, outbound=False), direct=direct)
    first = sender.protect(rtp(1))
    tampered = first[:-1] + bytes([first[-1] ^ 1])
    with pytest.raises(pylibsrtp.Error, match="authentication"):
        receiver.unprotect(tampered)
    assert receiver.unprotect(first) == rtp(1)  # the tampered copy did not spend the index
    with pytest.raises(pylibsrtp.Error, match="replay"):
        receiver.unprotect(first)
    with pytest.raises(pylibsrtp.Error):
        receiver.unprotect_rtcp(b"\x80\xc9\x00\x01" + bytes(30))
    with pytest.raises(ValueError):
        sender.protect(rtp(2, bytes(MAX_PACKET)))
    assert sender.protect(rtp(2, bytes(MAX_PACKET - 12)))  # the limit itself fits


@settings(max_examples=200)
@given(data=st.binary(max_size=300))
def test_hostile_srtp_raises_only_pylibsrtp_error(data: bytes) -> None:
    profile, key_size = PROFILES["aead-aes-128-gcm"]
    receiver = SrtpContext(policy(profile, bytes(key_size), outbound=False))
    for unprotect in (receiver.unprotect, receiver.unprotect_rtcp):
        with contextlib.suppress(pylibsrtp.Error):  # anything else fails the test
            unprotect(data)
