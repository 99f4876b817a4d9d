"""The transceiver in direct mode (no relay): real UDP, real HTTP, aiortc as the caller."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiortc_caller import whip_call

from voxrelay.engine.signaling import SignalingServer
from voxrelay.engine.transceiver import Transceiver, TransceiverSettings
from voxrelay.proto.relay_header import bundle_decode, decode_header, encode_header

pytestmark = pytest.mark.timeout(60)

SECRET = os.urandom(32).hex()
CHROMIUM_OFFER = (
    Path(__file__).parent / "data" / "chromium-156" / "offer.sdp"
    if (Path(__file__).parent / "data" / "chromium-156" / "offer.sdp").exists()
    else Path("/work/shared/captures/chromium-156/offer.sdp")
)


@asynccontextmanager
async def running_transceiver(**overrides):
    settings = TransceiverSettings(
        transceiver_id=7, cluster_id=3, token_secrets=[SECRET], **overrides
    )
    transceiver = Transceiver(settings)
    await transceiver.open()
    server = SignalingServer(transceiver)
    await server.start()
    try:
        yield transceiver, server
    finally:
        transceiver.close()
        await asyncio.sleep(0.05)
        await server.stop()


def test_aiortc_call_hears_its_tone_echoed_and_delete_ends_it():
    async def scenario():
        async with running_transceiver() as (transceiver, server):
            result = await whip_call(server.url + "whip", seconds=2.5, frequency=440)
            assert result.error == ""
            assert result.status == 201, result.answer
            assert result.location.startswith("/whip/7/")
            assert "a=ice-lite" in result.answer
            assert result.connected, result.states
            assert result.loud_frames >= 25, result
            assert abs(result.dominant_frequency() - 440) < 25
            assert result.delete_status == 200
            await asyncio.sleep(0.05)
            assert transceiver.calls == {}
            assert transceiver.calls_ended["ended by client (DELETE)"] == 1
            assert transceiver.connect_times and transceiver.handshake_times

    asyncio.run(scenario())


def test_two_calls_at_once_each_hear_their_own_tone():
    async def scenario():
        async with running_transceiver() as (_, server):
            low, high = await asyncio.gather(
                whip_call(server.url + "whip", seconds=2.5, frequency=330),
                whip_call(server.url + "whip", seconds=2.5, frequency=880),
            )
            for result, frequency in ((low, 330), (high, 880)):
                assert result.connected, result
                assert result.loud_frames >= 20, result
                assert abs(result.dominant_frequency() - frequency) < 25

    asyncio.run(scenario())


def test_bearer_token_is_required_when_configured():
    token = "s3cret-token-for-whip-tests"

    async def scenario():
        async with running_transceiver(signaling_token=token) as (_, server):
            denied = await whip_call(server.url + "whip", seconds=0.1)
            assert denied.status == 401
            allowed = await whip_call(server.url + "whip", seconds=1.0, bearer=token)
            assert allowed.status == 201 and allowed.connected
            assert allowed.delete_status == 200

    asyncio.run(scenario())


def test_bad_offers_get_4xx_with_a_reason_and_cors_preflight_works():
    async def scenario():
        async with running_transceiver(max_sessions=1) as (transceiver, server):
            url = server.url + "whip"
            async with ClientSession() as http:
                async with http.options(url) as response:
                    assert response.status == 204
                    assert response.headers["Access-Control-Allow-Origin"] == "*"
                    assert "Location" in response.headers["Access-Control-Expose-Headers"]
                    assert response.headers["Accept-Post"] == "application/sdp"
                async with http.post(url, data="v=0\r\n", headers=_sdp) as response:
                    assert response.status == 400
                    assert "cannot accept this offer" in await response.text()
                plain = {"Content-Type": "text/plain"}
                async with http.post(url, data="hello", headers=plain) as r:
                    assert r.status == 415
                async with http.post(url, data=b"v" * 100_000, headers=_sdp) as response:
                    assert response.status == 413
                video_only = CHROMIUM_OFFER.read_text().replace("m=audio", "m=video")
                async with http.post(url, data=video_only, headers=_sdp) as response:
                    assert response.status == 400
                    assert "audio" in (await response.text()).lower()
                async with http.post(url, data=CHROMIUM_OFFER.read_text(), headers=_sdp) as r:
                    assert r.status == 201
                    assert r.headers["Access-Control-Allow-Origin"] == "*"
                async with http.post(url, data=CHROMIUM_OFFER.read_text(), headers=_sdp) as r:
                    assert r.status == 503  # max_sessions = 1
                async with http.delete(server.url + "whip/7/nope") as response:
                    assert response.status == 404
                async with http.get(server.url) as response:
                    assert response.status == 200 and "RTCPeerConnection" in await response.text()
                async with http.get(server.url + "metrics") as response:
                    assert "voxrelay_transceiver_calls_started" in await response.text()
            assert len(transceiver.calls) == 1

    asyncio.run(scenario())


def test_garbage_datagrams_are_counted_and_calls_survive():
    async def scenario():
        async with running_transceiver() as (transceiver, server):
            call = asyncio.create_task(whip_call(server.url + "whip", seconds=2.5))
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            junk = [b"", b"\x01", b"\x01\x04" + b"\x00" * 30, b"\x00\x01\x00\x00", b"\x16" * 50]
            junk += [bytes([b]) * 40 for b in range(0, 256, 7)]
            for _ in range(20):
                for datagram in junk:
                    sock.sendto(datagram, ("127.0.0.1", transceiver.port))
                await asyncio.sleep(0.05)
            result = await call
            sock.close()
            assert result.connected and result.loud_frames >= 20, result
            assert sum(transceiver.drops.values()) >= 20 * (len(junk) - 1)

    asyncio.run(scenario())


_sdp = {"Content-Type": "application/sdp"}


def test_configured_certificate_is_the_one_the_answer_fingerprints(tmp_path):
    import time as _time

    from voxrelay.proto.dtls import generate_certificate

    certificate = generate_certificate(_time.time())
    (tmp_path / "cert.pem").write_bytes(certificate.certificate_pem())
    (tmp_path / "key.pem").write_bytes(certificate.private_key_pem())

    async def scenario():
        async with running_transceiver(
            certificate_path=str(tmp_path / "cert.pem"),
            private_key_path=str(tmp_path / "key.pem"),
        ) as (_, server):
            async with ClientSession() as http:
                body = CHROMIUM_OFFER.read_text()
                async with http.post(server.url + "whip", data=body, headers=_sdp) as response:
                    assert response.status == 201
                    return await response.text()

    answer = asyncio.run(scenario())
    assert f"a=fingerprint:sha-256 {certificate.fingerprint('sha-256')}" in answer


@pytest.mark.parametrize("limit", [300, 0])
def test_replies_to_a_relay_bundle_go_back_bundled_within_the_limit(limit):
    """Relay mode: the ICE checks of eight calls arrive in one bundle from a "relay worker"
    socket; every reply goes back to that socket, bundled in datagrams of at most ``limit``
    bytes (or one v1 datagram each when bundling is off), one success per client."""
    import time

    from voxrelay.proto.caller import CallerSession
    from voxrelay.proto.dtls import generate_certificate
    from voxrelay.proto.relay_header import bundle_encode

    async def scenario():
        async with running_transceiver(relay_bundle_max_bytes=limit) as (transceiver, server):
            loop = asyncio.get_running_loop()
            relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            relay.bind(("127.0.0.1", 0))
            relay.settimeout(0.3)
            certificate = generate_certificate(time.time())
            clients = [("127.0.0.1", 41000 + i) for i in range(8)]
            records = []
            async with ClientSession() as http:
                for client in clients:
                    caller = CallerSession(certificate, now=loop.time())
                    offer = caller.offer_sdp(*client)
                    async with http.post(server.url + "whip", data=offer, headers=_sdp) as reply:
                        assert reply.status == 201
                        answer = await reply.text()
                    caller.accept_answer(answer, loop.time())
                    (check,) = caller.datagrams_to_send()
                    records.append((client, check))
            relay.sendto(bundle_encode(records), ("127.0.0.1", transceiver.port))
            datagrams = []
            with contextlib.suppress(TimeoutError):
                while True:
                    datagrams.append(await asyncio.to_thread(relay.recv, 65536))
            relay.close()
            replies = []
            for datagram in datagrams:
                if datagram[0] == 2:
                    assert len(datagram) <= limit
                replies += _relay_records(datagram)
            assert sorted(client for client, _ in replies) == clients
            assert all(payload[:2] == b"\x01\x01" for _, payload in replies)  # binding success
            if limit:
                assert transceiver.bundles_out >= 1 and len(datagrams) < len(clients)
            else:
                assert transceiver.bundles_out == 0 and len(datagrams) == len(clients)

    asyncio.run(scenario())


class _RelayedCaller:
    """A sans-IO caller whose datagrams reach the transceiver as a relay worker forwards
    them: from one "worker" socket, each behind the client's relay header."""

    def __init__(self, transceiver, relay: socket.socket, client: tuple[str, int]) -> None:
        import time

        from voxrelay.proto.caller import CallerSession
        from voxrelay.proto.dtls import generate_certificate

        self.transceiver = transceiver
        self.relay = relay
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.session = CallerSession(generate_certificate(time.time()), now=self.loop.time())
        self.heard: list[bytes] = []
        self.location = ""

    async def dial(self, http: ClientSession, url: str) -> None:
        offer = self.session.offer_sdp(*self.client)
        async with http.post(url, data=offer, headers=_sdp) as reply:
            assert reply.status == 201
            self.location = reply.headers["Location"]
            self.session.accept_answer(await reply.text(), self.loop.time())

    async def pump(self, until, timeout: float = 5.0) -> None:
        """Move datagrams both ways until ``until()``; other clients' replies are dropped."""
        from voxrelay.proto.session import AudioReceived

        deadline = self.loop.time() + timeout
        while not until():
            assert self.loop.time() < deadline, "timed out"
            session = self.session
            timer = session.get_timer()
            if timer is not None and timer <= self.loop.time():
                session.handle_timer(self.loop.time())
            self.forward()
            await asyncio.sleep(0.005)
            with contextlib.suppress(BlockingIOError):
                while True:
                    for client, payload in _relay_records(self.relay.recv(65536)):
                        if client == self.client and payload:
                            session.receive_datagram(payload, self.loop.time())
            while (event := session.next_event()) is not None:
                if isinstance(event, AudioReceived):
                    self.heard.append(event.payload)

    def forward(self) -> None:
        """Send the caller's pending datagrams as the relay worker would forward them."""
        header = encode_header(*self.client)
        for datagram in self.session.datagrams_to_send():
            self.relay.sendto(header + datagram, ("127.0.0.1", self.transceiver.port))

    async def talk(self, frames: list[bytes]) -> None:
        """Send ``frames`` and wait for their echo."""
        for frame in frames:
            self.session.send_audio(frame, self.loop.time())
        await self.pump(lambda: set(frames) <= set(self.heard))


def test_relayed_media_follows_its_address_to_a_newer_call_and_stops_with_it():
    """Relayed media finds its call by the client's relay header without decoding it. When
    a new call's ICE check takes over an address an older call held (a client that restarted
    behind the same NAT port), that address's media goes to the new call; hanging up the old
    call leaves the new one's route alone; after the new call ends its media is dropped."""

    async def scenario():
        async with running_transceiver() as (transceiver, server):
            relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            relay.bind(("127.0.0.1", 0))
            relay.setblocking(False)
            client = ("127.0.0.1", 42000)
            async with ClientSession() as http:
                old = _RelayedCaller(transceiver, relay, client)
                await old.dial(http, server.url + "whip")
                await old.pump(lambda: old.session.is_connected)
                await old.talk([b"old %d" % i for i in range(5)])

                new = _RelayedCaller(transceiver, relay, client)
                await new.dial(http, server.url + "whip")
                await new.pump(lambda: new.session.is_connected)
                await new.talk([b"new %d" % i for i in range(5)])
                old_call = next(c for c in transceiver.calls.values() if c.id in old.location)
                assert old_call.session.drops["srtp_auth_failed"] == 0  # none went astray

                async with http.delete(server.url.rstrip("/") + old.location) as reply:
                    assert reply.status == 200
                await new.talk([b"after %d" % i for i in range(5)])

                async with http.delete(server.url.rstrip("/") + new.location) as reply:
                    assert reply.status == 200
                assert transceiver.calls == {}
                before = transceiver.drops["unknown_address"]
                new.session.send_audio(b"into the void", asyncio.get_running_loop().time())
                new.forward()
                await asyncio.sleep(0.1)
                assert transceiver.drops["unknown_address"] == before + 1
            relay.close()

    asyncio.run(scenario())


def _relay_records(datagram: bytes) -> list[tuple[tuple[str, int], bytes]]:
    """(client, payload) of each reply in a datagram to a relay worker: a bundle or a v1."""
    if datagram[0] == 2:
        return [(client, bytes(payload)) for client, payload in bundle_decode(datagram)]
    return [(decode_header(datagram), datagram[24:])]
