"""What the ``voxrelay bench`` commands share: errors, a temporary fleet driven through the
CLI, CPU accounting, report headers and CLI plumbing.

Kept apart so that each benchmark module holds only what it measures.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import psutil

_T = TypeVar("_T")


class BenchError(Exception):
    """The benchmark cannot run or lost a process mid-run; the message says which."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every process gets cleaned up by the finally blocks."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_reporting_errors(run: Callable[[], _T], errors: tuple[type[Exception], ...]) -> _T:
    """Run a benchmark for a click command: ``errors`` become a clean CLI error, Ctrl-C exit 130."""
    try:
        return run()
    except errors as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted; all benchmark processes stopped", err=True)
        sys.exit(130)


# -- measuring ------------------------------------------------------------------------------


def cpu_seconds(pids: Iterable[int], what: str) -> float:
    """User + system CPU time of these processes, as the kernel accounts it."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error as exc:
            raise BenchError(f"cannot read the CPU time of {what} pid {pid}: {exc}") from exc
        total += times.user + times.system
    return total


def ratio_of(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, None when either is missing (or the denominator is 0)."""
    return None if numerator is None or not denominator else numerator / denominator


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A table cell: ``value`` formatted, or a dash when there is none."""
    return "-" if value is None else format(value, spec)


# -- reports --------------------------------------------------------------------------------


def report_header(benchmark: str) -> dict[str, Any]:
    """The first keys of every benchmark's JSON: what ran, when, which version, on what."""
    from voxrelay import __version__

    return {
        "benchmark": benchmark,
        "schema_version": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "voxrelay_version": __version__,
        "machine": {
            "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()),
        },
    }


# -- a fleet of our own ---------------------------------------------------------------------


class CliFleet:
    """A fleet started and stopped through the CLI like an operator would, from a config
    the subclass writes to ``config_path``; ``runtime_dir`` holds its state and log."""

    def __init__(self, workdir: Path) -> None:
        self.config_path = workdir / "fleet.toml"
        self.runtime_dir = workdir / "run"

    def write_config(self, lines: list[str]) -> None:
        self.config_path.write_text("\n".join(lines) + "\n")

    def identity_lines(self, name: str, cluster_id: int, token_secret: bytes) -> list[str]:
        """The config's [fleet] and [secrets] sections: a quiet fleet in ``runtime_dir``."""
        return [
            "[fleet]",
            f'name = "{name}"',
            f"cluster_id = {cluster_id}",
            f"runtime_dir = {json.dumps(str(self.runtime_dir))}",  # a JSON string is TOML
            'log_level = "warning"',
            "[secrets]",
            f'token_secrets = ["hex:{token_secret.hex()}"]',
        ]

    def _cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "voxrelay", *args, "--config", str(self.config_path)]
        try:
            return subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"`voxrelay {' '.join(args)}` did not finish within {timeout:g} s\n"
                f"{self.log_tail()}"
            ) from None

    def up(self, timeout: float) -> None:
        """`voxrelay up --detach`, raising with the log's tail when it fails."""
        result = self._cli("up", "--detach", timeout=timeout)
        if result.returncode != 0:
            raise BenchError(
                f"`voxrelay up --detach` failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}\n{self.log_tail()}"
            )

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "voxrelay.log"

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def down(self, pids: Iterable[int], *, via_cli: bool = True) -> None:
        """`voxrelay down --now` (if ``via_cli``), then kill those of ``pids`` that are still
        voxrelay's (the CLI may not have stopped them, or `up` failed half way)."""
        if via_cli:
            with contextlib.suppress(BenchError, OSError):
                self._cli("down", "--now", "--timeout", "10", timeout=20)
        for pid in pids:
            if pid <= 0:
                continue
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if "voxrelay" in " ".join(process.cmdline()):  # still ours, not a reused pid
                    process.kill()
                    process.wait(3)


# -- CLI options ----------------------------------------------------------------------------

_Command = TypeVar("_Command", bound=Callable[..., Any])


def temporary_fleet_options(command: _Command) -> _Command:
    """``--transceivers`` and ``--workers``: the size of the fleet a benchmark starts."""
    command = click.option(
        "--workers",
        default=1,
        show_default=True,
        type=click.IntRange(1, 64),
        help="Relay workers of the temporary fleet.",
    )(command)
    return click.option(
        "--transceivers",
        default=1,
        show_default=True,
        type=click.IntRange(1, 64),
        help="Transceivers of the temporary fleet.",
    )(command)


call_timeout_option = click.option(
    "--call-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(1, 120),
    help="Seconds a call may take to hear its first echo.",
)
