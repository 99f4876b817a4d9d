"""Small helpers shared by the process supervisors (relay workers, transceivers)."""

from __future__ import annotations

import socket

__all__ = ["STABLE_AFTER_SECONDS", "free_port", "restart_backoff"]

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
_PR_SET_TIMERSLACK = 29


def set_timer_slack(nanoseconds: int) -> None:
    """How late the kernel may end this process's sleeps (it batches timer wake-ups).

    Coalescing sleeps of ~100 us (relay workers, transceivers) need a tighter slack than
    the default 50 us.
    """
    import ctypes

    unused = ctypes.c_ulong(0)
    ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(nanoseconds), unused, unused, unused)
