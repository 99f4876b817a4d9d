"""Specification of the config file: defaults, shipped files, exact errors, token secrets."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import pickle
import re
import stat
import tempfile
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from voxrelay.engine.config import (
    EMBEDDED_DEFAULT_SOURCE,
    GENERATED_SECRET_FILENAME,
    REDACTED,
    SECTIONS,
    STATIC_TRANSCEIVER_KEYS,
    Config,
    ConfigError,
    StaticTransceiver,
    check_config_file,
    config_to_dict,
    load_config,
    parse_config,
    read_secrets_file,
    resolve_secrets,
)
from voxrelay.proto.token import key_id_for

ROOT = Path(__file__).resolve().parents[1]
ETC_FILES = sorted((ROOT / "etc").rglob("*.toml"))
ANNOTATED_EXAMPLE = ROOT / "etc" / "voxrelay.toml"
SOURCE = "test.toml"


def parse(text: str) -> Config:
    return parse_config(text, SOURCE)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return str(caught.value)


def with_runtime_dir(directory: Path, extra: str = "") -> Config:
    return parse(f'[fleet]\nruntime_dir = "{directory}"\n{extra}')


# -- rendering TOML (tests only): lets hypothesis build documents from values -------------


def toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"cannot render {value!r}")


def render(document: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, table in document.items():
        lines.append(f"[{toml_string(section)}]")
        lines.extend(f"{toml_string(key)} = {toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def without_none(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(item) for item in value]
    return value


# -- the shipped files --------------------------------------------------------------------


def test_embedded_default_is_a_loopback_fleet_without_redis() -> None:
    config = load_config()
    assert config.source == EMBEDDED_DEFAULT_SOURCE
    assert (config.relay.bind, config.relay.port) == ("127.0.0.1", 3478)
    assert config.relay.public_address == "127.0.0.1"
    assert config.transceiver.count == 1
    assert config.transceiver.signaling_bind == "127.0.0.1"
    assert config.redis.url is None
    assert config.secrets.token_secrets == ()
    assert config.secrets.token_secrets_file is None
    assert (config.metrics.bind, config.metrics.port) == ("127.0.0.1", 9464)


def test_etc_holds_the_annotated_file_and_the_two_host_example() -> None:
    names = {path.relative_to(ROOT / "etc").as_posix() for path in ETC_FILES}
    assert {
        "voxrelay.toml",
        "two-host/relay-host.toml",
        "two-host/transceiver-host.toml",
    } <= names


@pytest.mark.parametrize("path", ETC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_etc_file_loads(path: Path) -> None:
    assert load_config(path).source == str(path)


def test_annotated_example_lists_every_key_set_or_commented_out() -> None:
    documented: dict[str, set[str]] = {}
    section = ""
    for line in ANNOTATED_EXAMPLE.read_text().splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header.group(1)
            documented.setdefault(section, set())
            continue
        key = re.match(r"(?:# )?(\w+) = ", line)
        if key and section:
            documented[section].add(key.group(1))
    static = documented["transceivers"] - set(SECTIONS["transceivers"])
    documented["transceivers"] -= static
    assert static == set(STATIC_TRANSCEIVER_KEYS)  # the commented [[transceivers.static]]
    assert documented["transceivers"] == set()  # static itself is an array of tables
    documented["transceivers"].add("static")
    assert documented == {name: set(keys) for name, keys in SECTIONS.items()}


def test_annotated_example_states_the_builtin_defaults() -> None:
    annotated = load_config(ANNOTATED_EXAMPLE)
    assert dataclasses.replace(annotated, source=SOURCE) == parse("")


def test_two_host_example_shares_the_fleet_identity_and_relay_address() -> None:
    relays = load_config(ROOT / "etc" / "two-host" / "relay-host.toml")
    transceivers = load_config(ROOT / "etc" / "two-host" / "transceiver-host.toml")
    assert relays.fleet.cluster_id == transceivers.fleet.cluster_id
    assert relays.secrets.token_secrets_file == transceivers.secrets.token_secrets_file
    assert relays.redis.url == transceivers.redis.url is not None
    assert relays.relay.public_address == transceivers.relay.public_address
    assert relays.relay.port == transceivers.relay.port
    assert relays.transceiver.count == 0
    assert transceivers.transceiver.count > 0
    assert transceivers.transceiver.signaling_token is not None  # signaling is not loopback


# -- defaults and accepted values ---------------------------------------------------------


def test_empty_file_gives_a_one_machine_fleet() -> None:
    config = parse("")
    relay = config.relay
    assert config.fleet.cluster_id == 1 and config.fleet.name == "default"
    assert (config.fleet.log_level, config.fleet.log_format) == ("info", "text")
    assert (relay.bind, relay.port, relay.public_address) == ("0.0.0.0", 3478, "127.0.0.1")
    assert relay.workers == len(os.sched_getaffinity(0))
    assert (relay.internal_bind, relay.internal_port_base) == ("127.0.0.1", 0)
    assert (relay.table_capacity, relay.idle_timeout) == (100_000, 30.0)
    assert relay.recv_buffer_bytes == relay.send_buffer_bytes == 4 * 1024 * 1024
    assert (relay.batch_size, relay.max_datagram, relay.pin_cpus) == (32, 1500, False)
    assert relay.bundle_max_bytes == 1472  # a 1500-byte MTU less the IPv4 and UDP headers
    assert relay.coalesce_us == 100
    assert relay.drain_seconds == 5.0
    assert 0 < relay.restart_backoff_initial <= relay.restart_backoff_max
    assert config.transceivers.static == ()
    local = config.transceiver
    assert (local.count, local.first_id, local.bind, local.port) == (1, 1, "127.0.0.1", 0)
    assert local.advertise_address == "127.0.0.1"
    assert (local.signaling_bind, local.signaling_port) == ("127.0.0.1", 8080)
    assert local.signaling_token is None
    redis = config.redis
    assert redis.url is None and redis.route_ttl == 60.0
    assert (redis.mirror_interval, redis.recovery_rate) == (1.0, 200.0)
    assert (redis.negative_cache_seconds, redis.socket_timeout) == (5.0, 0.2)
    assert redis.heartbeat_interval == 2.0
    assert (config.metrics.enabled, config.metrics.bind, config.metrics.port) == (
        True,
        "127.0.0.1",
        9464,
    )


def test_runtime_dir_defaults_under_xdg_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert parse('[fleet]\nname = "lab"').fleet.runtime_dir == tmp_path / "voxrelay" / "lab"


@pytest.mark.parametrize("xdg", [None, "", "relative/run"])
def test_runtime_dir_falls_back_to_tmp_without_a_usable_xdg_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, xdg: str | None
) -> None:
    if xdg is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    expected = Path(f"/tmp/voxrelay-{os.getuid()}/default")
    assert parse("").fleet.runtime_dir == expected


def test_runtime_dir_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse('[fleet]\nruntime_dir = "~/run"').fleet.runtime_dir == tmp_path / "run"


@pytest.mark.parametrize(
    ("relay", "public_address"),
    [
        ('bind = "10.1.2.3"', "10.1.2.3"),
        ('bind = "0.0.0.0"', "127.0.0.1"),
        ('bind = "::"', "127.0.0.1"),
        ('bind = "::0001"', "::1"),
        ('bind = "0.0.0.0"\npublic_address = "203.0.113.10"', "203.0.113.10"),
        ('public_address = "2001:DB8::0:1"', "2001:db8::1"),
    ],
)
def test_public_address_defaults_to_a_reachable_bind_address(
    relay: str, public_address: str
) -> None:
    assert parse(f"[relay]\n{relay}").relay.public_address == public_address


def test_transceiver_advertise_address_defaults_like_the_relay_public_address() -> None:
    assert parse('[transceiver]\nbind = "10.0.0.2"').transceiver.advertise_address == "10.0.0.2"
    assert parse('[transceiver]\nbind = "::"').transceiver.advertise_address == "127.0.0.1"
    local = parse('[transceiver]\nbind = "::"\nadvertise_address = "fd00::2"').transceiver
    assert local.advertise_address == "fd00::2"


def test_transceiver_ids_follow_first_id() -> None:
    assert list(parse("[transceiver]\ncount = 3\nfirst_id = 101").transceiver.ids) == [
        101,
        102,
        103,
    ]


def test_route_ttl_defaults_to_twice_the_idle_timeout() -> None:
    assert parse("[relay]\nidle_timeout = 12.5").redis.route_ttl == 25.0


def test_numbers_of_seconds_accept_integers_and_floats() -> None:
    relay = parse("[relay]\ndrain_seconds = 2\nrestart_backoff_initial = 0.25").relay
    assert relay.drain_seconds == 2.0 and isinstance(relay.drain_seconds, float)
    assert relay.restart_backoff_initial == 0.25


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("false", False), ("[3, 1, 2]", (3, 1, 2))]
)
def test_pin_cpus_is_a_bool_or_cpu_ids(value: str, expected: bool | tuple[int, ...]) -> None:
    assert parse(f"[relay]\npin_cpus = {value}").relay.pin_cpus == expected


@pytest.mark.parametrize("value", [0, 576, 1472, 8972, 65507])
def test_bundle_max_bytes_is_off_or_a_datagram_size(value: int) -> None:
    assert parse(f"[relay]\nbundle_max_bytes = {value}").relay.bundle_max_bytes == value


@pytest.mark.parametrize(("text", "expected"), [("", 10.0), ("= 0", 0.0), ("= 2.5", 2.5)])
def test_heap_trim_interval_is_off_or_seconds(text: str, expected: float) -> None:
    config = parse(f"[transceiver]\nheap_trim_interval {text}" if text else "")
    assert config.transceiver.heap_trim_interval == expected


@pytest.mark.parametrize("value", [0, 1, 100, 200])
def test_coalesce_us_is_off_or_a_short_sleep(value: int) -> None:
    assert parse(f"[relay]\ncoalesce_us = {value}").relay.coalesce_us == value


@pytest.mark.parametrize("level", ["DEBUG", "Warning", "error"])
def test_log_level_ignores_case(level: str) -> None:
    assert parse(f'[fleet]\nlog_level = "{level}"').fleet.log_level == level.lower()


def test_static_transceivers_keep_their_order_and_normalize_addresses() -> None:
    config = parse(
        "[relay]\n"
        'internal_bind = "::"\n'
        '[[transceivers.static]]\nid = 7\naddress = "10.0.0.2:4000"\n'
        '[[transceivers.static]]\nid = 3\naddress = "[2001:DB8:0::5]:4001"\n'
    )
    assert config.transceivers.static == (
        StaticTransceiver(7, "10.0.0.2", 4000),
        StaticTransceiver(3, "2001:db8::5", 4001),
    )
    assert [t.address for t in config.transceivers.static] == [
        "10.0.0.2:4000",
        "[2001:db8::5]:4001",
    ]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("0123456789abcdef", b"0123456789abcdef"),
        ("hex:" + "00ff" * 8, bytes.fromhex("00ff" * 8)),
        ("HEX:" + "00FF" * 8, bytes.fromhex("00ff" * 8)),
        ("base64:" + base64.b64encode(b"\x01" * 20).decode(), b"\x01" * 20),
        ("pässwörd-pässwörd", "pässwörd-pässwörd".encode()),
    ],
)
def test_token_secrets_decode_hex_base64_or_text(text: str, secret: bytes) -> None:
    config = parse(f"[secrets]\ntoken_secrets = [{toml_string(text)}]")
    assert config.secrets.token_secrets == (secret,)


def test_two_token_secrets_keep_current_first() -> None:
    current, previous = distinct_key_id_secrets()
    config = parse(f'[secrets]\ntoken_secrets = ["hex:{current.hex()}", "hex:{previous.hex()}"]')
    assert config.secrets.token_secrets == (current, previous)


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://127.0.0.1:6379/0",
        "redis://user:secret@10.0.0.3:6379/2",
        "redis://:secret@redis_1:6379",
        "rediss://[::1]:6380?ssl_cert_reqs=none",
        "unix:///run/redis/redis.sock",
    ],
)
def test_redis_urls_accepted(url: str) -> None:
    assert parse(f'[redis]\nurl = "{url}"').redis.url == url


def test_same_port_on_distinct_addresses_is_no_conflict() -> None:
    config = parse('[relay]\nbind = "10.0.0.1"\n[transceiver]\nbind = "10.0.0.2"\nport = 3478')
    assert config.transceiver.port == config.relay.port == 3478


# -- errors: each kind, exact text --------------------------------------------------------

STATIC = '[[transceivers.static]]\nid = 5\naddress = "{}"'
SECRET_A = "a" * 20
SIGNALING_TOKEN_HINT = (
    "expected at least 16 characters of A-Z a-z 0-9 - . _ ~ + / (then optional '=' padding)"
)
REDIS_URL_HINT = (
    "expected a URL like redis://host:6379/0, rediss://host:6380 or unix:///path/to.sock"
)
ADDRESS_HINT = 'expected "host:port" with an IP address host (IPv6 as "[addr]:port")'

ERROR_CASES = [
    # syntax
    (
        "[relay\nport = 1",
        "invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)",
    ),
    (
        "[relay]\nport = 1\nport = 2\n",
        "invalid TOML: Cannot overwrite a value (at line 3, column 9)",
    ),
    # unknown names, with suggestions
    ("[relya]", "relya: unknown section; did you mean [relay]?"),
    ("[relay]\nprot = 1", "relay.prot: unknown key; did you mean 'port'?"),
    ("[relay]\nidle_timout = 5", "relay.idle_timout: unknown key; did you mean 'idle_timeout'?"),
    (
        '[relay]\nurl = "redis://x"',
        "relay.url: unknown key; did you mean 'redis.url' or 'backend.url'?",
    ),
    ("[metrics]\nzzz = 1", "metrics.zzz: unknown key; expected one of: enabled, bind, port"),
    (
        "port = 1",
        "port: unknown key; did you mean 'relay.port', 'transceiver.port' or 'metrics.port'?",
    ),
    (
        "[nonsense]",
        "nonsense: unknown section; expected one of the sections [fleet], [secrets], [relay], "
        "[transceivers], [transceiver], [redis], [metrics], [backend]",
    ),
    (
        '[[transceiver.static]]\nid = 5\naddress = "127.0.0.1:4000"',
        "transceiver.static: unknown key; did you mean 'transceivers.static'?",
    ),
    (
        STATIC.format("127.0.0.1:4000") + "\nport = 4",
        "transceivers.static[0].port: unknown key; expected one of: id, address",
    ),
    ("relay = 5", "relay: expected a table ([relay]), got 5"),
    # types: a bool is not an integer, a float is not a port
    ("[relay]\nport = true", "relay.port: expected an integer in 0..65535, got True"),
    ("[relay]\nport = 3478.0", "relay.port: expected an integer in 0..65535, got 3478.0"),
    ('[relay]\nport = "3478"', "relay.port: expected an integer in 0..65535, got '3478'"),
    (
        "[fleet]\ncluster_id = 1979-05-27",
        "fleet.cluster_id: expected an integer in 0..65535, got datetime.date(1979, 5, 27)",
    ),
    ("[metrics]\nenabled = 'yes'", "metrics.enabled: expected true or false, got 'yes'"),
    ("[metrics]\nenabled = 1", "metrics.enabled: expected true or false, got 1"),
    # ranges
    ("[relay]\nport = 70000", "relay.port: expected an integer in 0..65535, got 70000"),
    ("[fleet]\ncluster_id = -1", "fleet.cluster_id: expected an integer in 0..65535, got -1"),
    ("[relay]\nbatch_size = 0", "relay.batch_size: expected an integer in 1..1024, got 0"),
    ("[relay]\nbatch_size = 1025", "relay.batch_size: expected an integer in 1..1024, got 1025"),
    (
        "[relay]\nmax_datagram = 575",
        "relay.max_datagram: expected an integer in 576..65535, got 575",
    ),
    ("[relay]\nworkers = 0", "relay.workers: expected an integer in 1..1024, got 0"),
    *(
        (
            f"[transceiver]\nheap_trim_interval = {value}",
            "transceiver.heap_trim_interval: expected 0 (off) or a number of seconds in "
            f"1..3600, got {shown}",
        )
        for value, shown in (("0.5", "0.5"), ("-1", "-1"), ("3601", "3601"), ('"10"', "'10'"))
    ),
    ("[relay]\ncoalesce_us = 201", "relay.coalesce_us: expected an integer in 0..200, got 201"),
    ("[relay]\ncoalesce_us = -1", "relay.coalesce_us: expected an integer in 0..200, got -1"),
    ("[relay]\ncoalesce_us = 0.5", "relay.coalesce_us: expected an integer in 0..200, got 0.5"),
    *(
        (
            f"[relay]\nbundle_max_bytes = {value}",
            f"relay.bundle_max_bytes: expected 0 (off) or an integer in 576..65507, got {shown}",
        )
        for value, shown in (
            ("1", "1"),
            ("575", "575"),
            ("65508", "65508"),
            ("-1", "-1"),
            ("true", "True"),
            ('"1472"', "'1472'"),
            ("1472.0", "1472.0"),
        )
    ),
    (
        "[relay]\ntable_capacity = 0",
        "relay.table_capacity: expected an integer in 1..100000000, got 0",
    ),
    (
        "[relay]\nrecv_buffer_bytes = 1024",
        "relay.recv_buffer_bytes: expected an integer in 4096..1073741824, got 1024",
    ),
    (
        "[relay]\nidle_timeout = 0.5",
        "relay.idle_timeout: expected a number of seconds in 1..86400, got 0.5",
    ),
    (
        "[relay]\nidle_timeout = nan",
        "relay.idle_timeout: expected a number of seconds in 1..86400, got nan",
    ),
    (
        "[relay]\ndrain_seconds = inf",
        "relay.drain_seconds: expected a number of seconds in 0..3600, got inf",
    ),
    (
        "[relay]\ndrain_seconds = false",
        "relay.drain_seconds: expected a number of seconds in 0..3600, got False",
    ),
    (
        "[relay]\nidle_timeout = 1" + "0" * 400,
        "relay.idle_timeout: expected a number of seconds in 1..86400, got 1" + "0" * 76 + "...",
    ),
    (
        "[redis]\nsocket_timeout = 0",
        "redis.socket_timeout: expected a number of seconds in 0.001..60, got 0",
    ),
    (
        "[redis]\nrecovery_rate = -1",
        "redis.recovery_rate: expected a number of lookups per second in 0..100000, got -1",
    ),
    (
        "[relay]\nrestart_backoff_initial = 10\nrestart_backoff_max = 5",
        "relay.restart_backoff_max: expected a number >= relay.restart_backoff_initial (10), got 5",
    ),
    (
        "[relay]\nworkers = 2\ninternal_port_base = 65535",
        "relay.internal_port_base: expected 0 or a port in 1..65534 "
        "(relay.workers = 2 consecutive ports), got 65535",
    ),
    (
        "[redis]\nroute_ttl = 10",
        "redis.route_ttl: expected a number of seconds >= relay.idle_timeout (30), got 10",
    ),
    # choices and names
    (
        '[fleet]\nlog_level = "warn"',
        "fleet.log_level: expected one of 'debug', 'info', 'warning', 'error', 'critical', "
        "got 'warn' (did you mean 'warning'?)",
    ),
    (
        '[fleet]\nlog_level = "verbose"',
        "fleet.log_level: expected one of 'debug', 'info', 'warning', 'error', 'critical', "
        "got 'verbose'",
    ),
    ("[fleet]\nlog_format = 1", "fleet.log_format: expected one of 'text', 'json', got 1"),
    (
        '[fleet]\nname = "my fleet"',
        "fleet.name: expected 1-32 characters of A-Z a-z 0-9 _ - starting with a letter or "
        "digit, got 'my fleet'",
    ),
    (
        '[fleet]\nname = "-x"',
        "fleet.name: expected 1-32 characters of A-Z a-z 0-9 _ - starting with a letter or "
        "digit, got '-x'",
    ),
    ('[fleet]\nruntime_dir = "run/x"', "fleet.runtime_dir: expected an absolute path, got 'run/x'"),
    (
        '[fleet]\nruntime_dir = "~nosuchuser/run"',
        "fleet.runtime_dir: expected an absolute path, got '~nosuchuser/run'",
    ),
    # addresses
    ('[relay]\nbind = "localhost"', "relay.bind: expected an IP address, got 'localhost'"),
    (
        '[relay]\nbind = "[::1]"',
        "relay.bind: expected an IP address (without brackets), got '[::1]'",
    ),
    ('[relay]\nbind = "224.0.0.1"', "relay.bind: expected a unicast IP address, got '224.0.0.1'"),
    (
        '[relay]\npublic_address = "::"',
        "relay.public_address: expected a specific IP address (not a wildcard), got '::'",
    ),
    (
        '[transceiver]\nadvertise_address = "0.0.0.0"',
        "transceiver.advertise_address: expected a specific IP address (not a wildcard), "
        "got '0.0.0.0'",
    ),
    ("[metrics]\nbind = 127", "metrics.bind: expected an IP address, got 127"),
    # pin_cpus
    (
        "[relay]\npin_cpus = []",
        "relay.pin_cpus: expected true, false or a non-empty list of distinct CPU ids in "
        "0..4095, got []",
    ),
    (
        '[relay]\npin_cpus = "all"',
        "relay.pin_cpus: expected true, false or a non-empty list of distinct CPU ids in "
        "0..4095, got 'all'",
    ),
    (
        "[relay]\npin_cpus = [1, 1]",
        "relay.pin_cpus[1]: expected a CPU id not already listed, got 1",
    ),
    ("[relay]\npin_cpus = [true]", "relay.pin_cpus[0]: expected a CPU id in 0..4095, got True"),
    # the static registry
    (
        "[transceivers]\nstatic = 5",
        "transceivers.static: expected an array of tables ([[transceivers.static]]), got 5",
    ),
    (
        "[transceivers]\nstatic = [5]",
        "transceivers.static[0]: expected a table with id and address, got 5",
    ),
    (
        '[[transceivers.static]]\naddress = "127.0.0.1:4000"',
        "transceivers.static[0].id: expected an integer in 1..65535, got nothing",
    ),
    (
        '[[transceivers.static]]\nid = 0\naddress = "127.0.0.1:4000"',
        "transceivers.static[0].id: expected an integer in 1..65535, got 0",
    ),
    (
        STATIC.format("127.0.0.1:4000") + "\n" + STATIC.format("127.0.0.1:4001"),
        "transceivers.static[1].id: expected an id not already used by transceivers.static[0], "
        "got 5",
    ),
    (
        STATIC.format("127.0.0.1:4000")
        + '\n[[transceivers.static]]\nid = 6\naddress = "127.0.0.1:4000"',
        "transceivers.static[1].address: expected an address not already used by "
        "transceivers.static[0], got '127.0.0.1:4000'",
    ),
    (
        "[[transceivers.static]]\nid = 5",
        f"transceivers.static[0].address: {ADDRESS_HINT}, got nothing",
    ),
    (
        STATIC.format("127.0.0.1"),
        f"transceivers.static[0].address: {ADDRESS_HINT}, got '127.0.0.1'",
    ),
    (
        STATIC.format("transceiver1:4000"),
        f"transceivers.static[0].address: {ADDRESS_HINT}, got 'transceiver1:4000'",
    ),
    (
        STATIC.format("[::1]4000"),
        f"transceivers.static[0].address: {ADDRESS_HINT}, got '[::1]4000'",
    ),
    (
        STATIC.format("::1:4000"),
        'transceivers.static[0].address: expected an IPv6 host in brackets ("[addr]:port"), '
        "got '::1:4000'",
    ),
    (
        STATIC.format("[127.0.0.1]:4000"),
        "transceivers.static[0].address: expected an IPv6 address inside the brackets, "
        "got '[127.0.0.1]:4000'",
    ),
    (
        STATIC.format("127.0.0.1:0"),
        "transceivers.static[0].address: expected a port in 1..65535 after the colon, "
        "got '127.0.0.1:0'",
    ),
    (
        STATIC.format("127.0.0.1:+80"),
        "transceivers.static[0].address: expected a port in 1..65535 after the colon, "
        "got '127.0.0.1:+80'",
    ),
    (
        STATIC.format("127.0.0.1:\u0663"),  # ARABIC-INDIC DIGIT THREE: int() would take it
        "transceivers.static[0].address: expected a port in 1..65535 after the colon, "
        "got '127.0.0.1:\u0663'",
    ),
    (
        STATIC.format("0.0.0.0:4000"),
        "transceivers.static[0].address: expected a specific unicast IP address "
        "(not a wildcard), got '0.0.0.0:4000'",
    ),
    (
        STATIC.format("[::1]:4000"),
        "transceivers.static[0].address: expected an IPv4 address (reachable from "
        "relay.internal_bind 127.0.0.1), got '[::1]:4000'",
    ),
    (
        '[[transceivers.static]]\nid = 1\naddress = "127.0.0.1:4000"',
        "transceivers.static[0].id: expected an id outside 1..1 (the ids of this machine's "
        "transceivers, see [transceiver]), got 1",
    ),
    # the local transceivers
    (
        "[transceiver]\ncount = 2\nfirst_id = 65535",
        "transceiver.first_id: expected an id in 1..65534 "
        "(transceiver.count = 2 consecutive ids), got 65535",
    ),
    (
        "[transceiver]\ncount = 3\nport = 65534",
        "transceiver.port: expected 0 or a port in 1..65533 "
        "(transceiver.count = 3 consecutive ports), got 65534",
    ),
    (
        '[transceiver]\nsignaling_token = "short"',
        f"transceiver.signaling_token: {SIGNALING_TOKEN_HINT}, got 5 characters",
    ),
    (
        '[transceiver]\nsignaling_token = "this has spaces in it"',
        f"transceiver.signaling_token: {SIGNALING_TOKEN_HINT}, got the character ' '",
    ),
    (
        '[transceiver]\nsignaling_token = "abcdefghij=klmnopqr"',
        f"transceiver.signaling_token: {SIGNALING_TOKEN_HINT}, got '=' before the end",
    ),
    (
        "[transceiver]\nsignaling_token = 7",
        "transceiver.signaling_token: expected a bearer token string, got 7",
    ),
    # secrets (never echoed)
    (
        '[secrets]\ntoken_secrets = ["tooshort"]',
        "secrets.token_secrets[0]: expected at least 16 bytes after decoding, got 8 bytes",
    ),
    (
        '[secrets]\ntoken_secrets = ["hex:0011"]',
        "secrets.token_secrets[0]: expected at least 16 bytes after decoding, got 2 bytes",
    ),
    (
        '[secrets]\ntoken_secrets = ["hex:zz00112233445566778899aabbccddeeff"]',
        "secrets.token_secrets[0]: expected hex digits after 'hex:', got invalid hex",
    ),
    (
        '[secrets]\ntoken_secrets = ["base64:!!!!secret-secret-secret"]',
        "secrets.token_secrets[0]: expected standard base64 after 'base64:', got invalid base64",
    ),
    (
        "[secrets]\ntoken_secrets = []",
        "secrets.token_secrets: expected a list of 1 or 2 secrets (current first), got []",
    ),
    (
        f'[secrets]\ntoken_secrets = ["{SECRET_A}", "b", "c"]',
        "secrets.token_secrets: expected a list of 1 or 2 secrets (current first), "
        "got ['<redacted>', '<redacted>', '<redacted>']",
    ),
    (
        f'[secrets]\ntoken_secrets = "{SECRET_A}"',
        "secrets.token_secrets: expected a list of 1 or 2 secrets (current first), "
        "got '<redacted>'",
    ),
    (
        '[secrets]\ntoken_secrets = [["nested-secret-value"]]',
        'secrets.token_secrets[0]: expected a string ("hex:...", "base64:..." or text), '
        "got an array",
    ),
    (
        f'[secrets]\ntoken_secrets = ["{SECRET_A}", "{SECRET_A}"]',
        "secrets.token_secrets: expected secrets with different key ids (1 in 16 pairs "
        "collide; generate another current secret), got the same secret twice with key id "
        f"{key_id_for(SECRET_A.encode())}",
    ),
    (
        f'[secrets]\ntoken_secrets = ["{SECRET_A}"]\ntoken_secrets_file = "/etc/s"',
        "secrets.token_secrets_file: expected either token_secrets or token_secrets_file, "
        "not both, got '/etc/s'",
    ),
    (
        '[secrets]\ntoken_secrets_file = "secrets.txt"',
        "secrets.token_secrets_file: expected an absolute path, got 'secrets.txt'",
    ),
    # redis (passwords never echoed)
    ('[redis]\nurl = "http://x"', f"redis.url: {REDIS_URL_HINT}, got 'http://x'"),
    ('[redis]\nurl = ""', f"redis.url: {REDIS_URL_HINT}, got ''"),
    ('[redis]\nurl = "redis://"', f"redis.url: {REDIS_URL_HINT}, got 'redis://'"),
    ('[redis]\nurl = "redis://a b"', f"redis.url: {REDIS_URL_HINT}, got 'redis://a b'"),
    (
        '[redis]\nurl = "redis://:hunter2@host:99999"',
        f"redis.url: {REDIS_URL_HINT}, got 'redis://:<redacted>@host:99999'",
    ),
    (
        '[redis]\nurl = "redis://host/abc"',
        f"redis.url: {REDIS_URL_HINT} (the path is a database number), got 'redis://host/abc'",
    ),
    ('[redis]\nurl = "unix://host/s"', f"redis.url: {REDIS_URL_HINT}, got 'unix://host/s'"),
    ("[redis]\nurl = 6379", f"redis.url: {REDIS_URL_HINT}, got 6379"),
    # listeners that would share a port
    (
        "[metrics]\nport = 8080",
        "transceiver.signaling_port: expected ports not used by metrics.port "
        "(8080 on 127.0.0.1), got 8080 on 127.0.0.1",
    ),
    (
        "[transceiver]\nport = 3478",
        "transceiver.port: expected ports not used by relay.port (3478 on 0.0.0.0), "
        "got 3478 on 127.0.0.1",
    ),
    (
        '[relay]\nbind = "::"\n[transceiver]\nport = 3478',
        "transceiver.port: expected ports not used by relay.port (3478 on ::), "
        "got 3478 on 127.0.0.1",
    ),
    (
        "[relay]\ninternal_port_base = 3470\nworkers = 10",
        "relay.internal_port_base: expected ports not used by relay.port (3478 on 0.0.0.0), "
        "got 3470..3479 on 127.0.0.1",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERROR_CASES, ids=[m for _, m in ERROR_CASES])
def test_error_message_is_exact(text: str, message: str) -> None:
    assert error_of(text) == f"{SOURCE}: {message}"


@pytest.mark.parametrize(
    "text",
    [
        "[transceiver]\ncount = 0\nport = 3478",  # no local transceivers: nothing binds it
        "[metrics]\nenabled = false\nport = 8080",
        "[relay]\nport = 0\n[transceiver]\nport = 0",
        '[relay]\nbind = "::1"\n[transceiver]\nport = 3478',
    ],
)
def test_listeners_that_cannot_collide_are_accepted(text: str) -> None:
    parse(text)


def test_errors_report_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("[relay]\nport = -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: relay.port: expected an integer in 0..65535, got -1"
    assert (caught.value.source, caught.value.key) == (str(path), "relay.port")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"^.*absent\.toml: cannot read the file: No such"):
        load_config(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read the file: Is a directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[fleet]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: expected UTF-8 text in the file, got byte 0xe9 on line 2"


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[fleet]\nname = "bom"\n')
    assert load_config(path).fleet.name == "bom"


def test_deep_nesting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^test\.toml: invalid TOML: "):
        parse("x = " + "[" * 5000 + "]" * 5000)


def test_config_error_is_one_line_even_from_a_strange_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("[relay]\nport = -1", "odd\nname.toml")
    assert "\n" not in str(caught.value)


def test_config_error_pickles_for_other_processes() -> None:
    error = ConfigError("a.toml", "relay.port", "expected an integer, got 'x'")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.key, copy.detail, str(copy)) == (
        error.source,
        error.key,
        error.detail,
        str(error),
    )


def test_check_config_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[relay]\nworkers = 2\n")
    bad.write_text("[relay]\nworkers = 0\n")
    assert check_config_file(good) == (True, "ok")
    assert check_config_file(bad) == (
        False,
        f"{bad}: relay.workers: expected an integer in 1..1024, got 0",
    )


def test_check_config_file_reads_the_secrets_file(tmp_path: Path) -> None:
    secrets_file = tmp_path / "token-secrets"
    path = tmp_path / "fleet.toml"
    path.write_text(f'[secrets]\ntoken_secrets_file = "{secrets_file}"\n')
    assert check_config_file(path) == (
        False,
        f"{path}: secrets.token_secrets_file: expected a readable file, got "
        f"'{secrets_file}' (No such file or directory)",
    )
    secrets_file.write_text(SECRET_A + "\n")
    assert check_config_file(path) == (True, "ok")


# -- config_to_dict -----------------------------------------------------------------------


def test_config_to_dict_mirrors_the_file_and_redacts_secrets() -> None:
    plain_secret = "do-not-print-this-secret"
    config = parse(
        f'[secrets]\ntoken_secrets = ["{plain_secret}"]\n'
        '[transceiver]\nsignaling_token = "do-not-print-this-token"\n'
        '[redis]\nurl = "redis://user:do-not-print-this-password@10.0.0.3:6379/0"\n'
    )
    view = config_to_dict(config)
    text = json.dumps(view)
    for leak in ("do-not-print", plain_secret.encode().hex()):
        assert leak not in text
        assert leak not in repr(config)
    assert view["secrets"] == {
        "source": "inline",
        "token_secrets": [REDACTED],
        "token_secrets_file": None,
    }
    assert view["redis"]["url"] == f"redis://user:{REDACTED}@10.0.0.3:6379/0"
    assert view["transceiver"]["signaling_token"] == REDACTED
    assert view["source"] == SOURCE
    for section, keys in SECTIONS.items():
        expected = set(keys) | ({"source"} if section == "secrets" else set())
        assert set(view[section]) == expected


def test_config_to_dict_resolves_derived_defaults() -> None:
    view = config_to_dict(parse("[relay]\nidle_timeout = 10"))
    assert view["relay"]["public_address"] == "127.0.0.1"
    assert view["redis"]["route_ttl"] == 20.0
    assert view["secrets"]["source"] == "generated"


def without_redacted(config: Config) -> Config:
    """``config`` less what config_to_dict redacts: secrets, tokens, passwords."""
    url = config.redis.url
    return dataclasses.replace(
        config,
        source=SOURCE,
        secrets=parse("").secrets,
        transceiver=dataclasses.replace(config.transceiver, signaling_token=None),
        redis=dataclasses.replace(
            config.redis, url=None if url and urllib.parse.urlsplit(url).password else url
        ),
    )


def assert_view_round_trips(config: Config) -> None:
    """config_to_dict, rendered back to TOML, parses to the same config (less redactions)."""
    view = config_to_dict(without_redacted(config))
    del view["source"], view["secrets"]
    reparsed = parse(render(without_none(view)))  # type: ignore[arg-type]
    assert reparsed == without_redacted(config)


@pytest.mark.parametrize("path", ETC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_config_to_dict_round_trips_the_shipped_files(path: Path) -> None:
    assert_view_round_trips(load_config(path))


# -- token secrets ------------------------------------------------------------------------


def distinct_key_id_secrets() -> tuple[bytes, bytes]:
    current = b"current-secret-0123456789"
    previous = next(
        candidate
        for candidate in (b"previous-secret-%03d" % n for n in range(100))
        if key_id_for(candidate) != key_id_for(current)
    )
    return current, previous


def test_resolve_secrets_returns_inline_secrets_without_touching_disk(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    config = with_runtime_dir(runtime, f'[secrets]\ntoken_secrets = ["{SECRET_A}"]')
    assert resolve_secrets(config) == [SECRET_A.encode()]
    assert not runtime.exists()


def test_resolve_secrets_generates_a_private_secret_once(tmp_path: Path) -> None:
    runtime = tmp_path / "run" / "fleet"
    first = resolve_secrets(with_runtime_dir(runtime))
    assert len(first) == 1 and len(first[0]) == 32
    secret_file = runtime / GENERATED_SECRET_FILENAME
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_IMODE(runtime.parent.stat().st_mode) == 0o700
    # A restart (a fresh parse) and a second process read the same secret.
    assert resolve_secrets(with_runtime_dir(runtime)) == first
    assert sorted(os.listdir(runtime)) == [GENERATED_SECRET_FILENAME]


def test_generated_secrets_differ_between_runtime_dirs(tmp_path: Path) -> None:
    one = resolve_secrets(with_runtime_dir(tmp_path / "one"))
    two = resolve_secrets(with_runtime_dir(tmp_path / "two"))
    assert one != two


def test_generated_secret_file_can_be_used_as_a_token_secrets_file(tmp_path: Path) -> None:
    generated = resolve_secrets(with_runtime_dir(tmp_path / "run"))
    path = tmp_path / "run" / GENERATED_SECRET_FILENAME
    assert resolve_secrets(parse(f'[secrets]\ntoken_secrets_file = "{path}"')) == generated


def _resolve_in_child(runtime: str, barrier: Any, queue: Any) -> None:
    config = with_runtime_dir(Path(runtime))
    barrier.wait()
    queue.put(resolve_secrets(config)[0])


def test_processes_starting_together_agree_on_one_generated_secret(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    runtime = tmp_path / "run"
    count = 6
    barrier, queue = context.Barrier(count), context.Queue()
    children = [
        context.Process(target=_resolve_in_child, args=(str(runtime), barrier, queue))
        for _ in range(count)
    ]
    for child in children:
        child.start()
    secrets = {queue.get(timeout=20) for _ in children}
    for child in children:
        child.join(timeout=20)
        assert child.exitcode == 0
    assert len(secrets) == 1
    assert os.listdir(runtime) == [GENERATED_SECRET_FILENAME]  # no temporary files left


def test_refuses_a_runtime_dir_others_can_write(tmp_path: Path) -> None:
    runtime = tmp_path / "shared"
    runtime.mkdir()
    runtime.chmod(0o777)
    config = with_runtime_dir(runtime)
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config)
    assert str(caught.value) == (
        f"{SOURCE}: fleet.runtime_dir: expected a directory owned by uid {os.geteuid()} and "
        f"writable only by it, got '{runtime}' (owner uid {os.geteuid()}, mode 0777)"
    )


def test_refuses_a_world_writable_parent_without_the_sticky_bit(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(with_runtime_dir(parent / "fleet"))
    assert str(caught.value) == (
        f"{SOURCE}: fleet.runtime_dir: expected parent directories owned by uid "
        f"{os.geteuid()} or root and not writable by everyone, got '{parent}' "
        f"(owner uid {os.geteuid()}, mode 0777)"
    )
    parent.chmod(0o1777)  # like /tmp: the sticky bit stops others replacing our dir
    assert len(resolve_secrets(with_runtime_dir(parent / "fleet"))) == 1


def test_refuses_a_generated_secret_others_can_read(tmp_path: Path) -> None:
    config = with_runtime_dir(tmp_path / "run")
    resolve_secrets(config)
    secret_file = tmp_path / "run" / GENERATED_SECRET_FILENAME
    secret_file.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config)
    assert str(caught.value) == (
        f"{SOURCE}: fleet.runtime_dir: expected a secret file owned by uid {os.geteuid()} "
        f"with mode 0600, got '{secret_file}' (owner uid {os.geteuid()}, mode 0644)"
    )


def test_refuses_a_corrupt_generated_secret(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    secret_file = runtime / GENERATED_SECRET_FILENAME
    secret_file.write_text("hex:abc\n")
    secret_file.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(with_runtime_dir(runtime))
    assert str(caught.value) == (
        f"{SOURCE}: fleet.runtime_dir: line 1 of '{secret_file}': expected hex digits after "
        "'hex:', got invalid hex"
    )


def test_refuses_a_runtime_dir_that_is_a_file(tmp_path: Path) -> None:
    runtime = tmp_path / "file"
    runtime.write_text("")
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(with_runtime_dir(runtime))
    assert str(caught.value) == (
        f"{SOURCE}: fleet.runtime_dir: expected a directory, got '{runtime}' (not a directory)"
    )


def test_secrets_file_holds_current_then_previous(tmp_path: Path) -> None:
    current, previous = distinct_key_id_secrets()
    path = tmp_path / "token-secrets"
    path.write_text(
        "# rotated 2024-05-01\n\n"
        f"  hex:{current.hex()}  \n"
        f"base64:{base64.b64encode(previous).decode()}\n"
    )
    config = parse(f'[secrets]\ntoken_secrets_file = "{path}"')
    assert config.secrets.token_secrets == ()
    assert resolve_secrets(config) == [current, previous]
    assert read_secrets_file(config) == [current, previous]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "expected 1 to 2 secret(s) in '{path}', got none"),
        (b"# only a comment\n\n", "expected 1 to 2 secret(s) in '{path}', got none"),
        (
            b"%s\n%s\n%s\n" % (b"a" * 16, b"b" * 16, b"c" * 16),
            "expected at most 2 secret(s) in '{path}', got another on line 3",
        ),
        (
            b"# header\nshort-secret\n",
            "line 2 of '{path}': expected at least 16 bytes after decoding, got 12 bytes",
        ),
        (b"\xff" * 20, "expected UTF-8 text in '{path}', got byte 0xff on line 1"),
    ],
)
def test_secrets_file_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "token-secrets"
    path.write_bytes(content)
    config = parse(f'[secrets]\ntoken_secrets_file = "{path}"')
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(config)
    expected = message.format(path=path)
    assert str(caught.value) == f"{SOURCE}: secrets.token_secrets_file: {expected}"


# -- fuzzing: nothing but ConfigError escapes ---------------------------------------------

ALL_KEYS = sorted({key for keys in SECTIONS.values() for key in keys} | {"id", "address"})
INTERESTING_STRINGS = [
    "",
    "127.0.0.1",
    "0.0.0.0",
    "::",
    "::1",
    "[::1]",
    "fe80::1%eth0",
    "224.0.0.1",
    "127.0.0.1:4000",
    "[::1]:4000",
    "10.0.0.2:0",
    "10.0.0.2:65536",
    "[::1",
    "]:",
    ":",
    "redis://localhost:6379/0",
    "redis://:pw@[::1]:6379",
    "redis://[bad",
    "rediss://h:0",
    "unix:///tmp/r.sock",
    "hex:" + "ab" * 16,
    "hex:",
    "base64:" + base64.b64encode(b"x" * 16).decode(),
    "base64:=",
    "json",
    "text",
    "INFO",
    "/tmp/voxrelay-test",
    "~/run",
    "~nosuchuser/run",
    "relative",
    "a" * 40,
    "0123456789abcdef0123",
]
scalars = st.one_of(
    st.booleans(),
    st.integers(-10, 70_000),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=10**300, max_value=10**320),  # tomllib has no integer limit
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(INTERESTING_STRINGS),
    st.dates(),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(ALL_KEYS) | st.text(max_size=8), children, max_size=3),
    ),
    max_leaves=8,
)
static_entries = st.lists(
    st.dictionaries(
        st.sampled_from(["id", "address", "id", "address", "port"]),
        st.one_of(st.integers(-1, 70_000), st.sampled_from(INTERESTING_STRINGS), toml_values),
        max_size=3,
    ),
    max_size=4,
)


ip_addresses = st.sampled_from(["127.0.0.1", "0.0.0.0", "::", "::1", "10.0.0.2", "fd00::7"])
seconds = st.floats(0.001, 100_000, allow_nan=False)
ports = st.integers(0, 65_535)
# Values a user might plausibly write for each key: mostly valid, sometimes just out of
# range, so generated documents often parse and the round trip gets exercised.
PLAUSIBLE: dict[str, st.SearchStrategy[object]] = {
    "cluster_id": st.integers(-1, 65_536),
    "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,33}", fullmatch=True),
    "runtime_dir": st.sampled_from(["/tmp/voxrelay-test/x", "~/run", "~nosuchuser/run", "x"]),
    "log_level": st.sampled_from(["debug", "INFO", "warning", "error", "critical", "warn"]),
    "log_format": st.sampled_from(["json", "text", "JSON"]),
    "token_secrets": st.lists(st.text(min_size=14, max_size=30), min_size=1, max_size=2),
    "token_secrets_file": st.sampled_from(["/etc/voxrelay/secrets", "~nosuchuser/s", "s"]),
    "bind": ip_addresses,
    "internal_bind": ip_addresses,
    "signaling_bind": ip_addresses,
    "public_address": ip_addresses,
    "advertise_address": ip_addresses,
    "port": ports,
    "signaling_port": ports,
    "internal_port_base": st.one_of(st.just(0), ports),
    "workers": st.integers(0, 64),
    "count": st.integers(0, 8),
    "first_id": st.integers(0, 65_535),
    "table_capacity": st.integers(0, 1_000_000),
    "recv_buffer_bytes": st.integers(0, 1 << 31),
    "send_buffer_bytes": st.integers(0, 1 << 31),
    "batch_size": st.integers(0, 2048),
    "max_datagram": st.integers(500, 70_000),
    "bundle_max_bytes": st.one_of(st.just(0), st.integers(-1, 70_000)),
    "coalesce_us": st.integers(-1, 300),
    "pin_cpus": st.one_of(st.booleans(), st.lists(st.integers(-1, 4096), max_size=4)),
    "signaling_token": st.text(min_size=10, max_size=30),
    "url": st.sampled_from(
        ["redis://localhost:6379/0", "rediss://u:p@[::1]:6380", "unix:///s.sock", "redis://"]
    ),
    "recovery_rate": st.one_of(st.integers(-1, 200_000), seconds),
    "enabled": st.booleans(),
    "static": st.lists(
        st.fixed_dictionaries(
            {
                "id": st.integers(0, 65_535),
                "address": st.sampled_from(["127.0.0.1", "10.0.0.2", "[::1]"]).map(
                    lambda host: host + ":4000"
                ),
            }
        ),
        max_size=3,
    ),
}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, dict[str, object]]:
    """Known sections and keys with plausible or random values; sometimes unknown names."""
    chaotic = draw(st.booleans())
    document: dict[str, dict[str, object]] = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS)), max_size=4, unique=True)):
        table: dict[str, object] = {}
        for key in draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=4, unique=True)):
            plausible = PLAUSIBLE.get(key, seconds)
            if key == "static" and chaotic:
                plausible = static_entries
            table[key] = draw(st.one_of(plausible, toml_values) if chaotic else plausible)
        document[section] = table
    if chaotic and draw(st.integers(0, 9)) == 0:
        document[draw(st.text(min_size=1, max_size=8))] = {}
    return document


def assert_only_config_errors(text: str) -> Config | None:
    try:
        return parse(text)
    except ConfigError as error:
        assert "\n" not in str(error)
        assert str(error).startswith(f"{SOURCE}: ")
        return None


@settings(max_examples=300, deadline=None)
@given(documents())
def test_random_documents_raise_only_config_errors_and_valid_ones_round_trip(
    document: dict[str, dict[str, object]],
) -> None:
    config = assert_only_config_errors(render(document))
    if config is not None:
        assert_view_round_trips(config)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_raises_only_config_errors(text: str) -> None:
    assert_only_config_errors(text)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mangled_annotated_example_raises_only_config_errors(data: st.DataObject) -> None:
    text = ANNOTATED_EXAMPLE.read_text()
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 8)))
        replacement = data.draw(st.sampled_from(["", "[", "]", "=", '"', "\n", "0", "x", "."]))
        text = text[:start] + replacement + text[end:]
    assert_only_config_errors(text)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=200))
def test_random_file_bytes_raise_only_config_errors(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".toml") as handle:
        handle.write(data)
        handle.flush()
        try:
            load_config(handle.name)
        except ConfigError as error:
            assert "\n" not in str(error)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=7, max_size=40).map(lambda text: "\u00a7" + text))
def test_secrets_are_never_echoed(secret: str) -> None:
    # The leading section sign keeps the secret from matching fixed text by chance.
    assume(secret.strip() == secret)
    text = f"[secrets]\ntoken_secrets = [{toml_string(secret)}, {toml_string(secret)}, 'x']"
    try:
        parse(text)
    except ConfigError as error:
        assert secret not in str(error)
    try:
        config = parse(f"[secrets]\ntoken_secrets = [{toml_string(secret)}]")
    except ConfigError as error:
        assert secret not in str(error)
    else:
        assert secret not in repr(config) and secret not in json.dumps(config_to_dict(config))


def test_toml_renderer_matches_tomllib() -> None:
    """The fuzzers rely on render(): check it against tomllib on awkward values."""
    document = {
        "s": {"a": 'quote " and \\ and \x00\x7f\n', "b": [1.5, -0.0, 1e300], "c": {"d": True}}
    }
    assert tomllib.loads(render(document)) == document


def test_backend_section_defaults_to_the_in_process_echo(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    backend = load_config(path).backend
    assert backend.kind == "echo" and backend.client_settings() is None


def test_websocket_backend_settings_and_redacted_token(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[backend]\nkind = "websocket"\nurl = "ws://10.0.0.5:8765/call"\ncodec = "pcm16"\n'
        'vad = true\nauth_token = "s3cret"\n'
    )
    config = load_config(path)
    settings = config.backend.client_settings()
    assert settings["url"] == "ws://10.0.0.5:8765/call"
    assert settings["sample_rate"] == 16000 and settings["vad"] is True
    assert settings["headers"] == {"Authorization": "Bearer s3cret"}
    assert "s3cret" not in repr(config.backend)
    assert "s3cret" not in str(config_to_dict(config))


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('kind = "websocket"', "backend.url", "required"),
        ('kind = "grpc"', "backend.kind", "one of"),
        ('kind = "websocket"\nurl = "http://x/y"', "backend.url", "ws://"),
        ('codec = "opus"\nsample_rate = 16000', "backend.sample_rate", "48000"),
        ('codec = "pcm16"\nsample_rate = 44100', "backend.sample_rate", "one of"),
        ("vad = 1", "backend.vad", "true or false"),
        ("vad_hangover = 0", "backend.vad_hangover", ""),
    ],
)
def test_bad_backend_keys_name_the_key_and_file(tmp_path, body, key, words):
    path = tmp_path / "bad.toml"
    path.write_text("[backend]\n" + body + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert words in message
    assert "\n" not in message


def test_transceiver_call_limits_and_certificate_pair(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[transceiver]\nmax_calls = 500\nconsent_timeout = 12\nsetup_timeout = 8\n"
        f'certificate = "{tmp_path}/cert.pem"\nprivate_key = "{tmp_path}/key.pem"\n'
    )
    local = load_config(path).transceiver
    assert (local.max_calls, local.consent_timeout, local.setup_timeout) == (500, 12.0, 8.0)
    assert local.certificate == tmp_path / "cert.pem" and local.private_key == tmp_path / "key.pem"
    path.write_text(f'[transceiver]\ncertificate = "{tmp_path}/cert.pem"\n')
    with pytest.raises(ConfigError, match=r"transceiver\.private_key: expected certificate"):
        load_config(path)
