"""The ``voxrelay`` command: start, stop and inspect a fleet; check configs; run benchmarks.

The CLI only parses arguments and calls engine/; everything it shows comes from the
supervisor's /status endpoint or its runtime directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from voxrelay import __version__

CONFIG_OPTION = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: the embedded single-machine config).",
)


def _load(config_path: str | None):
    from voxrelay.engine.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="voxrelay")
def cli() -> None:
    """voxrelay: a WebRTC edge for real-time voice AI."""


def _run_foreground(config_path: str | None, role: str) -> None:
    from voxrelay.engine.logs import setup_logging
    from voxrelay.engine.supervisor import Supervisor, SupervisorError

    config = _load(config_path)
    setup_logging(config.fleet.log_level, config.fleet.log_format)
    if role == "transceiver":
        from voxrelay.engine.transceiver_pool import TransceiverHost

        supervisor = TransceiverHost(config, config_path=config_path)
    else:
        supervisor = Supervisor(config, config_path=config_path, role=role)
    try:
        supervisor.start()
    except SupervisorError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(supervisor.run())


def _start(config_path: str | None, role: str, detach: bool, wait: float) -> None:
    if not detach:
        _run_foreground(config_path, role)
        return
    from voxrelay.engine.supervisor import read_state

    config = _load(config_path)
    runtime_dir = Path(config.fleet.runtime_dir)
    if read_state(runtime_dir) is not None:
        raise click.ClickException(
            f"a fleet named {config.fleet.name!r} is already running; `voxrelay down` first"
        )
    runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = runtime_dir / "voxrelay.log"
    args = [sys.executable, "-m", "voxrelay", role]
    if config_path:
        args += ["--config", str(Path(config_path).resolve())]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        state = read_state(runtime_dir)
        if (
            state is not None
            and state.get("pid") == process.pid
            and _transceivers_ready(state, deadline)
        ):
            _print_summary(state)
            click.echo(f"logs: {log_path}")
            return
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise click.ClickException(
                "the fleet failed to start:\n" + "\n".join(tail) if tail else "see " + str(log_path)
            )
        time.sleep(0.05)
    raise click.ClickException(f"the fleet did not report ready within {wait:g} s; see {log_path}")


def _transceivers_ready(state: dict[str, Any], deadline: float) -> bool:
    """Whether this machine's transceivers serve signaling (true if it runs none)."""
    status = _fetch_status(state)
    if status is None:
        return True  # metrics (and /status) disabled: state.json is all there is
    local = status.get("local_transceivers") or []
    return all(row.get("alive") and row.get("private_url") for row in local)


def _print_summary(state: dict[str, Any]) -> None:
    status = _fetch_status(state)
    relay = (status.get("relay") if status else None) or {}
    if state.get("role") == "transceiver":
        click.echo(
            f"voxrelay transceivers {state['name']!r} up (pid {state['pid']}) behind relays "
            f"{state['public_address']}:{state['public_port']}"
        )
    else:
        click.echo(
            f"voxrelay fleet {state['name']!r} up (pid {state['pid']}): relay "
            f"{state['public_address']}:{state['public_port']}, "
            f"{len(relay.get('workers', []))} workers"
        )
    if status and status.get("signaling_url"):
        click.echo(f"signaling: {status['signaling_url']}")
    if state.get("control_url"):
        click.echo(
            f"metrics: {state['control_url']}/metrics  status: {state['control_url']}/status"
        )


def _start_options(command):
    """The options `up` and `relay` share."""
    command = click.option(
        "--wait", default=30.0, show_default=True, help="Seconds to wait for --detach."
    )(command)
    command = click.option(
        "--detach", "-d", is_flag=True, help="Run in the background and return."
    )(command)
    return CONFIG_OPTION(command)


@cli.command()
@_start_options
def up(config_path: str | None, detach: bool, wait: float) -> None:
    """Start the whole fleet on this machine: relay workers, transceivers, echo backend.

    Without --config it runs the embedded default: relays on 127.0.0.1:3478 and the echo
    demo at http://127.0.0.1:8080/ (open it in a browser and talk).
    """
    _start(config_path, "up", detach, wait)


@cli.command()
@_start_options
def relay(config_path: str | None, detach: bool, wait: float) -> None:
    """Run only the relay role (for a host that only relays)."""
    _start(config_path, "relay", detach, wait)


@cli.command()
@_start_options
def transceiver(config_path: str | None, detach: bool, wait: float) -> None:
    """Run only the transceivers (for a host behind relays elsewhere; see etc/two-host)."""
    _start(config_path, "transceiver", detach, wait)


@cli.command()
@CONFIG_OPTION
@click.option("--timeout", default=None, type=float, help="Seconds to wait (default: drain+15).")
@click.option("--now", is_flag=True, help="Skip the drain grace period.")
def down(config_path: str | None, timeout: float | None, now: bool) -> None:
    """Stop a running fleet: drain, then exit."""
    from voxrelay.engine.supervisor import read_state

    config = _load(config_path)
    state = read_state(config.fleet.runtime_dir)
    if state is None:
        click.echo(f"fleet {config.fleet.name!r} is not running")
        return
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    if now:
        time.sleep(0.1)
        os.kill(pid, signal.SIGTERM)
    limit = timeout if timeout is not None else float(state.get("drain_seconds", 5)) + 15
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if read_state(config.fleet.runtime_dir) is None:
            click.echo(f"fleet {config.fleet.name!r} stopped")
            return
        time.sleep(0.1)
    raise click.ClickException(f"fleet (pid {pid}) still running after {limit:g} s")


def _fetch_status(state: dict[str, Any]) -> dict[str, Any] | None:
    url = state.get("control_url")
    if not url:
        return None
    try:
        with urllib.request.urlopen(url + "/status", timeout=3) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


@cli.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(config_path: str | None, as_json: bool) -> None:
    """Show the fleet at a glance."""
    from voxrelay.engine.supervisor import read_state

    config = _load(config_path)
    state = read_state(config.fleet.runtime_dir)
    if state is None:
        if as_json:
            click.echo(json.dumps({"name": config.fleet.name, "running": False}))
        else:
            click.echo(f"fleet {config.fleet.name!r} is not running")
        sys.exit(3)
    info = _fetch_status(state)
    if info is None:
        raise click.ClickException(
            f"fleet pid {state['pid']} is running but its status endpoint does not answer"
        )
    info["running"] = True
    if as_json:
        click.echo(json.dumps(info))
        return
    _print_status(info)


def _print_status(info: dict[str, Any]) -> None:
    relay, table = info["relay"], info["routing_table"]
    flag = "  DRAINING" if info.get("draining") else ""
    role = info.get("role", "relay")
    click.echo(
        f"fleet {info['name']!r} cluster {info['cluster_id']} pid {info['pid']} ({role}){flag}"
    )
    if relay is not None:
        click.echo(
            f"  relay       {relay['public_address']}:{relay['port']} (bind {relay['bind']})"
        )
    if info.get("signaling_url"):
        click.echo(f"  signaling   {info['signaling_url']}")
    if info.get("metrics_url"):
        click.echo(f"  metrics     {info['metrics_url']}/metrics")
    for row in info.get("local_transceivers") or []:
        state = "alive" if row["alive"] else "RESTARTING"
        click.echo(
            f"  transceiver #{row['id']:<5} pid {row['pid'] or '-':<8} udp {row['udp_port']:<6} "
            f"{state}, {row['restarts']} restarts"
        )
    if relay is None:
        return
    used = table["entries"] / table["capacity"] * 100 if table["capacity"] else 0
    click.echo(
        f"  routes      {table['entries']} / {table['capacity']} ({used:.1f}%), "
        f"{table['memory_bytes'] / 1e6:.1f} MB shared, {table['refused']} refused"
    )
    click.echo(
        "  workers     idx  pid      state      cpu  rx_pub   tx_pub   rx_int   tx_int   drops"
    )
    for w in relay["workers"]:
        c = w["counters"]
        drops = sum(w["drops"].values())
        cpu = "-" if w["cpu"] is None else str(w["cpu"])
        click.echo(
            f"              {w['index']:<4} {w['pid'] or '-':<8} {w['state']:<10} {cpu:<4} "
            f"{c['rx_public']:<8} {c['tx_public']:<8} {c['rx_internal']:<8} "
            f"{c['tx_internal']:<8} {drops}"
        )
    totals: dict[str, int] = {}
    for w in relay["workers"]:
        for reason, value in w["drops"].items():
            totals[reason] = totals.get(reason, 0) + value
    nonzero = {k: v for k, v in totals.items() if v}
    if nonzero:
        click.echo("  drops       " + ", ".join(f"{k}={v}" for k, v in sorted(nonzero.items())))
    if info["transceivers"]:
        click.echo("  transceivers")
        for t in info["transceivers"]:
            click.echo(f"              #{t['id']:<5} {t['address']:<24} {t['health']}")
    else:
        click.echo("  transceivers none registered")
    if info.get("redis"):
        mirror = info["redis"].get("mirror") or {}
        state = "connected" if mirror.get("connected") else "DISCONNECTED"
        click.echo(f"  redis       {info['redis']['url']} {state}")


@cli.group()
def config() -> None:
    """Inspect and validate configuration files."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate FILE; print 'ok' or a one-line error naming the file and key."""
    from voxrelay.engine.config import check_config_file

    ok, message = check_config_file(path)
    if ok:
        click.echo(message or "ok")
        return
    click.echo(message, err=True)
    sys.exit(1)


@config.command("show")
@CONFIG_OPTION
def config_show(config_path: str | None) -> None:
    """Print the effective config (secrets redacted) as JSON."""
    from voxrelay.engine.config import config_to_dict

    click.echo(json.dumps(config_to_dict(_load(config_path)), indent=2, default=str))


@cli.command()
@click.argument("kind", type=click.Choice(["echo", "agent"]))
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, help="TCP port (0: pick one).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
def backend(kind: str, bind: str, port: int, log_format: str) -> None:
    """Run an example backend service (WebSocket, docs/backend-protocol.md).

    echo sends every caller frame back; agent answers when the caller's turn ends and
    stops when interrupted (configure the transceiver with [backend] codec = "pcm16").
    Point [backend] url at ws://BIND:PORT/call.
    """
    import asyncio
    import contextlib

    from voxrelay.engine.logs import setup_logging

    setup_logging("info", log_format)
    if kind == "echo":
        from voxrelay.backends.echo import serve
    else:
        from voxrelay.backends.agent import serve
    click.echo(f"{kind} backend on ws://{bind}:{port}/call")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops it
        asyncio.run(serve(bind, port))


@cli.group()
def bench() -> None:
    """Benchmarks that compare voxrelay with a baseline measured in the same run."""


try:
    from voxrelay.bench.relay_bench import relay_bench_command

    bench.add_command(relay_bench_command, "relay")
except ImportError:  # the benchmark module is optional at import time
    pass

try:
    from voxrelay.bench.setup_bench import setup_bench_command

    bench.add_command(setup_bench_command, "setup")
except ImportError:  # needs aiortc, which only the test extra installs
    pass

from voxrelay.bench.latency_probe import latency_command  # noqa: E402 (imports lazily)

bench.add_command(latency_command, "latency")

try:
    from voxrelay.bench.sessions_bench import sessions_command

    bench.add_command(sessions_command, "sessions")
except ImportError:  # needs aiortc (the baseline), which the bench and test extras install
    pass


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
