"""retrace-client's minimal-core options and settings file (no server involved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import cli
from client.errors import EXIT_OK, EXIT_USAGE, ClientError
from client.minicore import read_note
from client.problem import Crash
from client.settings import Settings, load
from tests.unit.test_client_minicore import build_core


@pytest.fixture
def core(tmp_path: Path) -> Path:
    path = tmp_path / "core"
    build_core(path)
    return path


def client(config: Path, *args: str) -> cli.Client:
    parsed = cli._parser().parse_args(["--config", str(config), *args])
    return cli.Client(parsed, print)


def test_the_settings_file_is_optional_and_checked(tmp_path: Path) -> None:
    assert load(tmp_path / "absent.toml") == Settings()
    path = tmp_path / "client.toml"
    path.write_text("minimal = true\nred_zone = 8192\nmax_anonymous_kib = 16\n")
    assert load(path) == Settings(minimal=True, red_zone=8192, max_anonymous_kib=16)
    path.write_text("minimul = true\n")
    with pytest.raises(ClientError, match="unknown setting 'minimul'"):
        load(path)
    path.write_text('minimal = "yes"\n')
    with pytest.raises(ClientError, match="minimal must be true or false"):
        load(path)
    path.write_text("red_zone = -1\n")
    with pytest.raises(ClientError, match="red_zone must be a number, 0 or more"):
        load(path)
    path.write_text("minimal = \n")
    with pytest.raises(ClientError, match="cannot read the settings file"):
        load(path)


def test_a_setting_makes_minimal_the_default_and_the_options_win(
    core: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "client.toml"
    crash = Crash(core, {"executable": "/usr/bin/prog", "package": "prog-1-1"})
    source = ("create", "--core", str(core))
    # No setting: the core goes whole.
    assert client(config, *source).minimal(crash, tmp_path) is crash
    config.write_text("minimal = true\nblank_environment = true\nmax_anonymous_kib = 1024\n")
    sent = client(config, *source).minimal(crash, tmp_path)
    assert sent.core != core
    assert sent.temporary_core
    note = read_note(sent.core)
    assert note is not None
    assert note["environment_blanked"] is True
    assert note["max_anonymous"] == 1024 * 1024
    assert "--minimal-report says what it keeps" in capsys.readouterr().err
    assert client(config, *source, "--no-minimal").minimal(crash, tmp_path) is crash
    options = client(config, *source, "--no-blank-environment", "--max-anonymous", "8")
    note = read_note(options.minimal(crash, tmp_path).core)
    assert note is not None
    assert (note["environment_blanked"], note["max_anonymous"]) == (False, 8192)


def test_minimal_report_implies_minimal_and_prints_the_report(
    core: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "absent.toml"
    crash = Crash(core, {"executable": "/usr/bin/prog", "package": "prog-1-1"})
    sent = client(config, "batch", "--core", str(core), "--minimal-report").minimal(crash, tmp_path)
    assert read_note(sent.core) is not None
    err = capsys.readouterr().err
    assert "kept:" in err
    assert "thread stacks, from SP minus the red zone" in err
    assert "environment string(s)" in err
    contradiction = client(config, "batch", "--core", str(core), "--no-minimal", "--minimal-report")
    with pytest.raises(ClientError, match="not --no-minimal"):
        contradiction.minimal(crash, tmp_path)


def test_minimize_writes_the_core_and_sends_nothing(
    core: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small.core"
    args = ["--uri", "http://127.0.0.1:9", "--config", str(tmp_path / "none.toml")]
    code = cli.main([*args, "minimize", "--core", str(core), "-o", str(out), "--red-zone", "0"])
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert printed.startswith("minimal core: ")
    assert printed.rstrip().endswith(f"written to {out}")
    note = read_note(out)
    assert note is not None
    assert note["red_zone"] == 0
    assert cli.main([*args, "minimize", "--core", str(out), "-o", str(tmp_path / "x")]) == (
        EXIT_USAGE
    )
    assert "is a minimal core already" in capsys.readouterr().err
