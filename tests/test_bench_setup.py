"""Smoke tests of `voxrelay bench setup`: a real fleet, a real aiortc server, real calls.

The end-to-end test runs the benchmark through the CLI with tiny parameters and checks what
it writes (the JSON, a real PNG, the table) and that it leaves no process behind. It never
asserts timings, only what causality fixes (a call cannot hear its echo before DTLS is up).
The other tests pin down what would silently skew the comparison: the aiortc baseline must
echo the caller's packets untouched, as voxrelay's echo backend does, and the statistics
must be right.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiortc.rtp import RtpPacket

from voxrelay.bench.setup_bench import (
    MILESTONES,
    TARGET_CONNECTED_MS,
    TARGET_FIRST_ECHO_MS,
    AiortcEchoProcess,
    BenchCall,
    CallerSettings,
    encoded_tone,
    percentile,
)

from fleet import still_running_after

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow
def test_bench_setup_writes_json_png_and_table_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "voxrelay",
            "bench",
            "setup",
            *("--calls", "3", "--duration", "2", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((out / "setup.json").read_text())
    assert data["benchmark"] == "voxrelay bench setup"
    assert data["schema_version"] == 1
    settings = data["settings"]
    assert (settings["calls"], settings["steady_calls"], settings["duration_s"]) == (3, 3, 2.0)
    assert (settings["concurrency"], settings["burst"], settings["target"]) == (1, False, None)

    for name in ("voxrelay", "aiortc"):
        setup = data["setup"][name]
        assert (setup["calls"], setup["echoing"], setup["failed"]) == (3, 3, 0), setup["errors"]
        assert set(setup["milestones_ms"]) == set(MILESTONES)
        for milestone, stats in setup["milestones_ms"].items():
            assert stats["n"] == 3, (name, milestone)
            assert 0 < stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"]
        for call in setup["per_call"]:
            at = call["milestones_ms"]
            assert call["error"] is None and call["echoed"] >= 1
            # What causality orders (not timings): each step needs the one before.
            assert at["answer"] < at["ice_check"] <= at["ice_connected"] <= at["connected"]
            assert at["connected"] < at["first_echo"]

        steady = data["steady"][name]
        assert steady["calls"] == 3
        assert steady["sent_packets"] > 0 and steady["echoed_packets"] > 0
        assert 0 <= steady["echo_loss"] < 1
        assert steady["caller"]["cpu_s"] > 0
        assert steady["caller"]["cpu_us_per_echoed_packet"] > 0

    vox, aiortc = data["steady"]["voxrelay"], data["steady"]["aiortc"]
    assert set(vox["processes"]) == {"transceiver", "relay"}
    assert vox["processes"]["transceiver"]["cpu_s"] > 0
    assert vox["processes"]["transceiver"]["cpu_us_per_echoed_packet"] > 0
    assert vox["processes"]["relay"]["cpu_s"] >= 0  # a few hundred packets: maybe < 1 tick
    assert vox["transceiver_datagrams"]["datagrams_in"] > 0
    assert vox["transceiver_datagrams"]["datagrams_out"] > 0
    assert set(aiortc["processes"]) == {"server"}
    assert aiortc["processes"]["server"]["cpu_us_per_echoed_packet"] > 0
    assert data["ratios"]["transceiver_over_aiortc"] > 0

    targets = data["targets"]
    assert targets["connected_median_ms"]["target_max"] == TARGET_CONNECTED_MS
    assert targets["first_echo_median_ms"]["target_max"] == TARGET_FIRST_ECHO_MS
    assert all(isinstance(t["pass"], bool) for t in targets.values())

    assert (out / "setup.png").read_bytes().startswith(PNG_MAGIC)
    assert "first echoed RTP" in result.stdout
    assert "PASS" in result.stdout or "MISS" in result.stdout

    # Nothing left running: the temporary fleet and the aiortc server are gone.
    pids = [pid for group in data["servers"]["voxrelay"]["pids"].values() for pid in group]
    pids += data["servers"]["aiortc"]["pids"]["server"]
    assert len(pids) == 3
    assert still_running_after(pids, timeout=5) == []


def test_aiortc_baseline_echoes_the_callers_packets_untouched() -> None:
    """No transcoding: every payload the caller hears is one it sent, byte for byte."""
    packets = encoded_tone()

    class RecordingCall(BenchCall):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.payloads: list[bytes] = []

        def _on_echo(self, data: bytes) -> None:
            super()._on_echo(data)
            self.payloads.append(RtpPacket.parse(data).payload)

    server = AiortcEchoProcess()
    try:

        async def call() -> RecordingCall:
            settings = CallerSettings(bearer=None, call_timeout=10, prompt_ice=False)
            bench_call = RecordingCall(server.info["whip_url"], packets, settings)
            async with ClientSession() as http:
                await bench_call.dial(http)
                bench_call.answer_sdp = bench_call.pc.remoteDescription.sdp
                await asyncio.sleep(0.5)
                await bench_call.hang_up(http)
            return bench_call

        result = asyncio.run(call())
    finally:
        server.close()
    assert result.error == "", result.error
    # Like voxrelay's answers, the baseline's name loopback only: no benchmark traffic
    # goes to the machine's LAN address.
    candidates = [line for line in result.answer_sdp.splitlines() if "a=candidate" in line]
    assert candidates and all(" 127.0.0.1 " in line for line in candidates), candidates
    assert len(result.payloads) >= 10
    assert set(result.payloads) <= set(packets)
    assert server.process.returncode == 0  # it stopped at the end of its input


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    assert percentile([], 0.95) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile(list(range(1, 21)), 0.95) == pytest.approx(19.05)
    assert percentile([1.0, 2.0], 1.0) == 2.0
