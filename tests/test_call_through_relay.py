"""Whole calls through the whole fleet: `voxrelay up` with relay workers and transceivers.

An aiortc caller POSTs its offer to WHIP, gets an answer whose only candidate is the relay,
and its ICE checks, DTLS handshake and SRTP audio go caller -> relay worker -> transceiver
-> echo -> transceiver -> relay worker -> caller, all real processes and sockets.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request

import pytest
from aiohttp import ClientSession
from aiortc_caller import whip_call
from localfleet import LocalFleet

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fleet(tmp_path):
    local = LocalFleet(tmp_path)
    up = local.cli("up", "--detach")
    assert "signaling: http://127.0.0.1:" in up.stdout, up.stdout
    try:
        yield local
    finally:
        local.cli("down", "--now", check=False)


def test_aiortc_calls_through_the_relay_hear_their_echo(fleet):
    status = fleet.status()
    whip = status["signaling_url"] + "whip"
    relay_port = status["relay"]["port"]
    assert len(status["local_transceivers"]) == 2

    async def calls():
        return await asyncio.gather(
            *(whip_call(whip, seconds=2.5, frequency=f) for f in (300, 500, 700, 900))
        )

    results = asyncio.run(calls())
    for result, frequency in zip(results, (300, 500, 700, 900), strict=True):
        assert result.error == "", result.error
        assert result.status == 201
        candidates = re.findall(r"a=candidate:\S+ 1 udp \d+ (\S+) (\d+) typ host", result.answer)
        assert candidates == [("127.0.0.1", str(relay_port))]  # the relay, nothing else
        assert result.connected, (result.states, fleet.log())
        assert result.loud_frames >= 25, result
        assert abs(result.dominant_frequency() - frequency) < 25
        assert result.delete_status == 200  # whichever sibling took the DELETE

    after = fleet.status()
    created = sum(w["counters"]["routes_created"] for w in after["relay"]["workers"])
    assert created >= 4  # one per call at least (a caller may check from several addresses)
    forwarded = sum(w["counters"]["tx_internal"] for w in after["relay"]["workers"])
    assert forwarded > 4 * 100
    per_transceiver = [fleet.transceiver_status(row) for row in after["local_transceivers"]]
    assert sum(t["calls_started"] for t in per_transceiver) == 4
    assert sum(t["calls"] for t in per_transceiver) == 0  # every DELETE reached its owner


def test_delete_reaching_a_sibling_is_forwarded_to_the_owner(fleet):
    rows = fleet.status()["local_transceivers"]
    owner, sibling = rows[0], rows[1]

    async def run():
        located: asyncio.Future = asyncio.get_running_loop().create_future()
        call = asyncio.create_task(
            whip_call(
                owner["private_url"] + "whip",
                seconds=4.0,
                delete=False,
                on_location=located.set_result,
            )
        )
        location = await asyncio.wait_for(located, 10)
        assert location.startswith(f"/whip/{owner['id']}/")
        await asyncio.sleep(1.0)
        assert fleet.transceiver_status(owner)["connected"] == 1
        async with ClientSession() as http:
            target = sibling["private_url"].rstrip("/") + location
            async with http.delete(target) as response:
                assert response.status == 200
            async with http.delete(target) as response:
                assert response.status == 404
        return await call

    result = asyncio.run(run())
    assert result.connected
    status = fleet.transceiver_status(owner)
    assert status["calls"] == 0
    assert status["calls_ended"] == {"ended by client (DELETE)": 1}


def test_killed_transceiver_is_respawned_and_takes_new_calls(fleet):
    rows = fleet.status()["local_transceivers"]
    victim = rows[0]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        row = next(r for r in fleet.status()["local_transceivers"] if r["id"] == victim["id"])
        if row["alive"] and row["pid"] != victim["pid"] and row.get("private_url"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"transceiver not respawned: {row}\n{fleet.log()}")
    assert row["udp_port"] == victim["udp_port"]  # the relay's directory entry stays right
    result = asyncio.run(whip_call(row["private_url"] + "whip", seconds=1.5))
    assert result.connected and result.loud_frames >= 15, (result, fleet.log())


def _fleet_pids(status: dict) -> list[int]:
    """The supervisor's, its relay workers' and its transceivers' pids."""
    return [
        status["pid"],
        *(worker["pid"] for worker in status["relay"]["workers"]),
        *(row["pid"] for row in status["local_transceivers"]),
    ]


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def test_sigterm_to_every_process_of_the_fleet_still_drains_its_calls(tmp_path):
    """systemd's default KillMode signals every process of the service at once. The
    children wait for the supervisor's drain, so a call in progress keeps its echo through
    the grace period; then the fleet stops cleanly, logging no death."""
    fleet = LocalFleet(tmp_path, drain_seconds=4)
    fleet.cli("up", "--detach")
    try:
        status = fleet.status()
        pids = _fleet_pids(status)

        async def call_stopped_midway():
            call = asyncio.create_task(
                whip_call(status["signaling_url"] + "whip", seconds=3.5, delete=False)
            )
            await asyncio.sleep(1.2)
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            return await call

        result = asyncio.run(call_stopped_midway())
        assert result.connected, (result.states, fleet.log())
        # 3.5 s of 20 ms echoes; a call cut at the signal would hear about a third.
        assert result.loud_frames >= 140, (result, fleet.log())
        deadline = time.monotonic() + 20
        while not _gone(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = fleet.log()
        assert _gone(pids), log
        assert "drained" in log and " died" not in log, log
    finally:
        fleet.cli("down", "--now", check=False)


def test_children_stop_when_their_supervisor_is_killed(tmp_path):
    """A supervisor killed outright (SIGKILL, the OOM killer) takes its relay workers and
    transceivers with it, rather than leaving them running unsupervised."""
    fleet = LocalFleet(tmp_path)
    fleet.cli("up", "--detach")
    try:
        pids = _fleet_pids(fleet.status())
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not _gone(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pids), fleet.log()
    finally:
        fleet.cli("down", "--now", check=False)


RELAY_HOST = """
[fleet]
name = "{name}"
cluster_id = 9
runtime_dir = "{runtime_dir}"
log_format = "text"
[secrets]
token_secrets = ["hex:{secret}"]
[relay]
bind = "127.0.0.1"
port = 0
workers = 2
drain_seconds = 1
[metrics]
port = 0
[transceiver]
count = 0
[redis]
url = "REDIS"
heartbeat_interval = 0.3
mirror_interval = 0.1
"""

TRANSCEIVER_HOST = """
[fleet]
name = "{name}"
cluster_id = 9
runtime_dir = "{runtime_dir}"
log_format = "text"
[secrets]
token_secrets = ["hex:{secret}"]
[relay]
public_address = "127.0.0.1"
port = RELAY_PORT
drain_seconds = 1
[metrics]
port = 0
[transceiver]
count = 2
first_id = 101
signaling_port = 0
[redis]
url = "REDIS"
heartbeat_interval = 0.3
"""


def test_relay_host_and_transceiver_host_meet_through_redis(tmp_path):
    """etc/two-host on one machine: `voxrelay relay` and `voxrelay transceiver`."""
    from redis_server import RedisServer, require_redis_server

    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    relays = LocalFleet(tmp_path / "a", config=RELAY_HOST.replace("REDIS", server.url))
    relays.cli("relay", "--detach")
    transceivers = None
    try:
        relay_port = relays.status()["relay"]["port"]
        transceivers = LocalFleet(
            tmp_path / "b",
            config=TRANSCEIVER_HOST.replace("REDIS", server.url).replace(
                "RELAY_PORT", str(relay_port)
            ),
        )
        up = transceivers.cli("transceiver", "--detach")
        assert "behind relays 127.0.0.1:" in up.stdout
        status = transceivers.status()
        assert status["role"] == "transceiver" and status["relay"] is None
        assert [row["id"] for row in status["local_transceivers"]] == [101, 102]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            known = {t["id"]: t for t in relays.status()["transceivers"]}
            if {101, 102} <= set(known) and all(known[i]["health"] == "healthy" for i in known):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"relays never saw the transceivers: {relays.status()}")
        text = transceivers.cli("status").stdout
        assert "transceiver #101" in text and "(transceiver)" in text
        # A service manager's reload (etc/systemd) reaches both roles; neither dies of it.
        os.kill(relays.status()["pid"], signal.SIGHUP)
        os.kill(status["pid"], signal.SIGHUP)
        time.sleep(0.3)
        assert transceivers.status()["pid"] == status["pid"]

        result = asyncio.run(whip_call(status["signaling_url"] + "whip", seconds=2.0))
        assert result.connected, (result, relays.log(), transceivers.log())
        assert result.loud_frames >= 20
        assert f" {relay_port} typ host" in result.answer
        with urllib.request.urlopen(status["metrics_url"] + "/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'voxrelay_transceiver_calls_started_total{transceiver="101"}' in metrics
        assert 'voxrelay_transceiver_calls_started_total{transceiver="102"}' in metrics
    finally:
        if transceivers is not None:
            transceivers.cli("down", "--now", check=False)
        relays.cli("down", "--now", check=False)
        server.stop()


def test_hang_up_releases_the_route_at_once(tmp_path):
    local = LocalFleet(tmp_path, transceivers=1, workers=1)
    local.cli("up", "--detach")
    try:
        status = local.status()
        result = asyncio.run(whip_call(status["signaling_url"] + "whip", seconds=1.0))
        assert result.connected and result.delete_status == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = local.status()
            released = sum(w["counters"]["routes_released"] for w in after["relay"]["workers"])
            if released >= 1 and after["routing_table"]["entries"] == 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"route not released: {after}")
        transceiver = local.transceiver_status(after["local_transceivers"][0])
        assert transceiver["routes_released"] >= 1
    finally:
        local.cli("down", "--now", check=False)
