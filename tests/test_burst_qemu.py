"""Many builds on one real host at once (issue 31): bursts of creates, deletes, moves and unshelves on QEMU.

The host under the burst is the second libvirtd (``scripts/second-host.sh``, reached over
``qemu+tcp://``), fresh for each test: its pools are made by the first build of the burst,
while the others create and upload volumes into them. libvirt refuses a pool refresh while a
volume of the pool is being built ("has asynchronous jobs running"), so a driver that refreshed
or took that answer for a missing domain fails part of every burst. Guests are 32 MiB TCG
domains on a 64 MiB image; every instance must end ACTIVE (or gone), and nothing may be left on
the host after the deletes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from lifecycle import Engine, Flavor, Settings, upgrade
from tests.conftest import QEMU_URI, RemoteHost, qemu_ready

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

FLAVOR = Flavor(vcpus=1, memory_mb=32, root_gb=1, name="burst")
ROOT = Path(__file__).parents[1]


def _settings(**extra: Any) -> Settings:
    return Settings(
        **{"workers": 16, "shutdown_timeout": 0.0, "host_down_after": 3600.0, "max_concurrent_builds": 10, **extra}
    )


@pytest.fixture
def burst(
    tmp_path: Path, remote_host: RemoteHost, remote_instances: PurePosixPath, base_image: Path
) -> Iterator[Engine]:
    """An engine on a SQLite file with host ``b`` (the second libvirtd, fresh folder) and ``a`` (this machine's)."""
    qemu_ready()
    url = f"sqlite:///{tmp_path / 'burst.sqlite'}"
    upgrade(url)
    engine = Engine(url, settings=_settings())
    engine.hosts.add(
        "b",
        remote_host.uri,
        str(remote_instances),
        vcpus=512,
        memory_mb=65536,
        disk_gb=4096,
        console_address="127.0.0.2",
    )
    engine.hosts.add("a", QEMU_URI, str(tmp_path / "a"), vcpus=512, memory_mb=65536, disk_gb=4096)
    engine.images.add("tiny", str(base_image))
    for host in ("a", "b"):
        engine.hosts.heartbeat(host)
    yield engine
    engine.close()


def _states(engine: Engine, uuids: list[str]) -> dict[str, list[str]]:
    """The instances by vm_state, with the last audit message of those not active (their cause)."""
    by: dict[str, list[str]] = {}
    for uuid in uuids:
        instance = engine.get(uuid)
        state = instance.vm_state.value
        detail = "" if state == "active" else f": {engine.history(uuid)[-1].message}"
        by.setdefault(state, []).append(uuid + detail)
    return by


def _left_on(uri: str, folder: PurePosixPath) -> list[str]:
    """Domains and disk volumes on the host at ``uri`` that belong to the pools under ``folder``."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        left = []
        for pool in conn.listAllStoragePools(0):
            if str(folder) not in pool.XMLDesc(0) or not pool.isActive() or not pool.name().endswith("-disks"):
                continue
            pool.refresh(0)
            left += [f"volume {v.name()}" for v in pool.listAllVolumes(0)]
        for dom in conn.listAllDomains(0):
            if str(folder) in dom.XMLDesc(0):
                left.append(f"domain {dom.name()}")
        return left
    finally:
        conn.close()


def test_32_creates_at_once_onto_one_fresh_host_all_active_then_all_deleted_at_once(
    burst: Engine, remote_host: RemoteHost, remote_instances: PurePosixPath
) -> None:
    """32 creates onto one fresh host from one engine all end ACTIVE (beyond 10 they queue), and 32 deletes leave nothing."""
    engine = burst
    tasks = [engine.create(f"vm{i}", host="b", flavor=FLAVOR, image="tiny", wait=False) for i in range(32)]
    engine.runner.wait_idle()
    uuids = [t.instance_uuid for t in tasks]
    assert _states(engine, uuids).keys() == {"active"}, _states(engine, uuids)
    queued = [t.id for t in tasks if any(s.name == "queued_for_build_slot" for s in engine.steps(t.id))]
    assert queued, "16 workers and 10 build slots: some builds must have queued"
    for uuid in uuids:
        engine.delete(uuid, wait=False)
    engine.runner.wait_idle()
    assert {engine.get(u).vm_state.value for u in uuids} == {"deleted"}
    assert _left_on(remote_host.uri, remote_instances) == []


_WORKER = textwrap.dedent(
    """
    import json, sys
    from lifecycle import Engine, Flavor, Settings
    url, prefix = sys.argv[1], sys.argv[2]
    settings = Settings(workers=4, shutdown_timeout=0.0, host_down_after=3600.0)
    with Engine(url, settings=settings) as engine:
        flavor = Flavor(vcpus=1, memory_mb=32, root_gb=1, name="burst")
        tasks = [engine.create(f"{prefix}-{i}", host="b", flavor=flavor, image="tiny", wait=False) for i in range(4)]
        engine.runner.wait_idle()
        print(json.dumps([t.instance_uuid for t in tasks]))
    """
)


def test_16_creates_from_4_processes_onto_one_fresh_host_all_active(
    burst: Engine, tmp_path: Path, remote_host: RemoteHost, remote_instances: PurePosixPath
) -> None:
    """Four processes create four instances each, at once, onto one fresh host over one SQLite file: all 16 ACTIVE."""
    url = str(burst.store.engine.url)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, f"p{n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for n in range(4)
    ]
    uuids: list[str] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-2000:]
            uuids += json.loads(out.decode().strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(uuids) == 16
    assert _states(burst, uuids).keys() == {"active"}, _states(burst, uuids)
    for uuid in uuids:
        burst.delete(uuid, wait=False)
    burst.runner.wait_idle()
    assert _left_on(remote_host.uri, remote_instances) == []


def test_8_moves_into_one_host_then_8_unshelves_onto_one_host_at_once(
    burst: Engine, tmp_path: Path, remote_host: RemoteHost, remote_instances: PurePosixPath
) -> None:
    """Eight guests moved at once from a into b all arrive; shelved and offloaded, all eight unshelved at once onto a."""
    engine = burst
    uuids = [engine.create(f"vm{i}", host="a", flavor=FLAVOR, image="tiny", wait=False).instance_uuid for i in range(8)]
    engine.runner.wait_idle()
    assert _states(engine, uuids).keys() == {"active"}, _states(engine, uuids)
    for uuid in uuids:
        engine.migrate(uuid, host="b", wait=False)
    engine.runner.wait_idle()
    assert _states_named(engine, uuids) == {"resized"}, _states(engine, uuids)
    for uuid in uuids:
        engine.confirm_resize(uuid, wait=False)
    engine.runner.wait_idle()
    assert {engine.get(u).host for u in uuids} == {"b"}
    for uuid in uuids:
        engine.shelve(uuid, wait=False)
    engine.runner.wait_idle()
    for uuid in uuids:
        if engine.get(uuid).vm_state.value == "shelved":
            engine.shelve_offload(uuid, wait=False)
    engine.runner.wait_idle()
    assert _states_named(engine, uuids) == {"shelved_offloaded"}, _states(engine, uuids)
    for uuid in uuids:
        engine.unshelve(uuid, host="a", wait=False)
    engine.runner.wait_idle()
    assert _states(engine, uuids).keys() == {"active"}, _states(engine, uuids)
    assert {engine.get(u).host for u in uuids} == {"a"}
    for uuid in uuids:
        engine.delete(uuid, wait=False)
    engine.runner.wait_idle()
    assert _left_on(remote_host.uri, remote_instances) == []
    assert _left_on(QEMU_URI, PurePosixPath(tmp_path / "a")) == []


def _states_named(engine: Engine, uuids: list[str]) -> set[str]:
    return {engine.get(u).vm_state.value for u in uuids}
