"""Settings from a TOML file and ``LIFECYCLE_...`` environment variables, with where each value came from.

Precedence, highest first: flags (the CLI's, or ``overrides`` from code) >
environment > file > the defaults of :class:`~lifecycle.config.Settings`.
The file is ``--config PATH``, else ``$LIFECYCLE_CONFIG``, else
``/etc/lifecycle/lifecycle.toml`` when it exists. Every field of ``Settings``
can be set, nested ones too::

    # lifecycle.toml
    database_url = "postgresql+psycopg://lifecycle@db/lifecycle"
    libvirt_domain_type = "qemu"
    resize_confirm_window = 3600
    [scheduler]
    ram_allocation_ratio = 1.0
    [sync_policy]
    missing = "record"

    LIFECYCLE_RESIZE_CONFIRM_WINDOW=3600 LIFECYCLE_SCHEDULER__RAM_ALLOCATION_RATIO=1.0

The environment name of a key is ``LIFECYCLE_`` plus the key in capitals,
nested keys joined by ``__``; ``LIFECYCLE_DB_URL`` is the database URL.
pydantic-settings reads both sources and converts and checks the types; the
rules of ``Settings`` itself (allowed choices, ranges) run after. Whatever is
wrong is reported as :class:`~lifecycle.errors.InvalidInput` naming the key,
where it came from (``PATH, key KEY``, ``environment variable NAME`` or
``flag KEY``), the value and what is allowed, and nothing is changed. Refused
too: a ``LIFECYCLE_`` variable that names no setting (with the nearest names;
the variables scripts and tests read, in :data:`OTHER_VARIABLES`, are not
settings and pass), ``true`` or ``false`` for a number (TOML and JSON booleans
are not integers here), and a database URL that does not parse or whose host
part holds ``@`` (an unencoded password); a URL is never shown with its password.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lifecycle import validation
from lifecycle.config import Settings
from lifecycle.errors import InvalidInput

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings, EnvSettingsSource

__all__ = ["DEFAULT_CONFIG", "OTHER_VARIABLES", "Loaded", "find_config", "load_settings"]

DEFAULT_CONFIG = Path("/etc/lifecycle/lifecycle.toml")
ENV_PREFIX = "LIFECYCLE_"
_DB_KEY = "database_url"
OTHER_VARIABLES = frozenset(
    {
        "LIFECYCLE_CONFIG",  # the config file (find_config)
        "LIFECYCLE_DB_URL",  # the database URL (the database_url setting's own name)
        "LIFECYCLE_WEBHOOK_SECRET",  # `lifecycle changes webhook` signs with it
        "LIFECYCLE_WEBHOOK_SECRET_PREVIOUS",  # ... and the secret being rotated out
        "LIFECYCLE_QEMU_IMG",  # drivers/images.py: the qemu-img to run
        "LIFECYCLE_LIBVIRTD_PIDFILE",  # scripts/libvirtd.sh, for the tests
        "LIFECYCLE_HOST2_ADDR",  # scripts/second-host.sh, test.sh, demo.sh
        "LIFECYCLE_PG_PORT",  # scripts/test.sh
        "LIFECYCLE_CI",  # .ci/run: missing test tiers fail
    }
)
"""``LIFECYCLE_`` variables that are not settings (commands, scripts, tests read them); so is ``LIFECYCLE_TEST_*``."""
_OTHER_PREFIXES = ("LIFECYCLE_TEST_",)
_SETTING_IN_MESSAGE = re.compile(r"setting ([a-z_]+(?:\.[a-z_]+)?)")


@dataclass(frozen=True, slots=True)
class Loaded:
    """Effective settings, the database URL (None: the caller's default), and each key's source."""

    settings: Settings
    database_url: str | None
    sources: dict[str, str]
    """Dotted key (``scheduler.ram_allocation_ratio``) to ``flag``, ``env``, ``file PATH`` or ``default``."""
    path: Path | None


def find_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """Return the config file to read: ``path``, else ``$LIFECYCLE_CONFIG``, else the default one if it exists."""
    chosen = path if path is not None else environ.get("LIFECYCLE_CONFIG")
    if chosen:
        found = Path(chosen)
        if not found.is_file():
            raise InvalidInput(f"config file {str(found)!r} does not exist or is not a file")
        return found
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Loaded:
    """Load settings from the file, the environment and ``overrides`` (flags, dotted keys allowed)."""
    env = dict(os.environ if environ is None else environ)
    if "LIFECYCLE_DB_URL" in env and not env["LIFECYCLE_DB_URL"].strip():
        raise InvalidInput("LIFECYCLE_DB_URL is set but empty: unset it, or name a database")
    _refuse_unknown_variables(env)
    found = find_config(path, env)
    if found is None and not overrides and not _settings_in(env):
        return _defaults(env)  # the common case, without importing pydantic-settings (a CLI read starts faster)
    return _read(found, env, overrides or {})


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """Refuse ``LIFECYCLE_`` variables that name no setting (a typo would otherwise be ignored in silence)."""
    names = _variable_names()
    unknown = []
    for key in sorted(environ):
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper in OTHER_VARIABLES or upper.startswith(_OTHER_PREFIXES):
            continue
        if key.lower() not in names:
            near = difflib.get_close_matches(upper, sorted(n.upper() for n in names), n=2, cutoff=0.75)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            unknown.append(key + hint)
    if unknown:
        raise InvalidInput(
            f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: a LIFECYCLE_"
            " variable sets the setting named by the rest in capitals, nested keys after __"
            " (LIFECYCLE_SYNC_INTERVAL, LIFECYCLE_SCHEDULER__RAM_ALLOCATION_RATIO); unset it or correct its name"
        )


def _variable_names() -> set[str]:
    """Return the lower-case names of the variables that set a setting: every key, nested ones after ``__``."""
    names = {f"{ENV_PREFIX}{key.replace('.', '__')}".lower() for key in _all_keys()}
    names |= {f"{ENV_PREFIX}{f.name}".lower() for f in dataclasses.fields(Settings)}  # a whole table, as JSON
    return names | {v.lower() for v in OTHER_VARIABLES}


def _read(found: Path | None, env: dict[str, str], overrides: Mapping[str, Any]) -> Loaded:
    """Read the settings through pydantic-settings: the file, the environment, the flags, converted and checked."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError, TomlConfigSettingsSource

    flags = _nest(dict(overrides))
    model = _model(found, env)
    try:
        env_values = _env_source(model, env)()
        file_source = TomlConfigSettingsSource(model, toml_file=found) if found is not None else None
        file_values = file_source() if file_source is not None else {}
    except SettingsError as exc:  # a LIFECYCLE_ variable pydantic-settings could not parse (a list that is not JSON)
        raise _not_json(exc, env) from None
    except (OSError, ValueError) as exc:  # unreadable file, or not TOML (tomllib's TOMLDecodeError)
        raise InvalidInput(f"config file {found}: {exc}") from None
    where = _Where(_leaves(flags), _keys(env_values), _keys(file_values), env, found)
    _refuse_booleans(where, flags, env_values, file_values)
    try:
        values = model(**flags)
    except ValidationError as exc:
        raise _invalid(exc, where) from None
    data = {f.name: getattr(values, f.name) for f in dataclasses.fields(Settings)}
    try:
        settings = Settings(**data)  # the rules of Settings (choices, ranges), each naming its setting
    except InvalidInput as exc:
        named = _SETTING_IN_MESSAGE.match(str(exc))
        raise InvalidInput(f"invalid configuration: {where.of(named[1]) + ': ' if named else ''}{exc}") from None
    sources = _sources(flags, env_values, file_values, found)
    # The database URL is read through its alias (LIFECYCLE_DB_URL), which the sources do not report by key.
    if _DB_KEY in flags:
        sources[_DB_KEY] = "flag"
    elif "LIFECYCLE_DB_URL" in env:
        sources[_DB_KEY] = "env"
    elif file_source is not None and _DB_KEY in file_source.toml_data:
        sources[_DB_KEY] = f"file {found}"
    url = getattr(values, _DB_KEY)
    if url is not None:
        url = validation.database_url(f"invalid configuration: {where.of(_DB_KEY)}", url)
    return Loaded(settings, url, sources, found)


@dataclass(frozen=True, slots=True)
class _Where:
    """Which layer gave each key (flags, then environment, then file), to name it in an error."""

    flags: set[str]
    env: set[str]
    file: set[str]
    environ: Mapping[str, str]
    path: Path | None

    def of(self, key: str) -> str:
        """Say where ``key`` (dotted; a list index or a nested key under a given table is fine) came from."""
        if _given(key, self.flags):
            return f"flag {key}"
        if _given(key, self.env):
            return f"environment variable {_variable(self.environ, key)}"
        if self.path is not None and _given(key, self.file):
            return f"{self.path}, key {key}"
        return f"default {key}"


def _variable(environ: Mapping[str, str], key: str) -> str:
    """Return the variable, as spelled in ``environ``, that set ``key`` or the table holding it."""
    parts = key.split(".")
    wanted = [f"{ENV_PREFIX}{'__'.join(parts[:n])}".lower() for n in range(len(parts), 0, -1)]
    if key == _DB_KEY:
        wanted.insert(0, "lifecycle_db_url")
    for name in wanted:
        spelled = next((k for k in environ if k.lower() == name), None)
        if spelled is not None:
            return spelled
    return f"{ENV_PREFIX}{key.replace('.', '__').upper()}"


def _keys(values: Mapping[str, Any]) -> set[str]:
    """Return a source's leaf keys, the database URL by its key (the sources give it by its alias)."""
    return {_DB_KEY if key == "LIFECYCLE_DB_URL" else key for key in _leaves(values)}


def _given(key: str, leaves: set[str]) -> bool:
    return any(key == leaf or key.startswith(f"{leaf}.") or leaf.startswith(f"{key}.") for leaf in leaves)


def _refuse_booleans(where: _Where, *layers: Mapping[str, Any]) -> None:
    """Refuse ``true`` or ``false`` given for a number: pydantic would take them for 1 and 0."""
    hints = typing.get_type_hints(Settings)
    keys = sorted({key for layer in layers for key in _booleans(layer, hints)})
    if keys:
        problems = [f"{where.of(key)}: setting {key} takes a number, not true or false" for key in keys]
        raise InvalidInput("invalid configuration: " + "; ".join(problems))


def _booleans(values: Mapping[str, Any], hints: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Return the dotted keys in ``values`` whose type (from ``hints``) is a number and whose value is a bool."""
    found = []
    for key, value in values.items():
        hint = hints.get(key)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            found += _booleans(value, typing.get_type_hints(hint), f"{prefix}{key}.")
        elif hint is not None and _bool_for_number(hint, value):
            found.append(f"{prefix}{key}")
    return found


def _bool_for_number(hint: Any, value: object) -> bool:
    if hint in (int, float):
        return isinstance(value, bool)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not tuple or not isinstance(value, list | tuple):
        return False
    if len(args) == 2 and args[1] is Ellipsis:
        return any(_bool_for_number(args[0], item) for item in value)
    return any(_bool_for_number(h, item) for h, item in zip(args, value, strict=False))


def _not_json(exc: Exception, environ: Mapping[str, str]) -> InvalidInput:
    """Say which variable pydantic-settings could not parse: a list or table in a variable is JSON."""
    found = re.search(r'field "([^"]+)"', str(exc))
    key = found[1] if found else "?"
    name = _variable(environ, key) if found else "a LIFECYCLE_ variable"
    return InvalidInput(
        f"invalid configuration: environment variable {name}: setting {key} is a list or table, and a list or"
        f" table in a LIFECYCLE_ variable is JSON, e.g. '[\"https://a.example\"]' (not JSON: {exc.__cause__ or exc})"
    )


def _settings_in(environ: Mapping[str, str]) -> bool:
    """Say whether ``environ`` names a setting other than by ``LIFECYCLE_DB_URL`` (as pydantic-settings reads it).

    The environment source matches names case-insensitively: ``LIFECYCLE_`` plus a field, nested fields
    after ``__``; the database URL by its alias or its field name.
    """
    names = {f"{ENV_PREFIX}{name}".lower() for name in settings_model_fields()} | {"lifecycle_db_url"}
    for key in environ:
        low = key.lower()
        if key != "LIFECYCLE_DB_URL" and (low in names or low.partition("__")[0] in names):
            return True
    return False


def _defaults(environ: Mapping[str, str]) -> Loaded:
    """Return what :func:`load_settings` reads with no file, no flags and no setting in the environment."""
    url = environ.get("LIFECYCLE_DB_URL")
    sources = dict.fromkeys(sorted(_all_keys()), "default")
    if url is not None:
        sources[_DB_KEY] = "env"
        url = validation.database_url("invalid configuration: environment variable LIFECYCLE_DB_URL", url)
    return Loaded(Settings(), url, sources, None)


def settings_model_fields() -> list[str]:
    """Return the top-level keys a config file may hold."""
    return [*(f.name for f in dataclasses.fields(Settings)), _DB_KEY]


def _model(path: Path | None, environ: dict[str, str]) -> type[BaseSettings]:
    """Build the pydantic-settings model mirroring Settings (its types and defaults), reading ``path``."""
    from pydantic import Field, create_model
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

    hints = typing.get_type_hints(Settings)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
        fields[f.name] = (hints[f.name], default)
    fields[_DB_KEY] = (str | None, Field(default=None, validation_alias="LIFECYCLE_DB_URL"))

    class _Base(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            case_sensitive=False,
            extra="forbid",
            populate_by_name=True,
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, _env_source(settings_cls, environ)]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    model: type[BaseSettings] = create_model("LifecycleSettings", __base__=_Base, **fields)
    return model


def _env_source(settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> EnvSettingsSource:
    """Read ``LIFECYCLE_...`` variables from ``environ`` (the given environment, not necessarily os.environ)."""
    from pydantic_settings import EnvSettingsSource

    source = EnvSettingsSource(settings_cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False)
    source.env_vars = {k.lower(): v for k, v in environ.items()}
    return source


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[key] = value
    return nested


def _leaves(values: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and key != "metrics_weights":
            keys |= _leaves(value, f"{name}.")
        else:
            keys.add(name)
    return keys


def _sources(flags: dict[str, Any], env: dict[str, Any], file: dict[str, Any], path: Path | None) -> dict[str, str]:
    """Return where each leaf key's effective value came from."""
    given = [("flag", _leaves(flags)), ("env", _leaves(env)), (f"file {path}", _leaves(file))]
    result = {}
    for key in sorted(_all_keys()):
        result[key] = next((label for label, keys in given if key in keys or key.split(".")[0] in keys), "default")
    return result


def _all_keys() -> set[str]:
    keys = {_DB_KEY}
    for f in dataclasses.fields(Settings):
        value = getattr(Settings(), f.name)
        if dataclasses.is_dataclass(value):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)}
        else:
            keys.add(f.name)
    return keys


def _invalid(exc: ValidationError, where: _Where) -> InvalidInput:
    """Turn pydantic's report into one line naming each bad key, where it came from, its value and what is wanted."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            known = ", ".join(settings_model_fields())
            problems.append(f"{where.of(key)}: unknown setting {key!r} (known: {known})")
        else:
            problems.append(f"{where.of(key)}: setting {key} = {error.get('input')!r}: {error['msg']}")
    return InvalidInput("invalid configuration: " + "; ".join(problems))
