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
    assert after["routing_table"]["entries"] >= 4
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
