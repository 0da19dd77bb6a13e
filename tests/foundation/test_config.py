"""Configuration: defaults == config.toml, env overrides, and precise errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from securecollab.config import AclRule, ConfigError, Settings, defaults_as_dict, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_config_toml_documents_exactly_the_defaults() -> None:
    data = tomllib.loads((ROOT / "config.toml").read_text())
    assert data == defaults_as_dict()
    assert load_settings(ROOT / "config.toml", env={}) == Settings()
    # every key has a comment on its line (or, for [broker] acl, above it)
    lines = (ROOT / "config.toml").read_text().splitlines()
    for line in lines:
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("acl"):
            assert "#" in line, f"undocumented key: {line}"


def test_issue_defaults() -> None:
    s = load_settings(env={})
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)
    assert s.server.data_dir == "./data" and s.store.url == "sqlite:///data/securecollab.db"
    assert s.stomp.port == 61613 and s.auth.access_ttl_s == 3600
    assert s.http.cors_origins == () and s.broker.acl == ()


def test_env_overrides_are_typed() -> None:
    s = load_settings(
        env={
            "SECURECOLLAB_HTTP__PORT": "9000",
            "SECURECOLLAB_AUTH__REGISTRATION_ENABLED": "false",
            "SECURECOLLAB_STORE__BATCH_WAIT_MS": "2.5",
            "SECURECOLLAB_HTTP__CORS_ORIGINS": "https://a.example, https://b.example:8443",
            "SECURECOLLAB_BROKER__ACL": (
                '[{"pattern": "/queue/test.*", "subscribe": ["*"], "send": ["*"]}]'
            ),
            "SECURECOLLAB_TEST_PG": "postgresql://ignored",  # not SECTION__KEY: ignored
        }
    )
    assert s.http.port == 9000 and s.auth.registration_enabled is False
    assert s.store.batch_wait_ms == 2.5
    assert s.http.cors_origins == ("https://a.example", "https://b.example:8443")
    assert s.broker.acl == (AclRule("/queue/test.*", ("*",), ("*",)),)
    s = load_settings(env={"SECURECOLLAB_HTTP__CORS_ORIGINS": '["https://c.example"]'})
    assert s.http.cors_origins == ("https://c.example",)


def test_precedence_file_env_override(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[http]\nport = 7000\nhost = "0.0.0.0"\n')
    s = load_settings(f, env={"SECURECOLLAB_HTTP__PORT": "7001"})
    assert (s.http.host, s.http.port) == ("0.0.0.0", 7001)
    s = load_settings(
        f, env={"SECURECOLLAB_HTTP__PORT": "7001"}, overrides={"http": {"port": 7002}}
    )
    assert s.http.port == 7002


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[http]\nprot = 1\n", {}, "http.prot: unknown key"),
        ("[htp]\nport = 1\n", {}, "htp: unknown section"),
        ("", {"SECURECOLLAB_HTTP__PROT": "1"}, "http.prot: unknown key"),
        ('[http]\nport = "80"\n', {}, "http.port"),
        ("", {"SECURECOLLAB_HTTP__PORT": "eighty"}, "http.port"),
        ("[http]\nport = 70000\n", {}, "http.port"),
        ("[http]\nport = true\n", {}, "http.port"),
        ("[auth]\nregistration_enabled = 1\n", {}, "auth.registration_enabled"),
        ("", {"SECURECOLLAB_AUTH__REGISTRATION_ENABLED": "maybe"}, "auth.registration_enabled"),
        ("[auth]\nmin_password_length = 3\n", {}, "auth.min_password_length"),
        ('[server]\nlog_level = "loud"\n', {}, "server.log_level"),
        ('[server]\njwt_secret = "short"\n', {}, "server.jwt_secret"),
        ('[store]\nurl = "mysql://x"\n', {}, "store.url"),
        ('[http]\ncors_origins = ["https://a.example/path"]\n', {}, "http.cors_origins"),
        ('[http]\ntls_cert = "/nonexistent.pem"\n', {}, "http.tls_cert"),
        ('[broker]\nacl = [{pattern = "/queue/*", sned = ["*"]}]\n', {}, "broker.acl[0].sned"),
        ('[broker]\nacl = [{send = ["*"]}]\n', {}, "broker.acl[0].pattern"),
        ("[auth]\naccess_ttl_s = 7200\nrefresh_ttl_s = 3600\n", {}, "auth.refresh_ttl_s"),
        ('[events]\nkafka_bootstrap = "nohostport"\n', {}, "events.kafka_bootstrap"),
        ("[http\n", {}, "invalid TOML"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(f, env=env)
    assert needle in str(info.value)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/securecollab.toml", env={})
