"""Settings: one TOML file plus environment overrides, checked at start-up.

The file's path is ``RETRACE_CONFIG``.  Any key can be overridden from the
environment as ``RETRACE_<SECTION>__<KEY>`` (``RETRACE_BROKER__URL=...``); the value
is read as a TOML value when it parses as one (numbers, lists, booleans) and as a
plain string otherwise.  Relative paths resolve against ``RETRACE_HOME`` if set,
else against the settings file's folder, else against the default home
``$XDG_DATA_HOME/retrace-server`` -- never against the current directory.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

log = logging.getLogger(__name__)

ENV_PREFIX = "RETRACE_"


class ConfigError(Exception):
    """The settings cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathSettings(_Section):
    """Where the shared directories are."""

    spool: Path = Path("var/spool")
    repo: Path = Path("var/repo")


class StoreSettings(_Section):
    """The database of tasks, packages and build-ids."""

    url: str = "sqlite:///var/retrace.sqlite3"


class BrokerSettings(_Section):
    """Our RabbitMQ."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    heartbeat: int = Field(default=60, ge=1, le=600)
    management_url: str = "http://127.0.0.1:15672"
    delivery_limit: int = Field(default=3, ge=0)
    subscription_max_length: int = Field(default=100_000, ge=1)


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


class Settings(_Section):
    """All settings of all services; each service reads the sections it uses."""

    home: Path
    paths: PathSettings = PathSettings()
    store: StoreSettings = StoreSettings()
    broker: BrokerSettings = BrokerSettings()
    intake: IntakeSettings = IntakeSettings()
    analyzer: AnalyzerSettings = AnalyzerSettings()
    mirror: MirrorSettings = MirrorSettings()

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
        """The settings as a dict, with passwords in URLs replaced by ``***``."""
        data = self.model_dump(mode="json")
        data["store"]["url"] = mask_url(self.store.url)
        data["broker"]["url"] = mask_url(self.broker.url)
        data["mirror"]["koji_broker_url"] = mask_url(self.mirror.koji_broker_url)
        data["intake"]["mirror_url"] = mask_url(self.intake.mirror_url)
        if self.intake.password_key:
            data["intake"]["password_key"] = "***"  # noqa: S105 -- the mask itself
        return data


def mask_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _default_home(env: Mapping[str, str]) -> Path:
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "/var/lib")) / ".local/share")
    return Path(data) / "retrace-server"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings file named by ``RETRACE_CONFIG`` and the environment overrides.

    Raises :class:`ConfigError` naming the file and key when anything is wrong.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    config = env.get(ENV_PREFIX + "CONFIG")
    if config:
        path = Path(config).absolute()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from exc
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("__")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{name}: [{section}] is not a section")
        data[section][key] = _env_value(raw)
    if "home" in data:
        raise ConfigError("'home' is not a setting: set RETRACE_HOME instead")
    if env.get(ENV_PREFIX + "HOME"):
        home = Path(env[ENV_PREFIX + "HOME"]).absolute()
    elif config:
        home = Path(config).absolute().parent
    else:
        home = _default_home(env)
    try:
        return Settings(home=home, **data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        where = f" in {config}" if config else ""
        raise ConfigError(f"invalid settings{where}: {problems}") from exc


def log_settings(settings: Settings, service: str) -> None:
    """Log the settings a service starts with, secrets masked."""
    log.info("%s starting with settings %s", service, settings.masked())
