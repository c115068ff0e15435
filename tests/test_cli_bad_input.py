"""Bad input to every CLI command: exit 2, one typed error line, no traceback, and not one row changed.

Each case runs ``lifecycle ... --json`` in-process on a copy of one prepared
database (hosts h1 and h2, image cirros, an active instance on h1), dumps
every table with SQLAlchemy before and after, and checks the JSON error names
a :class:`LifecycleError` subclass. A few cases run the real ``lifecycle``
executable too, where argv, stdout and exit status are the operating system's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import lifecycle.errors
from lifecycle import Engine, Flavor, upgrade
from lifecycle.cli import main
from lifecycle.daemon import Daemon

ZERO = "00000000-0000-0000-0000-000000000000"
BIG = "99999999999999999999999"
LONG = "x" * 256
OK_FLAVOR = ("--flavor", "vcpus=1,ram=64,disk=1")
CREATE = ("create", "x", "--host", "h1", *OK_FLAVOR, "--image", "cirros")
"""A create that would succeed: cases add the one bad option."""


@dataclass(frozen=True)
class World:
    """The prepared database: its folder, the active instance's uuid, and an image file."""

    folder: Path
    uuid: str
    image: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Build the database once per module: h1 and h2 (in-memory fake hosts), image cirros, instance vm1 on h1."""
    folder = tmp_path_factory.mktemp("bad-input-template")
    image = folder / "cirros.qcow2"
    image.write_bytes(b"QFI\xfb")
    url = f"sqlite:///{folder / 'lifecycle.db'}"
    upgrade(url)
    with Engine(url) as engine:
        for name in ("h1", "h2"):
            engine.hosts.add(name, "fake://", str(folder / name), vcpus=8, memory_mb=4096, disk_gb=40)
            engine.hosts.heartbeat(name)
        engine.images.add("cirros", str(image))
        uuid = engine.create("vm1", host="h1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
    return World(folder, uuid, str(image))


@pytest.fixture
def world(template: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    """A private copy of the template database, made the CLI's default through LIFECYCLE_DB_URL."""
    for path in template.folder.glob("lifecycle.db*"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setenv("LIFECYCLE_DB_URL", f"sqlite:///{tmp_path / 'lifecycle.db'}")
    monkeypatch.setattr(Daemon, "run", _daemon_must_not_start)  # a case let through must fail, not loop forever
    return World(tmp_path, template.uuid, template.image)


def _daemon_must_not_start(_daemon: Daemon) -> None:
    pytest.fail("the daemon started: bad input was let through")


def dump(folder: Path) -> dict[str, list[str]]:
    """Every row of every table (alembic's included), as sorted reprs."""
    engine = sa.create_engine(f"sqlite:///{folder / 'lifecycle.db'}")
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return {name: sorted(repr(tuple(r)) for r in conn.execute(sa.select(t))) for name, t in meta.tables.items()}
    finally:
        engine.dispose()


def _corrupt_db(folder: Path) -> str:
    path = folder / "corrupt.db"
    path.write_bytes(bytes(range(256)) * 16)
    return f"sqlite:///{path}"


def _file(folder: Path) -> str:
    (folder / "a-file").write_text("not a directory")
    return str(folder / "a-file")


# Placeholders: {uuid} the active instance, {image} an image file, {tmp} the test's folder,
# {corrupt} a SQLite URL of a file of garbage, {file} a regular file.
CASES: list[Any] = [
    # empty values
    ("empty-db-url", ["--db", "", "list"]),
    ("empty-host-name", ["host", "add", "", "--uri", "fake://"]),
    ("empty-uri", ["host", "add", "h9", "--uri", ""]),
    ("empty-zone", ["host", "add", "h9", "--uri", "fake://", "--zone", ""]),
    ("empty-instances-path", ["host", "add", "h9", "--uri", "fake://", "--instances-path", ""]),
    ("empty-hypervisor-type", ["host", "add", "h9", "--uri", "fake://", "--hypervisor-type", ""]),
    ("empty-architecture", ["host", "add", "h9", "--uri", "fake://", "--architecture", ""]),
    ("empty-capability", ["host", "add", "h9", "--uri", "fake://", "--capability", ""]),
    ("empty-capability-key", ["host", "add", "h9", "--uri", "fake://", "--capability", "=x"]),
    ("empty-image-name", ["image", "add", "", "--path", "{image}"]),
    ("empty-image-path", ["image", "add", "i9", "--path", ""]),
    ("empty-property", ["image", "add", "i9", "--path", "{image}", "--property", ""]),
    ("empty-instance-name", ["create", "", "--host", "h1", *OK_FLAVOR, "--image", "cirros"]),
    ("empty-flavor", ["create", "x", "--host", "h1", "--flavor", "", "--image", "cirros"]),
    ("empty-create-host", ["create", "x", "--host", "", *OK_FLAVOR, "--image", "cirros"]),
    ("empty-create-image", ["create", "x", "--host", "h1", *OK_FLAVOR, "--image", ""]),
    ("empty-create-uuid", [*CREATE, "--uuid", ""]),
    ("empty-extra-spec", [*CREATE, "--extra-spec", ""]),
    ("empty-uuid-show", ["show", ""]),
    ("empty-uuid-stop", ["stop", ""]),
    ("empty-uuid-tasks", ["tasks", ""]),
    ("empty-uuid-history", ["history", ""]),
    ("empty-uuid-console", ["console", ""]),
    ("empty-timeout", ["stop", "{uuid}", "--timeout", ""]),
    ("empty-request-id", ["stop", "{uuid}", "--request-id", ""]),
    ("empty-idempotency-key", ["stop", "{uuid}", "--idempotency-key", ""]),
    ("empty-owner", ["recover", "--owner", ""]),
    ("empty-list-host", ["list", "--host", ""]),
    ("empty-sync-host", ["sync", "--once", "--host", ""]),
    ("empty-cleanup-host", ["image", "cleanup", "--host", ""]),
    ("empty-max-age", ["image", "cleanup", "--host", "h1", "--max-age", ""]),
    ("empty-migrate-host", ["migrate", "{uuid}", "--host", ""]),
    ("empty-rebuild-image", ["rebuild", "{uuid}", "--image", ""]),
    ("empty-resize-flavor", ["resize", "{uuid}", "--flavor", ""]),
    ("empty-host-show", ["host", "show", ""]),
    ("empty-host-remove", ["host", "remove", ""]),
    ("empty-daemon-host", ["daemon", "--host", ""]),
    ("empty-interval", ["daemon", "--interval", ""]),
    ("empty-revision", ["db", "downgrade", ""]),
    # control characters: C0, DEL, C1, bidirectional override, line separator, newline
    ("c0-host-name", ["host", "add", "h\x1b[31m", "--uri", "fake://"]),
    ("del-host-name", ["host", "add", "h\x7f", "--uri", "fake://"]),
    ("c1-host-name", ["host", "add", "h\x85", "--uri", "fake://"]),
    ("c1-image-name", ["image", "add", "i\x9b", "--path", "{image}"]),
    ("bidi-instance-name", ["create", "vm\u202egnp.exe", "--host", "h1", *OK_FLAVOR, "--image", "cirros"]),
    ("newline-instance-name", ["create", "vm\nfake line", "--host", "h1", *OK_FLAVOR, "--image", "cirros"]),
    ("line-separator-instance-name", ["create", "vm\u2028", "--host", "h1", *OK_FLAVOR, "--image", "cirros"]),
    ("c1-instance-name", ["create", "vm\x85", "--host", "h1", *OK_FLAVOR, "--image", "cirros"]),
    ("control-zone", ["host", "add", "h9", "--uri", "fake://", "--zone", "a\nb"]),
    ("control-architecture", ["host", "add", "h9", "--uri", "fake://", "--architecture", "x86\x1b"]),
    ("control-capability", ["host", "add", "h9", "--uri", "fake://", "--capability", "ssd=tr\x85ue"]),
    ("control-property", ["image", "add", "i9", "--path", "{image}", "--property", "architecture=x\x1b"]),
    ("control-uri", ["host", "add", "h9", "--uri", "fake://\x1b"]),
    ("control-image-path", ["image", "add", "i9", "--path", "{tmp}/a\nb"]),
    (
        "control-extra-spec",
        [*CREATE, "--extra-spec", "capabilities:ssd=t\x85"],
    ),
    ("control-request-id", ["stop", "{uuid}", "--request-id", "req\x1b"]),
    ("control-idempotency-key", ["stop", "{uuid}", "--idempotency-key", "k\u2029"]),
    ("control-owner", ["recover", "--owner", "o\x85"]),
    ("control-list-host", ["list", "--host", "h\x85"]),
    # too long
    ("long-host-name", ["host", "add", LONG, "--uri", "fake://"]),
    ("long-image-name", ["image", "add", LONG, "--path", "{image}"]),
    ("long-instance-name", ["create", LONG, "--host", "h1", *OK_FLAVOR, "--image", "cirros"]),
    ("long-zone", ["host", "add", "h9", "--uri", "fake://", "--zone", LONG]),
    ("long-architecture", ["host", "add", "h9", "--uri", "fake://", "--architecture", "a" * 33]),
    ("long-hypervisor-type", ["host", "add", "h9", "--uri", "fake://", "--hypervisor-type", "q" * 65]),
    ("long-request-id", ["stop", "{uuid}", "--request-id", "r" * 65]),
    ("long-idempotency-key", ["stop", "{uuid}", "--idempotency-key", LONG]),
    ("long-owner", ["recover", "--owner", LONG]),
    ("long-image-path", ["image", "add", "i9", "--path", "/" + "p" * 1100]),
    ("long-flavor", ["create", "x", "--host", "h1", "--flavor", "vcpus=1," * 5000, "--image", "cirros"]),
    # integers too large for any database
    ("big-vcpus", ["host", "add", "h9", "--uri", "fake://", "--vcpus", BIG]),
    ("big-memory", ["host", "add", "h9", "--uri", "fake://", "--memory-mb", str(2**31)]),
    ("big-disk", ["host", "add", "h9", "--uri", "fake://", "--disk-gb", "9" * 5000]),
    ("big-min-disk", ["image", "add", "i9", "--path", "{image}", "--min-disk", BIG]),
    (
        "big-flavor-vcpus",
        ["create", "x", "--host", "h1", "--flavor", f"vcpus={BIG},ram=64,disk=1", "--image", "cirros"],
    ),
    ("big-flavor-ram", ["create", "x", "--host", "h1", "--flavor", f"vcpus=1,ram={BIG},disk=1", "--image", "cirros"]),
    ("big-resize-disk", ["resize", "{uuid}", "--flavor", f"vcpus=1,ram=64,disk={BIG}"]),
    ("big-timeout", ["stop", "{uuid}", "--timeout", "1e300"]),
    ("big-max-age", ["image", "cleanup", "--host", "h1", "--max-age", "1e300"]),
    ("big-interval", ["daemon", "--interval", "1e300"]),
    # negative and below a sane minimum
    ("negative-vcpus", ["host", "add", "h9", "--uri", "fake://", "--vcpus", "-1"]),
    ("negative-min-disk", ["image", "add", "i9", "--path", "{image}", "--min-disk", "-1"]),
    ("negative-timeout", ["stop", "{uuid}", "--timeout", "-1"]),
    ("negative-max-age", ["image", "cleanup", "--host", "h1", "--max-age", "-5"]),
    ("negative-interval", ["daemon", "--interval", "-1"]),
    ("zero-interval", ["daemon", "--interval", "0"]),
    ("tiny-claim-interval", ["daemon", "--claim-interval", "0.001"]),
    ("negative-event-delay", ["daemon", "--event-delay", "-1"]),
    ("zero-flavor-vcpus", ["create", "x", "--host", "h1", "--flavor", "vcpus=0,ram=64,disk=1", "--image", "cirros"]),
    # NaN and infinities
    ("nan-timeout", ["stop", "{uuid}", "--timeout", "nan"]),
    ("inf-timeout", ["stop", "{uuid}", "--timeout", "inf"]),
    ("minus-inf-timeout", ["stop", "{uuid}", "--timeout=-inf"]),
    ("nan-max-age", ["image", "cleanup", "--host", "h1", "--max-age", "NaN"]),
    ("nan-interval", ["daemon", "--interval", "nan"]),
    ("inf-claim-interval", ["daemon", "--claim-interval", "inf"]),
    ("inf-event-delay", ["daemon", "--event-delay", "Infinity"]),
    ("word-timeout", ["stop", "{uuid}", "--timeout", "soon"]),
    ("arabic-digits-vcpus", ["host", "add", "h9", "--uri", "fake://", "--vcpus", "\u0661\u0662"]),
    ("underscore-vcpus", ["host", "add", "h9", "--uri", "fake://", "--vcpus", "1_000"]),
    # unknown and malformed uuids
    *[(f"unknown-uuid-{cmd}", [cmd, ZERO]) for cmd in ("show", "history", "tasks", "console", "start", "delete")],
    ("unknown-uuid-stop", ["stop", ZERO, "--timeout", "5"]),
    ("unknown-uuid-resize", ["resize", ZERO, "--flavor", "vcpus=2,ram=64,disk=1"]),
    ("unknown-uuid-migrate", ["migrate", ZERO]),
    ("unknown-uuid-rebuild", ["rebuild", ZERO]),
    ("unknown-uuid-reboot", ["reboot", ZERO, "--hard"]),
    *[(f"malformed-uuid-{cmd}", [cmd, "nonsense"]) for cmd in ("show", "history", "tasks", "console", "pause")],
    ("malformed-uuid-braces", ["show", "{{{uuid}}}"]),
    ("malformed-uuid-arabic", ["show", "\u0663" * 32]),
    ("malformed-create-uuid", [*CREATE, "--uuid", "nope"]),
    ("taken-create-uuid", [*CREATE, "--uuid", "{uuid}"]),
    # unknown hosts and images
    ("unknown-create-host", ["create", "x", "--host", "nope", *OK_FLAVOR, "--image", "cirros"]),
    ("unknown-create-image", ["create", "x", "--host", "h1", *OK_FLAVOR, "--image", "nope"]),
    ("unknown-migrate-host", ["migrate", "{uuid}", "--host", "nope"]),
    ("unknown-rebuild-image", ["rebuild", "{uuid}", "--image", "nope"]),
    *[
        (f"unknown-host-{verb}", ["host", verb, "nope"])
        for verb in ("show", "enable", "disable", "heartbeat", "remove")
    ],
    ("unknown-list-host", ["list", "--host", "nope"]),
    ("unknown-sync-host", ["sync", "--once", "--host", "nope"]),
    ("unknown-cleanup-host", ["image", "cleanup", "--host", "nope"]),
    ("unknown-daemon-host", ["daemon", "--host", "nope"]),
    ("duplicate-host", ["host", "add", "h1", "--uri", "fake://"]),
    ("duplicate-image", ["image", "add", "cirros", "--path", "{image}"]),
    ("host-in-use", ["host", "remove", "h1"]),
    # bad flavors and extra specs
    *[
        (f"flavor-{label}", ["create", "x", "--host", "h1", "--flavor", text, "--image", "cirros"])
        for label, text in [
            ("arabic-digits", "vcpus=\u0661\u0662,ram=64,disk=1"),
            ("underscore", "vcpus=1_000,ram=64,disk=1"),
            ("plus-sign", "vcpus= +3,ram=64,disk=1"),
            ("unknown-key", "cpus=1,ram=64,disk=1"),
            ("missing-disk", "vcpus=1,ram=64"),
            ("twice", "vcpus=1,vcpus=2,ram=64,disk=1"),
            ("fraction", "vcpus=1.5,ram=64,disk=1"),
        ]
    ],
    ("flavor-resize-shrink", ["resize", "{uuid}", "--flavor", "vcpus=1,ram=64,disk=0"]),
    ("flavor-resize-same", ["resize", "{uuid}", "--flavor", "vcpus=1,ram=64,disk=1"]),
    (
        "extra-spec-no-namespace",
        [*CREATE, "--extra-spec", "ssd=true"],
    ),
    (
        "extra-spec-twice",
        [*CREATE, "--extra-spec", "capabilities:ssd=true", "--extra-spec", "capabilities:ssd=false"],
    ),
    ("capability-twice", ["host", "add", "h9", "--uri", "fake://", "--capability", "a=1", "--capability", "a=2"]),
    # bad URIs and database URLs
    ("uri-no-scheme", ["host", "add", "h9", "--uri", "nonsense"]),
    ("uri-unknown-scheme", ["host", "add", "h9", "--uri", "foo://x"]),
    ("uri-fake-missing-folder", ["host", "add", "h9", "--uri", "fake:///no/such/dir/h9.json"]),
    ("uri-test-missing-node", ["host", "add", "h9", "--uri", "test:///no/such/node.xml"]),
    ("uri-qemu-bad-path", ["host", "add", "h9", "--uri", "qemu:///bogus"]),
    ("db-unknown-scheme", ["--db", "foo://x", "list"]),
    ("db-unparseable", ["--db", "not a url", "list"]),
    ("db-driver-missing", ["--db", "mysql://u@localhost/x", "list"]),
    ("db-missing-folder", ["--db", "sqlite:////no/such/dir/x.db", "list"]),
    ("db-missing-folder-upgrade", ["--db", "sqlite:////no/such/dir/x.db", "db", "upgrade"]),
    ("db-corrupt", ["--db", "{corrupt}", "list"]),
    ("db-corrupt-upgrade", ["--db", "{corrupt}", "db", "upgrade"]),
    ("db-unreachable-postgres", ["--db", "postgresql+psycopg://u@127.0.0.1:1/x", "show", "{uuid}"]),
    ("db-ipv6-unclosed", ["--db", "postgresql+psycopg://u:hunter2@[::1/db", "list"]),
    ("db-at-in-password", ["--db", "postgresql+psycopg://u:abc@SECRETTAIL@127.0.0.1:5/db", "list"]),
    ("db-at-in-password-upgrade", ["--db", "postgresql+psycopg://u:abc@SECRETTAIL@127.0.0.1:5/db", "db", "upgrade"]),
    ("revision-unknown", ["db", "downgrade", "zzz"]),
    ("revision-future", ["db", "upgrade", "0099"]),
    ("revision-backwards", ["db", "upgrade", "0001"]),
    ("revision-relative-too-far", ["db", "downgrade", "+5"]),
    # bad paths
    ("path-relative", ["image", "add", "i9", "--path", "relative.qcow2"]),
    ("path-missing", ["image", "add", "i9", "--path", "{tmp}/missing.qcow2"]),
    ("path-directory", ["image", "add", "i9", "--path", "{tmp}"]),
    ("instances-path-relative", ["host", "add", "h9", "--uri", "fake://", "--instances-path", "relative"]),
    ("demo-keep-is-a-file", ["demo", "--keep", "{file}"]),
    # the change feed and audit queries
    ("feed-bad-after", ["changes", "--after", "x"]),
    ("feed-after-leading-zero", ["changes", "--after", "01:2"]),
    ("feed-after-too-big", ["changes", "--after", "1:99999999999999999999"]),
    ("feed-zero-limit", ["changes", "--limit", "0"]),
    ("feed-big-limit", ["changes", "--limit", "10001"]),
    ("feed-big-limit-consumer", ["changes", "--consumer", "c", "--limit", "10001"]),
    ("feed-bad-format", ["changes", "--format", "xml"]),
    ("feed-empty-consumer", ["changes", "--consumer", ""]),
    ("feed-control-consumer", ["changes", "--consumer", "c\x1b"]),
    ("feed-long-consumer", ["changes", "--consumer", LONG]),
    ("feed-prune-with-follow", ["changes", "--follow", "prune"]),
    ("feed-prune-with-after", ["changes", "--after", "0:0", "prune"]),
    ("feed-prune-negative", ["changes", "prune", "--older-than", "-1"]),
    ("feed-prune-nan", ["changes", "prune", "--older-than", "nan"]),
    ("feed-forget-unknown", ["changes", "forget", "nobody"]),
    ("feed-unknown-subcommand", ["changes", "rewind"]),
    ("feed-webhook-no-secret", ["changes", "webhook", "http://127.0.0.1:9/hook"]),
    ("feed-consumer-reserved", ["changes", "--consumer", "webhook:x"]),
    ("feed-follow-reserved", ["changes", "--follow", "--consumer", "Webhook:x"]),
    ("feed-webhook-userinfo", ["changes", "webhook", "http://u:pw@127.0.0.1:9/hook"]),
    ("feed-webhook-ipv6-unclosed", ["changes", "webhook", "http://[::1"]),
    ("feed-webhook-port-range", ["changes", "webhook", "http://127.0.0.1:99999/hook"]),
    ("feed-webhook-port-text", ["changes", "webhook", "http://127.0.0.1:http/hook"]),
    ("feed-webhook-ftp", ["changes", "webhook", "ftp://127.0.0.1/x"]),
    ("feed-webhook-control", ["changes", "webhook", "http://h/\x1b"]),
    ("audit-bad-since", ["audit", "--since", "yesterday"]),
    ("audit-bad-date", ["audit", "--since", "2026-13-01"]),
    ("audit-age-overflow", ["audit", "--since", "999999999d"]),
    ("audit-since-after-until", ["audit", "--since", "2026-01-02", "--until", "2026-01-01"]),
    ("audit-unknown-cause", ["audit", "--cause", "boredom"]),
    ("audit-unknown-vm-state", ["audit", "--vm-state", "asleep"]),
    ("audit-zero-limit", ["audit", "--limit", "0"]),
    ("audit-big-limit", ["audit", "--limit", "100001"]),
    ("audit-control-host", ["audit", "--host", "h\x85"]),
    ("audit-long-request-id", ["audit", "--request-id", "r" * 65]),
    ("audit-long-operation", ["audit", "--operation", "o" * 65]),
    # refused by the state graph or the parser
    ("state-start-active", ["start", "{uuid}"]),
    (
        "create-idempotency-key",
        [*CREATE, "--idempotency-key", "k"],
    ),
    ("parser-unknown-command", ["frobnicate"]),
    ("parser-missing-argument", ["host", "add", "h9"]),
    ("parser-bad-choice", ["graph", "--format", "png"]),
    ("parser-bad-format", ["image", "add", "i9", "--path", "{image}", "--format", "vmdk"]),
    ("parser-extra-argument", ["show", "{uuid}", "extra"]),
]

# Cases refused only once the engine side lands: case id -> what is missing (none pending now).
PENDING: dict[str, str] = {}


def _argv(world: World, template: list[str]) -> list[str]:
    values = {
        "uuid": world.uuid,
        "image": world.image,
        "tmp": str(world.folder),
        "corrupt": _corrupt_db(world.folder),
        "file": _file(world.folder),
    }
    return [arg.format(**values) for arg in template]


def _params() -> Iterator[Any]:
    ids = [case_id for case_id, _ in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    for case_id, argv in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=PENDING[case_id])] if case_id in PENDING else []
        yield pytest.param(argv, id=case_id, marks=marks)


def _assert_typed_error(code: int, out: str, err: str) -> dict[str, Any]:
    assert code == 2, f"exit {code}, stderr {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("error: ") and err.count("\n") == 1, f"not one error line: {err!r}"
    data: dict[str, Any] = json.loads(out)
    error_class = getattr(lifecycle.errors, data["error"], None)
    assert isinstance(error_class, type) and issubclass(error_class, lifecycle.errors.LifecycleError), data
    assert data["message"] in err
    return data


@pytest.mark.parametrize("argv", list(_params()))
def test_bad_input_is_refused_with_a_typed_error_and_changes_nothing(
    world: World, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """The command exits 2 with one `error:` line, a --json error naming a LifecycleError subclass, and every table as it was."""
    args = _argv(world, argv)
    before = dump(world.folder)
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    data = _assert_typed_error(code, out, err)
    assert dump(world.folder) == before
    print(f"{data['error']}: {data['message']}")  # shown with -rP: a review of every refusal


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["host", "add", "h9", "--uri", "fake://", "--vcpus", BIG], id="big-vcpus"),
        pytest.param(["--db", "sqlite:////no/such/dir/x.db", "list"], id="db-missing-folder"),
        pytest.param(["stop", "{uuid}", "--timeout", "nan"], id="nan-timeout"),
        pytest.param(["create", "vm\x85", "--host", "h1", *OK_FLAVOR, "--image", "cirros"], id="c1-instance-name"),
        pytest.param(["db", "downgrade", "zzz"], id="revision-unknown"),
    ],
)
def test_bad_input_through_the_real_executable(world: World, argv: list[str]) -> None:
    """Run as its own process (real argv, stdout and exit status), bad input still exits 2 with a typed error and no traceback."""
    exe = Path(sys.executable).with_name("lifecycle")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lifecycle.cli"]
    before = dump(world.folder)
    done = subprocess.run(
        [*command, *_argv(world, argv), "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    _assert_typed_error(done.returncode, done.stdout, done.stderr)
    assert dump(world.folder) == before


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://u:hunter2@[::1/db", "postgresql+psycopg://u:hunter2@SECRETTAIL@127.0.0.1:5/db"]
)
def test_db_flag_gets_the_database_url_checks(capsys: pytest.CaptureFixture[str], url: str) -> None:
    """--db is refused as the environment's URL is (an unclosed bracket, an unencoded @), naming --db and showing no part of the password."""
    assert main(["--db", url, "host", "list"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --db: ") and len(err.splitlines()) == 1, err
    assert "hunter2" not in out + err and "SECRETTAIL" not in out + err
