"""`voxrelay bench latency` runs end to end against a fleet it starts itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_latency_probe_hears_its_beeps_and_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "voxrelay",
            "bench",
            "latency",
            "--calls",
            "2",
            "--duration",
            "3",
            "--interval",
            "0.4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "latency.json").read_text())
    assert report["calls_connected"] == 2 and report["errors"] == []
    assert report["beeps_sent"] >= 8
    assert report["beeps_heard"] >= report["beeps_sent"] - 2  # a beep may be cut by hang-up
    stats = report["mouth_to_ear_ms"]
    assert 0 < stats["p50"] <= stats["p99"] < 1000
    assert len(report["samples_ms"]) == report["beeps_heard"]
    assert (out / "latency.png").stat().st_size > 1000
    assert "mouth-to-ear ms: p50" in result.stdout
