"""Settings: one TOML file, environment overrides, paths resolved against the home."""

from pathlib import Path

import pytest

from services.common.settings import ConfigError, load_settings, mask_url


def test_defaults_need_nothing_but_a_home(tmp_path: Path) -> None:
    settings = load_settings({"RETRACE_HOME": str(tmp_path)})
    assert settings.spool == tmp_path / "var/spool"
    assert settings.repo == tmp_path / "var/repo"
    assert settings.store_url == f"sqlite:///{tmp_path}/var/retrace.sqlite3"
    assert settings.broker.url == "amqp://guest:guest@127.0.0.1:5672/"


def test_relative_paths_resolve_against_the_settings_file_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "etc" / "retrace.toml"
    config.parent.mkdir()
    config.write_text('[paths]\nspool = "spool"\nrepo = "/srv/repo"\n')
    monkeypatch.chdir("/")  # the working directory must not matter
    settings = load_settings({"RETRACE_CONFIG": str(config)})
    assert settings.spool == tmp_path / "etc" / "spool"
    assert settings.repo == Path("/srv/repo")


def test_retrace_home_wins_over_the_settings_file_folder(tmp_path: Path) -> None:
    config = tmp_path / "retrace.toml"
    config.write_text('[paths]\nspool = "spool"\n')
    home = tmp_path / "home"
    settings = load_settings({"RETRACE_CONFIG": str(config), "RETRACE_HOME": str(home)})
    assert settings.spool == home / "spool"


def test_environment_overrides_the_file_and_reads_toml_values(tmp_path: Path) -> None:
    config = tmp_path / "retrace.toml"
    config.write_text('[broker]\nurl = "amqp://a:b@broker/"\n[intake]\narches = ["x86_64"]\n')
    settings = load_settings(
        {
            "RETRACE_CONFIG": str(config),
            "RETRACE_BROKER__URL": "amqp://c:d@other/",
            "RETRACE_INTAKE__ARCHES": '["x86_64", "aarch64"]',
            "RETRACE_INTAKE__MAX_PACKED_SIZE_MIB": "7",
        }
    )
    assert settings.broker.url == "amqp://c:d@other/"
    assert settings.intake.arches == ("x86_64", "aarch64")
    assert settings.intake.max_packed_size_mib == 7


def test_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "retrace.toml"
    config.write_text("[broker]\nheartbeet = 5\n")
    with pytest.raises(ConfigError, match=r"broker\.heartbeet"):
        load_settings({"RETRACE_CONFIG": str(config)})


def test_a_bad_value_from_the_environment_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker\.heartbeat"):
        load_settings({"RETRACE_HOME": str(tmp_path), "RETRACE_BROKER__HEARTBEAT": "often"})


def test_a_missing_settings_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_settings({"RETRACE_CONFIG": str(tmp_path / "nope.toml")})


def test_secrets_are_masked_when_settings_are_shown(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "RETRACE_HOME": str(tmp_path),
            "RETRACE_BROKER__URL": "amqp://retrace:s3cret@mq.example.org:5671/prod",
            "RETRACE_STORE__URL": "postgresql://retrace:hunter2@db/retrace",
        }
    )
    shown = repr(settings.masked())
    assert "s3cret" not in shown
    assert "hunter2" not in shown
    assert "amqp://retrace:***@mq.example.org:5671/prod" in shown
    assert mask_url("amqp://127.0.0.1/") == "amqp://127.0.0.1/"
