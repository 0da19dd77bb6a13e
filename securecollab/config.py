"""Typed settings: built-in defaults <- TOML file <- environment <- explicit overrides.

`load_settings(path, env)` returns a frozen `Settings` whose sections are attributes
(`settings.http.port`). Every key can be overridden by an environment variable
`SECURECOLLAB_<SECTION>__<KEY>` (e.g. `SECURECOLLAB_HTTP__PORT=9000`); values are parsed
to the declared type (ints, floats, bools `true/false/1/0/yes/no/on/off`, lists as JSON
or comma-separated, `[broker] acl` as JSON). An unknown section or key, a wrong type or
an impossible value raises `ConfigError` naming the key and where it came from; the CLI
prints it and exits with code 2.

`config.toml` at the repository root documents every key with its default; a test keeps
it equal to the defaults declared here.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "SECURECOLLAB_"


class ConfigError(Exception):
    """Invalid configuration; the message names the offending key and its source."""


# ----------------------------------------------------------------------------- checks
# A check returns None when the value is acceptable, else a short reason.

Check = Callable[[Any], str | None]


def _range(lo: float | None = None, hi: float | None = None) -> Check:
    def check(v: Any) -> str | None:
        if lo is not None and v < lo:
            return f"must be >= {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _nonempty(v: Any) -> str | None:
    return None if v.strip() else "must not be empty"


def _file_or_empty(v: Any) -> str | None:
    if v and not os.path.isfile(v):
        return f"file {v!r} does not exist"
    return None


def _jwt_secret(v: Any) -> str | None:
    # RFC 7518 3.2: an HS512 key must be at least as long as the hash output (64 bytes)
    if v and len(v.encode("utf-8")) < 64:
        return "must be empty (generate one) or at least 64 characters"
    return None


_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def _origins(v: Any) -> str | None:
    for origin in v:
        if origin != "*" and not _ORIGIN_RE.match(origin):
            return f"{origin!r} is not an origin like https://chat.example.com (no path)"
    return None


def _networks(v: Any) -> str | None:
    from securecollab.netaddr import parse_network

    for entry in v:
        try:
            parse_network(entry)
        except ValueError:
            return f"{entry!r} is not an IP address or network like 10.0.0.0/8"
    return None


def _store_url(v: Any) -> str | None:
    if not v.startswith(("sqlite:", "postgresql:", "postgres:")):
        return "must start with sqlite: or postgresql:"
    return None


def _backplane_url(v: Any) -> str | None:
    if not v.startswith(("memory://", "redis://", "rediss://")):
        return "must be memory:// or redis://host:port/db"
    return None


def _bootstrap(v: Any) -> str | None:
    if not v:
        return None
    for part in v.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            return f"{part!r} is not host:port"
    return None


def _meta(doc: str, check: Check | None = None) -> dict[str, Any]:
    return {"doc": doc, "check": check}


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class ServerSettings:
    data_dir: str = field(default="./data", metadata=_meta("data directory", _nonempty))
    jwt_secret: str = field(
        default="", repr=False, metadata=_meta("JWT signing secret", _jwt_secret)
    )
    shutdown_timeout_s: float = field(
        default=5.0, metadata=_meta("shutdown bound", _range(0.5, 600))
    )
    log_level: str = field(
        default="info", metadata=_meta("log level", _one_of("debug", "info", "warning", "error"))
    )

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path (relative paths resolve against the CWD)."""
        return Path(self.data_dir).expanduser().resolve()


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = field(default="127.0.0.1", metadata=_meta("listen address", _nonempty))
    port: int = field(default=8080, metadata=_meta("listen port", _range(0, 65535)))
    tls_cert: str = field(default="", metadata=_meta("PEM certificate", _file_or_empty))
    tls_key: str = field(default="", metadata=_meta("PEM key", _file_or_empty))
    max_body_bytes: int = field(
        default=1_048_576, metadata=_meta("request body limit", _range(1024, 1 << 30))
    )
    cors_origins: tuple[str, ...] = field(default=(), metadata=_meta("CORS allow-list", _origins))
    rate_limit_user_per_min: int = field(default=100, metadata=_meta("per user", _range(1)))
    rate_limit_ip_per_min: int = field(default=1000, metadata=_meta("per IP", _range(1)))
    metrics_token: str = field(default="", metadata=_meta("bearer token for /metrics"))
    trusted_proxies: tuple[str, ...] = field(
        default=(), metadata=_meta("reverse proxies whose X-Forwarded-For is used", _networks)
    )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    access_ttl_s: int = field(default=3600, metadata=_meta("access JWT life", _range(30, 86400)))
    refresh_ttl_s: int = field(
        default=2_592_000, metadata=_meta("refresh token life", _range(60, 31_536_000))
    )
    registration_enabled: bool = field(default=True, metadata=_meta("open registration"))
    min_password_length: int = field(default=10, metadata=_meta("password policy", _range(8, 1024)))
    login_limit_per_user_per_min: int = field(
        default=10, metadata=_meta("login throttle", _range(1))
    )
    login_limit_per_ip_per_min: int = field(
        default=100, metadata=_meta("login throttle", _range(1))
    )
    argon2_time_cost: int = field(default=3, metadata=_meta("argon2id iterations", _range(1, 20)))
    argon2_memory_kib: int = field(
        default=65536, metadata=_meta("argon2id memory", _range(1024, 4_194_304))
    )
    argon2_parallelism: int = field(default=4, metadata=_meta("argon2id lanes", _range(1, 64)))


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = field(default="sqlite:///data/securecollab.db", metadata=_meta("store", _store_url))
    batch_max: int = field(default=256, metadata=_meta("group commit size", _range(1, 100_000)))
    batch_wait_ms: float = field(default=1.0, metadata=_meta("group commit wait", _range(0, 1000)))
    read_pool: int = field(default=4, metadata=_meta("reader connections", _range(1, 256)))


@dataclass(frozen=True, slots=True)
class AuditSettings:
    retention_days: int = field(default=90, metadata=_meta("audit retention", _range(1, 36500)))
    prune_interval_s: int = field(default=3600, metadata=_meta("prune period", _range(1, 604_800)))


@dataclass(frozen=True, slots=True)
class BackplaneSettings:
    url: str = field(default="memory://", metadata=_meta("backplane", _backplane_url))


@dataclass(frozen=True, slots=True)
class StompSettings:
    port: int = field(default=61613, metadata=_meta("STOMP TCP port, 0 disables", _range(0, 65535)))
    host: str = field(default="", metadata=_meta("STOMP listen address"))
    tls_cert: str = field(default="", metadata=_meta("PEM certificate", _file_or_empty))
    tls_key: str = field(default="", metadata=_meta("PEM key", _file_or_empty))
    max_frame_bytes: int = field(
        default=102_400, metadata=_meta("frame limit", _range(1024, 1 << 30))
    )
    max_headers: int = field(default=64, metadata=_meta("header count", _range(1, 10_000)))
    max_header_line: int = field(default=8192, metadata=_meta("header line", _range(256, 1 << 20)))
    connect_timeout_s: float = field(
        default=10.0, metadata=_meta("CONNECT deadline", _range(0.1, 3600))
    )
    heartbeat_send_ms: int = field(default=10_000, metadata=_meta("server heart-beat", _range(0)))
    heartbeat_recv_ms: int = field(default=10_000, metadata=_meta("client heart-beat", _range(0)))
    outbound_queue_frames: int = field(default=1000, metadata=_meta("slow consumer", _range(1)))
    outbound_queue_bytes: int = field(
        default=4_194_304, metadata=_meta("slow consumer", _range(1024))
    )
    ws_always_binary: bool = field(default=False, metadata=_meta("binary WS frames"))
    pipeline_depth: int = field(
        default=32, metadata=_meta("chat SENDs in flight per connection", _range(1, 1024))
    )
    send_limit: int = field(default=20, metadata=_meta("SENDs per window", _range(1)))
    send_window_s: float = field(default=10.0, metadata=_meta("SEND window", _range(0.1, 3600)))


@dataclass(frozen=True, slots=True)
class AclRule:
    """One `[[broker.acl]]` entry: who may SUBSCRIBE/SEND to destinations matching `pattern`.

    `pattern` is a glob (fnmatch) over the destination; "*" in a list means any
    authenticated user, any other entry is a userId.
    """

    pattern: str
    subscribe: tuple[str, ...] = ()
    send: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    acl: tuple[AclRule, ...] = field(default=(), metadata=_meta("general destinations ACL"))


@dataclass(frozen=True, slots=True)
class PresenceSettings:
    ttl_s: int = field(default=600, metadata=_meta("presence TTL", _range(5, 86400)))


@dataclass(frozen=True, slots=True)
class MessagesSettings:
    max_content_bytes: int = field(
        default=65536, metadata=_meta("ciphertext limit", _range(16, 1 << 30))
    )
    offline_ttl_days: int = field(default=7, metadata=_meta("offline queue TTL", _range(1, 3650)))
    offline_prune_interval_s: int = field(
        default=3600, metadata=_meta("prune period", _range(1, 604_800))
    )


@dataclass(frozen=True, slots=True)
class EventsSettings:
    kafka_bootstrap: str = field(default="", metadata=_meta("Kafka bootstrap servers", _bootstrap))


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings; each section is a frozen dataclass."""

    server: ServerSettings = field(default_factory=ServerSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    backplane: BackplaneSettings = field(default_factory=BackplaneSettings)
    stomp: StompSettings = field(default_factory=StompSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    messages: MessagesSettings = field(default_factory=MessagesSettings)
    events: EventsSettings = field(default_factory=EventsSettings)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Settings)}  # type: ignore[misc]


# ----------------------------------------------------------------------------- parsing

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type_name(tp: Any) -> str:
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "a boolean"
    return "a list"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` (from TOML or already parsed) against the declared type `tp`."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if item_tp is AclRule:
            return tuple(_acl_rule(v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _acl_rule(value: Any, where: str) -> AclRule:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table {{pattern, subscribe, send}}")
    unknown = set(value) - {"pattern", "subscribe", "send"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if "pattern" not in value:
        raise ConfigError(f"{where}.pattern: missing")
    pattern = _coerce(value["pattern"], str, f"{where}.pattern")
    if not pattern.startswith("/"):
        raise ConfigError(f"{where}.pattern: must start with '/'")
    return AclRule(
        pattern=pattern,
        subscribe=_coerce(value.get("subscribe", []), tuple[str, ...], f"{where}.subscribe"),
        send=_coerce(value.get("send", []), tuple[str, ...], f"{where}.send"),
    )


def _parse_env(text: str, tp: Any, where: str) -> Any:
    """Parse an environment string to the declared type (then `_coerce` checks it)."""
    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{where}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    # lists: JSON when it looks like JSON, else comma-separated strings
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except ValueError as e:
            raise ConfigError(f"{where}: invalid JSON list: {e}") from None
    return [part.strip() for part in stripped.split(",") if part.strip()]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build the settings: defaults <- TOML file at `path` <- `env` <- `overrides`.

    `env` defaults to `os.environ`; only variables named `SECURECOLLAB_<SECTION>__<KEY>`
    are read (other `SECURECOLLAB_*` names, without the double underscore, are ignored).
    `overrides` ({"http": {"port": 0}}) come from CLI flags and tests and are typed values.
    Raises ConfigError naming the key on any problem.
    """
    raw: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in SECTIONS}

    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r}: invalid TOML: {e}") from None
        for section, table in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section (in {p})")
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a table (in {p})")
            for key, value in table.items():
                raw[section][key] = (value, f"in {p}")

    env = os.environ if env is None else env
    for name, text in env.items():
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (from environment {name})")
        hints = _hints(SECTIONS[section])
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown key (from environment {name})")
        where = f"{section}.{key} (from environment {name})"
        raw[section][key] = (_parse_env(text, hints[key], where), f"from environment {name}")

    for section, table in (overrides or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (override)")
        for key, value in table.items():
            raw[section][key] = (value, "override")

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        meta = {f.name: f.metadata for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, (value, source) in raw[section].items():
            if key not in hints:
                raise ConfigError(f"{section}.{key}: unknown key ({source})")
            where = f"{section}.{key}"
            try:
                typed = _coerce(value, hints[key], where)
            except ConfigError as e:
                raise ConfigError(f"{e} ({source})") from None
            check = meta[key].get("check")
            reason = check(typed) if check else None
            if reason:
                raise ConfigError(f"{where}: {typed!r} {reason} ({source})")
            kwargs[key] = typed
        built[section] = cls(**kwargs)
    settings = Settings(**built)
    _cross_checks(settings)
    return settings


def _cross_checks(s: Settings) -> None:
    for section in ("http", "stomp"):
        sec = getattr(s, section)
        if bool(sec.tls_cert) != bool(sec.tls_key):
            raise ConfigError(f"{section}.tls_key: tls_cert and tls_key must be set together")
    if s.auth.refresh_ttl_s < s.auth.access_ttl_s:
        raise ConfigError("auth.refresh_ttl_s: must be >= auth.access_ttl_s")
    if s.stomp.port != 0 and s.stomp.port == s.http.port and s.http.port != 0:
        if (s.stomp.host or s.http.host) == s.http.host:
            raise ConfigError("stomp.port: must differ from http.port on the same host")


def defaults_as_dict() -> dict[str, dict[str, Any]]:
    """The built-in defaults as plain TOML-like data (tuples become lists)."""
    out: dict[str, dict[str, Any]] = {}
    defaults = Settings()
    for section in SECTIONS:
        sec = getattr(defaults, section)
        out[section] = {
            f.name: list(v) if isinstance(v := getattr(sec, f.name), tuple) else v
            for f in fields(sec)
        }
    return out
