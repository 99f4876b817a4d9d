"""End-to-end tests of the relay fleet: real processes, real UDP sockets, a real Redis.

Each test starts a fleet with `voxrelay up --detach`, drives it with real STUN binding
requests and RTP-shaped datagrams, and checks what arrives where.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from voxrelay.proto.relay_header import encode_header, encode_record
from voxrelay.proto.token import mint_token

from fleet import (
    CLUSTER,
    SECRET,
    Client,
    FakeTransceiver,
    Fleet,
    binding_request,
    kill_quietly,
    process_running,
    rtp_packet,
    running_fleet,
    wait_until,
)
from redis_server import RedisServer, require_redis_server

pytestmark = pytest.mark.slow


@pytest.fixture
def transceiver():
    t = FakeTransceiver(1)
    yield t
    t.close()


def _establish(fleet, client: Client, transceiver: FakeTransceiver) -> None:
    """Send a valid binding request and wait for the echo: the route exists both ways."""
    client.send(binding_request(fleet.token(transceiver.id)))
    wait_until(lambda: transceiver.payloads_from(client.address), what="STUN at transceiver")
    replies = client.receive_all(0.3)
    assert replies and replies[0].startswith(b"echo:")


def test_valid_stun_creates_route_and_media_follows_both_ways(tmp_path, transceiver):
    with running_fleet(tmp_path, [transceiver]) as fleet:
        client = Client(fleet.relay)
        request = binding_request(fleet.token())
        client.send(request)
        wait_until(lambda: transceiver.payloads_from(client.address), what="STUN forwarded")
        # The transceiver saw the exact bytes and the client's address in the relay header.
        assert transceiver.payloads_from(client.address)[0] == request
        assert client.receive_all(0.3) == [b"echo:" + request]
        # Later non-STUN packets follow the route, both ways, from the public port.
        for seq in range(20):
            client.send(rtp_packet(seq))
        wait_until(lambda: len(transceiver.payloads_from(client.address)) == 21, what="media")
        echoes = client.receive_all(0.5)
        assert sorted(echoes) == sorted(b"echo:" + rtp_packet(s) for s in range(20))
        status = fleet.status()
        assert status["routing_table"]["entries"] == 1
        created = sum(w["counters"]["routes_created"] for w in status["relay"]["workers"])
        assert created == 1
        client.close()


def test_status_json_reports_the_fleet(tmp_path, transceiver):
    with running_fleet(tmp_path, [transceiver], workers=2) as fleet:
        status = fleet.status()
        assert status["running"] is True
        relay = status["relay"]
        assert relay["port"] == fleet.relay[1] and relay["port"] != 0
        assert len(relay["workers"]) == 2
        for worker in relay["workers"]:
            assert worker["alive"] and worker["pid"] > 0
            assert {"rx_public", "tx_public", "rx_internal", "tx_internal"} <= set(
                worker["counters"]
            )
            assert "bad_token" in worker["drops"]
        assert status["routing_table"]["capacity"] == 1000
        assert status["routing_table"]["memory_bytes"] > 0
        assert status["transceivers"] == [
            {"id": 1, "address": f"127.0.0.1:{transceiver.port}", "health": "healthy", "load": 0.0}
        ]
        assert "signaling_url" in status
        text = fleet.cli("status").stdout
        assert "routes" in text and "workers" in text
        # Prometheus metrics are served too.
        import urllib.request

        with urllib.request.urlopen(status["metrics_url"] + "/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "voxrelay_relay_packets_total" in body
        assert "voxrelay_routing_table_entries" in body
        assert 'voxrelay_relay_drops_total{reason="bad_token",worker="0"}' in body


def test_forged_tokens_and_floods_create_no_routes_and_crash_nothing(tmp_path, transceiver):
    with running_fleet(tmp_path, [transceiver], workers=2) as fleet:
        pids_before = sorted(fleet.worker_pids())
        rng = random.Random(1234)
        good = fleet.token()
        forged = [
            good[:-1] + ("A" if good[-1] != "A" else "B"),  # bad MAC
            mint_token(b"another-secret-not-ours-0123456789", 7, 1),  # unknown key
            mint_token(bytes(range(32)), 8, 1),  # wrong cluster
            mint_token(bytes(range(32)), 7, 999),  # unknown transceiver
            good[:10],  # truncated
            "",
            "x" * 300,
        ]
        unusable_stun = _unusable_stun(good)
        attackers = [Client(fleet.relay) for _ in range(20)]
        for i, attacker in enumerate(attackers):
            for token in forged:
                attacker.send(binding_request(token or "x", f"c{i}"))
            for message in unusable_stun:  # whole STUN messages that cannot create a route
                attacker.send(message)
            for _ in range(20):  # random garbage of every shape
                attacker.send(rng.randbytes(rng.randint(0, 1400)))
            # Truncated STUN: the header's length runs past the datagram, so by RFC 7983
            # demultiplexing plus the length check this is not STUN at all: no_route.
            for n in range(0, 40, 3):
                attacker.send(binding_request(good)[:n])
            attacker.send(rtp_packet(1))
        time.sleep(1.0)
        status = fleet.status()
        assert status["routing_table"]["entries"] == 0
        workers = status["relay"]["workers"]
        drops: dict[str, int] = {}
        for worker in workers:
            for reason, value in worker["drops"].items():
                drops[reason] = drops.get(reason, 0) + value
        # Every datagram a worker read was dropped for exactly one reason (UDP loss on the
        # way in, if any, changes both sides alike); nothing reached a transceiver.
        assert sum(drops.values()) == sum(w["counters"]["rx_public"] for w in workers)
        assert sum(w["counters"]["tx_internal"] for w in workers) == 0
        assert drops["bad_token"] >= 20 * 4
        assert drops["wrong_cluster"] >= 20
        assert drops["unknown_transceiver"] >= 20
        assert drops["no_route"] >= 20
        assert drops["bad_stun"] >= 20 * 2
        assert transceiver.received == []
        assert sorted(fleet.worker_pids()) == pids_before  # nobody crashed
        # A legitimate caller still gets through afterwards.
        client = Client(fleet.relay)
        _establish(fleet, client, transceiver)
        for c in [*attackers, client]:
            c.close()


def _unusable_stun(token: str) -> list[bytes]:
    """Well-formed STUN that must count as bad_stun: a binding request without USERNAME,
    and a binding indication and a success response that carry a valid token (only a
    request may create a route)."""
    from aioice import stun

    without_username = stun.Message(
        message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST
    )
    without_username.attributes["PRIORITY"] = 1
    without_username.add_fingerprint()
    messages = [bytes(without_username)]
    for message_class in (stun.Class.INDICATION, stun.Class.RESPONSE):
        message = stun.Message(message_method=stun.Method.BINDING, message_class=message_class)
        message.attributes["USERNAME"] = f"{token}:cli1"
        message.add_fingerprint()
        messages.append(bytes(message))
    return messages


def test_internal_side_is_not_an_open_reflector(tmp_path):
    owner, other = FakeTransceiver(1, echo=False), FakeTransceiver(2, echo=False)
    try:
        with running_fleet(tmp_path, [owner, other]) as fleet:
            client = Client(fleet.relay)
            client.send(binding_request(fleet.token(1)))
            wait_until(lambda: owner.received, what="route to transceiver 1")
            relay_internal = owner.received[0][2]
            # The owner can reach the client.
            owner.send_to_client(client.address, b"hello", relay_internal)
            assert client.receive_all(0.3) == [b"hello"]
            # Another registered transceiver cannot reach a client it does not own.
            other.send_to_client(client.address, b"hijack", relay_internal)
            # Nobody can reach an address without a route.
            stranger = Client(fleet.relay)
            owner.send_to_client(stranger.address, b"reflect", relay_internal)
            # An unregistered source cannot use the internal port at all.
            rogue = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            from voxrelay.proto.relay_header import encode_header

            rogue.sendto(encode_header(*client.address) + b"spoof", relay_internal)
            owner.sock.sendto(b"\x01\x04short", relay_internal)  # bad header
            assert client.receive_all(0.3) == []
            assert stranger.receive_all(0.1) == []
            drops: dict[str, int] = {}
            for worker in fleet.status()["relay"]["workers"]:
                for reason, value in worker["drops"].items():
                    drops[reason] = drops.get(reason, 0) + value
            assert drops["internal_wrong_transceiver"] == 1
            assert drops["internal_no_route"] == 1
            assert drops["internal_unknown_source"] == 1
            assert drops["internal_bad_header"] == 1
            rogue.close()
            client.close()
            stranger.close()
    finally:
        owner.close()
        other.close()


def _flows_alive(clients, transceiver, seq: int) -> bool:
    for client in clients:
        client.send(rtp_packet(seq))
    time.sleep(0.3)
    return all(rtp_packet(seq) in transceiver.payloads_from(c.address) for c in clients)


def test_kill_9_worker_loses_no_route_and_flows_resume(tmp_path, transceiver):
    with running_fleet(tmp_path, [transceiver], workers=2) as fleet:
        clients = [Client(fleet.relay) for _ in range(16)]
        for client in clients:
            _establish(fleet, client, transceiver)
        assert fleet.status()["routing_table"]["entries"] == 16
        for round_number in range(2):
            victim = fleet.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda v=victim: v not in fleet.worker_pids() and len(fleet.worker_pids()) == 2,
                what="worker respawned",
            )
            status = fleet.status()
            assert status["routing_table"]["entries"] == 16
            assert sum(w["restarts"] for w in status["relay"]["workers"]) == round_number + 1
            # Every established flow resumes with no new STUN, both ways.
            seq = 1000 + round_number
            wait_until(
                lambda s=seq: _flows_alive(clients, transceiver, s),
                timeout=10,
                what="flows after respawn",
            )
            # ...and the echoes come back to each client through the relay.
            for client in clients:
                assert b"echo:" + rtp_packet(seq) in client.receive_all(0.3)
        for client in clients:
            client.close()


def test_sigterm_drains_live_flows_then_stops(tmp_path, transceiver):
    with running_fleet(tmp_path, [transceiver], workers=1, drain_seconds=2) as fleet:
        client = Client(fleet.relay)
        _establish(fleet, client, transceiver)
        os.kill(fleet.supervisor_pid, signal.SIGTERM)
        time.sleep(0.3)
        # During the grace period live flows keep flowing, new routes are refused.
        client.send(rtp_packet(7))
        wait_until(
            lambda: rtp_packet(7) in transceiver.payloads_from(client.address),
            what="flow during drain",
        )
        newcomer = Client(fleet.relay)
        newcomer.send(binding_request(fleet.token()))
        time.sleep(0.3)
        assert transceiver.payloads_from(newcomer.address) == []
        wait_until(
            lambda: not (fleet.runtime_dir / "state.json").exists(),
            timeout=15,
            what="supervisor exit",
        )
        client.close()
        newcomer.close()


def test_ctrl_c_on_foreground_up_drains_and_exits_cleanly(tmp_path, transceiver):
    fleet = Fleet(tmp_path, [transceiver], workers=2, drain_seconds=1.5)
    output = tmp_path / "up.out"
    process = fleet.up_foreground(output)
    try:
        client = Client(fleet.relay)
        _establish(fleet, client, transceiver)  # a route: the table's views are in use
        # Ctrl-C: the terminal signals the whole foreground process group, workers too.
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.3)
        # The supervisor drains: workers keep forwarding live flows through the grace.
        client.send(rtp_packet(9))
        wait_until(
            lambda: rtp_packet(9) in transceiver.payloads_from(client.address),
            what="flow during the drain after Ctrl-C",
        )
        returncode = process.wait(timeout=30)
        client.close()
    finally:
        if process.poll() is None:
            kill_quietly(-process.pid, signal.SIGKILL)
            process.wait()
        fleet.down()
    text = output.read_text(errors="replace")
    assert returncode == 0, text
    for marker in ("Exception ignored", "BufferError", "Traceback", "worker died"):
        assert marker not in text, text
    assert "drained" in text
    assert not (fleet.runtime_dir / "state.json").exists()
    assert not [n for n in os.listdir("/dev/shm") if fleet.name in n]


def test_up_status_down_from_the_cli(tmp_path, transceiver):
    with running_fleet(tmp_path, [transceiver]) as fleet:
        assert fleet.cli("status", "--json").returncode == 0
        second = fleet.cli("up", "--detach", check=False)
        assert second.returncode != 0 and "already running" in second.stderr
        result = fleet.cli("down")
        assert "stopped" in result.stdout
        gone = fleet.cli("status", check=False)
        assert gone.returncode == 3 and "not running" in gone.stdout
        # Shared memory segments are gone too.
        assert not [n for n in os.listdir("/dev/shm") if fleet.name in n]


@pytest.mark.redis
def test_whole_relay_restart_recovers_routes_from_redis_without_stun(tmp_path, transceiver):
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        with running_fleet(tmp_path, [transceiver], redis_url=server.url) as fleet:
            clients = [Client(fleet.relay) for _ in range(5)]
            for client in clients:
                _establish(fleet, client, transceiver)
            r = server.client()
            wait_until(lambda: len(r.keys("voxrelay:7:route:*")) == 5, what="routes mirrored")
            # Kill the whole relay: supervisor and every worker, no cleanup.
            pids = [fleet.supervisor_pid, *fleet.worker_pids()]
            for pid in pids:
                kill_quietly(pid, signal.SIGKILL)
            wait_until(lambda: not any(process_running(p) for p in pids), what="relay dead")
            (fleet.runtime_dir / "state.json").unlink(missing_ok=True)
            fleet.up()  # same config, same public port is not guaranteed: use the new one
            for client in clients:
                client.relay = fleet.relay
            assert fleet.status()["routing_table"]["entries"] == 0
            # Media only, no STUN: the first packets trigger recovery from Redis.
            wait_until(
                lambda: _flows_alive(clients, transceiver, 4242), timeout=10, what="recovered flows"
            )
            status = fleet.status()
            assert status["routing_table"]["entries"] == 5
            for client in clients:
                client.close()


@pytest.mark.redis
def test_redis_stopped_mid_traffic_changes_nothing_for_live_flows(tmp_path, transceiver):
    require_redis_server()
    with RedisServer(tmp_path / "redis") as server:
        with running_fleet(tmp_path, [transceiver], redis_url=server.url) as fleet:
            clients = [Client(fleet.relay) for _ in range(4)]
            for client in clients:
                _establish(fleet, client, transceiver)
            server.stop()
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < 2.0:
                for client in clients:
                    client.send(rtp_packet(5000 + sent))
                sent += 1
                time.sleep(0.02)
            time.sleep(0.3)
            for client in clients:
                got = {p for p in transceiver.payloads_from(client.address)}
                missing = [s for s in range(sent) if rtp_packet(5000 + s) not in got]
                assert missing == [], f"{len(missing)} of {sent} lost while Redis was down"
            status = fleet.status()  # the supervisor still answers promptly
            assert status["redis"]["mirror"]["connected"] is False
            # New callers still get routes while Redis is down.
            newcomer = Client(fleet.relay)
            _establish(fleet, newcomer, transceiver)
            server.start()
            for client in [*clients, newcomer]:
                client.close()


# -- bundles: relay -> transceiver datagrams carrying several client packets -----------------


@contextlib.contextmanager
def _paused(fleet: Fleet) -> Iterator[None]:
    """SIGSTOP the fleet's only worker until the block ends: what arrives meanwhile waits in
    its socket, so the worker then reads full batches (the flood case) deterministically."""
    (worker,) = fleet.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker, signal.SIGCONT)


def _routed_clients(
    fleet: Fleet, transceiver: FakeTransceiver, count: int, ufrag_prefix: str
) -> list[Client]:
    """``count`` clients, each routed by its own binding request, once every request has
    reached the transceiver (which need not echo, unlike :func:`_establish`)."""
    clients = [Client(fleet.relay) for _ in range(count)]
    for index, client in enumerate(clients):
        client.send(binding_request(fleet.token(), f"{ufrag_prefix}{index}"))
    wait_until(
        lambda: all(transceiver.payloads_from(c.address) for c in clients),
        what="every route",
    )
    return clients


def _media(client_index: int, seq: int, size: int) -> bytes:
    """An RTP-shaped datagram of ``size`` bytes that names its client and sequence number."""
    head = bytes([0x80, 111]) + seq.to_bytes(2, "big") + client_index.to_bytes(4, "big")
    return head + bytes(size - len(head))


@pytest.mark.parametrize("bundle_max_bytes", [1472, 576, 0])
def test_a_flood_from_many_clients_arrives_complete_and_in_order(tmp_path, bundle_max_bytes):
    """Bundled (default and a small limit with oversize packets) or not (0): every client's
    packets reach the transceiver in the order sent; bundles respect the limit, a packet too
    big for the limit goes alone as v1, and counters count packets, not datagrams."""
    transceiver = FakeTransceiver(1, echo=False)
    rng = random.Random(bundle_max_bytes)
    try:
        with running_fleet(
            tmp_path, [transceiver], workers=1, bundle_max_bytes=bundle_max_bytes
        ) as fleet:
            clients = _routed_clients(fleet, transceiver, 40, "c")
            sent: dict[tuple, list[bytes]] = {c.address: [] for c in clients}
            with _paused(fleet):
                for seq in range(25):
                    for index, client in enumerate(clients):
                        size = 700 if seq % 5 == 0 else rng.randint(12, 400)  # 700: oversize
                        packet = _media(index, seq, size)
                        client.send(packet)
                        sent[client.address].append(packet)
            total = len(clients) * 26  # binding request + 25 media each
            wait_until(lambda: len(transceiver.received) == total, what="every packet")
            for client in clients:
                assert transceiver.payloads_from(client.address)[1:] == sent[client.address]
            log = transceiver.datagram_log()
            assert transceiver.bad == 0
            assert sum(len(lengths) for _, _, lengths in log) == total
            bundles = [entry for entry in log if entry[0] == "bundle"]
            for kind, size, lengths in log:
                if kind == "v1":
                    assert len(lengths) == 1
                else:
                    assert len(lengths) >= 2 and size <= bundle_max_bytes
                    assert size == sum(28 + n for n in lengths)
                    assert all(28 + n <= bundle_max_bytes for n in lengths)
            counters = fleet.status()["relay"]["workers"][0]["counters"]
            assert counters["tx_internal"] == counters["rx_public"] == total
            assert counters["bundles_out"] == len(bundles)
            if bundle_max_bytes:
                # The paused worker read full batches, so most packets went bundled.
                assert sum(len(lengths) for _, _, lengths in bundles) > total // 2
            else:
                assert bundles == []
            for client in clients:
                client.close()
    finally:
        transceiver.close()


def test_a_live_call_through_the_relay_takes_bundles_and_shrugs_off_malformed_ones(tmp_path):
    """The real transceiver behind a real relay: a call whose packets arrive bundled (the
    worker is paused now and then, so the caller's audio piles up) keeps its audio, while
    malformed bundles sent at the transceiver are dropped and counted, keeping the valid
    records before the fault."""
    from aiortc_caller import whip_call

    from voxrelay.engine.signaling import SignalingServer
    from voxrelay.engine.transceiver import Transceiver, TransceiverSettings

    stranger = encode_record(encode_header("127.0.0.1", 9), rtp_packet(1))  # no such call
    malformed = [
        b"\x02",
        b"\x02\x00\x00",
        stranger + b"\x02\x00\xff\xff" + encode_header("127.0.0.1", 9) + b"short",
        stranger + b"\x03" + stranger[1:],
        encode_record(b"\x01\x04" + bytes(22), b"\x80"),  # header with port 0
    ]
    valid_before_fault = 2  # the two bundles that start with a `stranger` record
    rounds = 5

    async def scenario() -> None:
        settings = TransceiverSettings(
            transceiver_id=1, cluster_id=CLUSTER, token_secrets=[SECRET.hex()]
        )
        transceiver = Transceiver(settings)
        await transceiver.open()
        server = SignalingServer(transceiver)
        await server.start()
        fleet = Fleet(tmp_path, [SimpleNamespace(id=1, port=transceiver.port)], workers=1)
        junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await asyncio.to_thread(fleet.up)
            settings.candidate_port = fleet.relay[1]  # answers name the relay
            call = asyncio.create_task(whip_call(server.url + "whip", seconds=3.0))
            await asyncio.sleep(1.0)
            (worker,) = await asyncio.to_thread(fleet.worker_pids)
            for _ in range(rounds):
                os.kill(worker, signal.SIGSTOP)
                await asyncio.sleep(0.1)
                os.kill(worker, signal.SIGCONT)
                for datagram in malformed:
                    junk.sendto(datagram, ("127.0.0.1", transceiver.port))
                await asyncio.sleep(0.2)
            result = await call
            status = await asyncio.to_thread(fleet.status)
        finally:
            junk.close()
            await asyncio.to_thread(fleet.down)
            transceiver.close()
            await asyncio.sleep(0.05)
            await server.stop()
        assert result.connected, (result.states, fleet.log())
        assert result.loud_frames >= 25, result
        counters = status["relay"]["workers"][0]["counters"]
        assert counters["bundles_out"] > 0  # the call's packets did arrive bundled
        assert transceiver.bundles_out > 0  # and the echoes of a bundle went back as one
        assert transceiver.drops["bad_relay_bundle"] == rounds * len(malformed)
        assert transceiver.drops["unknown_address"] >= rounds * valid_before_fault

    asyncio.run(scenario())


def test_bundled_replies_from_a_transceiver_reach_every_client_in_order(tmp_path):
    """Transceiver -> relay bundles: each record goes to its client from the public port, in
    order, even when one bundle holds more records than a send batch (tiny payloads, batch
    size 8); an empty record releases its client's route; a record for a client without a
    route, and a malformed record, are dropped and counted, the records before them kept."""
    from voxrelay.proto.relay_header import bundle_encode

    transceiver = FakeTransceiver(1, echo=False)
    try:
        with running_fleet(tmp_path, [transceiver], workers=1, batch_size=8) as fleet:
            clients = _routed_clients(fleet, transceiver, 12, "b")
            (relay_internal,) = transceiver.relays
            expected: dict[tuple, list[bytes]] = {c.address: [] for c in clients}
            for round_index in range(6):
                records = []
                for seq in range(3):
                    for index, client in enumerate(clients):
                        payload = bytes([0x80, round_index, seq, index])
                        records.append((client.address, payload))
                        expected[client.address].append(payload)
                transceiver.sock.sendto(bundle_encode(records), relay_internal)  # 36 records
            last = clients[0]
            lone = b"\x80\xffalone"
            expected[last.address].append(lone)
            stranger = ("127.0.0.1", 9)  # no route
            faulty = bundle_encode([(last.address, lone), (stranger, b"\x80lost")])
            faulty += b"\x02\x00\x00\x40" + bytes(24)  # truncated, bad header: the end
            transceiver.sock.sendto(faulty, relay_internal)
            for client in clients:
                got = client.receive_all(0.6)
                assert got == expected[client.address]
            status = fleet.status()
            counters = status["relay"]["workers"][0]["counters"]
            drops = status["relay"]["workers"][0]["drops"]
            assert counters["tx_public"] == 6 * 36 + 1
            assert drops["internal_no_route"] == 1
            assert drops["internal_bad_header"] == 1
            # An empty record is a release: the route goes at once, later replies are lost.
            transceiver.sock.sendto(
                bundle_encode([(last.address, b"\x80bye"), (last.address, b"")]), relay_internal
            )
            assert last.receive_all(0.4) == [b"\x80bye"]
            wait_until(
                lambda: fleet.status()["relay"]["workers"][0]["counters"]["routes_released"] == 1,
                what="the route released",
            )
            transceiver.send_to_client(last.address, b"\x80late", relay_internal)
            assert last.receive_all(0.3) == []
            assert fleet.status()["routing_table"]["entries"] == len(clients) - 1
            for client in clients:
                client.close()
    finally:
        transceiver.close()


@pytest.mark.parametrize(
    ("batch_size", "limit", "shape"),
    [
        (32, 1472, (32, 1472)),  # a batch of 32 fits the region: bytes alone bound a bundle
        (64, 576, (20, 576)),  # at most 576 // 28 records of >= 28 bytes
        (1024, 65507, (341, 9575)),  # 1024 iovecs per message: 341 records, limit lowered
        (1, 1472, (1, 1472)),
    ],
)
def test_bundle_regions_hold_every_bundle_the_byte_limit_allows(batch_size, limit, shape):
    from voxrelay.engine.relay import IOV_MAX, bundle_shape

    assert bundle_shape(batch_size, limit) == shape
    per_bundle, effective = shape
    assert 3 * per_bundle <= IOV_MAX
    assert min(batch_size, effective // 28) <= per_bundle  # records of >= 28 bytes each
