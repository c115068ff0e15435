"""An operator's duties, configuration and metrics on real QEMU, driven through the command line.

Every engine setting comes from a config file (``LIFECYCLE_CONFIG``), as an operator would set it:
TCG guests, no clean-shutdown wait (these guests have no OS), a short reclaim interval and confirm
window. Hosts: ``a`` is ``qemu:///system`` (instances under the test's ``tmp_path``), ``b`` the
second libvirtd reached only over TCP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import QEMU_URI, qemu_ready, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

LIFECYCLE = str(Path(sys.executable).with_name("lifecycle"))


class Cli:
    """Runs the installed ``lifecycle`` with the test's database and config file."""

    def __init__(self, tmp_path: Path, config: Path) -> None:
        self.env = {**os.environ, "LIFECYCLE_CONFIG": str(config)}
        self.env.pop("LIFECYCLE_DB_URL", None)  # the config file names the database
        self.tmp_path = tmp_path

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [LIFECYCLE, *args], capture_output=True, text=True, env=self.env, timeout=180, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"lifecycle {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def daemon(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [LIFECYCLE, "daemon", "--claim-interval", "0.2", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )


def _stop(proc: subprocess.Popen[str]) -> str:
    """Stop a daemon by its pid (SIGTERM), wait, and return its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return err


def _libvirt_domains(uri: str) -> dict[str, int]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        return {d.UUIDString(): d.state()[0] for d in conn.listAllDomains(0) if d.name().startswith("lifecycle-")}
    finally:
        conn.close()


@pytest.fixture
def cli(tmp_path: Path, remote_instances: PurePosixPath, base_image: Path) -> Iterator[Cli]:
    """A database, hosts a and b, an image, and every setting from a config file."""
    qemu_ready()
    tmp_path.chmod(0o755)
    config = tmp_path / "lifecycle.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "op.db"}"\n'
        'libvirt_domain_type = "qemu"\n'
        "shutdown_timeout = 0\n"
        "soft_reboot_seconds = 1\n"
        "reclaim_instance_interval = 3\n"
        "resize_confirm_window = 1\n"
        "host_down_after = 6\n"
        "sync_interval = 0.5\n"
    )
    run = Cli(tmp_path, config)
    run("db", "upgrade")
    run("host", "add", "a", "--uri", QEMU_URI, "--instances-path", str(tmp_path / "a"))
    remote = ["--uri", os.environ["LIFECYCLE_TEST_REMOTE_URI"], "--console-address", "127.0.0.2"]
    run("host", "add", "b", *remote, "--instances-path", str(remote_instances))
    for host in ("a", "b"):
        run("host", "heartbeat", host)
    run("image", "add", "base", "--path", str(base_image))
    yield run


def _create(cli: Cli, name: str = "vm", host: str = "a") -> str:
    return str(cli.json("create", name, "--host", host, "--flavor", "vcpus=1,ram=64,disk=1", "--image", "base")["uuid"])


def test_config_show_reads_the_file_back(cli: Cli) -> None:
    """`config show` reports the file's values (TCG, the window, the reclaim interval) as coming from the file."""
    rows = {r["key"]: (r["value"], r["source"]) for r in cli.json("config", "show")}
    source = f"file {cli.env['LIFECYCLE_CONFIG']}"
    assert rows["libvirt_domain_type"] == ("qemu", source)
    assert rows["resize_confirm_window"] == (1.0, source)
    assert rows["reclaim_instance_interval"] == (3.0, source)
    assert rows["scheduler.max_attempts"][1] == "default"


def test_delete_is_a_soft_delete_restorable_then_reclaimed_by_the_daemon(cli: Cli) -> None:
    """With the reclaim interval set, delete keeps the guest (off); restore brings it back; the daemon reclaims a second delete."""
    uuid = _create(cli)
    assert cli.json("delete", uuid)["vm_state"] == "soft-delete"  # Nova spells the vm_state so
    assert _libvirt_domains(QEMU_URI)[uuid] == 5  # VIR_DOMAIN_SHUTOFF: kept, off
    assert cli.json("restore", uuid)["status"] == "ACTIVE"
    assert _libvirt_domains(QEMU_URI)[uuid] == 1  # running again
    cli("delete", uuid)
    daemon = cli.daemon("--host", "a")
    try:
        wait_until("the reclaim", lambda: cli.json("show", uuid)["vm_state"] == "deleted", 60, interval=0.2)
    finally:
        _stop(daemon)
    assert uuid not in _libvirt_domains(QEMU_URI)
    assert not list((Path(cli.tmp_path) / "a" / "disks").glob(f"{uuid}*"))  # the disk volume went with it
    history = cli.json("history", uuid)
    assert (history[-1]["cause"], history[-1]["actor"]) == ("timer", "timer:reclaim")


def test_lock_refuses_stop_and_force_passes_on_a_real_guest(cli: Cli) -> None:
    """A locked guest refuses stop (exit 2, naming the lock, the guest still running); --force stops it."""
    uuid = _create(cli)
    cli("lock", uuid, "--reason", "under investigation", "--actor", "ops")
    refused = cli("stop", uuid, check=False)
    assert refused.returncode == 2 and "locked by ops" in refused.stderr and "under investigation" in refused.stderr
    assert _libvirt_domains(QEMU_URI)[uuid] == 1
    assert cli.json("stop", uuid, "--force")["status"] == "SHUTOFF"
    assert _libvirt_domains(QEMU_URI)[uuid] == 5
    cli("unlock", uuid, "--actor", "ops")
    cli("delete", uuid, "--force")  # reclaim is on: soft delete; then for good
    cli("force-delete", uuid)


def test_reset_state_frees_an_instance_whose_task_is_stuck(cli: Cli) -> None:
    """A stop whose engine died mid-task (SIGKILL) leaves the task stuck; reset-state ends it; the next pass fixes power."""
    uuid = _create(cli)
    proc = subprocess.Popen(
        [LIFECYCLE, "stop", uuid, "--timeout", "60"], env=cli.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until("the stop to start", lambda: cli.json("show", uuid)["task_state"] == "powering-off", 60, interval=0.2)
    proc.kill()  # the engine dies inside the clean-shutdown wait: the guest ignores ACPI, the task is stuck
    proc.wait(10)
    assert cli.json("show", uuid)["task_state"] == "powering-off"
    done = cli.json("reset-state", uuid, "--reason", "engine died during stop", "--actor", "oncall")
    assert (done["vm_state"], done["task_state"]) == ("error", None)
    [*_, stuck] = cli.json("tasks", uuid)
    assert stuck["outcome"] == "failed" and "oncall" in stuck["error"]
    cli("sync", "--once", "--host", "a")
    assert cli.json("show", uuid)["power_state"] == 1  # the guest still runs; power is in line
    cli("reset-state", uuid, "--state", "active", "--reason", "checked")
    assert cli.json("stop", uuid)["status"] == "SHUTOFF"
    cli("force-delete", uuid)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_daemon_obeys_the_window_and_its_metrics_show_a_drifting_guest(cli: Cli) -> None:
    """The daemon obeys the file's 1 s confirm window, and its metrics count a real guest's drift and the action."""
    uuid = _create(cli)
    assert cli.json("migrate", uuid, "--host", "b")["status"] == "VERIFY_RESIZE"
    other = _create(cli, "drifter")
    port = _free_port()
    daemon = cli.daemon("--metrics-listen", f"127.0.0.1:{port}")
    try:
        wait_until("the confirm window", lambda: cli.json("show", uuid)["status"] == "ACTIVE", 120, interval=0.2)
        migration = cli.json("migration", "list")[0]
        assert migration["status"] == "confirmed"
        subprocess.run(
            ["virsh", "-q", "-c", QEMU_URI, "destroy", f"lifecycle-{other}"], check=True, capture_output=True
        )
        rule = ("lifecycle_sync_actions_total", (("host", "a"), ("rule", "active_but_off:adopt")))

        def counted() -> bool:
            try:
                return _metrics(port).get(rule, 0) >= 1
            except OSError:
                return False

        wait_until("the drift in the metrics", counted, 60, interval=0.2)
        samples = _metrics(port)
        assert samples[("lifecycle_resize_window_total", (("action", "confirm_resize"), ("outcome", "done")))] >= 1
        assert samples[("lifecycle_host_up", (("host", "a"),))] == 1
        assert samples[("lifecycle_host_up", (("host", "b"),))] == 1
        assert samples[("lifecycle_sync_passes_total", (("host", "b"), ("result", "ok")))] >= 1
        assert cli.json("show", other)["status"] == "SHUTOFF"
    finally:
        err = _stop(daemon)
    assert daemon.returncode == 0, err[-2000:]
    for vm in (uuid, other):
        cli("force-delete", vm)
