"""The benchmark's baseline: a naive Python UDP forwarder doing the relay's work, unbatched.

Why it exists: "is the relay worker fast?" only has an answer beside something measured on
the same machine in the same run. This is what a competent Python programmer writes first:
one socket on the public port, one internal socket, an epoll loop that drains each socket
with ``recvfrom_into`` into a preallocated buffer, a dict from client address to route, and
one ``sendto`` per datagram. It does the same work as a relay worker - route lookup, the
same 24-byte relay header (proto/relay_header.py) in front of every datagram to the
transceiver, replies routed back to the client by that header, replies accepted only from
the transceiver - just without batching. A route is created by a client's first STUN
binding request, like the relay's, but without verifying the token.

Counters (rx/tx per direction, routes, drops) go to a :class:`~voxrelay.bench.loadgen.CounterFile`
after every drained burst, so the benchmark reads them at any moment; CPU time is read
from outside, the same way for this process and for relay workers.

Run: ``python -m voxrelay.bench.naive_forwarder --port P --sink HOST:PORT --stats FILE``.
It prints one JSON line (its ports) when ready and exits on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voxrelay.bench.loadgen import (
    CounterFile,
    cpu_list,
    emit,
    ignore_interrupts,
    parse_address,
    pin_to_cpus,
    set_buffers,
    spawn,
    stop_process,
)
from voxrelay.proto.relay_header import HEADER_SIZE, RelayHeaderError, header_from_address
from voxrelay.proto.stun import is_stun

COUNTERS = ("rx_public", "tx_internal", "rx_internal", "tx_public", "routes", "drops")
BURST = 256  # datagrams per drain before the loop polls (and flushes counters) again
MAX_DATAGRAM = 1500


class NaiveForwarder:
    """Forwards client <-> transceiver datagrams one syscall per datagram."""

    def __init__(
        self,
        bind: str,
        port: int,
        transceiver: tuple[str, int],
        counters: CounterFile,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.transceiver = transceiver
        self.counters = counters
        self.public = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if reuse_port:
            self.public.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_buffers(self.public)
        self.public.bind((bind, port))
        self.internal = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_buffers(self.internal)
        self.internal.bind(("127.0.0.1", 0))
        for sock in (self.public, self.internal):
            sock.setblocking(False)
        self.routes: dict[tuple[str, int], bytes] = {}  # client address -> relay header
        self.clients: dict[bytes, tuple[str, int]] = {}  # relay header -> client address
        # The header goes in front of the payload in place: receive at offset 24.
        self.buffer = bytearray(HEADER_SIZE + MAX_DATAGRAM + 1)
        self.view = memoryview(self.buffer)
        self.rx_public = self.tx_internal = self.rx_internal = self.tx_public = 0
        self.drops = 0
        self._stop = False

    @property
    def ports(self) -> tuple[int, int]:
        return self.public.getsockname()[1], self.internal.getsockname()[1]

    def stop(self) -> None:
        self._stop = True

    def run(self, watch_fd: int | None = None) -> None:
        """Serve until stop(), or until ``watch_fd`` reaches EOF (the parent went away)."""
        poller = select.epoll()
        public_fd, internal_fd = self.public.fileno(), self.internal.fileno()
        poller.register(public_fd, select.EPOLLIN)
        poller.register(internal_fd, select.EPOLLIN)
        if watch_fd is not None:
            poller.register(watch_fd, select.EPOLLIN | select.EPOLLHUP)
        try:
            while not self._stop:
                for fd, _ in poller.poll(0.2):
                    if fd == public_fd:
                        self.drain_public()
                    elif fd == internal_fd:
                        self.drain_internal()
                    elif not os.read(fd, 4096):
                        return
                self.flush_counters()
        finally:
            poller.close()
            self.flush_counters()

    def drain_public(self) -> None:
        """Client -> transceiver: look the route up, put its header in front, send."""
        recvfrom_into, sendto = self.public.recvfrom_into, self.internal.sendto
        view, payload = self.view, self.view[HEADER_SIZE:]
        routes, transceiver = self.routes, self.transceiver
        for _ in range(BURST):
            try:
                length, client = recvfrom_into(payload)
            except BlockingIOError:
                return
            self.rx_public += 1
            header = routes.get(client)
            if header is None:
                header = self._learn(client, payload, length)
                if header is None:
                    continue
            view[:HEADER_SIZE] = header
            try:
                sendto(view[: HEADER_SIZE + length], transceiver)
            except OSError:
                self.drops += 1
                continue
            self.tx_internal += 1

    def drain_internal(self) -> None:
        """Transceiver -> client: the header names the client; send the payload to it."""
        recvfrom_into, sendto = self.internal.recvfrom_into, self.public.sendto
        view, clients, transceiver = self.view, self.clients, self.transceiver
        for _ in range(BURST):
            try:
                length, source = recvfrom_into(view)
            except BlockingIOError:
                return
            self.rx_internal += 1
            if source != transceiver:
                self.drops += 1
                continue
            client = clients.get(bytes(view[:HEADER_SIZE]))
            if client is None:
                self.drops += 1
                continue
            try:
                sendto(view[HEADER_SIZE:length], client)
            except OSError:
                self.drops += 1
                continue
            self.tx_public += 1

    def _learn(self, client: tuple[str, int], payload: memoryview, length: int) -> bytes | None:
        """A first datagram from ``client``: a STUN request creates its route (no token check)."""
        if length > MAX_DATAGRAM or not is_stun(payload, length):
            self.drops += 1
            return None
        try:
            header = header_from_address(client)
        except RelayHeaderError:
            self.drops += 1
            return None
        self.routes[client] = header
        self.clients[header] = client
        return header

    def flush_counters(self) -> None:
        words, index = self.counters.words, self.counters.index
        words[index["rx_public"]] = self.rx_public
        words[index["tx_internal"]] = self.tx_internal
        words[index["rx_internal"]] = self.rx_internal
        words[index["tx_public"]] = self.tx_public
        words[index["routes"]] = len(self.routes)
        words[index["drops"]] = self.drops

    def close(self) -> None:
        self.public.close()
        self.internal.close()


class NaiveForwarderProcess:
    """The benchmark's handle on one naive forwarder process."""

    def __init__(
        self,
        workdir: Path,
        index: int,
        port: int,
        transceiver: tuple[str, int],
        *,
        reuse_port: bool = False,
        cpus: Sequence[int] | None = None,
    ) -> None:
        self.stats_path = workdir / f"naive-{index}.counters"
        args = [
            "-m", "voxrelay.bench.naive_forwarder",
            "--port", str(port),
            "--sink", f"{transceiver[0]}:{transceiver[1]}",
            "--stats", str(self.stats_path),
        ]  # fmt: skip
        if reuse_port:
            args.append("--reuse-port")
        if cpus:
            args += ["--cpus", ",".join(map(str, cpus))]
        # A session of its own, like the fleet `voxrelay up --detach` starts: in the
        # benchmark's session it would share one scheduler autogroup with the clients and
        # the sink, and on a busy machine get a fraction of the CPU share the relay gets -
        # starved, it reads big batches late, which lowers its CPU per packet and raises
        # its latency (measured: +0.5 s p50 beside two busy processes on its CPU).
        self.process, channel = spawn(args, f"naive forwarder {index}", new_session=True)
        try:
            ready = channel.read(15)
            self.port: int = ready["port"]
            self.pid: int = ready["pid"]
            self.counters = CounterFile(self.stats_path, COUNTERS, create=False)
        except BaseException:
            stop_process(self.process)
            raise

    def read(self) -> dict[str, int]:
        return self.counters.read()

    def close(self) -> None:
        self.counters.close()
        stop_process(self.process)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m voxrelay.bench.naive_forwarder")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="public port (0: pick one)")
    parser.add_argument(
        "--sink", type=parse_address, required=True, help="the transceiver's host:port"
    )
    parser.add_argument("--stats", required=True, help="counter file to create")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="SO_REUSEPORT on the public port (several processes share it)",
    )
    parser.add_argument("--cpus", type=cpu_list, default=None)
    args = parser.parse_args(argv)
    import signal

    pin_to_cpus(args.cpus)
    counters = CounterFile(args.stats, COUNTERS, create=True)
    forwarder = NaiveForwarder(
        args.bind, args.port, args.sink, counters, reuse_port=args.reuse_port
    )
    signal.signal(signal.SIGTERM, lambda *_: forwarder.stop())
    ignore_interrupts()
    public_port, internal_port = forwarder.ports
    ready: dict[str, Any] = {
        "event": "ready",
        "port": public_port,
        "internal_port": internal_port,
        "pid": os.getpid(),
    }
    emit(ready)
    try:
        forwarder.run(watch_fd=sys.stdin.fileno())
    finally:
        forwarder.close()
        with contextlib.suppress(BufferError):
            counters.close()


if __name__ == "__main__":
    main()
