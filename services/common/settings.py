"""Settings: one TOML file plus environment overrides, checked at start-up, per service.

Each service validates the sections it reads and ignores the others: the shared
``[paths]``, ``[store]`` and ``[broker]``, plus its own (:class:`IntakeConfig`,
:class:`AnalyzerConfig`, :class:`MirrorConfig`).  A key or a whole section added for
one service therefore never stops another from starting, while an unknown key in a
section a service validates is still an error naming it.  ``retrace-admin`` reads
:class:`AdminConfig`: every section, and an unknown section is an error too.

The file's path is ``RETRACE_CONFIG``; pydantic-settings reads it (its TOML source)
and the environment, where any key can be overridden as ``RETRACE_<SECTION>__<KEY>``
(``RETRACE_BROKER__URL=...``).  An environment value is read as a TOML value when it
parses as one (``["x86_64", "aarch64"]``, ``"static"``, ``{ epel9 = "epel-9" }``; JSON
lists and objects too), as a plain string otherwise.  Relative paths resolve against
``RETRACE_HOME`` if set, else against the settings file's folder, else against the
default home ``$XDG_DATA_HOME/retrace-server`` -- never against the current directory.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "RETRACE_"
NESTED = "__"


class ConfigError(Exception):
    """The settings cannot be used; the message says which file or variable, which key and why."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]
        """Each problem found, one line apiece (``retrace-admin settings`` prints them all)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def masked(self) -> dict[str, Any]:
        """The section as a dict, with secrets replaced by ``***``."""
        return self.model_dump(mode="json")


class PathSettings(_Section):
    """Where the shared directories are."""

    spool: Path = Field(default=Path("var/spool"), description="uploads and results")
    repo: Path = Field(default=Path("var/repo"), description="mirrored RPMs and repodata")


class StoreSettings(_Section):
    """The database of tasks, packages and build-ids."""

    url: str = "sqlite:///var/retrace.sqlite3"

    def masked(self) -> dict[str, Any]:
        return {**super().masked(), "url": mask_url(self.url)}


class BrokerSettings(_Section):
    """Our RabbitMQ."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    heartbeat: int = Field(default=60, ge=1, le=600)
    management_url: str = "http://127.0.0.1:15672"
    delivery_limit: int = Field(default=3, ge=0)
    subscription_max_length: int = Field(default=100_000, ge=1)

    def masked(self) -> dict[str, Any]:
        return {**super().masked(), "url": mask_url(self.url)}


class IntakeSettings(_Section):
    """The public HTTP face."""

    arches: tuple[str, ...] = ("x86_64",)
    max_packed_size_mib: int = Field(default=50, ge=1)
    max_unpacked_size_mib: int = Field(default=1024, ge=1)
    min_free_space_mib: int = Field(default=1024, ge=0)
    max_running_tasks: int = Field(default=20, ge=1)
    decoder_memory_mib: int = Field(default=96, ge=8)
    max_uploads_per_client: int = Field(default=2, ge=1)
    upload_timeout_seconds: int = Field(default=900, ge=1)
    password_mode: Literal["single-use", "static"] = "single-use"  # noqa: S105 -- a mode
    password_key: str = ""
    password_grace_seconds: int = Field(default=120, ge=0)
    wrong_password_limit: int = Field(default=10, ge=1)
    wrong_password_window_seconds: int = Field(default=900, ge=1)
    keep_success_hours: float = Field(default=168, gt=0)
    keep_failure_hours: float = Field(default=168, gt=0)
    keep_debug_hours: float = Field(default=72, gt=0)
    submitting_timeout_seconds: int = Field(default=300, ge=10)
    trusted_proxies: tuple[str, ...] = ()
    require_https: bool = False
    # What GET /settings offers and GET /checkpackage looks in, besides what the store holds.
    releases: tuple[
        Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]*-[0-9a-z_.]+$")], ...
    ] = ()
    rawhide: int = Field(default=0, ge=0)
    # GET /checkpackage: ask the mirror whether Koji has a build it lacks (empty: never).
    mirror_url: str = Field(default="", pattern=r"^(https?://\S+)?$")
    mirror_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    checkpackage_limit: int = Field(default=60, ge=1)
    checkpackage_window_seconds: int = Field(default=60, ge=1)

    def masked(self) -> dict[str, Any]:
        shown = {**super().masked(), "mirror_url": mask_url(self.mirror_url)}
        if self.password_key:
            shown["password_key"] = "***"  # noqa: S105 -- the mask itself
        return shown


class AnalyzerSettings(_Section):
    """The gdb workers."""

    arches: tuple[str, ...] = ("x86_64",)
    cache: Path = Path("var/cache/analyzer")
    gdb_timeout: int = Field(default=600, ge=1)
    gdb: str = "gdb"
    sandbox: Literal["bwrap", "none"] = "bwrap"
    gdb_memory_mib: int = Field(default=8192, ge=256)
    cache_max_mib: int = Field(default=20480, ge=1)
    # A crash of a build the mirror lacks: ask the mirror for it, wait, retry.
    fetch_wait_seconds: int = Field(default=120, ge=1)
    fetch_attempts: int = Field(default=3, ge=0)
    # The spool is full (ENOSPC, EDQUOT) when the results are written: retry later.
    results_retry_seconds: int = Field(default=60, ge=1)
    lease_seconds: int = Field(default=30, ge=3)


class MirrorSettings(_Section):
    """The repository of every package version, fed by Koji."""

    koji_hub: str = "https://koji.fedoraproject.org/kojihub"
    koji_topurl: str = "https://kojipkgs.fedoraproject.org"
    koji_timeout: int = Field(default=60, ge=1)
    # The broker that carries Koji's messages (Fedora's in production).
    koji_broker_url: str = "amqps://fedora:@rabbitmq.fedoraproject.org/%2Fpublic_pubsub"
    koji_broker_ca_cert: Path | None = None
    koji_broker_certfile: Path | None = None
    koji_broker_keyfile: Path | None = None
    koji_exchange: str = "amq.topic"
    koji_topic_prefix: str = "org.fedoraproject.prod"
    koji_queue: str = "retrace-mirror-koji"
    koji_queue_durable: bool = True
    packages: tuple[str, ...] = ()
    releases: tuple[str, ...] = ()
    arches: tuple[str, ...] = ("x86_64",)
    tag_releases: dict[str, str] = {}
    sigkeys: tuple[str, ...] = ()
    gpg_keys: tuple[Path, ...] = ()
    catch_up_interval: int = Field(default=600, ge=1)
    retry_delays: tuple[int, ...] = (15, 60, 300, 1800)
    # Attempts of a build whose downloads are bad, retry_delays apart, before it fails.
    download_attempts: int = Field(default=5, ge=1)
    delete_on_deleted: bool = False
    eol_releases: tuple[str, ...] = ()
    max_size_gib: float = Field(default=0, ge=0)
    createrepo_workers: int = Field(default=2, ge=1)

    def masked(self) -> dict[str, Any]:
        return {**super().masked(), "koji_broker_url": mask_url(self.koji_broker_url)}


class ServiceConfig(BaseSettings):
    """What every service reads: the home folder, the shared folders, the store and the broker.

    Sections of other services are ignored; build one with :func:`load_settings`.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    home: Path
    paths: PathSettings = PathSettings()
    store: StoreSettings = StoreSettings()
    broker: BrokerSettings = BrokerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings reads the file and the environment it is given and passes their
        # values in, so that building one (as tests do) never reads the process's own.
        del settings_cls, env_settings, dotenv_settings, file_secret_settings
        return (init_settings,)

    def resolve(self, path: Path) -> Path:
        """``path`` made absolute against the home folder."""
        return path if path.is_absolute() else self.home / path

    @property
    def spool(self) -> Path:
        """Absolute path of the spool (uploads and results)."""
        return self.resolve(self.paths.spool)

    @property
    def repo(self) -> Path:
        """Absolute path of the mirrored repository."""
        return self.resolve(self.paths.repo)

    @property
    def store_url(self) -> str:
        """The store's URL, a relative SQLite path made absolute against the home folder."""
        prefix = "sqlite:///"
        url = self.store.url
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            rest = url.removeprefix(prefix)
            if rest and rest != ":memory:":
                return prefix + str(self.resolve(Path(rest)))
        return url

    def masked(self) -> dict[str, Any]:
        """The settings as a dict, with secrets (passwords in URLs, keys) replaced by ``***``."""
        shown: dict[str, Any] = {"home": str(self.home)}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, _Section):
                shown[name] = value.masked()
        return shown


class IntakeConfig(ServiceConfig):
    """The intake's settings: the shared sections and ``[intake]``."""

    intake: IntakeSettings = IntakeSettings()


class AnalyzerConfig(ServiceConfig):
    """An analyzer's settings: the shared sections and ``[analyzer]``."""

    analyzer: AnalyzerSettings = AnalyzerSettings()


class MirrorConfig(ServiceConfig):
    """The mirror's settings (listener, worker, HTTP face): the shared sections and ``[mirror]``."""

    mirror: MirrorSettings = MirrorSettings()


class AdminConfig(IntakeConfig, AnalyzerConfig, MirrorConfig):
    """Every section, as ``retrace-admin`` checks them: an unknown section is an error too."""

    model_config = SettingsConfigDict(extra="forbid")


Config = TypeVar("Config", bound=ServiceConfig)


def mask_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class _NotToml:
    pass


_NOT_TOML = _NotToml()


def _toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return _NOT_TOML


def _unquoted(value: Any) -> Any:
    """A plain value from the environment as the settings have always read it.

    A quoted TOML string (``"static"``) loses its quotes; numbers and booleans stay text
    for pydantic to read as the field's type (so ``7`` is still ``"7"`` for a string).
    """
    if isinstance(value, dict):
        return {key: _unquoted(item) for key, item in value.items()}
    if isinstance(value, str):
        parsed = _toml_value(value)
        if isinstance(parsed, str):
            return parsed
    return value


class _Environment(EnvSettingsSource):
    """The ``RETRACE_<SECTION>__<KEY>`` variables of ``env``, values read as TOML first."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._given.items()}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        """A list or table: TOML (``["a", 'b']``, ``{ k = "v" }``), else JSON, else the text
        itself, which validation then refuses naming the key."""
        del field_name, field
        parsed = _toml_value(value)
        if not isinstance(parsed, _NotToml):
            return parsed
        try:
            return json.loads(value)
        except ValueError:
            return value

    def explode_env_vars(
        self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]
    ) -> dict[str, Any]:
        """The section's keys found in the environment, plain values unquoted."""
        found = super().explode_env_vars(field_name, field, env_vars)
        return {key: _unquoted(value) for key, value in found.items()}


def _default_home(env: Mapping[str, str]) -> Path:
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "/var/lib")) / ".local/share")
    return Path(data) / "retrace-server"


def _variable(env: Mapping[str, str], loc: tuple[int | str, ...]) -> str | None:
    """The environment variable that set the key at ``loc``, if one did."""
    for depth in range(len(loc), 1, -1):
        wanted = ENV_PREFIX + NESTED.join(str(part) for part in loc[:depth])
        for name in env:
            if name.upper() == wanted.upper():
                return name
    return None


def _message(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key" if len(error["loc"]) > 1 else "unknown section"
    return str(error["msg"])


def _file_problems(data: dict[str, Any], sections: set[str], strict: bool) -> list[str]:
    problems = []
    for key, value in data.items():
        if key == "home":
            problems.append("'home' is not a setting: set RETRACE_HOME instead")
        elif not isinstance(value, dict):
            problems.append(f"{key}: a key outside any section (a [section] must come first)")
        elif strict and key not in sections:
            problems.append(f"[{key}]: unknown section")
    return problems


def _env_problems(env: Mapping[str, str], sections: set[str]) -> list[str]:
    problems = []
    for name in env:
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and NESTED in upper:
            section = upper.removeprefix(ENV_PREFIX).partition(NESTED)[0].lower()
            if section not in sections:
                problems.append(f"{name}: [{section}] is not a section")
    return problems


def _read_file(kind: type[ServiceConfig], path: Path, where: str) -> dict[str, Any]:
    try:
        with path.open("rb"):
            pass  # the TOML source skips a file it cannot find: say so instead
        return TomlConfigSettingsSource(kind, toml_file=path)()
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from exc


def _home(env: Mapping[str, str], path: Path | None) -> Path:
    if env.get(ENV_PREFIX + "HOME"):
        return Path(env[ENV_PREFIX + "HOME"]).absolute()
    if path is not None:
        return path.parent
    return _default_home(env)


def load_settings(kind: type[Config], env: Mapping[str, str] | None = None) -> Config:
    """Read the settings of ``kind`` from the file named by ``RETRACE_CONFIG`` and the
    ``RETRACE_<SECTION>__<KEY>`` variables of ``env`` (default: the process's).

    Sections that ``kind`` does not have are ignored (but for :class:`AdminConfig`).
    Raises :class:`ConfigError` naming the file or variable, the key and the problem.
    """
    env = os.environ if env is None else env
    config = env.get(ENV_PREFIX + "CONFIG")
    path = Path(config).absolute() if config else None
    where = f"settings file {path}" if path else "settings"
    file_data = {} if path is None else _read_file(kind, path, where)
    strict = kind.model_config.get("extra") == "forbid"
    sections = {name for name in kind.model_fields if name != "home"}
    problems = [f"{where}: {p}" for p in _file_problems(file_data, sections, strict)]
    if strict:
        problems += _env_problems(env, sections)
    values = {key: value for key, value in file_data.items() if key in sections}
    for section, keys in _Environment(kind, env)().items():
        if section == "home":
            continue  # RETRACE_HOME is the home folder, not a section
        if isinstance(keys, dict) and isinstance(values.get(section), dict):
            values[section] = {**values[section], **keys}
        else:
            values[section] = keys
    settings = None
    try:
        settings = kind(home=_home(env, path), **values)
    except ValidationError as exc:
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            variable = _variable(env, error["loc"])
            source = f"{variable} (environment)" if variable else where
            problems.append(f"{source}: {key}: {_message(error)}")
    if problems or settings is None:
        raise ConfigError("invalid settings: " + "; ".join(problems), problems)
    return settings


def log_settings(settings: ServiceConfig, service: str) -> None:
    """Log the settings a service starts with, secrets masked."""
    log.info("%s starting with settings %s", service, settings.masked())
