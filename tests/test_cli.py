"""The CLI: --json output with the library's field names, one-line errors, nothing changed on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from lifecycle.cli import main


@pytest.fixture
def cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
):  # type: ignore[no-untyped-def]
    """Run `lifecycle ...` in-process on a scratch database and fake host; return (code, stdout, stderr)."""
    monkeypatch.setenv("LIFECYCLE_DB_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    old = structlog.get_config()
    request.addfinalizer(lambda: structlog.configure(**old))  # the CLI configures logging globally

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    assert run("db", "upgrade")[0] == 0
    assert run("host", "add", "h1", "--uri", f"fake://{tmp_path / 'h1.json'}")[0] == 0
    assert run("image", "add", "cirros", "--path", "/images/cirros.qcow2")[0] == 0
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
