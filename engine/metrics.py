"""Prometheus metrics for the fleet, read from shared memory at scrape time.

Why a custom collector: the counters live in the workers' stats blocks and the routing
table header, so a scrape reads them directly; nothing is counted twice and the hot loop
never calls into prometheus_client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_PACKET_COUNTERS = {
    "rx_public": ("client", "in"),
    "tx_public": ("client", "out"),
    "rx_internal": ("transceiver", "in"),
    "tx_internal": ("transceiver", "out"),
}


class FleetCollector:
    """Collects relay, table, transceiver and Redis metrics from a running Supervisor."""

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        fleet, table = sup.fleet, sup.table
        if fleet is None or table is None:
            return
        packets = CounterMetricFamily(
            "voxrelay_relay_packets",
            "Datagrams handled by relay workers",
            labels=["worker", "peer", "direction"],
        )
        octets = CounterMetricFamily(
            "voxrelay_relay_bytes",
            "Payload bytes handled by relay workers",
            labels=["worker", "direction"],
        )
        drops = CounterMetricFamily(
            "voxrelay_relay_drops",
            "Datagrams dropped by relay workers, by reason",
            labels=["worker", "reason"],
        )
        routes = CounterMetricFamily(
            "voxrelay_relay_routes_created",
            "Routes created from a valid STUN token",
            labels=["worker"],
        )
        repointed = CounterMetricFamily(
            "voxrelay_relay_routes_repointed",
            "Routes moved to another transceiver",
            labels=["worker"],
        )
        up = GaugeMetricFamily(
            "voxrelay_relay_worker_up", "1 if the worker process is alive", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "voxrelay_relay_worker_restarts",
            "Times the supervisor replaced the worker",
            labels=["worker"],
        )
        for worker in sup.workers:
            label = str(worker.index)
            stats = fleet.read_worker(worker.index)
            for name, (peer, direction) in _PACKET_COUNTERS.items():
                packets.add_metric([label, peer, direction], stats.counters[name])
            octets.add_metric([label, "in"], stats.counters["bytes_in"])
            octets.add_metric([label, "out"], stats.counters["bytes_out"])
            for reason, value in stats.drops.items():
                drops.add_metric([label, reason], value)
            routes.add_metric([label], stats.counters["routes_created"])
            repointed.add_metric([label], stats.counters["routes_repointed"])
            alive = worker.process is not None and worker.process.poll() is None
            up.add_metric([label], 1 if alive else 0)
            restarts.add_metric([label], worker.restarts)
        yield from (packets, octets, drops, routes, repointed, up, restarts)
        yield GaugeMetricFamily(
            "voxrelay_routing_table_entries", "Live routes", value=table.live_count()
        )
        yield GaugeMetricFamily(
            "voxrelay_routing_table_capacity", "Maximum live routes", value=table.capacity
        )
        yield GaugeMetricFamily(
            "voxrelay_routing_table_bytes", "Shared memory of the table", value=table.memory_bytes
        )
        yield CounterMetricFamily(
            "voxrelay_routing_table_refused",
            "New routes refused because the table was full",
            value=table.refused_count,
        )
        transceivers = GaugeMetricFamily(
            "voxrelay_transceivers", "Known transceivers by health", labels=["health"]
        )
        counts: dict[str, int] = {"healthy": 0, "unhealthy": 0}
        for entry in fleet.transceivers():
            counts[entry.state] = counts.get(entry.state, 0) + 1
        for health, count in counts.items():
            transceivers.add_metric([health], count)
        yield transceivers
        yield GaugeMetricFamily(
            "voxrelay_draining", "1 while the fleet drains", value=1 if fleet.draining else 0
        )
        mirror = getattr(sup, "mirror", None)
        if mirror is not None:
            stats = mirror.stats_dict()
            yield GaugeMetricFamily(
                "voxrelay_redis_connected",
                "1 if the last Redis call worked",
                value=1 if stats.get("connected") else 0,
            )
            ops = CounterMetricFamily(
                "voxrelay_redis_mirror_ops", "Route mirror operations", labels=["op"]
            )
            for op in ("mirrored", "refreshed", "deleted", "errors"):
                ops.add_metric([op], stats.get(op, 0))
            yield ops


def render_metrics(collector: FleetCollector) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
