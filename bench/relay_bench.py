"""``voxrelay bench relay``: the relay worker against a naive Python forwarder, same run.

What it measures, for a real voxrelay fleet (started with ``voxrelay up --detach`` from a
generated config, the sink registered as its only transceiver, routes created by real
STUN binding requests carrying valid routing tokens) and for the naive forwarder of
bench/naive_forwarder.py:

- flat out: the clients flood the forwarder (faster than one worker can forward); we
  report forwarded packets/s at the sink, and CPU microseconds per forwarded packet:
  the forwarder processes' own CPU time (user + system, read from /proc with psutil) over
  the packets they sent on;
- at a fixed moderate rate (default 20,000 probes/s, evenly paced, every probe echoed
  by the sink): CPU per forwarded packet (probes and echoes both count), and the round
  trip time p50/p99, from which the RTT of direct client <-> sink echoes, sent by the
  same load process during the same phase, is subtracted to give the added latency (a
  baseline measured at another moment would carry another moment's noise).

Phases alternate between the two forwarders (``--repeat`` rounds, the order flipped
every round, medians reported) so drift on a shared machine hits both alike. The
ratios voxrelay / naive of CPU per packet are compared with the targets (0.75 flat out,
1.2 at the fixed rate) and reported with pass flags; nothing asserts them.

``--workers`` takes one count or an increasing list (``1,2,4``): for a list the whole
measurement above runs once per count (a fresh fleet of that many relay workers, and as
many naive forwarder processes on one SO_REUSEPORT port), and the report adds a scaling
summary: packets/s flat out and CPU per packet per count, speedup over the first count.

With ``--pin`` and a count smaller than the usable CPUs, forwarders are pinned to the last
CPUs and the load generator and sink to the others, so a forwarder has a core of its own;
a count that leaves no CPU for the load runs unpinned. The load generator and the sink are
busy processes too: when workers + 2 exceed the usable CPUs, they share cores with the
forwarders (or with each other), and the report says that its figures - scaling above
all - are bounded by the machine's cores rather than by the forwarders.
Each forwarder runs in a session of its own (the fleet through ``voxrelay up --detach``,
the naive processes started so), so the scheduler's autogrouping treats them alike: a
forwarder in the benchmark's own group would share one CPU share with the load processes.

The fleet bundles relay -> transceiver datagrams as configured by ``--bundle-max-bytes``
(the relay's default; 0 sends one internal datagram per packet). Packets are always
client packets: the sink counts the records inside bundles, and the relay's tx_internal
counts packets, not internal datagrams. The naive forwarder stays one sendto per packet.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

from voxrelay.bench.common import (
    BenchError,
    CliFleet,
    cpu_seconds,
    fmt,
    ratio_of,
    report_header,
    run_reporting_errors,
    terminate_as_interrupt,
)
from voxrelay.bench.loadgen import (
    MAX_DATAGRAM,
    MIN_DATAGRAM,
    SOCKET_BUFFER_BYTES,
    ClientsProcess,
    LoadgenError,
    SinkProcess,
    clients_process,
)
from voxrelay.bench.naive_forwarder import NaiveForwarderProcess
from voxrelay.bench.plot import PlotError, grouped_bars, pyplot, save_figure, target_marker
from voxrelay.proto.token import mint_token

TARGET_FLAT_OUT = 0.75  # voxrelay / naive CPU per packet, flat out: at most
TARGET_FIXED_RATE = 1.2  # ... and at the fixed moderate rate
CLUSTER_ID = 1
TRANSCEIVER_ID = 1
FORWARDED = ("tx_internal", "tx_public")
FORWARDER_COUNTERS = ("rx_public", "tx_internal", "rx_internal", "tx_public")
DEFAULT_BUNDLE_MAX_BYTES = 1472  # the relay's default (engine/config.py)
MIN_BUNDLE_MAX_BYTES, MAX_BUNDLE_MAX_BYTES = 576, 65507


# -- settings and CPU placement -------------------------------------------------------------


MAX_WORKERS = 64
LOAD_PROCESSES = 2  # the clients (load generator) and the sink, both busy flat out


@dataclass(frozen=True)
class Placement:
    """Which CPUs the forwarders and the load (clients + sink) may run on; None: anywhere.

    ``note`` says why pinning was asked for but not done (None when it was, or not asked).
    """

    forwarder_cpus: list[int] | None
    load_cpus: list[int] | None
    note: str | None = None

    @classmethod
    def plan(cls, workers: int, pin: bool, cpus: Sequence[int] | None = None) -> Placement:
        """Forwarders on the last ``workers`` CPUs, load on the rest; unpinned if none is left."""
        usable = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
        if not pin:
            return cls(None, None)
        if len(usable) <= workers:
            return cls(
                None,
                None,
                f"--pin: {workers} worker(s) on {len(usable)} usable CPU(s) leave none for the "
                "load generator and sink, so nothing is pinned for this count",
            )
        return cls(usable[-workers:], usable[:-workers])

    def forwarder_cpu(self, index: int) -> list[int] | None:
        if not self.forwarder_cpus:
            return None
        return [self.forwarder_cpus[index % len(self.forwarder_cpus)]]


@dataclass(frozen=True)
class BenchSettings:
    duration: float
    rate: float
    clients: int
    size: int
    workers: int
    repeat: int
    placement: Placement
    bundle_max_bytes: int = DEFAULT_BUNDLE_MAX_BYTES
    usable_cpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    @property
    def sink_max_datagram(self) -> int:
        """Room per datagram in the sink: a whole bundle must fit, or records go uncounted."""
        return max(2048, self.bundle_max_bytes + 1)

    @property
    def busy_processes(self) -> int:
        return self.workers + LOAD_PROCESSES

    @property
    def cpu_oversubscribed(self) -> bool:
        """More busy processes than CPUs: some forwarder or the load shares a core."""
        return self.busy_processes > self.usable_cpus

    def machine_notes(self) -> list[str]:
        """What about this machine bounds this count's figures; empty when nothing does."""
        notes = [self.placement.note] if self.placement.note else []
        if not self.cpu_oversubscribed:
            return notes
        head = (
            f"{self.workers} forwarder(s) + load generator + sink = {self.busy_processes} busy "
            f"processes on {self.usable_cpus} usable CPU(s)"
        )
        if self.placement.forwarder_cpus:
            load = len(self.placement.load_cpus or [])
            notes.append(
                f"{head}: the forwarders have a CPU each, the load generator and sink share "
                f"the other {load}, which may bound the offered load and so packets/s flat out"
            )
        else:
            notes.append(
                f"{head}, all sharing them: packets/s and CPU per packet are bounded by the "
                "machine's cores, not by the forwarders alone"
            )
        return notes

    def as_dict(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration,
            "rate_pps": self.rate,
            "clients": self.clients,
            "size_bytes": self.size,
            "workers": self.workers,
            "repeat": self.repeat,
            "forwarder_cpus": self.placement.forwarder_cpus,
            "load_cpus": self.placement.load_cpus,
            "socket_buffer_bytes": SOCKET_BUFFER_BYTES,
            "bundling": self.bundle_max_bytes > 0,
            "bundle_max_bytes": self.bundle_max_bytes,
            "usable_cpus": self.usable_cpus,
            "busy_processes": self.busy_processes,
            "cpu_oversubscribed": self.cpu_oversubscribed,
        }


# -- the forwarders under test ------------------------------------------------------------------


class Forwarder(Protocol):
    name: str

    @property
    def address(self) -> tuple[str, int]: ...

    def pids(self) -> list[int]: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class VoxrelayFleet(CliFleet):
    """A real fleet, started and stopped through the CLI like an operator would."""

    name = "voxrelay"

    def __init__(
        self, workdir: Path, transceiver: tuple[str, int], settings: BenchSettings
    ) -> None:
        super().__init__(workdir)
        self.secret = secrets.token_bytes(32)
        self.state: dict[str, Any] = {}
        self._pids: list[int] = []
        pins = settings.placement.forwarder_cpus
        lines = [
            *self.identity_lines(f"bench{secrets.token_hex(4)}", CLUSTER_ID, self.secret),
            "[relay]",
            'bind = "127.0.0.1"',
            "port = 0",
            f"workers = {settings.workers}",
            f"table_capacity = {max(4 * settings.clients * settings.repeat, 1024)}",
            "idle_timeout = 3600",
            "drain_seconds = 0",
            f"recv_buffer_bytes = {SOCKET_BUFFER_BYTES}",
            f"send_buffer_bytes = {SOCKET_BUFFER_BYTES}",
            f"bundle_max_bytes = {settings.bundle_max_bytes}",
            f"pin_cpus = {json.dumps(pins) if pins else 'false'}",
            "[transceiver]",
            "count = 0",  # the sink is the transceiver
            "[metrics]",
            'bind = "127.0.0.1"',
            "port = 0",
            "[[transceivers.static]]",
            f"id = {TRANSCEIVER_ID}",
            f'address = "{transceiver[0]}:{transceiver[1]}"',
        ]
        self.write_config(lines)

    def start(self, timeout: float = 30.0) -> None:
        from voxrelay.engine.supervisor import read_state

        self.up(timeout=timeout + 10)
        self.state = read_state(self.runtime_dir) or {}
        if not self.state.get("control_url"):
            raise BenchError(f"the fleet started without a status endpoint\n{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.status()["relay"]["workers"]
            if workers and all(w["state"] == "running" and w["pid"] for w in workers):
                self._pids = [int(w["pid"]) for w in workers]
                return
            time.sleep(0.05)
        raise BenchError(f"relay workers not running after {timeout:g} s\n{self.log_tail()}")

    def status(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.state["control_url"] + "/status", timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BenchError(f"the fleet's /status does not answer: {exc}") from exc

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", int(self.state["public_port"]))

    def token(self) -> str:
        return mint_token(self.secret, CLUSTER_ID, TRANSCEIVER_ID)

    def pids(self) -> list[int]:
        return list(self._pids)

    def counters(self) -> dict[str, int]:
        totals = dict.fromkeys(FORWARDER_COUNTERS, 0)
        totals["drops"] = totals["bundles_out"] = 0
        for worker in self.status()["relay"]["workers"]:
            if worker["pid"] not in self._pids:
                raise BenchError(
                    f"relay worker {worker['index']} was restarted mid-run (pid "
                    f"{worker['pid']}, was one of {self._pids}); see {self.log_path}"
                )
            for name in FORWARDER_COUNTERS:
                totals[name] += worker["counters"][name]
            totals["drops"] += sum(worker["drops"].values())
            totals["bundles_out"] += worker["counters"]["bundles_out"]
        return totals

    def close(self) -> None:
        """`voxrelay down --now`; kill whatever is left if the CLI could not stop it."""
        from voxrelay.engine.supervisor import read_state

        state = self.state or read_state(self.runtime_dir)  # `up` may have failed half way
        if not state:
            return
        self.down([int(state.get("pid", 0)), *self._pids])
        self.state = {}

    @property
    def supervisor_pid(self) -> int:
        return int(self.state.get("pid", 0))


class NaiveFleet:
    """``workers`` naive forwarder processes on one public port (SO_REUSEPORT when > 1)."""

    name = "naive"

    def __init__(
        self, workdir: Path, transceiver: tuple[str, int], settings: BenchSettings
    ) -> None:
        self.processes: list[NaiveForwarderProcess] = []
        reuse = settings.workers > 1
        try:
            port = 0
            for index in range(settings.workers):
                process = NaiveForwarderProcess(
                    workdir,
                    index,
                    port,
                    transceiver,
                    reuse_port=reuse,
                    cpus=settings.placement.forwarder_cpu(index),
                )
                self.processes.append(process)
                port = process.port
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.processes[0].port)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def counters(self) -> dict[str, int]:
        totals = dict.fromkeys((*FORWARDER_COUNTERS, "drops"), 0)
        for process in self.processes:
            if process.process.poll() is not None:
                raise BenchError(
                    f"naive forwarder pid {process.pid} exited with status "
                    f"{process.process.returncode}"
                )
            for name, value in process.read().items():
                if name in totals:
                    totals[name] += value
        return totals

    def close(self) -> None:
        for process in self.processes:
            process.close()
        self.processes = []


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Forwarder CPU seconds, forwarder counters and sink counters at one instant (or a delta)."""

    cpu: float
    counters: dict[str, int]
    sink: dict[str, int]

    @classmethod
    def take(cls, forwarder: Forwarder | None, sink: SinkProcess) -> Snapshot:
        if forwarder is None:
            return cls(0.0, {}, sink.read())
        return cls(cpu_seconds(forwarder.pids(), "forwarder"), forwarder.counters(), sink.read())

    def since(self, before: Snapshot) -> Snapshot:
        return Snapshot(
            self.cpu - before.cpu,
            {k: v - before.counters.get(k, 0) for k, v in self.counters.items()},
            {k: v - before.sink.get(k, 0) for k, v in self.sink.items()},
        )

    @property
    def forwarded(self) -> int:
        return sum(self.counters.get(name, 0) for name in FORWARDED)


def settle(forwarder: Forwarder | None, sink: SinkProcess, timeout: float = 3.0) -> Snapshot:
    """Snapshot once the forwarder's queues have drained (its counters stop moving)."""
    previous = None
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.1)
        current = Snapshot.take(forwarder, sink)
        key = (current.forwarded, current.sink.get("relayed"), current.sink.get("echoed"))
        if key == previous or time.monotonic() >= deadline:
            return current
        previous = key


def _per_packet_us(cpu: float, packets: int) -> float | None:
    return cpu * 1e6 / packets if packets > 0 else None


def measure_flat_out(
    forwarder: Forwarder, sink: SinkProcess, clients: ClientsProcess, duration: float
) -> dict[str, Any]:
    before = settle(forwarder, sink, timeout=1.0)
    load = clients.flood(duration)
    delta = settle(forwarder, sink).since(before)
    elapsed, sent = load["elapsed_s"], load["sent"]
    at_sink = delta.sink["relayed"]
    read = delta.counters["rx_public"]
    return {
        "offered_pps": sent / elapsed,
        "forwarded_pps": at_sink / elapsed,
        "forwarder_tx_pps": delta.forwarded / elapsed,
        "cpu_us_per_packet": _per_packet_us(delta.cpu, delta.forwarded),
        "forwarder_cpu_s": delta.cpu,
        "forwarder_cpu_share": delta.cpu / elapsed,
        "loss": 1 - at_sink / sent if sent else None,
        # Packets the kernel dropped at the forwarder's public socket: it was saturated.
        "saturated": read < 0.98 * sent,
        "forwarder_drops": delta.counters.get("drops", 0),
        # Internal datagrams that carried bundles (voxrelay only; 0 without bundling).
        "bundles_out": delta.counters.get("bundles_out", 0),
        "generator": {
            "sent": sent,
            "elapsed_s": elapsed,
            "cpu_us_per_packet": _per_packet_us(load["cpu_s"], sent),
            "gso_segments": load["gso_segments"],
        },
    }


RTT_KEYS = ("p50", "p90", "p99", "p999", "max", "mean")


def measure_fixed_rate(
    forwarder: Forwarder,
    sink: SinkProcess,
    clients: ClientsProcess,
    duration: float,
    rate: float,
) -> dict[str, Any]:
    """Paced probes through ``forwarder``, and the direct baseline probes in the same phase."""
    before = settle(forwarder, sink, timeout=1.0)
    load = clients.paced(duration, rate)
    delta = settle(forwarder, sink).since(before)
    elapsed, sent = load["elapsed_s"], load["sent"]
    rtt = {key: load["rtt_us"][key] for key in RTT_KEYS}
    direct = load["direct"]
    direct_rtt = {key: direct["rtt_us"][key] for key in RTT_KEYS}
    return {
        "rate_pps": sent / elapsed,
        "forwarded_pps": delta.forwarded / elapsed,
        "cpu_us_per_packet": _per_packet_us(delta.cpu, delta.forwarded),
        "forwarder_cpu_s": delta.cpu,
        "forwarder_drops": delta.counters.get("drops", 0),
        "rtt_us": rtt,
        "loss": 1 - load["received"] / sent if sent else None,
        "direct_rtt_us": direct_rtt,
        "direct_loss": 1 - direct["received"] / direct["sent"] if direct["sent"] else None,
        "added_latency_us": {key: rtt[key] - direct_rtt[key] for key in ("p50", "p99")},
        "late_sends": load["late"],
        "generator": {
            "sent": sent,
            "received": load["received"],
            "direct_sent": direct["sent"],
            "elapsed_s": elapsed,
            "cpu_s": load["cpu_s"],
        },
    }


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Progress:
    total: int
    done: int = 0
    echo: Callable[[str], None] = click.echo

    def phase(self, text: str) -> None:
        self.done += 1
        self.echo(f"[{self.done}/{self.total}] {text}")


def _describe_flat(name: str, result: dict[str, Any]) -> str:
    return (
        f"{name} flat out: {result['forwarded_pps']:,.0f} pkt/s at the sink, "
        f"{fmt(result['cpu_us_per_packet'], '.2f')} µs CPU/pkt "
        f"(offered {result['offered_pps']:,.0f} pkt/s)"
    )


def _describe_rate(name: str, result: dict[str, Any]) -> str:
    rtt, direct = result["rtt_us"], result["direct_rtt_us"]
    return (
        f"{name} at {result['rate_pps']:,.0f} pkt/s: RTT p50 {rtt['p50']:.0f} µs p99 "
        f"{rtt['p99']:.0f} µs (direct {direct['p50']:.0f} / {direct['p99']:.0f} µs), "
        f"{fmt(result['cpu_us_per_packet'], '.2f')} µs CPU/pkt, loss {result['loss']:.2%}"
    )


def run_round(
    index: int,
    forwarders: Sequence[Forwarder],
    sink: SinkProcess,
    settings: BenchSettings,
    token: Callable[[], str],
    progress: Progress,
) -> dict[str, Any]:
    """One round: flat out, then the fixed rate, through each forwarder in turn."""
    order = list(forwarders) if index % 2 == 0 else list(reversed(forwarders))
    results: dict[str, Any] = {"order": [f.name for f in order]}
    for forwarder in order:
        with clients_process(
            forwarder.address,
            settings.clients,
            settings.size,
            settings.placement.load_cpus,
            direct=sink.address,
        ) as clients:
            clients.establish(token())
            flat = measure_flat_out(forwarder, sink, clients, settings.duration)
            progress.phase(_describe_flat(forwarder.name, flat))
            fixed = measure_fixed_rate(forwarder, sink, clients, settings.duration, settings.rate)
            progress.phase(_describe_rate(forwarder.name, fixed))
        results[forwarder.name] = {"flat_out": flat, "fixed_rate": fixed}
    return results


def _median_tree(items: Sequence[Any]) -> Any:
    """Element-wise median of same-shaped results (numbers: median; flags: all; else first)."""
    first = items[0]
    if isinstance(first, dict):
        return {key: _median_tree([item[key] for item in items]) for key in first}
    if isinstance(first, bool):
        return all(items)
    if isinstance(first, int | float):
        numbers = [item for item in items if item is not None]
        return statistics.median(numbers) if numbers else None
    if first is None:
        numbers = [item for item in items if isinstance(item, int | float)]
        return statistics.median(numbers) if numbers else None
    return first


def ratios(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """voxrelay / naive per round (rounds pair the two under the same conditions), median."""

    def median_ratio(phase: str, metric: str) -> float | None:
        values = [ratio_of(r["voxrelay"][phase][metric], r["naive"][phase][metric]) for r in rounds]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    flat = median_ratio("flat_out", "cpu_us_per_packet")
    fixed = median_ratio("fixed_rate", "cpu_us_per_packet")
    return {
        "cpu_per_packet_flat_out": {
            "voxrelay_over_naive": flat,
            "target_max": TARGET_FLAT_OUT,
            "pass": flat is not None and flat <= TARGET_FLAT_OUT,
        },
        "cpu_per_packet_fixed_rate": {
            "voxrelay_over_naive": fixed,
            "target_max": TARGET_FIXED_RATE,
            "pass": fixed is not None and fixed <= TARGET_FIXED_RATE,
        },
        "forwarded_pps_flat_out": {
            "voxrelay_over_naive": median_ratio("flat_out", "forwarded_pps"),
        },
    }


NOTES = [
    "cpu_us_per_packet: the forwarder processes' user+system CPU time over the "
    "packets they forwarded (both directions); summary values are medians over "
    "rounds, ratios are medians of per-round ratios.",
    "fixed_rate: every probe is echoed by the sink, so each probe is forwarded "
    "twice; a tenth as many probes go straight to the sink in the same phase, and "
    "added_latency_us = forwarder RTT percentile - that direct RTT percentile; "
    "summary.direct is the median of those baselines.",
    "flat_out: the generator offers more than a worker can take; loss is mostly "
    "the kernel dropping at the forwarder's full socket, by design.",
    "bundling (settings.bundling): the relay sends the packets of a read batch "
    "that go to one transceiver as one internal datagram of up to "
    "settings.bundle_max_bytes; packet counts are client packets either way (the "
    "sink counts records inside bundles); bundles_out counts bundle datagrams.",
    "machine_notes: what about this machine bounds the figures (CPU pinning not "
    "possible, more busy processes than usable CPUs); empty when nothing does.",
]
SWEEP_NOTES = [
    "sweep: one entry per worker count, each the whole single-count measurement (its "
    "own fleet, naive processes, sink and rounds); scaling summarises packets/s flat out "
    "and CPU per packet per count, speedup_vs_first = forwarded_pps / that of the "
    "first count (ideal: workers / first count).",
]
SINGLE_SCHEMA_VERSION = 1  # one worker count: the original layout
SWEEP_SCHEMA_VERSION = 2  # settings.workers is a list; results move under sweep[]


@dataclass
class Report:
    """The rounds measured for one worker count."""

    settings: BenchSettings
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The per-count results: settings, summary, ratios, rounds, machine_notes."""
        summary = {
            name: _median_tree([r[name] for r in self.rounds]) for name in ("voxrelay", "naive")
        }
        baselines = [r[name]["fixed_rate"] for r in self.rounds for name in ("voxrelay", "naive")]
        summary["direct"] = {
            "fixed_rate": {
                "rtt_us": _median_tree([b["direct_rtt_us"] for b in baselines]),
                "loss": _median_tree([b["direct_loss"] for b in baselines]),
            }
        }
        return {
            "settings": self.settings.as_dict(),
            "summary": summary,
            "ratios": ratios(self.rounds),
            "rounds": self.rounds,
            "machine_notes": self.settings.machine_notes(),
        }


def scaling(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Packets/s flat out and CPU per packet per worker count, speedup over the first count."""
    first = entries[0]["summary"]
    rows = []
    for entry in entries:
        s, summary = entry["settings"], entry["summary"]
        row: dict[str, Any] = {
            "workers": s["workers"],
            "pinned": s["forwarder_cpus"] is not None,
            "cpu_oversubscribed": s["cpu_oversubscribed"],
        }
        for name in ("voxrelay", "naive"):
            flat, fixed = summary[name]["flat_out"], summary[name]["fixed_rate"]
            row[name] = {
                "forwarded_pps_flat_out": flat["forwarded_pps"],
                "speedup_vs_first": ratio_of(
                    flat["forwarded_pps"], first[name]["flat_out"]["forwarded_pps"]
                ),
                "cpu_us_per_packet_flat_out": flat["cpu_us_per_packet"],
                "cpu_us_per_packet_fixed_rate": fixed["cpu_us_per_packet"],
                # False: the forwarders kept up with the generator, which was the bound.
                "saturated_flat_out": flat["saturated"],
            }
        row["forwarded_pps_flat_out_voxrelay_over_naive"] = ratio_of(
            row["voxrelay"]["forwarded_pps_flat_out"], row["naive"]["forwarded_pps_flat_out"]
        )
        rows.append(row)
    counts = [row["workers"] for row in rows]
    usable = entries[-1]["settings"]["usable_cpus"]
    bounded = any(row["cpu_oversubscribed"] for row in rows)
    note = None
    if bounded:
        note = (
            f"scaling over {', '.join(map(str, counts))} worker(s) is bounded by this "
            f"machine's {usable} usable CPU(s): the load generator and sink share them "
            f"(measuring {counts[-1]} forwarder(s) alone needs {counts[-1] + LOAD_PROCESSES} "
            "CPUs), so flat scaling here does not show what the relay does on more cores"
        )
    return {
        "worker_counts": counts,
        "baseline_workers": counts[0],
        "usable_cpus": usable,
        "bounded_by_cores": bounded,
        "note": note,
        "rows": rows,
    }


def sweep_report(reports: Sequence[Report]) -> dict[str, Any]:
    """relay.json's content: the single-count layout for one count, else sweep + scaling."""
    entries = [report.to_dict() for report in reports]
    if len(entries) == 1:
        header = {**report_header("voxrelay bench relay"), "schema_version": SINGLE_SCHEMA_VERSION}
        return {**header, **entries[0], "notes": NOTES}
    common = dict(entries[0]["settings"])
    for key in ("forwarder_cpus", "load_cpus", "busy_processes", "cpu_oversubscribed"):
        common.pop(key)
    common["workers"] = [entry["settings"]["workers"] for entry in entries]
    summary = scaling(entries)
    return {
        **report_header("voxrelay bench relay"),
        "schema_version": SWEEP_SCHEMA_VERSION,
        "settings": common,
        "sweep": entries,
        "scaling": summary,
        "notes": [*NOTES, *SWEEP_NOTES, *([summary["note"]] if summary["note"] else [])],
    }


def render_table(data: dict[str, Any]) -> str:
    """The printed report: one block per worker count, then the scaling summary of a sweep."""
    if "sweep" not in data:
        return _render_count(data)
    blocks = [_render_count(entry) for entry in data["sweep"]]
    return "\n\n".join([*blocks, _render_scaling(data["scaling"], data["settings"]["rate_pps"])])


def _render_scaling(summary: dict[str, Any], rate: float) -> str:
    first = summary["baseline_workers"]

    def row(*cells: str) -> str:
        widths = (7, 16, 9, 16, 9, 13, 14, 13, 14)
        return "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths, strict=True))

    lines = [
        f"scaling: forwarded pkt/s flat out (speedup vs {first} worker(s)), CPU µs/packet "
        f"flat out and at {rate:,.0f} pkt/s",
        row(
            "workers",
            "voxrelay pkt/s",
            "speedup",
            "naive pkt/s",
            "speedup",
            "vox µs/pkt",
            "naive µs/pkt",
            "vox µs@rate",
            "naive µs@rate",
        ),
    ]
    for r in summary["rows"]:
        vox, naive = r["voxrelay"], r["naive"]
        placed = "pinned" if r["pinned"] else "unpinned"
        shared = ", CPUs shared" if r["cpu_oversubscribed"] else ""
        lines.append(
            row(
                str(r["workers"]),
                f"{vox['forwarded_pps_flat_out']:,.0f}",
                fmt(vox["speedup_vs_first"], ".2f") + "x",
                f"{naive['forwarded_pps_flat_out']:,.0f}",
                fmt(naive["speedup_vs_first"], ".2f") + "x",
                fmt(vox["cpu_us_per_packet_flat_out"], ".2f"),
                fmt(naive["cpu_us_per_packet_flat_out"], ".2f"),
                fmt(vox["cpu_us_per_packet_fixed_rate"], ".2f"),
                fmt(naive["cpu_us_per_packet_fixed_rate"], ".2f"),
            )
            + f"  ({placed}{shared})"
        )
    if summary["note"]:
        lines.append(f"note: {summary['note']}")
    return "\n".join(lines)


def _render_count(data: dict[str, Any]) -> str:
    """The table of one worker count (the whole report when there is only one)."""
    s, summary, ratio = data["settings"], data["summary"], data["ratios"]
    vox, naive, direct = summary["voxrelay"], summary["naive"], summary["direct"]
    rate = f"{s['rate_pps']:,.0f} pkt/s"

    def row(label: str, v: str, n: str, r: str = "", target: str = "", verdict: str = "") -> str:
        return f"{label:<34}{v:>14}{n:>14}{r:>9}{target:>9}  {verdict}".rstrip()

    def verdict(entry: dict[str, Any]) -> str:
        if entry["voxrelay_over_naive"] is None:
            return "n/a"
        return "PASS" if entry["pass"] else "MISS"

    def latency(entry: dict[str, Any], key: str) -> str:
        values = entry[key]
        return f"{values['p50']:.0f} / {values['p99']:.0f}"

    flat_r, fixed_r = ratio["cpu_per_packet_flat_out"], ratio["cpu_per_packet_fixed_rate"]
    pps_r = ratio["forwarded_pps_flat_out"]["voxrelay_over_naive"]
    lines = [
        f"voxrelay bench relay: {s['workers']} worker(s), {s['clients']} clients, "
        f"{s['size_bytes']}-byte datagrams, {s['duration_s']:g} s phases, "
        f"median of {s['repeat']} round(s), relay bundling "
        + (f"up to {s['bundle_max_bytes']} bytes" if s["bundling"] else "off"),
        row("", "voxrelay", "naive", "ratio", "target"),
        row(
            "CPU µs/packet, flat out",
            fmt(vox["flat_out"]["cpu_us_per_packet"], ".2f"),
            fmt(naive["flat_out"]["cpu_us_per_packet"], ".2f"),
            fmt(flat_r["voxrelay_over_naive"], ".2f") + "x",
            f"<={TARGET_FLAT_OUT:.2f}x",
            verdict(flat_r),
        ),
        row(
            f"CPU µs/packet, {rate}",
            fmt(vox["fixed_rate"]["cpu_us_per_packet"], ".2f"),
            fmt(naive["fixed_rate"]["cpu_us_per_packet"], ".2f"),
            fmt(fixed_r["voxrelay_over_naive"], ".2f") + "x",
            f"<={TARGET_FIXED_RATE:.2f}x",
            verdict(fixed_r),
        ),
        row(
            "forwarded pkt/s, flat out",
            f"{vox['flat_out']['forwarded_pps']:,.0f}",
            f"{naive['flat_out']['forwarded_pps']:,.0f}",
            fmt(pps_r, ".2f") + "x",
        ),
        row(
            "forwarder CPU share, flat out",
            f"{vox['flat_out']['forwarder_cpu_share']:.2f}",
            f"{naive['flat_out']['forwarder_cpu_share']:.2f}",
        ),
        row(
            "loss, flat out (offered > capacity)",
            fmt(vox["flat_out"]["loss"], ".1%"),
            fmt(naive["flat_out"]["loss"], ".1%"),
        ),
        row(
            f"RTT p50 / p99 µs, {rate}",
            latency(vox["fixed_rate"], "rtt_us"),
            latency(naive["fixed_rate"], "rtt_us"),
        )
        + f"   direct {latency(direct['fixed_rate'], 'rtt_us')}",
        row(
            "added latency p50 / p99 µs",
            latency(vox["fixed_rate"], "added_latency_us"),
            latency(naive["fixed_rate"], "added_latency_us"),
        ),
        row(
            f"loss, {rate}",
            fmt(vox["fixed_rate"]["loss"], ".2%"),
            fmt(naive["fixed_rate"]["loss"], ".2%"),
        ),
    ]
    generator = vox["flat_out"]["generator"]
    lines.append(
        f"generator, flat out: {vox['flat_out']['offered_pps']:,.0f} pkt/s offered at "
        f"{fmt(generator['cpu_us_per_packet'], '.2f')} µs CPU/pkt "
        f"(sendmmsg, UDP GSO x{generator['gso_segments']:.0f})"
    )
    lines += [f"note: {note}" for note in data.get("machine_notes", [])]
    return "\n".join(lines)


def plot_report(data: dict[str, Any], path: Path) -> Path:
    """relay.png: CPU per packet (with targets), packets/s, RTT and added latency.

    A sweep draws every worker count side by side in each panel.
    """
    plt = pyplot()
    entries = data.get("sweep", [data])
    s = data["settings"]
    several = len(entries) > 1
    rate = f"{s['rate_pps'] / 1000:g}k pkt/s"

    def label(base: str, entry: dict[str, Any]) -> str:
        return f"{base}\n{entry['settings']['workers']} w" if several else base

    counts = ", ".join(str(e["settings"]["workers"]) for e in entries)
    figure, axes = plt.subplots(2, 2, figsize=(11 + 3 * (len(entries) - 1), 8))
    figure.suptitle(
        f"voxrelay bench relay - {counts} worker(s), {s['clients']} clients, "
        f"{s['size_bytes']} B datagrams, median of {s['repeat']}",
        fontsize=11,
    )
    phases = (
        ("flat_out", "flat out", "cpu_per_packet_flat_out"),
        ("fixed_rate", rate, "cpu_per_packet_fixed_rate"),
    )
    cells = [
        (phase, key, entry, label(name, entry)) for phase, name, key in phases for entry in entries
    ]
    cpu_axes = axes[0][0]
    placed = grouped_bars(
        cpu_axes,
        [text for *_, text in cells],
        {
            name: [
                entry["summary"][name][phase]["cpu_us_per_packet"] for phase, _, entry, _ in cells
            ]
            for name in ("voxrelay", "naive")
        },
        title="Forwarder CPU per forwarded packet (lower is better)",
        ylabel="µs",
        value_format="{:.2f}",
    )
    for group, (phase, key, entry, _) in enumerate(cells):
        summary, ratio = entry["summary"], entry["ratios"]
        baseline = summary["naive"][phase]["cpu_us_per_packet"]
        if baseline is None:
            continue
        target = ratio[key]["target_max"]
        centre, width = placed["voxrelay"][group]
        target_marker(
            cpu_axes,
            centre,
            width,
            baseline * target,
            f"target {target:g}x naive",
            bar_height=summary["voxrelay"][phase]["cpu_us_per_packet"],
            passed=ratio[key]["pass"],
        )
    cpu_axes.legend(fontsize=8)
    grouped_bars(
        axes[0][1],
        [label("flat out", entry) for entry in entries],
        {
            name: [entry["summary"][name]["flat_out"]["forwarded_pps"] for entry in entries]
            for name in ("voxrelay", "naive")
        },
        title="Forwarded packets/s at the sink (higher is better)",
        ylabel="packets/s",
        value_format="{:,.0f}",
    )
    percentiles = [(p, entry) for entry in entries for p in ("p50", "p99")]
    grouped_bars(
        axes[1][0],
        [label(p, entry) for p, entry in percentiles],
        {
            name: [entry["summary"][name]["fixed_rate"]["rtt_us"][p] for p, entry in percentiles]
            for name in ("voxrelay", "naive", "direct")
        },
        title=f"Round trip time at {rate}",
        ylabel="µs",
        value_format="{:.0f}",
    )
    axes[1][0].legend(fontsize=8)
    grouped_bars(
        axes[1][1],
        [label(p, entry) for p, entry in percentiles],
        {
            name: [
                entry["summary"][name]["fixed_rate"]["added_latency_us"][p]
                for p, entry in percentiles
            ]
            for name in ("voxrelay", "naive")
        },
        title=f"Added latency vs direct echo at {rate}",
        ylabel="µs",
        value_format="{:.0f}",
    )
    return save_figure(figure, path)


def plot_scaling(data: dict[str, Any], path: Path) -> Path:
    """relay_scaling.png: packets/s flat out and CPU per packet against the worker count."""
    plt = pyplot()
    summary, s = data["scaling"], data["settings"]
    rows = summary["rows"]
    groups = [f"{row['workers']} worker{'s' if row['workers'] > 1 else ''}" for row in rows]
    names = ("voxrelay", "naive")
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    title = (
        f"voxrelay bench relay - scaling over {', '.join(map(str, summary['worker_counts']))} "
        f"worker(s), {s['clients']} clients, {s['size_bytes']} B datagrams, "
        f"median of {s['repeat']}"
    )
    if summary["bounded_by_cores"]:
        title += (
            f"\nbounded by this machine's {summary['usable_cpus']} usable CPU(s): "
            "the load generator and sink share them with the forwarders"
        )
    figure.suptitle(title, fontsize=11)
    placed = grouped_bars(
        axes[0],
        groups,
        {name: [row[name]["forwarded_pps_flat_out"] for row in rows] for name in names},
        title="Forwarded packets/s flat out (higher is better)",
        ylabel="packets/s",
        value_format="{:,.0f}",
    )
    axes[0].ticklabel_format(axis="y", style="plain")
    first = rows[0]
    for index, row in enumerate(rows[1:], start=1):
        for name in names:  # where linear scaling from the first count would put each bar
            centre, width = placed[name][index]
            ideal = first[name]["forwarded_pps_flat_out"] * row["workers"] / first["workers"]
            target_marker(
                axes[0],
                centre,
                width,
                ideal,
                "linear",
                bar_height=row[name]["forwarded_pps_flat_out"],
                passed=None,
            )
    axes[0].legend(fontsize=8)
    for panel, (key, phase) in zip(
        axes[1:],
        (
            ("cpu_us_per_packet_flat_out", "flat out"),
            ("cpu_us_per_packet_fixed_rate", f"at {s['rate_pps'] / 1000:g}k pkt/s"),
        ),
        strict=True,
    ):
        grouped_bars(
            panel,
            groups,
            {name: [row[name][key] for row in rows] for name in names},
            title=f"Forwarder CPU per packet, {phase} (lower is better)",
            ylabel="µs",
            value_format="{:.2f}",
        )
        panel.legend(fontsize=8)
    return save_figure(figure, path)


def run_count(settings: BenchSettings, progress: Progress) -> Report:
    """Start a sink, a fleet and the naive forwarders for one worker count; run its rounds."""
    report = Report(settings)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voxrelay-bench-")))
        sink = SinkProcess(workdir, settings.placement.load_cpus, settings.sink_max_datagram)
        stack.callback(sink.close)
        fleet = VoxrelayFleet(workdir, sink.address, settings)
        stack.callback(fleet.close)
        fleet.start()
        naive = NaiveFleet(workdir, sink.address, settings)
        stack.callback(naive.close)
        click.echo(
            f"voxrelay fleet pid {fleet.supervisor_pid} at port {fleet.address[1]} (workers "
            f"{fleet.pids()}), naive at port {naive.address[1]} (pids {naive.pids()}), sink "
            f"pid {sink.process.pid} at port {sink.port}; "
            f"forwarder CPUs {settings.placement.forwarder_cpus or 'any'}, load CPUs "
            f"{settings.placement.load_cpus or 'any'}"
        )
        for index in range(settings.repeat):
            report.rounds.append(
                run_round(index, [fleet, naive], sink, settings, fleet.token, progress)
            )
    return report


def run_benchmark(sweep: Sequence[BenchSettings], out: Path) -> dict[str, Any]:
    """Measure each worker count in turn; write relay.json, relay.png (and for a sweep
    relay_scaling.png); returns the data."""
    progress = Progress(total=sum(settings.repeat * 4 for settings in sweep))
    reports = []
    with terminate_as_interrupt():
        for settings in sweep:
            if len(sweep) > 1:
                click.echo(f"-- {settings.workers} worker(s)")
            for note in settings.machine_notes():
                click.echo(f"note: {note}")
            reports.append(run_count(settings, progress))
    data = sweep_report(reports)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relay.json").write_text(json.dumps(data, indent=2) + "\n")
    plot_report(data, out / "relay.png")
    if "sweep" in data:
        plot_scaling(data, out / "relay_scaling.png")
    return data


class WorkerCounts(click.ParamType):
    """One worker count, or a comma list of strictly increasing counts (``1,2,4``)."""

    name = "N[,N...]"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        if isinstance(value, int):
            value = str(value)
        counts: list[int] = []
        for item in str(value).split(","):
            try:
                count = int(item.strip())
            except ValueError:
                self.fail(f"{item.strip()!r} is not a whole number (in {value!r})", param, ctx)
            if not 1 <= count <= MAX_WORKERS:
                self.fail(f"{count} is not in 1..{MAX_WORKERS} (in {value!r})", param, ctx)
            if counts and count <= counts[-1]:
                self.fail(
                    f"counts must strictly increase, {count} follows {counts[-1]} (in {value!r})",
                    param,
                    ctx,
                )
            counts.append(count)
        return tuple(counts)


WORKER_COUNTS = WorkerCounts()


@click.command("relay")
@click.option(
    "--duration",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.2, 600),
    help="Seconds per phase.",
)
@click.option(
    "--rate",
    default=20_000.0,
    show_default=True,
    type=click.FloatRange(100, 200_000),
    help="Probes/s (total over all clients) for the latency and light-load phase.",
)
@click.option(
    "--clients",
    default=256,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Client source ports (one UDP socket each).",
)
@click.option(
    "--size",
    default=100,
    show_default=True,
    type=click.IntRange(MIN_DATAGRAM, MAX_DATAGRAM),
    help="Datagram size in bytes.",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    type=WORKER_COUNTS,
    help="Relay workers (and naive forwarder processes on a SO_REUSEPORT port): one count, "
    f"or increasing counts like 1,2,4 (each 1..{MAX_WORKERS}) to measure scaling.",
)
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="Rounds, alternating the order of voxrelay and naive; medians reported.",
)
@click.option(
    "--pin/--no-pin",
    default=True,
    show_default=True,
    help="Pin forwarders to their own CPUs, load and sink to the rest.",
)
@click.option(
    "--bundle-max-bytes",
    default=DEFAULT_BUNDLE_MAX_BYTES,
    show_default=True,
    type=click.IntRange(0, MAX_BUNDLE_MAX_BYTES),
    help=f"The relay's bundle_max_bytes: 0 (no bundling) or {MIN_BUNDLE_MAX_BYTES}.."
    f"{MAX_BUNDLE_MAX_BYTES}.",
)
@click.option(
    "--out",
    "out_dir",
    default="bench-out/relay",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory for relay.json and relay.png.",
)
def relay_bench_command(
    duration: float,
    rate: float,
    clients: int,
    size: int,
    workers: tuple[int, ...],
    repeat: int,
    pin: bool,
    bundle_max_bytes: int,
    out_dir: str,
) -> None:
    """Forwarding cost and latency of the relay worker beside a naive Python forwarder.

    Reports forwarded packets/s flat out, forwarder CPU µs per packet flat out and at
    --rate, and added latency p50/p99 at --rate, for voxrelay and for a naive
    recvfrom_into/dict/sendto forwarder measured in the same run. Writes relay.json
    and relay.png to --out. With --workers 1,2,4 the measurement runs once per worker
    count and relay_scaling.png shows packets/s and CPU per packet against the count.
    """
    if 0 < bundle_max_bytes < MIN_BUNDLE_MAX_BYTES:
        raise click.BadParameter(
            f"0 (off) or {MIN_BUNDLE_MAX_BYTES}..{MAX_BUNDLE_MAX_BYTES}, got {bundle_max_bytes}",
            param_hint="--bundle-max-bytes",
        )
    sweep = [
        BenchSettings(
            duration=duration,
            rate=rate,
            clients=clients,
            size=size,
            workers=count,
            repeat=repeat,
            placement=Placement.plan(count, pin),
            bundle_max_bytes=bundle_max_bytes,
        )
        for count in workers
    ]
    out = Path(out_dir)
    data = run_reporting_errors(
        lambda: run_benchmark(sweep, out), (BenchError, LoadgenError, PlotError)
    )
    click.echo(render_table(data))
    written = ["relay.json", "relay.png", *(["relay_scaling.png"] if "sweep" in data else [])]
    click.echo(f"wrote {', '.join(str(out / name) for name in written)}")
