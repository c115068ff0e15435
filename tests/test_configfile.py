"""Settings from a TOML file and the environment: precedence, provenance, refusals, the example file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle import Settings
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
