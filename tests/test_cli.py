"""The CLI: --json output with the library's field names, one-line errors, nothing changed on bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from lifecycle import Engine
from lifecycle.cli import main
from lifecycle.drivers.fake import SimulatedCrash


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run `lifecycle ...` in-process on a scratch database and fake host; return (code, stdout, stderr)."""
    monkeypatch.setenv("LIFECYCLE_DB_URL", f"sqlite:///{tmp_path / 'cli.db'}")

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    assert run("db", "upgrade")[0] == 0
    assert run("host", "add", "h1", "--uri", f"fake://{tmp_path / 'h1.json'}")[0] == 0
    image = tmp_path / "cirros.qcow2"
    image.write_bytes(b"QFI\xfb")  # image add wants an existing file; the fake host never reads it
    assert run("image", "add", "cirros", "--path", str(image))[0] == 0
    return run


def _create(cli) -> str:  # type: ignore[no-untyped-def]
    code, out, _ = cli(
        "create", "vm1", "--host", "h1", "--flavor", "vcpus=1,ram=64,disk=1", "--image", "cirros", "--json"
    )
    assert code == 0
    return str(json.loads(out)["uuid"])


def test_create_and_show_print_the_library_field_names(cli) -> None:  # type: ignore[no-untyped-def]
    """--json output carries uuid, name, host, vm_state, task_state, power_state, status and task_id."""
    uuid = _create(cli)
    code, out, _ = cli("show", uuid, "--json")
    data = json.loads(out)
    assert code == 0
    assert {
        k: data[k] for k in ("uuid", "name", "host", "vm_state", "task_state", "power_state", "status", "task_id")
    } == {
        "uuid": uuid,
        "name": "vm1",
        "host": "h1",
        "vm_state": "active",
        "task_state": None,
        "power_state": 1,
        "status": "ACTIVE",
        "task_id": None,
    }


def test_operations_persist_across_invocations(cli) -> None:  # type: ignore[no-untyped-def]
    """Separate CLI runs see one hypervisor (the fake host's state file) and one database."""
    uuid = _create(cli)
    for op, status in (("stop", "SHUTOFF"), ("start", "ACTIVE"), ("pause", "PAUSED"), ("unpause", "ACTIVE")):
        code, out, _ = cli(op, uuid, "--json")
        assert (code, json.loads(out)["status"]) == (0, status)
    code, out, _ = cli("reboot", uuid, "--hard", "--json")
    assert json.loads(out)["task"]["operation"] == "reboot_hard"
    code, out, _ = cli("history", uuid, "--json")
    ops = [row["operation"] for row in json.loads(out)]
    assert ops.count("stop") == 2 and ops[-1] == "reboot_hard"


def _snapshot(cli) -> str:  # type: ignore[no-untyped-def]
    return cli("list", "--all", "--json")[1]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("start", "{uuid}"), "start is allowed from vm_state stopped"),
        (("stop", "00000000-0000-0000-0000-000000000000"), "instance 00000000-0000-0000-0000-000000000000 not found"),
        (("stop", "nonsense"), "invalid instance uuid 'nonsense'"),
        (("create", "x", "--host", "h1", "--flavor", "vcpus=1,ram=64", "--image", "cirros"), "missing root_gb"),
        (
            ("create", "x", "--host", "h1", "--flavor", "cpus=1", "--image", "cirros"),
            "expected vcpus=N,ram=MiB,disk=GiB",
        ),
        (
            ("create", "x", "--host", "nope", "--flavor", "vcpus=1,ram=64,disk=1", "--image", "cirros"),
            "known hosts: h1",
        ),
        (
            ("create", "x", "--host", "h1", "--flavor", "vcpus=1,ram=64,disk=1", "--image", "nope"),
            "known images: cirros",
        ),
    ],
)
def test_bad_input_prints_one_line_exits_2_and_changes_nothing(cli, argv: tuple[str, ...], needle: str) -> None:  # type: ignore[no-untyped-def]
    """Each bad input is one clear stderr line and a JSON error, exit 2, database untouched."""
    uuid = _create(cli)
    before = _snapshot(cli)
    code, out, err = cli(*(a.format(uuid=uuid) for a in argv), "--json")
    assert code == 2
    assert err.count("\n") == 1 and needle in err
    assert json.loads(out)["message"] in err
    assert _snapshot(cli) == before


def test_failed_operation_exits_1(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An operation that ran and failed exits 1 and says why."""
    uuid = _create(cli)
    state = json.loads((tmp_path / "h1.json").read_text())
    del state["domains"][uuid]
    (tmp_path / "h1.json").write_text(json.dumps(state))
    code, _, err = cli("pause", uuid)
    assert code == 1 and "DomainNotFound" in err


def test_graph_json_is_the_operations_table(cli) -> None:  # type: ignore[no-untyped-def]
    """`graph --format json` lists every operation with its guards and walk."""
    code, out, _ = cli("graph", "--format", "json")
    rows = {r["operation"]: r for r in json.loads(out)}
    assert code == 0 and rows["stop"]["allowed_vm_states"] == ["active", "error"]
    assert rows["reboot_hard"]["walk"] == ["rebooting_hard", "reboot_pending_hard", "reboot_started_hard"]


def test_host_and_image_lists(cli) -> None:  # type: ignore[no-untyped-def]
    """Host list and image list show what was added, in JSON."""
    assert [h["name"] for h in json.loads(cli("host", "list", "--json")[1])] == ["h1"]
    assert [i["name"] for i in json.loads(cli("image", "list", "--json")[1])] == ["cirros"]
    code, _, err = cli("host", "add", "h1", "--uri", "fake://")
    assert code == 2 and "host 'h1' already exists" in err


def test_demo_tells_the_story(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo runs end to end and shows the preempted stop in db-1's audit log."""
    assert main(["demo", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    db = data["instances"]["db-1"]
    assert db["instance"]["vm_state"] == "deleted"
    assert [r["operation"] for r in db["history"]][-3:] == ["stop", "force_delete", "force_delete"]


@pytest.mark.qemu
@pytest.mark.slow
def test_demo_on_real_qemu_resizes_onto_the_second_libvirtd(remote_instances: Any) -> None:
    """With --uri and --remote-uri the demo drives real QEMU, resizes web-1 onto the other libvirtd, and leaves no pool."""
    import libvirt

    from tests.conftest import QEMU_URI, qemu_ready

    qemu_ready()
    remote = os.environ["LIFECYCLE_TEST_REMOTE_URI"]

    def pools() -> set[str]:
        names = set()
        for uri in (QEMU_URI, remote):
            conn = libvirt.open(uri)
            names |= {p.name() for p in conn.listAllStoragePools(0) if "/lifecycle-demo-" in p.XMLDesc(0)}
            names |= {p.name() for p in conn.listAllStoragePools(0) if str(remote_instances) in p.XMLDesc(0)}
            conn.close()
        return names

    before = pools()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lifecycle")), "demo", "--uri", QEMU_URI, "--remote-uri", remote,
         "--remote-instances", str(remote_instances)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compute-1: libvirt at qemu:///system" in done.stdout
    assert "resized web-1 onto compute-3" in done.stdout and "confirm_resize -> ACTIVE" in done.stdout
    assert pools() == before


def test_hosts_and_scheduled_create(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Hosts with resources are shown, disabled and heartbeated; create without --host is scheduled or explains why not."""
    code, out, _ = cli(
        "host",
        "add",
        "big",
        "--uri",
        f"fake://{tmp_path / 'big.json'}",
        "--vcpus",
        "8",
        "--memory-mb",
        "4096",
        "--disk-gb",
        "40",
        "--capability",
        "ssd=true",
        "--json",
    )
    assert code == 0 and json.loads(out)["capabilities"] == {"ssd": "true"}
    code, _, err = cli("create", "x", "--flavor", "vcpus=1,ram=512,disk=1", "--image", "cirros")
    assert code == 1 and "big: ComputeFilter: down" in err
    assert cli("host", "heartbeat", "big")[0] == 0 and cli("host", "heartbeat", "h1")[0] == 0
    code, out, _ = cli(
        "create",
        "y",
        "--flavor",
        "vcpus=1,ram=512,disk=1",
        "--image",
        "cirros",
        "--extra-spec",
        "capabilities:ssd=true",
        "--json",
    )
    assert code == 0 and json.loads(out)["host"] == "big"
    assert json.loads(cli("host", "show", "big", "--json")[1])["memory_mb_used"] == 512
    assert json.loads(cli("host", "disable", "big", "--json")[1])["enabled"] is False
    code, _, err = cli(
        "create", "z", "--flavor", "vcpus=1,ram=512,disk=1", "--image", "cirros", "--extra-spec", "nokeyvalue"
    )
    assert code == 2 and "--extra-spec takes KEY=VALUE" in err


def test_graph_honours_json_flag(cli) -> None:  # type: ignore[no-untyped-def]
    """`graph --json` prints the table as JSON like every other command's --json."""
    code, out, _ = cli("graph", "--json")
    assert code == 0 and json.loads(out)[0]["operation"] == "create"


def test_resize_confirm_and_revert_from_the_cli(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """resize --flavor, confirm-resize, migrate --host and revert-resize work end to end with --json."""
    cli("host", "add", "h2", "--uri", f"fake://{tmp_path / 'h2.json'}")
    for host in ("h1", "h2"):
        cli("host", "heartbeat", host)
    uuid = _create(cli)
    code, out, _ = cli("resize", uuid, "--flavor", "vcpus=2,ram=128,disk=2", "--json")
    assert (code, json.loads(out)["status"], json.loads(out)["host"]) == (0, "VERIFY_RESIZE", "h2")
    assert json.loads(cli("confirm-resize", uuid, "--json")[1])["status"] == "ACTIVE"
    code, out, _ = cli("migrate", uuid, "--host", "h1", "--json")
    assert (code, json.loads(out)["host"]) == (0, "h1")
    assert json.loads(cli("revert-resize", uuid, "--json")[1])["host"] == "h2"
    code, _, err = cli("resize", uuid, "--flavor", "vcpus=2,ram=128,disk=1")
    assert code == 2 and "cannot shrink the root disk" in err


def _sql(tmp_path: Path, statement: str, **params: object) -> None:
    """Write to the CLI's database behind the engine's back, as an older version could have."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def test_text_output_escapes_control_characters_from_older_databases(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Names, zones, paths, actors and request ids holding controls print as repr escapes in list, show, host, image, history and tasks."""
    uuid = _create(cli)
    evil = "evil\x1b[2J\x85\u202e\n"
    _sql(tmp_path, "UPDATE instances SET name = :v", v=evil)
    _sql(tmp_path, "UPDATE hosts SET availability_zone = :v, driver_uri = :v", v=evil)
    _sql(tmp_path, "UPDATE images SET path = :v", v=evil)
    _sql(tmp_path, "UPDATE audit_log SET actor = :v, request_id = :v", v=evil)
    _sql(tmp_path, "UPDATE tasks SET actor = :v, request_id = :v", v=evil)
    escaped = "evil\\x1b[2J\\x85\\u202e\\n"
    for argv in (("list",), ("show", uuid), ("host", "list"), ("host", "show", "h1"), ("image", "list")):
        code, out, _ = cli(*argv)
        assert code == 0 and escaped in out, argv
        assert not any(c in out for c in "\x1b\x85\u202e") and out.count("\n") == 1, argv
    for argv in (("history", uuid), ("tasks", uuid)):
        code, out, _ = cli(*argv)
        assert code == 0 and escaped in out and not any(c in out for c in "\x1b\x85\u202e"), argv
    code, out, _ = cli("show", uuid, "--json")
    assert json.loads(out)["name"] == evil  # JSON carries the value itself, escaped by JSON's own rules


def test_json_output_never_holds_nan(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A NaN metric read back from an older database prints as null: the output stays strict JSON."""
    _sql(tmp_path, "UPDATE hosts SET metrics = :v", v='{"cpu": NaN, "io": 1.5}')

    def strict(constant: str) -> object:
        raise AssertionError(f"{constant} in JSON output")

    code, out, _ = cli("host", "show", "h1", "--json")
    assert code == 0 and json.loads(out, parse_constant=strict)["metrics"] == {"cpu": None, "io": 1.5}


def test_a_closed_stdout_ends_quietly_with_141(cli, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """When whoever reads stdout goes away mid-output, main returns 141 (128 + SIGPIPE) and prints no traceback."""

    class ClosedPipe(io.StringIO):
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["graph"]) == 141
    assert main(["list"]) == 141
    assert capsys.readouterr().err == ""


def test_a_closed_pipe_through_the_real_executable(tmp_path: Path) -> None:
    """`lifecycle graph | head -1`: the process whose reader is gone exits 141 with nothing on stderr."""
    exe = Path(sys.executable).with_name("lifecycle")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lifecycle.cli"]
    proc = subprocess.Popen([*command, "graph"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the interpreter has even started: every write meets a pipe with no reader
    err = proc.stderr.read()
    assert (proc.wait(timeout=60), err) == (141, b"")
    proc.stderr.close()


def test_sync_reports_every_host_and_exits_1_when_one_failed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`sync --once` prints the failed host's error and the other host's pass, then exits 1; --host of an unknown host stays exit 2."""
    cli("host", "add", "h2", "--uri", f"fake://{tmp_path / 'h2.json'}")
    _create(cli)
    (tmp_path / "h1.json").write_text("not json")
    code, out, _ = cli("sync", "--once")
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("h1: pass failed: JSONDecodeError") and lines[1].startswith("h2: 0 instances")
    code, out, _ = cli("sync", "--once", "--json")
    assert code == 1 and [bool(s["error"]) for s in json.loads(out)] == [True, False]
    assert cli("sync", "--once", "--host", "h2")[0] == 0
    assert cli("sync", "--once", "--host", "nope")[0] == 2


def test_host_remove(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`host remove` forgets an empty host, refuses one holding an instance, and with --force lists the orphans."""
    cli("host", "add", "h2", "--uri", f"fake://{tmp_path / 'h2.json'}")
    code, out, _ = cli("host", "remove", "h2", "--json")
    assert (code, json.loads(out)) == (0, {"removed": "h2", "orphaned": []})
    uuid = _create(cli)
    code, out, err = cli("host", "remove", "h1", "--json")
    assert code == 2 and json.loads(out)["error"] == "HostInUse" and "still holds 1 instance" in err
    code, out, _ = cli("host", "remove", "h1", "--force")
    assert code == 0 and out.splitlines() == ["host h1 removed", f"{uuid}: error, no host"]
    assert [h["name"] for h in json.loads(cli("host", "list", "--json")[1])] == []


def test_tasks_of_an_unknown_instance_is_not_found(cli) -> None:  # type: ignore[no-untyped-def]
    """`tasks UUID` of no instance says not found and exits 2, as `show` does, instead of printing nothing."""
    code, _, err = cli("tasks", "00000000-0000-0000-0000-000000000000")
    assert code == 2 and "instance 00000000-0000-0000-0000-000000000000 not found" in err


def test_db_downgrade_with_an_instance_and_back(cli) -> None:  # type: ignore[no-untyped-def]
    """`db downgrade 0004` with an instance in the database works on SQLite, and `db upgrade` brings it back."""
    uuid = _create(cli)
    code, out, _ = cli("db", "downgrade", "0004", "--json")
    assert (code, json.loads(out)["revision"]) == (0, "0004")
    code, out, _ = cli("db", "upgrade", "--json")
    assert code == 0 and json.loads(out)["revision"] == json.loads(out)["head"]
    assert json.loads(cli("show", uuid, "--json")[1])["vm_state"] == "active"


def test_recover_explains_the_lease(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """After a crash, recover says the task is within its lease and until when; --owner alone refuses, --force takes it."""
    uuid = _create(cli)
    crashed = Engine(os.environ["LIFECYCLE_DB_URL"], owner="crashed-engine")
    original = crashed.store.writes.begin

    def begin_then_crash(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise SimulatedCrash("crash after begin")

    crashed.store.writes.begin = begin_then_crash  # type: ignore[method-assign]
    with pytest.raises(SimulatedCrash):
        crashed.stop(uuid)
    crashed.close()
    code, out, _ = cli("recover")
    assert code == 0 and out.startswith("no task to recover\n1 running task(s) still within their owner's lease")
    assert "--owner NAME --force" in out
    code, out, err = cli("recover", "--json")
    assert (code, json.loads(out)) == (0, []) and "1 running task(s) still within" in err
    code, out, _ = cli("recover", "--owner", "crashed-engine", "--json")
    assert (code, json.loads(out)) == (0, [])  # a live lease is not taken without --force
    code, _, err = cli("recover", "--force")
    assert code == 2 and "needs --owner" in err
    code, out, _ = cli("recover", "--owner", "crashed-engine", "--force", "--json")
    assert code == 0 and [r["operation"] for r in json.loads(out)] == ["stop"]
    code, out, _ = cli("recover")
    assert out == "no task to recover\n"


def test_recover_help_explains_the_lease(capsys: pytest.CaptureFixture[str]) -> None:
    """`recover --help` says a task is taken only after its owner's lease expires, or at once with --owner."""
    with pytest.raises(SystemExit):
        main(["recover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lease has expired (60 s by default" in text and "--owner NAME --force" in text and "fenced" in text


def test_migration_list_and_show(cli) -> None:  # type: ignore[no-untyped-def]
    """`migration list` and `migration show ID` print a move with its hosts and status; an unknown id exits 2."""
    code, out, _ = cli("migration", "list")
    assert (code, out) == (0, "no migrations\n")
    code, out, err = cli("migration", "show", "00000000-0000-0000-0000-000000000000")
    assert code == 2 and "not found" in err


def test_tasks_and_migrations_show_the_copy_progress(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """After a resize, `tasks` shows resize_finish's bytes copied, `migration list/show` the same, --json the numbers."""
    cli("host", "add", "h2", "--uri", f"fake://{tmp_path / 'h2.json'}")
    for host in ("h1", "h2"):
        cli("host", "heartbeat", host)
    uuid = _create(cli)
    assert cli("resize", uuid, "--flavor", "vcpus=2,ram=128,disk=2")[0] == 0
    code, out, _ = cli("tasks", uuid)
    finish = [line for line in out.splitlines() if "resize_finish" in line]
    assert code == 0 and len(finish) == 1 and "(copied " in finish[0] and "100%)" in finish[0]
    code, out, _ = cli("migration", "list", "--json")
    [row] = json.loads(out)
    assert code == 0 and row["bytes_done"] == row["bytes_total"] > 0 and row["status"] == "finished"
    code, out, _ = cli("migration", "show", row["id"])
    assert code == 0 and "h1 -> h2" in out and "100%)" in out


def test_lock_refuses_stop_naming_the_lock_and_force_passes(cli) -> None:  # type: ignore[no-untyped-def]
    """`lock` then `stop` exits 2 naming who and why; `stop --force` runs; `show` carries the lock; `unlock` by another needs --force."""
    uuid = _create(cli)
    code, out, _ = cli("lock", uuid, "--reason", "legal hold", "--actor", "bob", "--json")
    assert code == 0 and (json.loads(out)["locked_by"], json.loads(out)["locked_reason"]) == ("bob", "legal hold")
    code, _, err = cli("stop", uuid)
    assert code == 2 and "locked by bob" in err and "legal hold" in err
    code, out, _ = cli("stop", uuid, "--force", "--json")
    assert code == 0 and json.loads(out)["status"] == "SHUTOFF"
    assert json.loads(cli("show", uuid, "--json")[1])["locked_by"] == "bob"
    code, _, err = cli("unlock", uuid, "--actor", "eve")
    assert code == 2 and "locked by bob" in err
    assert cli("unlock", uuid, "--actor", "eve", "--force")[0] == 0
    assert json.loads(cli("show", uuid, "--json")[1])["locked_by"] is None


def test_reset_state_from_the_cli(cli) -> None:  # type: ignore[no-untyped-def]
    """`reset-state` needs --reason (exit 2 without), sets error by default or --state active, and is audited as admin."""
    uuid = _create(cli)
    code, _, err = cli("reset-state", uuid)
    assert code == 2 and "--reason" in err
    code, _, err = cli("reset-state", uuid, "--state", "stopped", "--reason", "x")
    assert code == 2 and "invalid choice" in err
    code, out, _ = cli("reset-state", uuid, "--reason", "ticket 7", "--actor", "alice", "--json")
    assert code == 0 and json.loads(out)["vm_state"] == "error"
    code, out, _ = cli("reset-state", uuid, "--state", "active", "--reason", "fixed", "--json")
    assert code == 0 and json.loads(out)["vm_state"] == "active"
    history = json.loads(cli("history", uuid, "--json")[1])
    assert [(h["cause"], h["operation"], h["message"]) for h in history[-2:]] == [
        ("admin", "reset_state", "ticket 7"),
        ("admin", "reset_state", "fixed"),
    ]


def test_one_shot_reclaim_and_build_timeout(cli) -> None:  # type: ignore[no-untyped-def]
    """`reclaim --older-than 0` finds nothing to do; a soft-deleted instance is reclaimed by `reclaim --older-than S`."""
    uuid = _create(cli)
    assert cli("soft-delete", uuid)[0] == 0
    code, out, _ = cli("reclaim", "--older-than", "3600")
    assert (code, out) == (0, "nothing to do\n")
    code, out, _ = cli("reclaim", "--older-than", "0.001", "--json")
    assert code == 0 and json.loads(out) == [{"uuid": uuid, "outcome": "deleted", "detail": None}]
    assert json.loads(cli("show", uuid, "--json")[1])["vm_state"] == "deleted"
    code, out, _ = cli("build-timeout", "--older-than", "60")
    assert (code, out) == (0, "nothing to do\n")
    code, _, err = cli("build-timeout", "--older-than", "-1")
    assert code == 2 and "--older-than" in err


def test_building_the_parser_leaves_argparse_translating_through_gettext(capsys: pytest.CaptureFixture[str]) -> None:
    """The parser memoizes argparse's translations only while it is built: argparse uses gettext again after."""
    import argparse
    import gettext

    assert main(["graph", "--format", "json"]) == 0
    capsys.readouterr()
    assert argparse._ is gettext.gettext  # type: ignore[attr-defined]


def test_every_command_names_its_handler_and_every_operation_is_a_command() -> None:
    """Each leaf parser sets the handler the one dispatch calls, and each operation but reboot_hard is a command."""
    import argparse

    from lifecycle import graph
    from lifecycle.cli.app import _build_parser

    leaves: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups or not groups[0].required:  # `changes` runs on its own as well as with a subcommand
            leaves[path] = parser
        for group in groups:
            for name, sub in group.choices.items():
                walk(sub, f"{path} {name}".strip())

    walk(_build_parser(), "")
    assert [path for path, parser in leaves.items() if not callable(parser.get_default("handler"))] == []
    commands = {path for path in leaves if " " not in path}
    assert {op.name.replace("_", "-") for op in graph.OPERATIONS} - commands == {"reboot-hard"}
