"""Evacuate on real hosts through the CLI: a libvirtd killed with its guests running, then brought back.

Host ``a`` is this machine's libvirtd; host ``c`` is a third libvirtd of this test's own
(``scripts/second-host.sh`` on 127.0.0.4, in its own mount namespace, reached over TCP), so that
killing it disturbs no other test. Its libvirtd is SIGKILLed: its QEMU guests keep running, as on
a host whose management daemon died. The host goes down, is fenced, and its instances are
evacuated to ``a``. Then libvirtd is started again *in the same namespace*, where it finds the
old guests still running; a daemon run for ``c`` must destroy those copies (never start one)
before anything else, so that each instance runs exactly once, on ``a``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.conftest import QEMU_URI, qemu_ready, require, wait_until
from tests.test_fleet_qemu import CONFIG, EXECUTABLE, RUNNING, HostView

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "second-host.sh"
ADDR = "127.0.0.4"
URI = f"qemu+tcp://{ADDR}/system"


def _script(action: str, folder: Path) -> None:
    env = os.environ | {"LIFECYCLE_HOST2_ADDR": ADDR}
    done = subprocess.run([str(SCRIPT), action, str(folder)], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"second-host.sh {action}: {done.stderr}"


def _pid(path: Path) -> int:
    return int(path.read_text().strip())


@pytest.fixture
def third_host(tmp_path: Path) -> Iterator[Path]:
    """A libvirtd of this test's own on 127.0.0.4, stopped (with every QEMU it started) afterwards."""
    qemu_ready()
    require("root", os.geteuid() == 0, "run as root (the third host is a libvirtd in its own namespace)")
    folder = tmp_path / "host-c"
    _script("start", folder)
    try:
        yield folder
    finally:
        _script("stop", folder)


def _restart_libvirtd(folder: Path) -> None:
    """Start libvirtd again in the namespace its virtlogd still lives in: it finds the old guests running."""
    virtlogd = _pid(folder / "virtlogd.pid")
    subprocess.run(
        [
            "nsenter",
            "-t",
            str(virtlogd),
            "-m",
            "libvirtd",
            "-d",
            "--listen",
            "-p",
            str(folder / "libvirtd.pid"),
            "-f",
            "/etc/libvirt/libvirtd.conf",
        ],
        check=True,
    )
    wait_until(
        "the restarted libvirtd answers",
        lambda: subprocess.run(["virsh", "-q", "-c", URI, "version"], capture_output=True, check=False).returncode == 0,
        30,
    )


def _no_domain(view: HostView, uuid: str) -> bool:
    """Whether ``view`` has no domain for ``uuid`` (one destroyed while it was being read counts as none)."""
    import libvirt

    try:
        return view.domain(uuid) is None
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise


def _qemu_copies(uuid: str) -> int:
    """How many QEMU processes on this machine (either host's) run the guest of ``uuid``."""
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and b"qemu" in Path(args[0].decode(errors="replace")).name.encode() and uuid.encode() in args:
            count += 1
    return count


class Cli:
    """The ``lifecycle`` executable with the test's config file, and LIFECYCLE_ variables per call."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = folder / "lifecycle.toml"
        self.config.write_text(f'database_url = "sqlite:///{folder / "db.sqlite"}"\n{CONFIG}')

    def env(self, settings: dict[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
        env["LIFECYCLE_CONFIG"] = str(self.config)
        return env | {f"LIFECYCLE_{k.upper()}": str(v) for k, v in settings.items()}

    def run(self, *args: str, **settings: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*EXECUTABLE, *args, "--json"],
            env=self.env(settings),
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def daemon(self, host: str, log: Path) -> subprocess.Popen[bytes]:
        """Start ``lifecycle daemon --host HOST`` (host_down_after 2) in the background."""
        with log.open("w") as sink:
            return subprocess.Popen(
                [*EXECUTABLE, "daemon", "--host", host],
                env=self.env({"host_down_after": 2}),
                cwd=self.folder,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )

    def stop(self, daemon: subprocess.Popen[bytes]) -> None:
        """SIGTERM a daemon and wait for it to end."""
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)

    def ok(self, *args: str, **settings: Any) -> Any:
        done = self.run(*args, **settings)
        assert done.returncode == 0, f"lifecycle {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
        return json.loads(done.stdout) if done.stdout.strip() else None


def test_evacuate_a_killed_host_and_destroy_its_copies_when_it_returns(
    tmp_path: Path, base_image: Path, third_host: Path
) -> None:
    """Guests of a host whose libvirtd was killed run again on a; when it returns, its old copies are destroyed."""
    tmp_path.chmod(0o755)  # QEMU reads the base image through the instances path under it
    cli = Cli(tmp_path)
    a = HostView(QEMU_URI, PurePosixPath(tmp_path / "a"))
    c = HostView(URI, PurePosixPath("/var/lib/libvirt/lifecycle/evacuate"))
    cli.ok("db", "upgrade")
    for name, view in (("a", a), ("c", c)):
        address = [] if view.uri == QEMU_URI else ["--console-address", ADDR]
        cli.ok("host", "add", name, "--uri", view.uri, "--instances-path", str(view.instances), *address)
        cli.ok("host", "heartbeat", name)
    cli.ok("image", "add", "base", "--path", str(base_image))
    uuids = [
        cli.ok("create", f"vm{i}", "--host", "c", "--flavor", "vcpus=1,ram=64,disk=1", "--image", "base")["uuid"]
        for i in range(2)
    ]
    assert all(c.state(u) == RUNNING for u in uuids)

    keeper = cli.daemon("a", tmp_path / "daemon-a.log")  # a heartbeats every second: up, with host_down_after 2
    try:
        _kill_and_evacuate(cli, third_host, a, uuids)
    finally:
        cli.stop(keeper)

    _restart_libvirtd(third_host)
    assert all(c.state(u) == RUNNING for u in uuids), "the restarted libvirtd found its old guests running"
    daemon = cli.daemon("c", tmp_path / "daemon-c.log")
    try:
        wait_until("the old copies destroyed", lambda: all(_no_domain(c, u) for u in uuids), 120)
        wait_until("c heartbeats again", lambda: cli.ok("host", "show", "c")["last_heartbeat"] is not None, 30)
    finally:
        cli.stop(daemon)
    for uuid in uuids:
        assert a.state(uuid) == RUNNING and c.domain(uuid) is None
        assert _qemu_copies(uuid) == 1, "exactly one running copy, on a"
        assert uuid not in c.volumes(), "the old disk is gone"
        notes = [h for h in cli.ok("history", uuid) if h["operation"] == "destroy_evacuated"]
        assert len(notes) == 1 and "on c" in notes[0]["message"] and notes[0]["cause"] == "sync"
    assert {m["status"] for m in cli.ok("migration", "list")} == {"completed"}
    for uuid in uuids:
        cli.ok("delete", uuid)


def _kill_and_evacuate(cli: Cli, third_host: Path, a: HostView, uuids: list[str]) -> None:
    """SIGKILL c's libvirtd, wait until c is down, refuse while unfenced, fence, evacuate every instance to a."""
    os.kill(_pid(third_host / "libvirtd.pid"), signal.SIGKILL)  # its QEMU guests keep running
    wait_until("the guests run on after libvirtd died", lambda: all(_qemu_copies(u) == 1 for u in uuids), 30)

    def down() -> subprocess.CompletedProcess[str] | None:
        """The refusal once it no longer says c is up (its last heartbeat, at set-up, older than 2 s)."""
        refused = cli.run("host", "evacuate", "c", host_down_after=2)
        return None if "not down" in refused.stderr else refused

    refused = wait_until("c down: evacuate refused for want of a fence alone", down, 30, interval=0.5)
    assert refused.returncode == 2 and "not fenced" in refused.stderr, refused.stderr
    assert json.loads(refused.stdout)["error"] == "HostNotEvacuable"
    cli.ok("host", "fence", "c", "--reason", "libvirtd killed by the test", "--actor", "ops")
    out = cli.ok("host", "evacuate", "c", host_down_after=2)
    assert "data on the dead host's disk is lost" in out["note"]
    assert sorted(r["uuid"] for r in out["instances"]) == sorted(uuids)
    assert {(r["outcome"], r["host"]) for r in out["instances"]} == {("evacuated", "a")}, out
    for uuid in uuids:
        shown = cli.ok("show", uuid)
        assert (shown["host"], shown["status"], shown["name"]) == ("a", "ACTIVE", f"vm{uuids.index(uuid)}")
        assert a.state(uuid) == RUNNING
    migrations = cli.ok("migration", "list")
    assert {(m["kind"], m["source_host"], m["dest_host"], m["status"]) for m in migrations} == {
        ("evacuation", "c", "a", "done")
    }
    assert all(_qemu_copies(u) == 2 for u in uuids), "the dead host's copies still run: the disaster to undo"
