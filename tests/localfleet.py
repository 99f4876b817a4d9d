"""A whole local fleet (relay workers and transceivers) started through the CLI for tests."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

SECRET = os.urandom(32)


class LocalFleet:
    """`voxrelay up --detach` with transceivers, from a generated config."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        transceivers: int = 2,
        workers: int = 2,
        drain_seconds: float = 1,
        extra: str = "",
        config: str | None = None,
    ) -> None:
        """``config``, when given, replaces the generated file; ``{name}``,
        ``{runtime_dir}`` and ``{secret}`` in it are filled in."""
        self.name = f"c{secrets.token_hex(4)}"
        self.runtime_dir = tmp_path / "run"
        self.config_path = tmp_path / "fleet.toml"
        tmp_path.mkdir(parents=True, exist_ok=True)
        if config is not None:
            self.config_path.write_text(
                config.format(name=self.name, runtime_dir=self.runtime_dir, secret=SECRET.hex())
            )
            return
        self.config_path.write_text(
            "\n".join(
                [
                    "[fleet]",
                    f'name = "{self.name}"',
                    "cluster_id = 9",
                    f'runtime_dir = "{self.runtime_dir}"',
                    'log_format = "text"',
                    "[secrets]",
                    f'token_secrets = ["hex:{SECRET.hex()}"]',
                    "[relay]",
                    'bind = "127.0.0.1"',
                    "port = 0",
                    f"workers = {workers}",
                    f"drain_seconds = {drain_seconds}",
                    "restart_backoff_initial = 0.05",
                    "[metrics]",
                    "port = 0",
                    "[transceiver]",
                    f"count = {transceivers}",
                    "signaling_port = 0",
                ]
            )
            + "\n"
            + extra
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "voxrelay", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}\n{self.log()}")
        return result

    def log(self) -> str:
        path = self.runtime_dir / "voxrelay.log"
        return path.read_text()[-6000:] if path.exists() else ""

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def transceiver_status(self, row: dict) -> dict:
        with urllib.request.urlopen(row["private_url"] + "status", timeout=5) as response:
            return json.loads(response.read())
