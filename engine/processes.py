"""Small helpers shared by the process supervisors (relay workers, transceivers)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

__all__ = [
    "HEAP_TRIM_INTERVAL",
    "STABLE_AFTER_SECONDS",
    "TERMINATE_WAIT_SECONDS",
    "die_with_parent",
    "free_port",
    "restart_backoff",
    "trim_heap",
    "trim_heap_every",
]

STABLE_AFTER_SECONDS = 10.0
"""A process that lived this long died of something new: restart it at once."""


def restart_backoff(
    lived: float, failures: int, initial: float, maximum: float
) -> tuple[int, float]:
    """After a child died having lived ``lived`` seconds: (new failure count, restart delay).

    Quick deaths in a row double the delay (``initial``, 2x, 4x ... up to ``maximum``), so
    a child that cannot start does not spin a core; one that ran for a while restarts now.
    """
    failures = 0 if lived > STABLE_AFTER_SECONDS else failures + 1
    if not failures:
        return 0, 0.0
    return failures, min(initial * (2 ** (failures - 1)), maximum)


def free_port(host: str, kind: int = socket.SOCK_DGRAM) -> int:
    """A port the kernel considers free on ``host`` right now (UDP by default)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


TIMER_SLACK_NS = 5_000  # the kernel's default (50 us) would stretch a 100 us sleep by half
_PR_SET_PDEATHSIG = 1
_PR_SET_TIMERSLACK = 29


def _prctl(option: int, value: int) -> None:
    """Linux prctl(2) with one argument (the others unused)."""
    import ctypes

    unused = ctypes.c_ulong(0)
    ctypes.CDLL(None).prctl(option, ctypes.c_ulong(value), unused, unused, unused)


def set_timer_slack(nanoseconds: int) -> None:
    """How late the kernel may end this process's sleeps (it batches timer wake-ups).

    Coalescing sleeps of ~100 us (relay workers, transceivers) need a tighter slack than
    the default 50 us.
    """
    _prctl(_PR_SET_TIMERSLACK, nanoseconds)


TERMINATE_WAIT_SECONDS = 1.0
"""How long a supervised child that got SIGTERM waits for its fleet to start draining.

A stop that signals every process of the service at once (systemd's default
``KillMode=control-group``) reaches the children as it reaches the supervisor. Stopping
then would cut the calls the supervisor's drain is meant to keep alive, so a child first
waits this long: if the fleet starts draining, the supervisor stops it after the grace
period; if not, the signal was meant for this child alone (an operator recycling it) and
it stops."""


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel send SIGTERM when the process that started us exits; False if it
    already has (then the caller should exit).

    Children run in their own process groups, so that Ctrl-C or a signal to the
    supervisor's group reaches only the supervisor, which drains and then stops them.
    Without this, a supervisor killed with SIGKILL would leave them running unsupervised.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # The parent may have died before the prctl: we were then re-parented already.
    return os.getppid() == parent_pid


HEAP_TRIM_INTERVAL = 10.0
"""Seconds between heap trims by default (transceivers' ``heap_trim_interval``, backends)."""


def _malloc_trim():  # type: ignore[no-untyped-def]
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim``); False
    where there is none.

    A burst of call setups (DTLS handshakes, WebSocket connects, 256 KiB socket reads)
    leaves the heap with free pages between live allocations, which glibc keeps: in a
    transcoding transceiver at 40 calls, about 2 MB, or 50 KiB per call, more than a
    call's own state minus its codec. A trim costs well under a millisecond.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


async def trim_heap_every(interval: float) -> None:
    """Trim now and then every ``interval`` seconds, until cancelled (or no trim exists)."""
    while trim_heap():
        await asyncio.sleep(interval)
