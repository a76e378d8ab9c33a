"""Settings: one TOML file, environment overrides, paths resolved against the home;
each service checks its own sections and ignores the others'."""

from pathlib import Path

import pytest

from services.common.settings import (
    AdminConfig,
    AnalyzerConfig,
    ConfigError,
    IntakeConfig,
    MirrorConfig,
    ServiceConfig,
    load_settings,
    mask_url,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVICES: list[type[ServiceConfig]] = [IntakeConfig, AnalyzerConfig, MirrorConfig, AdminConfig]


def write(tmp_path: Path, text: str) -> dict[str, str]:
    """A settings file holding ``text``, and the environment naming it."""
    config = tmp_path / "retrace.toml"
    config.write_text(text)
    return {"RETRACE_CONFIG": str(config)}


def test_defaults_need_nothing_but_a_home(tmp_path: Path) -> None:
    settings = load_settings(IntakeConfig, {"RETRACE_HOME": str(tmp_path)})
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
    settings = load_settings(AnalyzerConfig, {"RETRACE_CONFIG": str(config)})
    assert settings.spool == tmp_path / "etc" / "spool"
    assert settings.repo == Path("/srv/repo")


def test_retrace_home_wins_over_the_settings_file_folder(tmp_path: Path) -> None:
    env = write(tmp_path, '[paths]\nspool = "spool"\n')
    home = tmp_path / "home"
    settings = load_settings(IntakeConfig, {**env, "RETRACE_HOME": str(home)})
    assert settings.spool == home / "spool"


def test_home_in_the_file_is_refused(tmp_path: Path) -> None:
    env = write(tmp_path, 'home = "/srv"\n')
    with pytest.raises(ConfigError, match="set RETRACE_HOME instead"):
        load_settings(IntakeConfig, env)


def test_environment_overrides_the_file_and_reads_toml_values(tmp_path: Path) -> None:
    env = write(tmp_path, '[broker]\nurl = "amqp://a:b@broker/"\n[intake]\narches = ["x86_64"]\n')
    settings = load_settings(
        IntakeConfig,
        {
            **env,
            "RETRACE_BROKER__URL": "amqp://c:d@other/",
            "RETRACE_INTAKE__ARCHES": '["x86_64", "aarch64"]',
            "RETRACE_INTAKE__MAX_PACKED_SIZE_MIB": "7",
        },
    )
    assert settings.broker.url == "amqp://c:d@other/"
    assert settings.intake.arches == ("x86_64", "aarch64")
    assert settings.intake.max_packed_size_mib == 7


def test_environment_values_are_read_as_they_always_were(tmp_path: Path) -> None:
    """TOML values (quoted strings, literal strings, inline tables), JSON lists and
    objects, and bare text, which stays text even where it looks like a number."""
    intake = load_settings(
        IntakeConfig,
        {
            "RETRACE_HOME": str(tmp_path),
            "RETRACE_INTAKE__PASSWORD_MODE": '"static"',
            "RETRACE_INTAKE__PASSWORD_KEY": "12345",
            "RETRACE_INTAKE__RELEASES": "['fedora-40', 'fedora-41']",
            "RETRACE_INTAKE__REQUIRE_HTTPS": "true",
            "RETRACE_INTAKE__KEEP_DEBUG_HOURS": "1.5",
            "RETRACE_INTAKE__MAX_RUNNING_TASKS": "1_000",
            "RETRACE_INTAKE__MIRROR_URL": "http://127.0.0.1:8001",
        },
    )
    assert intake.intake.password_mode == "static"
    assert intake.intake.password_key == "12345"
    assert intake.intake.releases == ("fedora-40", "fedora-41")
    assert intake.intake.require_https is True
    assert intake.intake.keep_debug_hours == 1.5
    assert intake.intake.max_running_tasks == 1000
    assert intake.intake.mirror_url == "http://127.0.0.1:8001"
    for tables in ('{ epel9 = "epel-9" }', '{"epel9": "epel-9"}'):
        mirror = load_settings(
            MirrorConfig,
            {"RETRACE_HOME": str(tmp_path), "RETRACE_MIRROR__TAG_RELEASES": tables},
        )
        assert mirror.mirror.tag_releases == {"epel9": "epel-9"}


def test_an_unknown_key_is_refused_naming_it_and_the_file(tmp_path: Path) -> None:
    env = write(tmp_path, "[broker]\nheartbeet = 5\n")
    for kind in SERVICES:
        with pytest.raises(ConfigError, match=r"retrace\.toml: broker\.heartbeet: unknown key"):
            load_settings(kind, env)


def test_a_service_ignores_other_services_sections(tmp_path: Path) -> None:
    """A key or section added for one service never stops another from starting."""
    env = write(
        tmp_path,
        "[intake]\nmax_running_tasks = 3\n"
        "[mirror]\nkey_of_a_newer_mirror = 1\n"
        '[analyzer]\narches = "not a list"\n'
        "[a_newer_service]\nport = 1\n",
    )
    settings = load_settings(
        IntakeConfig, {**env, "RETRACE_A_NEWER_SERVICE__PORT": "2", "RETRACE_MIRROR__X": "3"}
    )
    assert settings.intake.max_running_tasks == 3
    with pytest.raises(ConfigError, match=r"mirror\.key_of_a_newer_mirror: unknown key") as mirror:
        load_settings(MirrorConfig, env)
    assert "analyzer" not in str(mirror.value)
    with pytest.raises(ConfigError, match=r"analyzer\.arches: Input should be a valid tuple"):
        load_settings(AnalyzerConfig, env)


def test_an_unknown_key_in_its_own_section_from_the_environment_names_the_variable(
    tmp_path: Path,
) -> None:
    env = write(tmp_path, "[intake]\nmax_running_tasks = 3\n")
    with pytest.raises(ConfigError, match=r"RETRACE_INTAKE__HEARTBEET \(environment\)"):
        load_settings(IntakeConfig, {**env, "RETRACE_INTAKE__HEARTBEET": "5"})


def test_the_admin_checks_every_section_and_reports_every_problem(tmp_path: Path) -> None:
    env = write(
        tmp_path,
        "[intake]\nmax_runing_tasks = 3\n[mirror]\nkoji_timeout = 0\n[anlyzer]\narches = []\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(AdminConfig, {**env, "RETRACE_BROKR__URL": "amqp://x/"})
    where = f"settings file {tmp_path / 'retrace.toml'}"
    assert sorted(caught.value.problems) == sorted(
        [
            f"{where}: [anlyzer]: unknown section",
            "RETRACE_BROKR__URL: [brokr] is not a section",
            f"{where}: intake.max_runing_tasks: unknown key",
            f"{where}: mirror.koji_timeout: Input should be greater than or equal to 1",
        ]
    )


def test_a_key_outside_any_section_is_refused(tmp_path: Path) -> None:
    env = write(tmp_path, 'spool = "/srv/spool"\n[paths]\nrepo = "/srv/repo"\n')
    with pytest.raises(ConfigError, match="spool: a key outside any section"):
        load_settings(MirrorConfig, env)


def test_a_bad_value_from_the_environment_is_refused_naming_it(tmp_path: Path) -> None:
    env = {"RETRACE_HOME": str(tmp_path), "RETRACE_BROKER__HEARTBEAT": "often"}
    with pytest.raises(ConfigError, match=r"RETRACE_BROKER__HEARTBEAT \(environment\): broker\."):
        load_settings(AnalyzerConfig, env)
    env = {"RETRACE_HOME": str(tmp_path), "RETRACE_INTAKE__ARCHES": "x86_64 aarch64"}
    with pytest.raises(ConfigError, match=r"RETRACE_INTAKE__ARCHES .*intake\.arches"):
        load_settings(IntakeConfig, env)


def test_a_missing_or_broken_settings_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_settings(IntakeConfig, {"RETRACE_CONFIG": str(tmp_path / "nope.toml")})
    env = write(tmp_path, "[intake\n")
    with pytest.raises(ConfigError, match=r"retrace\.toml is not valid TOML"):
        load_settings(IntakeConfig, env)


@pytest.mark.parametrize(
    "example", sorted([DEPLOY / "retrace.example.toml", *(DEPLOY / "config").glob("*.toml")])
)
def test_the_example_settings_files_are_accepted_by_every_service(example: Path) -> None:
    for kind in SERVICES:
        settings = load_settings(kind, {"RETRACE_CONFIG": str(example)})
        assert settings.home == example.parent


def test_secrets_are_masked_when_settings_are_shown(tmp_path: Path) -> None:
    env = {
        "RETRACE_HOME": str(tmp_path),
        "RETRACE_BROKER__URL": "amqp://retrace:s3cret@mq.example.org:5671/prod",
        "RETRACE_STORE__URL": "postgresql://retrace:hunter2@db/retrace",
        "RETRACE_INTAKE__PASSWORD_KEY": "k3y",
        "RETRACE_INTAKE__MIRROR_URL": "http://u:m1rror@mirror.example.org/",
        "RETRACE_MIRROR__KOJI_BROKER_URL": "amqps://fedora:k0ji@rabbitmq.example.org/",
    }
    for kind in SERVICES:
        shown = repr(load_settings(kind, env).masked())
        for secret in ("s3cret", "hunter2", "k3y", "m1rror", "k0ji"):
            assert secret not in shown, (kind, secret)
        assert "amqp://retrace:***@mq.example.org:5671/prod" in shown
    intake = load_settings(IntakeConfig, env).masked()
    assert set(intake) == {"home", "paths", "store", "broker", "intake"}
    assert intake["intake"]["password_key"] == "***"
    mirror = load_settings(MirrorConfig, env).masked()
    assert mirror["mirror"]["koji_broker_url"] == "amqps://fedora:***@rabbitmq.example.org/"
    assert mask_url("amqp://127.0.0.1/") == "amqp://127.0.0.1/"
