"""Settings from a TOML file and the environment: precedence, provenance, refusals, the example file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lifecycle import Settings, configfile
from lifecycle.cli import main
from lifecycle.configfile import load_settings
from lifecycle.errors import InvalidInput
from lifecycle.sync import Stance

EXAMPLE = Path(__file__).parents[1] / "lifecycle.example.toml"


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lifecycle.toml"
    path.write_text(text)
    return path


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    """Each layer wins over the next for the same key, nested keys included, and the sources say which did."""
    path = _file(
        tmp_path,
        'sync_interval = 300\nshutdown_timeout = 5\nlibvirt_domain_type = "qemu"\n'
        "[scheduler]\nram_allocation_ratio = 1.0\ncpu_allocation_ratio = 2.0\n",
    )
    env = {"LIFECYCLE_SYNC_INTERVAL": "30", "LIFECYCLE_SCHEDULER__CPU_ALLOCATION_RATIO": "4"}
    loaded = load_settings(path, environ=env, overrides={"sync_interval": 5})
    s = loaded.settings
    assert (s.sync_interval, s.shutdown_timeout, s.libvirt_domain_type) == (5.0, 5.0, "qemu")
    assert (s.scheduler.ram_allocation_ratio, s.scheduler.cpu_allocation_ratio) == (1.0, 4.0)
    assert s.lease_seconds == Settings().lease_seconds
    src = loaded.sources
    assert (src["sync_interval"], src["scheduler.cpu_allocation_ratio"], src["lease_seconds"]) == (
        "flag",
        "env",
        "default",
    )
    assert src["shutdown_timeout"] == src["scheduler.ram_allocation_ratio"] == f"file {path}"


def test_the_file_is_found_by_flag_then_environment(tmp_path: Path) -> None:
    """Without a path, $LIFECYCLE_CONFIG names the file; a named file that does not exist is refused."""
    path = _file(tmp_path, "workers = 7\n")
    assert load_settings(environ={"LIFECYCLE_CONFIG": str(path)}).settings.workers == 7
    with pytest.raises(InvalidInput, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("bogus = 1\n", {}, "unknown setting 'bogus'"),
        ("[scheduler]\nbogus = 2\n", {}, "scheduler.bogus"),
        ('sync_interval = "soon"\n', {}, "setting sync_interval = 'soon'"),
        ('resize_window_action = "later"\n', {}, "resize_window_action must be one of confirm, revert"),
        ("workers = 0\n", {}, "workers must be an integer from 1"),
        ('[sync_policy]\nmissing = "ignore"\n', {}, "sync_policy.missing"),
        ("this is not toml\n", {}, "Expected '='"),
        ("", {"LIFECYCLE_SYNC_INTERVAL": "-5"}, "sync_interval must be a finite number"),
        ("", {"LIFECYCLE_SCHEDULER__RAM_ALLOCATION_RATIO": "x"}, "scheduler.ram_allocation_ratio = 'x'"),
    ],
)
def test_bad_keys_and_values_are_refused_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    """Every bad key or value is InvalidInput naming the key and what is wrong."""
    with pytest.raises(InvalidInput, match=message):
        load_settings(_file(tmp_path, text), environ=env)


def test_the_example_file_sets_every_key_to_its_default_with_a_comment(tmp_path: Path) -> None:
    """lifecycle.example.toml loads, holds every setting, each preceded by a comment, equal to the defaults."""
    loaded = load_settings(EXAMPLE, environ={})
    assert loaded.settings == Settings()
    assert all(source.startswith("file") for source in loaded.sources.values()), loaded.sources
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_nested_policy_from_the_environment(tmp_path: Path) -> None:
    """A sync policy stance and its threshold come from LIFECYCLE_SYNC_POLICY__... variables."""
    env = {"LIFECYCLE_SYNC_POLICY__MISSING": "record", "LIFECYCLE_SYNC_POLICY__MISSING_THRESHOLD": "5"}
    policy = load_settings(None, environ=env).settings.sync_policy
    assert (policy.missing, policy.missing_threshold) == (Stance.RECORD, 5)


def test_config_show_prints_values_and_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lifecycle --config F config show --json` lists every key with its value and source; a bad file exits 2."""
    db = f"sqlite:///{tmp_path / 'c.db'}"
    path = _file(tmp_path, f'database_url = "{db}"\nresize_confirm_window = 60\nlibvirt_domain_type = "qemu"\n')
    monkeypatch.delenv("LIFECYCLE_DB_URL", raising=False)
    monkeypatch.setenv("LIFECYCLE_SHUTDOWN_TIMEOUT", "3")
    assert main(["--config", str(path), "config", "show", "--json"]) == 0
    rows = {r["key"]: (r["value"], r["source"]) for r in json.loads(capsys.readouterr().out)}
    assert rows["resize_confirm_window"] == (60.0, f"file {path}")
    assert rows["database_url"] == (db, f"file {path}")
    assert rows["shutdown_timeout"] == (3.0, "env")
    assert rows["scheduler.max_attempts"] == (3, "default")
    assert main(["--config", str(_file(tmp_path, "bogus = 1\n")), "config", "show"]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err


def test_the_database_url_comes_from_the_file_when_no_flag_or_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command run with only --config uses the file's database_url (db upgrade creates it there)."""
    db_file = tmp_path / "from-config.db"
    monkeypatch.delenv("LIFECYCLE_DB_URL", raising=False)
    path = _file(tmp_path, f'database_url = "sqlite:///{db_file}"\n')
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    assert db_file.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[scheduler]\nmax_attempts = 0\n", "scheduler.max_attempts"),
        ('[scheduler]\nfilters = ["NoSuchFilter"]\n', "unknown filters"),
        ("[scheduler]\nhost_subset_size = 0\n", "scheduler.host_subset_size"),
        ('[scheduler]\nmetrics_weights = [["cpu", nan]]\n', "must be a finite number"),
        ("[scheduler]\nram_weight_multiplier = inf\n", "must be a finite number"),
        ('libvirt_domain_type = "xen"\n', "libvirt_domain_type must be one of kvm, qemu"),
        ('vnc_listen = "not an ip; rm -rf"\n', "vnc_listen must be an IP address"),
        ('console_base_url = "javascript:alert(1)"\n', "console_base_url must be an http"),
        ("[sync_policy]\nmissing_threshold = -5\n", "sync_policy.missing_threshold"),
        ("preempt_retries = -3\n", "preempt_retries"),
    ],
)
def test_values_that_would_break_the_engine_are_refused(tmp_path: Path, text: str, message: str) -> None:
    """Values the engine cannot run with (no build attempts, unknown filters, non-finite weights...) are refused."""
    with pytest.raises(InvalidInput, match=message):
        load_settings(_file(tmp_path, text), environ={})


def test_config_show_never_prints_a_database_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database URL's password is masked in `config show`; an empty LIFECYCLE_DB_URL is refused, not defaulted."""
    monkeypatch.delenv("LIFECYCLE_DB_URL", raising=False)
    assert main(["--db", "postgresql+psycopg://admin:s3cr3tpw@db.example/lc", "config", "show"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3tpw" not in out and "admin:***@db.example" in out
    monkeypatch.setenv("LIFECYCLE_DB_URL", "")
    assert main(["config", "show"]) == 2
    assert "LIFECYCLE_DB_URL is set but empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LIFECYCLE_DB_URL": " sqlite:///spaced.db "},
        {"LIFECYCLE_DB_URL": "sqlite:///x.db", "LIFECYCLE_WEBHOOK_SECRET": "s" * 20, "LIFECYCLE_TEST_PG_URL": "x"},
        {"lifecycle_db_url": "sqlite:///lower.db"},
        {"LIFECYCLE_WORKERS": "3"},
        {"lifecycle_scheduler__ram_allocation_ratio": "2.0"},
        {"LIFECYCLE_DATABASE_URL": "sqlite:///by-field.db"},
    ],
)
def test_the_shortcut_without_pydantic_settings_reads_what_pydantic_settings_reads(env: dict[str, str]) -> None:
    """With no file and no flag, load_settings answers as the pydantic-settings path does, whatever the environment."""
    from lifecycle import configfile

    assert load_settings(environ=env) == configfile._read(None, dict(env), {})


def test_a_list_in_the_environment_that_is_not_json_says_so(tmp_path: Path) -> None:
    """A LIFECYCLE_ list written as plain text is refused naming the field and that lists are JSON, not a file."""
    env = {"LIFECYCLE_CONSOLE_ALLOWED_ORIGINS": "http://x"}
    with pytest.raises(InvalidInput, match=r"console_allowed_origins.*is JSON") as refused:
        load_settings(None, environ=env)
    assert "config file" not in str(refused.value)
    assert load_settings(
        None, environ={"LIFECYCLE_CONSOLE_ALLOWED_ORIGINS": '["http://x"]'}
    ).settings.console_allowed_origins == ("http://x",)


def test_an_unknown_lifecycle_variable_is_refused_naming_it_and_the_nearest_setting() -> None:
    """A LIFECYCLE_ variable that names no setting is InvalidInput naming it, with the nearest name when one is close."""
    with pytest.raises(InvalidInput, match=r"LIFECYCLE_SYNC_INTERVL \(did you mean LIFECYCLE_SYNC_INTERVAL[ ?]"):
        load_settings(None, environ={"LIFECYCLE_SYNC_INTERVL": "30"})
    with pytest.raises(InvalidInput, match="LIFECYCLE_SCHEDULER__BOGUS"):
        load_settings(None, environ={"LIFECYCLE_SCHEDULER__BOGUS": "1"})
    with pytest.raises(InvalidInput, match="unknown environment variable lifecycle_nothing_like_it:"):
        load_settings(None, environ={"lifecycle_nothing_like_it": "1"})


def test_the_variables_scripts_and_tests_read_are_not_refused() -> None:
    """Every LIFECYCLE_ name the repository's code, scripts and other tests use is a setting's or an allowed one."""
    root = Path(__file__).parents[1]
    names: set[str] = set()
    for folder in ("lifecycle", "drivers", "bench", "scripts", "tests", ".ci"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".sh", ".toml", ".md") and path != Path(__file__):
                names |= set(re.findall(r"\bLIFECYCLE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    assert {"LIFECYCLE_TEST_PG_URL", "LIFECYCLE_LIBVIRTD_PIDFILE", "LIFECYCLE_HOST2_ADDR"} <= names
    configfile._refuse_unknown_variables(dict.fromkeys(names, ""))  # no error: each names a setting or is allowed
    others = {"LIFECYCLE_TEST_ANYTHING": "1", "LIFECYCLE_CI": "1", "LIFECYCLE_WEBHOOK_SECRET_PREVIOUS": "s"}
    assert load_settings(None, environ=others).settings == Settings()


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("workers = true\n", {}, "workers"),
        ("sync_interval = false\n", {}, "sync_interval"),
        ("max_concurrent_builds = true\n", {}, "max_concurrent_builds"),
        ("[scheduler]\nmax_attempts = true\n", {}, "scheduler.max_attempts"),
        ('[scheduler]\nmetrics_weights = [["cpu", true]]\n', {}, "scheduler.metrics_weights"),
        ("", {"LIFECYCLE_SCHEDULER": '{"max_attempts": true}'}, "scheduler.max_attempts"),
    ],
)
def test_booleans_are_not_numbers(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    """true or false for a number (TOML, or JSON in a variable) is refused, not taken for 1 or 0."""
    with pytest.raises(InvalidInput, match=rf"setting {re.escape(key)} takes a number, not true or false"):
        load_settings(_file(tmp_path, text), environ=env)


def test_every_error_says_where_the_value_came_from(tmp_path: Path) -> None:
    """A bad value is named with its file and key, its environment variable, or its flag; a default never is."""
    path = _file(tmp_path, "workers = 0\n[scheduler]\nmax_attempts = 0\n")
    with pytest.raises(InvalidInput, match=rf"{re.escape(str(path))}, key workers: setting workers must be"):
        load_settings(path, environ={})
    with pytest.raises(InvalidInput, match=r"environment variable LIFECYCLE_WORKERS: setting workers must be"):
        load_settings(path, environ={"LIFECYCLE_WORKERS": "2000"})
    with pytest.raises(InvalidInput, match=r"flag workers: setting workers must be"):
        load_settings(path, environ={"LIFECYCLE_WORKERS": "3"}, overrides={"workers": -1})
    env = {"LIFECYCLE_WORKERS": "3", "lifecycle_scheduler__max_attempts": "x"}
    with pytest.raises(InvalidInput, match=r"environment variable lifecycle_scheduler__max_attempts: setting sch"):
        load_settings(path, environ=env)
    with pytest.raises(InvalidInput, match=rf"{re.escape(str(path))}, key scheduler.max_attempts: setting sch"):
        load_settings(path, environ={"LIFECYCLE_WORKERS": "3"})
    with pytest.raises(InvalidInput, match=rf"{re.escape(str(path))}, key bogus: unknown setting 'bogus'"):
        load_settings(_file(tmp_path, "bogus = 1\n"), environ={})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+psycopg://lc:Zq@x9@db.example/lc", "holds '@': a password holding @ must be percent-encoded"),
        ("postgresql+psycopg://lc:Zqx9@[::1/lc", "does not parse"),
        ("postgresql+psycopg://lc:Zqx9@db.example:54x/lc", "does not parse"),
        ("postgresql+psycopg://lc:Zqx9@db.example:99999/lc", "has port 99999"),
        ("postgresql+psycopg://lc:Zqx9/db", "does not parse"),  # no @host: the password taken for a port
        ("not a url", "is not a database URL"),
    ],
)
def test_a_database_url_that_cannot_work_is_refused_without_its_password(
    tmp_path: Path, url: str, message: str
) -> None:
    """A database URL with an unencoded @, a bad IPv6 host or port is InvalidInput saying where, never the password."""
    for env, path, where in (
        ({"LIFECYCLE_DB_URL": url}, None, "environment variable LIFECYCLE_DB_URL"),
        ({}, _file(tmp_path, f"database_url = '{url}'\n"), ", key database_url"),
        ({"LIFECYCLE_WORKERS": "2", "LIFECYCLE_DB_URL": url}, None, "environment variable LIFECYCLE_DB_URL"),
    ):
        with pytest.raises(InvalidInput, match=re.escape(message)) as refused:
            load_settings(path, environ=env)
        assert where in str(refused.value) and "Zq" not in str(refused.value) and "x9@" not in str(refused.value)


def test_config_show_refuses_a_password_with_an_at_sign_without_printing_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`config show` with LIFECYCLE_DB_URL holding an unencoded @ exits 2, the password in no output."""
    monkeypatch.setenv("LIFECYCLE_DB_URL", "postgresql+psycopg://admin:s3cr@t@db.example/lc")
    assert main(["config", "show"]) == 2
    out, err = capsys.readouterr()
    assert "percent-encoded" in err and "s3cr" not in out + err and "t@db" not in out + err


def test_max_concurrent_builds_comes_from_file_and_environment(tmp_path: Path) -> None:
    """max_concurrent_builds defaults to 10 (Nova's), is read from the file and LIFECYCLE_MAX_CONCURRENT_BUILDS."""
    assert Settings().max_concurrent_builds == 10
    path = _file(tmp_path, "max_concurrent_builds = 3\n")
    assert load_settings(path, environ={}).settings.max_concurrent_builds == 3
    assert load_settings(path, environ={"LIFECYCLE_MAX_CONCURRENT_BUILDS": "7"}).settings.max_concurrent_builds == 7
    for bad in (0, -1, True, 2.5, "10"):
        with pytest.raises(InvalidInput, match="max_concurrent_builds"):
            Settings(max_concurrent_builds=bad)  # type: ignore[arg-type]


def test_the_console_metrics_address_comes_from_file_and_environment(tmp_path: Path) -> None:
    """console_metrics_listen is empty (the console port) by default, set by the file or its variable, else refused."""
    assert Settings().console_metrics_listen == ""
    path = _file(tmp_path, 'console_metrics_listen = "off"\n')
    assert load_settings(path, environ={}).settings.console_metrics_listen == "off"
    env = {"LIFECYCLE_CONSOLE_METRICS_LISTEN": "[::1]:9181"}
    assert load_settings(path, environ=env).settings.console_metrics_listen == "[::1]:9181"
    with pytest.raises(InvalidInput, match="environment variable LIFECYCLE_CONSOLE_METRICS_LISTEN: setting console_m"):
        load_settings(path, environ={"LIFECYCLE_CONSOLE_METRICS_LISTEN": "metrics.example:9181"})


@pytest.mark.parametrize("url", ["http://[::1/vnc_lite.html", "http://console.example:99999/vnc_lite.html"])
def test_a_console_url_that_does_not_parse_is_invalid_input(tmp_path: Path, url: str) -> None:
    """A console_base_url with an unclosed IPv6 bracket or a bad port is InvalidInput naming the key, not a traceback."""
    with pytest.raises(InvalidInput, match="key console_base_url: setting console_base_url must be an http"):
        load_settings(_file(tmp_path, f'console_base_url = "{url}"\n'), environ={})
