"""Configuration: one TOML file (stdlib ``tomllib``) read into frozen dataclasses.

A file is validated strictly, up front, so a fleet never starts half-configured: unknown
sections and keys are errors (with a "did you mean" suggestion), types are exact (a bool
is not an integer, a float is not a port), numbers are range-checked, addresses are
parsed with :mod:`ipaddress`, and listeners that would share a port are refused. Every
error is a :class:`ConfigError` whose text is one line naming the file and the dotted key::

    relay.toml: relay.port: expected an integer in 0..65535, got 70000

Missing keys take laptop-friendly defaults (one machine, loopback, no Redis), so an empty
file is a valid config. With no file at all the embedded default (``voxrelay/default.toml``)
is used. ``etc/voxrelay.toml`` documents every key.

Token secrets are the one piece of I/O beyond reading the file: :func:`resolve_secrets`
returns the configured secrets, reads ``token_secrets_file``, or generates a secret once
and keeps it in the runtime directory so every process on the machine agrees and tokens
stay valid across restarts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import difflib
import importlib.resources
import ipaddress
import math
import os
import re
import stat
import tempfile
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

from voxrelay.engine.processes import HEAP_TRIM_INTERVAL
from voxrelay.proto.token import MIN_SECRET_LENGTH, key_id_for

__all__ = [
    "EMBEDDED_DEFAULT_SOURCE",
    "GENERATED_SECRET_FILENAME",
    "REDACTED",
    "SECTIONS",
    "STATIC_TRANSCEIVER_KEYS",
    "Config",
    "ConfigError",
    "FleetConfig",
    "MetricsConfig",
    "RedisConfig",
    "RelayConfig",
    "SecretsConfig",
    "StaticTransceiver",
    "TransceiverConfig",
    "TransceiversConfig",
    "check_config_file",
    "config_to_dict",
    "load_config",
    "parse_config",
    "read_secrets_file",
    "resolve_secrets",
]

EMBEDDED_DEFAULT_SOURCE: Final = "<embedded default>"
GENERATED_SECRET_FILENAME: Final = "token-secret"
REDACTED: Final = "<redacted>"

# The schema: every section and its keys, in documentation order (``voxrelay config`` and
# the tests read it too). Values are validated by the _parse_* functions below; this table
# drives unknown-key errors and their suggestions. `[[transceivers.static]]` entries have
# the keys STATIC_TRANSCEIVER_KEYS.
SECTIONS: Final[dict[str, tuple[str, ...]]] = {
    "fleet": ("cluster_id", "name", "runtime_dir", "log_level", "log_format"),
    "secrets": ("token_secrets", "token_secrets_file"),
    "relay": (
        "bind",
        "port",
        "public_address",
        "workers",
        "internal_bind",
        "internal_port_base",
        "table_capacity",
        "idle_timeout",
        "recv_buffer_bytes",
        "send_buffer_bytes",
        "batch_size",
        "max_datagram",
        "bundle_max_bytes",
        "coalesce_us",
        "pin_cpus",
        "drain_seconds",
        "restart_backoff_initial",
        "restart_backoff_max",
    ),
    "transceivers": ("static",),
    "transceiver": (
        "count",
        "first_id",
        "bind",
        "port",
        "advertise_address",
        "signaling_bind",
        "signaling_port",
        "signaling_token",
        "max_calls",
        "consent_timeout",
        "setup_timeout",
        "heap_trim_interval",
        "certificate",
        "private_key",
    ),
    "redis": (
        "url",
        "route_ttl",
        "mirror_interval",
        "recovery_rate",
        "negative_cache_seconds",
        "socket_timeout",
        "heartbeat_interval",
    ),
    "metrics": ("enabled", "bind", "port"),
    "backend": (
        "kind",
        "url",
        "codec",
        "sample_rate",
        "auth_token",
        "connect_timeout",
        "max_queued_seconds",
        "vad",
        "barge_in",
        "vad_threshold_dbfs",
        "vad_hangover",
    ),
}
STATIC_TRANSCEIVER_KEYS: Final = ("id", "address")

_LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
_LOG_FORMATS: Final = ("text", "json")
_REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
_MAX_TRANSCEIVER_ID: Final = 0xFFFF
_MAX_PORT: Final = 0xFFFF
_MAX_CPU_ID: Final = 4095
_MAX_UDP_PAYLOAD: Final = 65507  # IPv4: 65535 - 20 (IP header) - 8 (UDP header)
_DEFAULT_BUNDLE_BYTES: Final = 1472  # a 1500-byte MTU minus IPv4 and UDP headers
_MIN_BUNDLE_BYTES: Final = 576
_MAX_COALESCE_US: Final = 200  # a worker's coalescing sleep adds at most this per hop
_FLEET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
# RFC 6750 b64token: the characters a bearer token may use in an Authorization header.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_BEARER_TOKEN_CHARACTERS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="
)
_MIN_BEARER_TOKEN_LENGTH: Final = 16
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(\.[A-Za-z0-9_-]{1,63})*\.?")
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
_MISSING: Final = object()


class ConfigError(Exception):
    """A config that cannot be used. ``str(error)`` is one line: file, dotted key, problem.

    ``source`` is the file (or ``"<embedded default>"``), ``key`` the dotted key
    (``relay.port``, ``transceivers.static[2].id``) or None for file-level problems such as
    a TOML syntax error, ``detail`` what was expected and what was found.
    """

    def __init__(self, source: str, key: str | None, detail: str) -> None:
        super().__init__(source, key, detail)
        self.source = source
        self.key = key
        self.detail = detail

    def __str__(self) -> str:
        parts = (self.source, self.key, self.detail) if self.key else (self.source, self.detail)
        return " ".join(": ".join(parts).splitlines())


# -- the parsed config ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Identity of the fleet on this machine: cluster id in tokens, name for dirs and shm."""

    cluster_id: int
    name: str
    runtime_dir: Path
    log_level: str
    log_format: str


@dataclass(frozen=True, slots=True)
class SecretsConfig:
    """Routing-token secrets: inline (decoded), from a file, or neither (generated).

    Use :func:`resolve_secrets` to get the bytes; it handles all three cases.
    """

    token_secrets: tuple[bytes, ...]
    token_secrets_file: Path | None

    def __repr__(self) -> str:  # never print secrets in a traceback or a log line
        return (
            f"SecretsConfig(token_secrets=<{len(self.token_secrets)} redacted>, "
            f"token_secrets_file={self.token_secrets_file!r})"
        )


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The relay workers: public port, internal sockets, routing table, socket tuning."""

    bind: str
    port: int
    public_address: str
    workers: int
    internal_bind: str
    internal_port_base: int
    table_capacity: int
    idle_timeout: float
    recv_buffer_bytes: int
    send_buffer_bytes: int
    batch_size: int
    max_datagram: int
    bundle_max_bytes: int
    coalesce_us: int
    pin_cpus: bool | tuple[int, ...]
    drain_seconds: float
    restart_backoff_initial: float
    restart_backoff_max: float


@dataclass(frozen=True, slots=True)
class StaticTransceiver:
    """One entry of the static transceiver registry (used when there is no Redis)."""

    id: int
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 host in brackets."""
        return _join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class TransceiversConfig:
    """The ``[transceivers]`` section: the static registry, ``[[transceivers.static]]``."""

    static: tuple[StaticTransceiver, ...]


@dataclass(frozen=True, slots=True)
class TransceiverConfig:
    """The transceiver processes run on this machine (ids ``first_id`` .. + count - 1).

    Transceiver ``i`` (0-based) uses UDP ``port + i`` when that is non-zero; all of them
    share ``signaling_port`` (SO_REUSEPORT), and register ``advertise_address`` as the
    address relays send to.
    """

    count: int
    first_id: int
    bind: str
    port: int
    advertise_address: str
    signaling_bind: str
    signaling_port: int
    signaling_token: str | None
    max_calls: int = 10_000
    consent_timeout: float = 30.0
    setup_timeout: float = 20.0
    heap_trim_interval: float = HEAP_TRIM_INTERVAL
    """Seconds between returns of free heap pages to the kernel; 0 never."""
    certificate: Path | None = None
    """PEM certificate for DTLS (ECDSA); None generates one per process."""
    private_key: Path | None = None

    @property
    def ids(self) -> range:
        return range(self.first_id, self.first_id + self.count)

    def __repr__(self) -> str:
        token = None if self.signaling_token is None else REDACTED
        return (
            f"TransceiverConfig(count={self.count}, first_id={self.first_id}, "
            f"bind={self.bind!r}, port={self.port}, "
            f"advertise_address={self.advertise_address!r}, "
            f"signaling_bind={self.signaling_bind!r}, signaling_port={self.signaling_port}, "
            f"signaling_token={token!r})"
        )


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Optional Redis: route mirror, route recovery, transceiver registry."""

    url: str | None
    route_ttl: float
    mirror_interval: float
    recovery_rate: float
    negative_cache_seconds: float
    socket_timeout: float
    heartbeat_interval: float

    def __repr__(self) -> str:
        url = None if self.url is None else _redact_url(self.url)
        return (
            f"RedisConfig(url={url!r}, route_ttl={self.route_ttl!r}, "
            f"mirror_interval={self.mirror_interval!r}, recovery_rate={self.recovery_rate!r}, "
            f"negative_cache_seconds={self.negative_cache_seconds!r}, "
            f"socket_timeout={self.socket_timeout!r}, "
            f"heartbeat_interval={self.heartbeat_interval!r})"
        )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """The supervisor's HTTP endpoint: /metrics, /status, /healthz."""

    enabled: bool
    bind: str
    port: int


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """What the transceivers hand calls to: the in-process echo, or a WebSocket backend."""

    kind: str  # "echo" or "websocket"
    url: str | None
    codec: str
    sample_rate: int
    auth_token: str | None
    connect_timeout: float
    max_queued_seconds: float
    vad: bool
    barge_in: bool
    vad_threshold_dbfs: float
    vad_hangover: float

    def __repr__(self) -> str:
        token = None if self.auth_token is None else REDACTED
        return f"BackendConfig(kind={self.kind!r}, url={self.url!r}, auth_token={token!r}, ...)"

    def client_settings(self) -> dict[str, Any] | None:
        """Keyword arguments of WebSocketBackendSettings, or None for the in-process echo."""
        if self.kind != "websocket":
            return None
        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        return {
            "url": self.url,
            "codec": self.codec,
            "sample_rate": self.sample_rate,
            "headers": headers,
            "connect_timeout": self.connect_timeout,
            "max_queued": self.max_queued_seconds,
            "vad": self.vad,
            "barge_in": self.barge_in,
            "vad_threshold_dbfs": self.vad_threshold_dbfs,
            "vad_hangover": self.vad_hangover,
        }


_DEFAULT_BACKEND = BackendConfig(
    "echo", None, "opus", 48_000, None, 5.0, 30.0, False, True, -45.0, 0.6
)


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, validated config. ``source`` is the file it came from, for messages."""

    source: str
    fleet: FleetConfig
    secrets: SecretsConfig
    relay: RelayConfig
    transceivers: TransceiversConfig
    transceiver: TransceiverConfig
    redis: RedisConfig
    metrics: MetricsConfig
    backend: BackendConfig = _DEFAULT_BACKEND


# -- entry points -------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config file at ``path``; None means the embedded default."""
    if path is None:
        text = importlib.resources.files("voxrelay").joinpath("default.toml").read_text("utf-8")
        return parse_config(text, EMBEDDED_DEFAULT_SOURCE)
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as error:
        raise ConfigError(source, None, f"cannot read the file: {_os_reason(error)}") from None
    return parse_config(_decode_utf8(data, source, None, "the file"), source)


def parse_config(text: str, source: str) -> Config:
    """Validate TOML ``text``; ``source`` names it in error messages (a path or a label)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, None, f"invalid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(
            source, None, "invalid TOML: arrays or tables nested too deeply"
        ) from None
    except ValueError as error:  # e.g. an integer longer than int() accepts
        raise ConfigError(source, None, f"invalid TOML: {error}") from None
    return _build_config(document, source)


def check_config_file(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """For ``voxrelay config check``: ``(True, "ok")`` or ``(False, <one-line error>)``.

    Besides parsing, reads ``token_secrets_file`` if one is configured, since a fleet could
    not start without it. Generated secrets are not created by a check.
    """
    try:
        config = load_config(path)
        if config.secrets.token_secrets_file is not None:
            read_secrets_file(config)
    except ConfigError as error:
        return False, str(error)
    return True, "ok"


def resolve_secrets(config: Config) -> list[bytes]:
    """The routing-token secrets, current first: inline, from the file, or generated.

    With no secret configured, a random 32-byte secret is generated once and kept in
    ``<runtime_dir>/token-secret`` (mode 0600, created atomically, so processes starting
    together agree); later calls and restarts reuse it, so minted tokens stay valid. That
    only works for processes on one machine: fleets spanning hosts must configure secrets.
    """
    if config.secrets.token_secrets:
        return list(config.secrets.token_secrets)
    if config.secrets.token_secrets_file is not None:
        return read_secrets_file(config)
    return [_load_or_generate_secret(config)]


def read_secrets_file(config: Config) -> list[bytes]:
    """Read and validate ``secrets.token_secrets_file``: 1 or 2 secrets, one a line.

    Blank lines and lines starting with ``#`` are ignored; surrounding whitespace is
    stripped; each line is ``hex:...``, ``base64:...`` or plain text.
    """
    key = "secrets.token_secrets_file"
    path = config.secrets.token_secrets_file
    if path is None:
        raise ConfigError(config.source, key, "expected a file to read secrets from, got nothing")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            config.source, key, f"expected a readable file, got {str(path)!r} ({_os_reason(error)})"
        ) from None
    text = _decode_utf8(data, config.source, key, repr(str(path)))
    return _parse_secret_lines(text, config.source, key, f"{str(path)!r}", max_count=2)


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON-friendly view for status and debugging, with secrets redacted.

    Keys mirror the file's sections and keys; derived defaults (``public_address``,
    ``route_ttl``, ``runtime_dir``...) appear resolved. ``secrets.source`` says where the
    secrets come from: "inline", "file" or "generated".
    """
    secrets = config.secrets
    if secrets.token_secrets:
        secret_source = "inline"
    elif secrets.token_secrets_file is not None:
        secret_source = "file"
    else:
        secret_source = "generated"
    local, redis = _plain_fields(config.transceiver), _plain_fields(config.redis)
    if config.transceiver.signaling_token is not None:
        local["signaling_token"] = REDACTED
    if config.redis.url is not None:
        redis["url"] = _redact_url(config.redis.url)
    return {
        "source": config.source,
        "fleet": _plain_fields(config.fleet),
        "secrets": {
            "source": secret_source,
            "token_secrets": [REDACTED] * len(secrets.token_secrets),
            "token_secrets_file": _plain(secrets.token_secrets_file),
        },
        "relay": _plain_fields(config.relay),
        "transceivers": {
            "static": [{"id": t.id, "address": t.address} for t in config.transceivers.static]
        },
        "transceiver": local,
        "redis": redis,
        "metrics": _plain_fields(config.metrics),
        "backend": {
            **_plain_fields(config.backend),
            "auth_token": None if config.backend.auth_token is None else REDACTED,
        },
    }


def _plain_fields(section: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}


def _plain(value: object) -> Any:
    """JSON types: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# -- reading one table --------------------------------------------------------------------


class _Table:
    """One TOML table being read: typed getters that raise ConfigError naming the key."""

    def __init__(self, source: str, path: str, values: dict[str, Any], keys: tuple[str, ...]):
        self.source = source
        self.path = path
        self.values = values
        for key in values:
            if key not in keys:
                raise ConfigError(source, self.dotted(key), _unknown_key_detail(path, key, keys))

    def dotted(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str, got: object = _MISSING, hint: str = "") -> NoReturn:
        detail = f"expected {expected}, got {_show(got)}{hint}"
        raise ConfigError(self.source, self.dotted(key), detail)

    def get(self, key: str) -> Any:
        return self.values.get(key, _MISSING)

    def integer(self, key: str, default: int, low: int, high: int, what: str = "") -> int:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not _is_int(value) or not low <= value <= high:
            self.fail(key, what or f"an integer in {low}..{high}", value)
        return int(value)

    def seconds(self, key: str, default: float, low: float, high: float) -> float:
        return self.number(key, default, low, high, "a number of seconds")

    def number(
        self, key: str, default: float, low: float, high: float, what: str = "a number"
    ) -> float:
        value = self.get(key)
        if value is _MISSING:
            return float(default)
        if not _is_number(value) or not low <= value <= high:
            self.fail(key, f"{what} in {_fmt_number(low)}..{_fmt_number(high)}", value)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.get(key)
        if value is _MISSING:
            return default
        expected = "one of " + ", ".join(repr(choice) for choice in choices)
        if not isinstance(value, str):
            self.fail(key, expected, value)
        if value.lower() not in choices:
            self.fail(key, expected, value, _did_you_mean(value.lower(), choices))
        return value.lower()

    def ip(self, key: str, default: str) -> str:
        """An IP address literal, normalized (``::0`` -> ``::``); wildcards allowed."""
        address = self.optional_ip(key, wildcard_ok=True)
        return default if address is None else address

    def optional_ip(self, key: str, *, wildcard_ok: bool) -> str | None:
        value = self.get(key)
        if value is _MISSING:
            return None
        expected = "an IP address" if wildcard_ok else "a specific IP address (not a wildcard)"
        if not isinstance(value, str):
            self.fail(key, expected, value)
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            hint = " (without brackets)" if value.startswith("[") else ""
            self.fail(key, expected + hint, value)
        if address.is_multicast:
            self.fail(key, "a unicast IP address", value)
        if address.is_unspecified and not wildcard_ok:
            self.fail(key, expected, value)
        return str(address)

    def absolute_path(self, key: str) -> Path | None:
        value = self.get(key)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or "\0" in value:
            self.fail(key, "an absolute path", value)
        path = Path(os.path.expanduser(value))  # unchanged if the home dir is unknown
        if not path.is_absolute():
            self.fail(key, "an absolute path", value)
        return path


# -- sections -----------------------------------------------------------------------------


def _build_config(document: dict[str, Any], source: str) -> Config:
    for name, value in document.items():
        if name not in SECTIONS:
            kind = "section" if isinstance(value, dict) else "key"
            raise ConfigError(source, name, _unknown_key_detail("", name, (), kind=kind))
    sections: dict[str, _Table] = {}
    for name, keys in SECTIONS.items():
        value = document.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(source, name, f"expected a table ([{name}]), got {_show(value)}")
        sections[name] = _Table(source, name, value, keys)

    fleet = _parse_fleet(sections["fleet"])
    secrets = _parse_secrets(sections["secrets"])
    relay = _parse_relay(sections["relay"])
    transceivers = _parse_static_transceivers(sections["transceivers"], relay)
    local = _parse_local_transceivers(sections["transceiver"], transceivers)
    redis = _parse_redis(sections["redis"], relay)
    metrics = _parse_metrics(sections["metrics"])
    backend = _parse_backend(sections["backend"])
    _check_port_conflicts(source, relay, local, metrics)
    return Config(source, fleet, secrets, relay, transceivers, local, redis, metrics, backend)


def _parse_fleet(table: _Table) -> FleetConfig:
    cluster_id = table.integer("cluster_id", 1, 0, 0xFFFF)
    name = table.get("name")
    if name is _MISSING:
        name = "default"
    elif not isinstance(name, str) or not _FLEET_NAME.fullmatch(name):
        table.fail(
            "name",
            "1-32 characters of A-Z a-z 0-9 _ - starting with a letter or digit",
            name,
        )
    runtime_dir = table.absolute_path("runtime_dir") or _default_runtime_dir(name)
    log_level = table.choice("log_level", "info", _LOG_LEVELS)
    log_format = table.choice("log_format", "text", _LOG_FORMATS)
    return FleetConfig(cluster_id, name, runtime_dir, log_level, log_format)


def _default_runtime_dir(name: str) -> Path:
    """``$XDG_RUNTIME_DIR/voxrelay/<name>``, else ``/tmp/voxrelay-<uid>/<name>``."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative value
        return Path(xdg) / "voxrelay" / name
    return Path("/tmp") / f"voxrelay-{os.getuid()}" / name


def _parse_secrets(table: _Table) -> SecretsConfig:
    key = "token_secrets"
    value = table.get(key)
    secrets: tuple[bytes, ...] = ()
    if value is not _MISSING:
        if not isinstance(value, list) or not 1 <= len(value) <= 2:
            table.fail(key, "a list of 1 or 2 secrets (current first)", _redacted_list(value))
        decoded = []
        for index, item in enumerate(value):
            item_key = f"{key}[{index}]"
            if not isinstance(item, str):
                table.fail(item_key, 'a string ("hex:...", "base64:..." or text)', _kind(item))
            try:
                decoded.append(_decode_secret(item))
            except ValueError as error:
                raise ConfigError(table.source, table.dotted(item_key), str(error)) from None
        _check_distinct_key_ids(decoded, table.source, table.dotted(key))
        secrets = tuple(decoded)
    secrets_file = table.absolute_path("token_secrets_file")
    if secrets and secrets_file is not None:
        table.fail(
            "token_secrets_file",
            "either token_secrets or token_secrets_file, not both",
            str(secrets_file),
        )
    return SecretsConfig(secrets, secrets_file)


def _parse_relay(table: _Table) -> RelayConfig:
    bind = table.ip("bind", "0.0.0.0")
    port = table.integer("port", 3478, 0, _MAX_PORT)
    public_address = table.optional_ip("public_address", wildcard_ok=False)
    if public_address is None:
        public_address = _advertised_default(bind)
    workers = table.integer("workers", _usable_cpu_count(), 1, 1024)
    internal_bind = table.ip("internal_bind", "127.0.0.1")
    internal_port_base = table.integer("internal_port_base", 0, 0, _MAX_PORT)
    if internal_port_base and internal_port_base + workers - 1 > _MAX_PORT:
        table.fail(
            "internal_port_base",
            f"0 or a port in 1..{_MAX_PORT - workers + 1} (relay.workers = {workers} "
            f"consecutive ports)",
            internal_port_base,
        )
    table_capacity = table.integer("table_capacity", 100_000, 1, 100_000_000)
    idle_timeout = table.seconds("idle_timeout", 30, 1, 86_400)
    recv_buffer = table.integer("recv_buffer_bytes", 4 << 20, 4096, 1 << 30)
    send_buffer = table.integer("send_buffer_bytes", 4 << 20, 4096, 1 << 30)
    batch_size = table.integer("batch_size", 32, 1, 1024)
    max_datagram = table.integer("max_datagram", 1500, 576, _MAX_PORT)
    bundle_what = f"0 (off) or an integer in {_MIN_BUNDLE_BYTES}..{_MAX_UDP_PAYLOAD}"
    bundle_max_bytes = table.integer(
        "bundle_max_bytes", _DEFAULT_BUNDLE_BYTES, 0, _MAX_UDP_PAYLOAD, bundle_what
    )
    if 0 < bundle_max_bytes < _MIN_BUNDLE_BYTES:
        table.fail("bundle_max_bytes", bundle_what, bundle_max_bytes)
    coalesce_us = table.integer("coalesce_us", 100, 0, _MAX_COALESCE_US)
    pin_cpus = _parse_pin_cpus(table)
    drain_seconds = table.seconds("drain_seconds", 5, 0, 3600)
    backoff_initial = table.seconds("restart_backoff_initial", 0.5, 0.01, 60)
    backoff_max = table.seconds("restart_backoff_max", 30, 0.01, 3600)
    if backoff_max < backoff_initial:
        table.fail(
            "restart_backoff_max",
            f"a number >= relay.restart_backoff_initial ({_fmt_number(backoff_initial)})",
            table.get("restart_backoff_max"),
        )
    return RelayConfig(
        bind=bind,
        port=port,
        public_address=public_address,
        workers=workers,
        internal_bind=internal_bind,
        internal_port_base=internal_port_base,
        table_capacity=table_capacity,
        idle_timeout=idle_timeout,
        recv_buffer_bytes=recv_buffer,
        send_buffer_bytes=send_buffer,
        batch_size=batch_size,
        max_datagram=max_datagram,
        bundle_max_bytes=bundle_max_bytes,
        coalesce_us=coalesce_us,
        pin_cpus=pin_cpus,
        drain_seconds=drain_seconds,
        restart_backoff_initial=backoff_initial,
        restart_backoff_max=backoff_max,
    )


def _parse_pin_cpus(table: _Table) -> bool | tuple[int, ...]:
    value = table.get("pin_cpus")
    if value is _MISSING:
        return False
    if isinstance(value, bool):
        return value
    expected = f"true, false or a non-empty list of distinct CPU ids in 0..{_MAX_CPU_ID}"
    if not isinstance(value, list) or not value:
        table.fail("pin_cpus", expected, value)
    for index, cpu in enumerate(value):
        if not _is_int(cpu) or not 0 <= cpu <= _MAX_CPU_ID:
            table.fail(f"pin_cpus[{index}]", f"a CPU id in 0..{_MAX_CPU_ID}", cpu)
        if cpu in value[:index]:
            table.fail(f"pin_cpus[{index}]", "a CPU id not already listed", cpu)
    return tuple(value)


def _parse_static_transceivers(table: _Table, relay: RelayConfig) -> TransceiversConfig:
    value = table.get("static")
    if value is _MISSING:
        return TransceiversConfig(())
    if not isinstance(value, list):
        table.fail("static", "an array of tables ([[transceivers.static]])", value)
    internal = ipaddress.ip_address(relay.internal_bind)
    entries: list[StaticTransceiver] = []
    seen_ids: dict[int, int] = {}
    seen_addresses: dict[tuple[str, int], int] = {}
    for index, item in enumerate(value):
        item_path = f"{table.path}.static[{index}]"
        if not isinstance(item, dict):
            table.fail(f"static[{index}]", "a table with id and address", item)
        entry = _Table(table.source, item_path, item, STATIC_TRANSCEIVER_KEYS)
        if entry.get("id") is _MISSING:
            entry.fail("id", f"an integer in 1..{_MAX_TRANSCEIVER_ID}")
        transceiver_id = entry.integer("id", 0, 1, _MAX_TRANSCEIVER_ID)
        if transceiver_id in seen_ids:
            entry.fail(
                "id",
                f"an id not already used by transceivers.static[{seen_ids[transceiver_id]}]",
                transceiver_id,
            )
        host, port = _parse_host_port(entry, "address")
        if not _can_reach(internal, ipaddress.ip_address(host)):
            entry.fail(
                "address",
                f"an IPv{internal.version} address (reachable from relay.internal_bind "
                f"{relay.internal_bind})",
                entry.get("address"),
            )
        if (host, port) in seen_addresses:
            entry.fail(
                "address",
                "an address not already used by "
                f"transceivers.static[{seen_addresses[(host, port)]}]",
                entry.get("address"),
            )
        seen_ids[transceiver_id] = index
        seen_addresses[(host, port)] = index
        entries.append(StaticTransceiver(transceiver_id, host, port))
    return TransceiversConfig(tuple(entries))


def _parse_local_transceivers(table: _Table, registry: TransceiversConfig) -> TransceiverConfig:
    count = table.integer("count", 1, 0, 1024)
    first_id = table.integer("first_id", 1, 1, _MAX_TRANSCEIVER_ID)
    if first_id + count - 1 > _MAX_TRANSCEIVER_ID:
        table.fail(
            "first_id",
            f"an id in 1..{_MAX_TRANSCEIVER_ID - count + 1} "
            f"(transceiver.count = {count} consecutive ids)",
            first_id,
        )
    for index, entry in enumerate(registry.static):
        if count and entry.id in range(first_id, first_id + count):
            raise ConfigError(
                table.source,
                f"transceivers.static[{index}].id",
                f"expected an id outside {first_id}..{first_id + count - 1} (the ids of this "
                f"machine's transceivers, see [transceiver]), got {entry.id}",
            )
    bind = table.ip("bind", "127.0.0.1")
    port = _port_range(table, "port", 0, count)
    advertise = table.optional_ip("advertise_address", wildcard_ok=False)
    signaling_bind = table.ip("signaling_bind", "127.0.0.1")
    # Shared by all of this machine's transceivers (SO_REUSEPORT); 0 picks a free one.
    signaling_port = table.integer("signaling_port", 8080, 0, _MAX_PORT)
    token = table.get("signaling_token")
    if token is _MISSING:
        token = None
    elif not isinstance(token, str):
        table.fail("signaling_token", "a bearer token string", token)
    elif len(token) < _MIN_BEARER_TOKEN_LENGTH or not _BEARER_TOKEN.fullmatch(token):
        raise ConfigError(
            table.source,
            table.dotted("signaling_token"),
            f"expected at least {_MIN_BEARER_TOKEN_LENGTH} characters of A-Z a-z 0-9 - . _ ~ "
            f"+ / (then optional '=' padding), got {_describe_bad_token(token)}",
        )
    certificate = table.absolute_path("certificate")
    private_key = table.absolute_path("private_key")
    if (certificate is None) != (private_key is None):
        table.fail(
            "private_key" if certificate is not None else "certificate",
            "certificate and private_key together (or neither, to generate one)",
        )
    heap_trim_interval = table.get("heap_trim_interval")
    if heap_trim_interval is _MISSING:
        heap_trim_interval = HEAP_TRIM_INTERVAL
    elif not _is_number(heap_trim_interval) or not (
        heap_trim_interval == 0 or 1 <= heap_trim_interval <= 3600
    ):
        table.fail(
            "heap_trim_interval",
            "0 (off) or a number of seconds in 1..3600",
            heap_trim_interval,
        )
    return TransceiverConfig(
        count=count,
        first_id=first_id,
        bind=bind,
        port=port,
        advertise_address=advertise or _advertised_default(bind),
        signaling_bind=signaling_bind,
        signaling_port=signaling_port,
        signaling_token=token,
        max_calls=table.integer("max_calls", 10_000, 1, 1_000_000),
        consent_timeout=table.seconds("consent_timeout", 30.0, 5.0, 3600.0),
        setup_timeout=table.seconds("setup_timeout", 20.0, 1.0, 600.0),
        heap_trim_interval=float(heap_trim_interval),
        certificate=certificate,
        private_key=private_key,
    )


def _port_range(table: _Table, key: str, default: int, count: int) -> int:
    """A port that is 0 (pick free ones) or the first of ``count`` consecutive ports."""
    port = table.integer(key, default, 0, _MAX_PORT)
    if port and count > 1 and port + count - 1 > _MAX_PORT:
        table.fail(
            key,
            f"0 or a port in 1..{_MAX_PORT - count + 1} (transceiver.count = {count} "
            "consecutive ports)",
            port,
        )
    return port


def _parse_redis(table: _Table, relay: RelayConfig) -> RedisConfig:
    url = table.get("url")
    if url is _MISSING:
        url = None
    else:
        problem = _redis_url_problem(url)
        if problem:
            shown = _redact_url(url) if isinstance(url, str) else url
            table.fail("url", problem, shown)
    route_ttl = table.seconds("route_ttl", 2 * relay.idle_timeout, 1, 7 * 86_400)
    if route_ttl < relay.idle_timeout:
        table.fail(
            "route_ttl",
            f"a number of seconds >= relay.idle_timeout ({_fmt_number(relay.idle_timeout)})",
            table.get("route_ttl"),
        )
    return RedisConfig(
        url=url,
        route_ttl=route_ttl,
        mirror_interval=table.seconds("mirror_interval", 1.0, 0.01, 60),
        recovery_rate=table.number(
            "recovery_rate", 200, 0, 100_000, "a number of lookups per second"
        ),
        negative_cache_seconds=table.seconds("negative_cache_seconds", 5, 0, 3600),
        socket_timeout=table.seconds("socket_timeout", 0.2, 0.001, 60),
        heartbeat_interval=table.seconds("heartbeat_interval", 2.0, 0.1, 300),
    )


def _redis_url_problem(url: object) -> str | None:
    """Why ``url`` is not a usable Redis URL, or None. Checked without connecting."""
    expected = "a URL like redis://host:6379/0, rediss://host:6380 or unix:///path/to.sock"
    if not isinstance(url, str) or not url or any(c.isspace() for c in url):
        return expected
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        return expected
    if parts.scheme not in _REDIS_SCHEMES:
        return expected
    if parts.scheme == "unix":
        return None if parts.path.startswith("/") and not parts.netloc else expected
    host = parts.hostname or ""
    bracketed = "[" in parts.netloc
    if bracketed and not (_is_ip(host) and ipaddress.ip_address(host).version == 6):
        return expected
    if not bracketed and not _HOSTNAME.fullmatch(host):
        return expected
    if port == 0:
        return expected
    database = parts.path.lstrip("/")
    if database and not (database.isascii() and database.isdigit()):
        return expected + " (the path is a database number)"
    return None


def _parse_backend(table: _Table) -> BackendConfig:
    kind = table.choice("kind", "echo", ("echo", "websocket"))
    url = table.get("url")
    if url is _MISSING:
        url = None
        if kind == "websocket":
            table.fail("url", 'a ws:// or wss:// URL (required with kind = "websocket")')
    elif not isinstance(url, str) or not url.startswith(("ws://", "wss://")) or len(url) < 8:
        table.fail("url", "a ws:// or wss:// URL", url)
    codec = table.choice("codec", "opus", ("opus", "pcm16"))
    rates = (8000, 12000, 16000, 24000, 48000)
    sample_rate = table.integer("sample_rate", 48000 if codec == "opus" else 16000, 8000, 48000)
    if codec == "opus" and sample_rate != 48000:
        table.fail("sample_rate", "48000 with codec opus", sample_rate)
    if sample_rate not in rates:
        table.fail("sample_rate", "one of " + ", ".join(map(str, rates)), sample_rate)
    token = table.get("auth_token")
    if token is _MISSING:
        token = None
    elif not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        table.fail("auth_token", "a bearer token string", REDACTED)
    return BackendConfig(
        kind=kind,
        url=url,
        codec=codec,
        sample_rate=sample_rate,
        auth_token=token,
        connect_timeout=table.seconds("connect_timeout", 5.0, 0.1, 60.0),
        max_queued_seconds=table.seconds("max_queued_seconds", 30.0, 0.1, 600.0),
        vad=table.boolean("vad", False),
        barge_in=table.boolean("barge_in", True),
        vad_threshold_dbfs=table.number("vad_threshold_dbfs", -45.0, -90.0, 0.0, "dBFS"),
        vad_hangover=table.seconds("vad_hangover", 0.6, 0.1, 10.0),
    )


def _parse_metrics(table: _Table) -> MetricsConfig:
    enabled = table.boolean("enabled", True)
    bind = table.ip("bind", "127.0.0.1")
    port = table.integer("port", 9464, 0, _MAX_PORT)
    return MetricsConfig(enabled, bind, port)


def _check_port_conflicts(
    source: str, relay: RelayConfig, local: TransceiverConfig, metrics: MetricsConfig
) -> None:
    """Refuse fixed ports that two listeners would share.

    Relay sockets use SO_REUSEPORT, so a clash would not fail at bind time: packets would
    be silently split between the two sockets. Port 0 (pick a free one) never clashes.
    """
    udp = [
        ("relay.port", relay.bind, relay.port, 1),
        ("relay.internal_port_base", relay.internal_bind, relay.internal_port_base, relay.workers),
        ("transceiver.port", local.bind, local.port, local.count),
    ]
    tcp = [
        ("metrics.port", metrics.bind, metrics.port, 1 if metrics.enabled else 0),
        ("transceiver.signaling_port", local.signaling_bind, local.signaling_port, 1),
    ]
    for listeners in (udp, tcp):
        for later in range(len(listeners)):
            key, bind, first, count = listeners[later]
            if not first or not count:
                continue
            for other_key, other_bind, other_first, other_count in listeners[:later]:
                if not other_first or not other_count:
                    continue
                overlap = (
                    first <= other_first + other_count - 1 and other_first <= first + count - 1
                )
                if overlap and _binds_overlap(bind, other_bind):
                    raise ConfigError(
                        source,
                        key,
                        f"expected ports not used by {other_key} "
                        f"({_fmt_ports(other_first, other_count)} on {other_bind}), "
                        f"got {_fmt_ports(first, count)} on {bind}",
                    )


# -- secrets ------------------------------------------------------------------------------


def _decode_secret(text: str) -> bytes:
    """``hex:...``, ``base64:...`` (prefixes case-insensitive) or plain UTF-8 text.

    Raises ValueError with a message that never contains the secret itself.
    """
    prefix, _, rest = text.partition(":")
    kind = prefix.lower()
    if kind == "hex":
        try:
            secret = bytes.fromhex(rest)
        except ValueError:
            raise ValueError("expected hex digits after 'hex:', got invalid hex") from None
    elif kind == "base64":
        try:
            secret = base64.b64decode(rest.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "expected standard base64 after 'base64:', got invalid base64"
            ) from None
    else:
        secret = text.encode("utf-8")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"expected at least {MIN_SECRET_LENGTH} bytes after decoding, got {len(secret)} bytes"
        )
    return secret


def _check_distinct_key_ids(secrets: list[bytes], source: str, key: str) -> None:
    """Two secrets must differ in key id, or a token could not say which one minted it."""
    if len(secrets) == 2 and key_id_for(secrets[0]) == key_id_for(secrets[1]):
        same = "the same secret twice" if secrets[0] == secrets[1] else "two secrets"
        raise ConfigError(
            source,
            key,
            "expected secrets with different key ids (1 in 16 pairs collide; generate "
            f"another current secret), got {same} with key id {key_id_for(secrets[0])}",
        )


def _parse_secret_lines(
    text: str, source: str, key: str, where: str, *, max_count: int
) -> list[bytes]:
    secrets: list[bytes] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(secrets) == max_count:
            raise ConfigError(
                source,
                key,
                f"expected at most {max_count} secret(s) in {where}, got another on line {number}",
            )
        try:
            secrets.append(_decode_secret(line))
        except ValueError as error:
            raise ConfigError(source, key, f"line {number} of {where}: {error}") from None
    if not secrets:
        raise ConfigError(source, key, f"expected 1 to {max_count} secret(s) in {where}, got none")
    _check_distinct_key_ids(secrets, source, key)
    return secrets


def _load_or_generate_secret(config: Config) -> bytes:
    directory = config.fleet.runtime_dir
    key = "fleet.runtime_dir"
    try:
        _make_private_dirs(directory)
    except OSError as error:
        raise ConfigError(
            config.source,
            key,
            f"expected a directory this user can create, got {str(directory)!r} "
            f"({_os_reason(error)})",
        ) from None
    _check_private_dir(config.source, key, directory)
    path = directory / GENERATED_SECRET_FILENAME
    try:
        if not path.exists():
            _create_secret_file(path)
        return _read_generated_secret(config.source, key, path)
    except OSError as error:
        raise ConfigError(
            config.source,
            key,
            f"expected a usable generated secret file, got {str(path)!r} ({_os_reason(error)})",
        ) from None


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents, each mode 0700 (makedirs would not)."""
    missing: list[Path] = []
    cursor = directory
    while not cursor.exists() and cursor != cursor.parent:
        missing.append(cursor)
        cursor = cursor.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another fleet process was first
            os.mkdir(path, 0o700)


def _check_private_dir(source: str, key: str, directory: Path) -> None:
    """Refuse a runtime dir that another user could tamper with (e.g. squatted in /tmp)."""
    euid = os.geteuid()
    try:
        info = os.stat(directory)
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(
                source, key, f"expected a directory, got {str(directory)!r} (not a directory)"
            )
        if info.st_uid != euid or info.st_mode & 0o022:
            raise ConfigError(
                source,
                key,
                f"expected a directory owned by uid {euid} and writable only by it, got "
                f"{str(directory)!r} ({_owner_and_mode(info)})",
            )
        for parent in directory.parents:
            info = os.stat(parent)
            world_writable = info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX
            if info.st_uid not in (euid, 0) or world_writable:
                raise ConfigError(
                    source,
                    key,
                    f"expected parent directories owned by uid {euid} or root and not "
                    f"writable by everyone, got {str(parent)!r} ({_owner_and_mode(info)})",
                )
    except OSError as error:
        raise ConfigError(
            source,
            key,
            f"expected a usable directory, got {str(directory)!r} ({_os_reason(error)})",
        ) from None


def _create_secret_file(path: Path) -> None:
    """Write a fresh secret to a private temp file, then hard-link it into place.

    ``link`` fails if the name exists, so when processes race exactly one secret wins and
    nobody ever reads a half-written file.
    """
    secret = os.urandom(32)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as stream:
            stream.write(
                "# voxrelay routing-token secret, generated because none is configured.\n"
                "# Relays and transceivers on this machine share it; keep it private.\n"
                f"hex:{secret.hex()}\n"
            )
            stream.flush()
            os.fsync(stream.fileno())
        # If another process won the race, everyone reads the winner's secret.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def _read_generated_secret(source: str, key: str, path: Path) -> bytes:
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as stream:
        info = os.fstat(stream.fileno())
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise ConfigError(
                source,
                key,
                f"expected a secret file owned by uid {os.geteuid()} with mode 0600, got "
                f"{str(path)!r} ({_owner_and_mode(info)})",
            )
        data = stream.read(4096)
    text = _decode_utf8(data, source, key, repr(str(path)))
    return _parse_secret_lines(text, source, key, repr(str(path)), max_count=1)[0]


# -- small helpers ------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or a finite float (math.isfinite would overflow on a huge TOML integer)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _fmt_ports(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}..{first + count - 1}"


def _show(value: object, limit: int = 80) -> str:
    """``repr`` for messages: one line, truncated, "nothing" for a missing key."""
    if value is _MISSING:
        return "nothing"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redacted_list(value: object) -> object:
    """Show a token_secrets value's shape without its contents."""
    if isinstance(value, list):
        return [REDACTED if isinstance(item, str) else item for item in value]
    return REDACTED if isinstance(value, str) else value


def _describe_bad_token(token: str) -> str:
    """What is wrong with a bearer token, without repeating the token."""
    if len(token) < _MIN_BEARER_TOKEN_LENGTH:
        return f"{len(token)} characters"
    bad = next((c for c in token if c not in _BEARER_TOKEN_CHARACTERS), None)
    return "'=' before the end" if bad is None else f"the character {bad!r}"


class _Shown:
    """A description standing in for a value in ``got ...`` (a secret, or a type)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _kind(value: object) -> _Shown:
    """``an integer``, ``an array``...: a value's TOML type, for when its repr may leak."""
    if isinstance(value, bool):
        return _Shown("a boolean")
    kinds = {int: "an integer", float: "a float", str: "a string", list: "an array"}
    kinds[dict] = "a table"
    for kind, text in kinds.items():
        if isinstance(value, kind):
            return _Shown(text)
    return _Shown("a date or time")


def _usable_cpu_count() -> int:
    """CPUs this process may run on (a container's cpuset), else os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return min(max(len(os.sched_getaffinity(0)), 1), 1024)
    return min(os.cpu_count() or 1, 1024)


def _advertised_default(bind: str) -> str:
    """The address to tell others: the bind address, or loopback for a wildcard."""
    return "127.0.0.1" if ipaddress.ip_address(bind).is_unspecified else bind


def _can_reach(
    local: ipaddress.IPv4Address | ipaddress.IPv6Address,
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> bool:
    """Whether a socket bound to ``local`` can send to ``remote`` (``::`` is dual-stack)."""
    return local.version == remote.version or (local.version == 6 and local.is_unspecified)


def _binds_overlap(first: str, second: str) -> bool:
    """Whether sockets bound to these addresses would compete for the same packets."""
    a, b = ipaddress.ip_address(first), ipaddress.ip_address(second)
    if a == b:
        return True
    if a.version == b.version:
        return a.is_unspecified or b.is_unspecified
    # Linux binds "::" dual-stack by default, so it also covers every IPv4 address.
    return (a.version == 6 and a.is_unspecified) or (b.version == 6 and b.is_unspecified)


def _parse_host_port(table: _Table, key: str) -> tuple[str, int]:
    """``"a.b.c.d:port"`` or ``"[v6]:port"``, host a specific IP, port in 1..65535."""
    value = table.get(key)
    shape = '"host:port" with an IP address host (IPv6 as "[addr]:port")'
    if not isinstance(value, str):
        table.fail(key, shape, value)
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            table.fail(key, shape, value)
        port_text = rest[1:]
        if not _is_ip(host) or ipaddress.ip_address(host).version != 6:
            table.fail(key, "an IPv6 address inside the brackets", value)
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            table.fail(key, shape, value)
        if ":" in host:
            table.fail(key, 'an IPv6 host in brackets ("[addr]:port")', value)
        if not _is_ip(host):
            table.fail(key, shape, value)
    if not _PORT_DIGITS.fullmatch(port_text) or not 1 <= int(port_text) <= _MAX_PORT:
        table.fail(key, f"a port in 1..{_MAX_PORT} after the colon", value)
    address = ipaddress.ip_address(host)
    if address.is_unspecified or address.is_multicast:
        table.fail(key, "a specific unicast IP address (not a wildcard)", value)
    return str(address), int(port_text)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact_url(url: str) -> str:
    """The URL with any password replaced, for messages and status."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return REDACTED
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))


def _decode_utf8(data: bytes, source: str, key: str | None, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            source,
            key,
            f"expected UTF-8 text in {what}, got byte 0x{data[error.start]:02x} on line {line}",
        ) from None


def _owner_and_mode(info: os.stat_result) -> str:
    return f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}"


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _did_you_mean(name: str, candidates: tuple[str, ...] | list[str]) -> str:
    matches = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _unknown_key_detail(section: str, key: str, keys: tuple[str, ...], *, kind: str = "key") -> str:
    """``unknown key; did you mean 'port'?``, pointing across sections when that fits."""
    if not section:
        candidates = list(SECTIONS)
        close = difflib.get_close_matches(key.lower(), candidates, n=1)
        if close:
            return f"unknown {kind}; did you mean [{close[0]}]?"
    else:
        close = difflib.get_close_matches(key.lower(), keys, n=1)
        if close:
            return f"unknown {kind}; did you mean {close[0]!r}?"
    # A key written under the wrong header, e.g. `url` in [relay] rather than [redis].
    real_section = not section or section in SECTIONS
    elsewhere = [f"{name}.{key}" for name, names in SECTIONS.items() if key in names]
    if elsewhere and real_section:
        quoted = [repr(name) for name in elsewhere]
        listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        return f"unknown {kind}; did you mean {listed}?"
    if not section:
        return f"unknown {kind}; expected one of the sections " + ", ".join(
            f"[{name}]" for name in SECTIONS
        )
    return f"unknown {kind}; expected one of: " + ", ".join(keys)
