"""Smoke tests of `voxrelay bench relay` and its parts: real processes, real sockets.

The end-to-end test runs the benchmark through the CLI with tiny phases and checks what it
writes (the JSON schema, a real PNG, the table) and that it leaves no process behind. It
never asserts timings: those depend on the machine. The other tests pin down the parts
whose mistakes would silently skew a benchmark: the naive baseline must do the relay's
work (header in front, replies routed by it), and the statistics must be right.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from array import array
from pathlib import Path

import pytest
from click.testing import CliRunner

from voxrelay.bench.loadgen import (
    FLOOD_MARK,
    PROBE,
    PROBE_MARK,
    CounterFile,
    SinkProcess,
    binding_request,
    latency_summary,
)
from voxrelay.bench.naive_forwarder import COUNTERS, NaiveForwarder
from voxrelay.bench.relay_bench import (
    TARGET_FIXED_RATE,
    TARGET_FLAT_OUT,
    WORKER_COUNTS,
    BenchSettings,
    Placement,
    _median_tree,
    ratios,
    relay_bench_command,
    scaling,
)
from voxrelay.proto.relay_header import HEADER_SIZE, bundle_encode, decode_header, encode_header

from fleet import process_running

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _udp(timeout: float = 2.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


@pytest.mark.slow
def test_bench_relay_writes_json_png_and_table_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tiny = ["--duration", "0.3", "--rate", "2000", "--clients", "8", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "voxrelay", "bench", "relay", *tiny],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((out / "relay.json").read_text())
    assert data["benchmark"] == "voxrelay bench relay"
    assert data["schema_version"] == 1
    settings = data["settings"]
    assert (settings["duration_s"], settings["rate_pps"], settings["clients"]) == (0.3, 2000, 8)
    assert (settings["size_bytes"], settings["workers"], settings["repeat"]) == (100, 1, 1)
    assert (settings["bundling"], settings["bundle_max_bytes"]) == (True, 1472)  # the default
    summary = data["summary"]
    for name in ("voxrelay", "naive"):
        flat, fixed = summary[name]["flat_out"], summary[name]["fixed_rate"]
        for key in ("forwarded_pps", "offered_pps", "cpu_us_per_packet", "loss", "saturated"):
            assert key in flat, (name, key)
        assert flat["forwarded_pps"] > 0  # packets really went through each forwarder
        # The relay bundled the flood; the naive forwarder never bundles.
        assert (flat["bundles_out"] > 0) == (name == "voxrelay")
        for key in ("cpu_us_per_packet", "forwarded_pps", "loss"):
            assert key in fixed, (name, key)
        assert set(fixed["rtt_us"]) >= {"p50", "p99"}
        assert set(fixed["added_latency_us"]) == {"p50", "p99"}
        assert set(fixed["direct_rtt_us"]) >= {"p50", "p99"}  # the same phase's baseline
        assert fixed["generator"]["direct_sent"] > 0
        assert fixed["generator"]["received"] > 0  # probes came back through the forwarder
    assert set(summary["direct"]["fixed_rate"]["rtt_us"]) >= {"p50", "p99"}
    flat_ratio = data["ratios"]["cpu_per_packet_flat_out"]
    fixed_ratio = data["ratios"]["cpu_per_packet_fixed_rate"]
    assert (flat_ratio["target_max"], fixed_ratio["target_max"]) == (0.75, 1.2)
    assert isinstance(flat_ratio["pass"], bool) and isinstance(fixed_ratio["pass"], bool)
    assert len(data["rounds"]) == 1 and data["rounds"][0]["order"] == ["voxrelay", "naive"]
    assert isinstance(data["machine_notes"], list)
    assert "sweep" not in data and "scaling" not in data  # one count: the original layout

    assert (out / "relay.png").read_bytes().startswith(PNG_MAGIC)
    assert "CPU µs/packet, flat out" in result.stdout
    assert "relay bundling up to 1472 bytes" in result.stdout
    assert result.stdout.count("\n[") == 4  # one progress line per phase

    _assert_all_stopped(result.stdout, counts=1)


@pytest.mark.slow
def test_bench_relay_sweeps_worker_counts_and_plots_the_scaling(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tiny = ["--duration", "0.3", "--rate", "2000", "--clients", "8", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "voxrelay", "bench", "relay", "--workers", "1,2", *tiny],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    data = json.loads((out / "relay.json").read_text())
    assert data["schema_version"] == 2
    assert data["settings"]["workers"] == [1, 2]
    assert "summary" not in data  # results live in the sweep, one entry per count
    assert [entry["settings"]["workers"] for entry in data["sweep"]] == [1, 2]
    for entry in data["sweep"]:
        assert set(entry) == {"settings", "summary", "ratios", "rounds", "machine_notes"}
        for name in ("voxrelay", "naive"):
            assert entry["summary"][name]["flat_out"]["forwarded_pps"] > 0, name
            assert entry["summary"][name]["fixed_rate"]["generator"]["received"] > 0, name
    summary = data["scaling"]
    assert (summary["worker_counts"], summary["baseline_workers"]) == ([1, 2], 1)
    assert [row["workers"] for row in summary["rows"]] == [1, 2]
    for row in summary["rows"]:
        for name in ("voxrelay", "naive"):
            assert row[name]["forwarded_pps_flat_out"] > 0
            assert row[name]["speedup_vs_first"] > 0
    assert summary["rows"][0]["voxrelay"]["speedup_vs_first"] == 1.0
    # Four busy processes for two workers: bounded unless the machine has 4 usable CPUs.
    assert summary["bounded_by_cores"] == (summary["usable_cpus"] < 4)
    assert (summary["note"] is not None) == summary["bounded_by_cores"]

    assert (out / "relay.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "relay_scaling.png").read_bytes().startswith(PNG_MAGIC)
    assert result.stdout.count("\n[") == 8  # one progress line per phase, both counts
    assert "scaling: forwarded pkt/s flat out (speedup vs 1 worker(s))" in result.stdout
    assert result.stdout.count("CPU µs/packet, flat out") == 2  # a block per count
    _assert_all_stopped(result.stdout, counts=2)


def _assert_all_stopped(stdout: str, counts: int) -> None:
    """Every process the benchmark started (per worker count) is gone."""
    started = re.findall(
        r"fleet pid (\d+) .*workers \[([\d, ]+)\].*pids \[([\d, ]+)\]\), sink pid (\d+)", stdout
    )
    assert len(started) == counts, stdout
    pids = [int(p) for groups in started for group in groups for p in group.split(",")]
    assert [pid for pid in pids if process_running(pid)] == []


def test_naive_forwarder_does_the_relays_work_both_ways(tmp_path: Path) -> None:
    sink, client = _udp(), _udp()
    counters = CounterFile(tmp_path / "naive.counters", COUNTERS, create=True)
    forwarder = NaiveForwarder("127.0.0.1", 0, sink.getsockname(), counters)
    thread = threading.Thread(target=forwarder.run, daemon=True)
    thread.start()
    try:
        public = ("127.0.0.1", forwarder.ports[0])
        # Media before any route is dropped: only a STUN request creates one.
        client.sendto(b"\x80" + bytes(40), public)
        request = binding_request("A" * 24, "cli1")
        client.sendto(request, public)
        data, relay_internal = sink.recvfrom(4096)
        assert decode_header(data) == client.getsockname()
        assert data[HEADER_SIZE:] == request
        client.sendto(b"\x80media", public)
        data, _ = sink.recvfrom(4096)
        assert data == encode_header(*client.getsockname()) + b"\x80media"
        # The transceiver's reply goes to the client named by the header, from the public port.
        sink.sendto(encode_header(*client.getsockname()) + b"reply", relay_internal)
        assert client.recvfrom(4096) == (b"reply", public)
        # A reply from anyone but the transceiver is dropped.
        stranger = _udp()
        stranger.sendto(encode_header(*client.getsockname()) + b"forged", relay_internal)
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recvfrom(4096)
        stranger.close()
    finally:
        forwarder.stop()
        thread.join(timeout=2)
        forwarder.close()
    assert counters.read() == {
        "rx_public": 3, "tx_internal": 2, "rx_internal": 2, "tx_public": 1, "routes": 1,
        "drops": 2,
    }  # fmt: skip
    counters.close()
    sink.close()
    client.close()


def test_sink_counts_the_records_of_a_bundle_and_echoes_probes_and_stun_as_v1(
    tmp_path: Path,
) -> None:
    """The sink stands in for a transceiver: packets are client packets, so a bundle counts
    one per record, and each record that asks for an echo gets its own v1 reply."""
    sink = SinkProcess(tmp_path)
    relay = _udp()
    try:
        probe = bytearray(PROBE.size + 20)
        PROBE.pack_into(probe, 0, PROBE_MARK, 7, 1)
        stun = binding_request("A" * 24, "cli1")
        flood = bytes([FLOOD_MARK]) + bytes(99)
        a, b = ("192.0.2.1", 5000), ("2001:db8::2", 6000)
        bundle = bundle_encode([(a, flood), (b, bytes(probe)), (a, stun), (b, flood)])
        relay.sendto(bundle, sink.address)
        relay.sendto(encode_header(*a) + bytes(probe), sink.address)  # v1 still works
        replies = {relay.recvfrom(4096)[0] for _ in range(3)}
        assert replies == {
            encode_header(*b) + bytes(probe),
            encode_header(*a) + stun,
            encode_header(*a) + bytes(probe),
        }
        counters = sink.read()
        assert (counters["relayed"], counters["echoed"], counters["direct"]) == (5, 3, 0)
    finally:
        relay.close()
        sink.close()


def test_bundle_max_bytes_option_is_off_or_a_datagram_size() -> None:
    result = CliRunner().invoke(relay_bench_command, ["--bundle-max-bytes", "100"])
    assert result.exit_code == 2 and "--bundle-max-bytes" in result.output
    assert "0 (off) or 576..65507" in result.output


def test_workers_option_takes_one_count_or_strictly_increasing_counts() -> None:
    assert WORKER_COUNTS.convert("1", None, None) == (1,)
    assert WORKER_COUNTS.convert("64", None, None) == (64,)
    assert WORKER_COUNTS.convert("1,2,4", None, None) == (1, 2, 4)
    assert WORKER_COUNTS.convert(" 2, 8 ", None, None) == (2, 8)
    assert WORKER_COUNTS.convert(3, None, None) == (3,)


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("0", "0 is not in 1..64"),
        ("65", "65 is not in 1..64"),
        ("1,-2", "-2 is not in 1..64"),
        ("2,1", "counts must strictly increase, 1 follows 2"),
        ("1,1", "counts must strictly increase, 1 follows 1"),
        ("1,,2", "'' is not a whole number"),
        ("two", "'two' is not a whole number"),
        ("1.5", "'1.5' is not a whole number"),
    ],
)
def test_workers_option_rejects_bad_counts_before_running(value: str, complaint: str) -> None:
    result = CliRunner().invoke(relay_bench_command, ["--workers", value])
    assert result.exit_code == 2, result.output
    assert "--workers" in result.output and complaint in result.output


def test_pinning_falls_back_to_none_when_workers_leave_no_cpu_for_the_load() -> None:
    pinned = Placement.plan(1, True, cpus=[0, 1])
    assert (pinned.forwarder_cpus, pinned.load_cpus, pinned.note) == ([1], [0], None)
    assert Placement.plan(3, True, cpus=[0, 1, 2, 3]).forwarder_cpus == [1, 2, 3]
    for workers in (2, 8, 64):  # as many workers as CPUs, or more: nothing pinned, a note
        crowded = Placement.plan(workers, True, cpus=[0, 1])
        assert (crowded.forwarder_cpus, crowded.load_cpus) == (None, None)
        assert crowded.note and "nothing is pinned" in crowded.note
        assert crowded.forwarder_cpu(workers - 1) is None
    assert Placement.plan(64, False, cpus=[0, 1]) == Placement(None, None, None)


def _settings(workers: int, usable_cpus: int, pin: bool = True) -> BenchSettings:
    cpus = list(range(usable_cpus))
    return BenchSettings(
        duration=1.0,
        rate=1000.0,
        clients=4,
        size=100,
        workers=workers,
        repeat=1,
        placement=Placement.plan(workers, pin, cpus=cpus),
        usable_cpus=usable_cpus,
    )


def test_machine_notes_say_when_the_load_shares_the_forwarders_cores() -> None:
    roomy = _settings(2, usable_cpus=8)
    assert (roomy.cpu_oversubscribed, roomy.machine_notes()) == (False, [])
    assert roomy.as_dict()["busy_processes"] == 4
    pinned = _settings(1, usable_cpus=2)  # forwarder alone on a core, load on the other
    assert pinned.cpu_oversubscribed
    assert [note for note in pinned.machine_notes() if "may bound the offered load" in note]
    crowded = _settings(4, usable_cpus=2)
    notes = crowded.machine_notes()
    assert len(notes) == 2 and "nothing is pinned" in notes[0]
    assert "bounded by the machine's cores" in notes[1]
    unpinned = _settings(2, usable_cpus=2, pin=False)
    assert len(unpinned.machine_notes()) == 1  # no pinning asked for, so no pinning note


def _count_entry(settings: BenchSettings, vox_pps: float, naive_pps: float) -> dict:
    def side(pps: float) -> dict:
        return {
            "flat_out": {"forwarded_pps": pps, "cpu_us_per_packet": 1e6 / pps, "saturated": True},
            "fixed_rate": {"cpu_us_per_packet": 3.0},
        }

    return {
        "settings": settings.as_dict(),
        "summary": {"voxrelay": side(vox_pps), "naive": side(naive_pps)},
    }


def test_scaling_reports_speedup_over_the_first_count_and_the_cores_bound() -> None:
    entries = [
        _count_entry(_settings(2, usable_cpus=8), 400_000, 100_000),
        _count_entry(_settings(4, usable_cpus=8), 700_000, 250_000),
    ]
    summary = scaling(entries)
    assert (summary["worker_counts"], summary["baseline_workers"]) == ([2, 4], 2)
    first, second = summary["rows"]
    assert first["voxrelay"]["speedup_vs_first"] == 1.0
    assert second["voxrelay"]["speedup_vs_first"] == pytest.approx(1.75)
    assert second["naive"]["speedup_vs_first"] == pytest.approx(2.5)
    assert second["forwarded_pps_flat_out_voxrelay_over_naive"] == pytest.approx(2.8)
    assert second["naive"]["cpu_us_per_packet_flat_out"] == pytest.approx(4.0)
    assert (summary["bounded_by_cores"], summary["note"]) == (False, None)  # 4 + 2 <= 8 CPUs
    bounded = scaling([*entries, _count_entry(_settings(8, usable_cpus=8), 9e5, 3e5)])
    assert bounded["bounded_by_cores"] and "bounded by this machine's 8" in bounded["note"]


def test_latency_summary_uses_nearest_rank_percentiles() -> None:
    samples = array("q", [(i + 1) * 1000 for i in range(100)])  # 1..100 µs, shuffled below
    samples = array("q", sorted(samples, key=lambda v: (v * 7919) % 101))
    summary = latency_summary(samples)
    assert (summary["count"], summary["p50"], summary["p99"], summary["max"]) == (100, 50, 99, 100)
    assert summary["mean"] == pytest.approx(50.5)
    assert latency_summary(array("q"))["count"] == 0


def test_probe_layout_fits_the_smallest_datagram() -> None:
    probe = bytearray(PROBE.size)
    PROBE.pack_into(probe, 0, PROBE_MARK, 7, 123456789)
    assert probe[0] == PROBE_MARK and 128 <= probe[0] <= 191  # RTP range: never STUN
    assert PROBE.unpack_from(probe)[1:] == (7, 123456789)


def _round(vox_flat: float, naive_flat: float, vox_rate: float, naive_rate: float) -> dict:
    def side(flat: float, rate: float) -> dict:
        return {
            "flat_out": {"cpu_us_per_packet": flat, "forwarded_pps": 1e6 / flat},
            "fixed_rate": {"cpu_us_per_packet": rate},
        }

    return {"voxrelay": side(vox_flat, vox_rate), "naive": side(naive_flat, naive_rate)}


def test_ratios_are_medians_of_per_round_ratios_with_targets() -> None:
    rounds = [_round(2.0, 4.0, 12, 12), _round(3.0, 4.0, 14, 10), _round(6.0, 8.0, 11, 10)]
    result = ratios(rounds)
    flat = result["cpu_per_packet_flat_out"]
    assert flat["voxrelay_over_naive"] == pytest.approx(0.75)  # median of 0.5, 0.75, 0.75
    assert (flat["target_max"], flat["pass"]) == (TARGET_FLAT_OUT, True)
    fixed = result["cpu_per_packet_fixed_rate"]
    assert fixed["voxrelay_over_naive"] == pytest.approx(1.1)  # median of 1.0, 1.4, 1.1
    assert (fixed["target_max"], fixed["pass"]) == (TARGET_FIXED_RATE, True)
    missed = ratios([_round(4.0, 4.0, 13, 10)])
    assert not missed["cpu_per_packet_flat_out"]["pass"]
    assert not missed["cpu_per_packet_fixed_rate"]["pass"]


def test_median_tree_takes_medians_of_numbers_and_all_of_flags() -> None:
    rounds = [
        {"a": {"x": 1.0, "ok": True, "n": None}, "name": "r"},
        {"a": {"x": 5.0, "ok": False, "n": 2}, "name": "r"},
        {"a": {"x": 3.0, "ok": True, "n": 4}, "name": "r"},
    ]
    assert _median_tree(rounds) == {"a": {"x": 3.0, "ok": False, "n": 3.0}, "name": "r"}
