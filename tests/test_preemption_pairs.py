"""Every (preempting operation, preempted driver call) pair: afterwards the hypervisor and the database agree.

The pairs come from the operations table (:func:`lifecycle.preemption.pairs`),
and the driver calls of each preempted operation from running it once on the
fake driver, so a new operation or a new driver call adds its rows here by
itself. Each case holds one driver call of the preempted operation inside
the fake hypervisor, runs the preempting operation, releases the call, waits
for both workers, and checks the rule of :mod:`lifecycle.preemption`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lifecycle import Engine, Flavor, InvalidState, Outcome, PowerState, Settings, VmState, preemption, upgrade
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image
from tests.invariants import check_invariants

V = VmState
BIGGER = Flavor(vcpus=2, memory_mb=128, root_gb=2, name="bigger")

# How to bring an instance to where each operation may start, and how to start it.
BEFORE: dict[str, list[str]] = {
    "start": ["stop"],
    "force_stop": ["stop"],
    "unpause": ["pause"],
    "resume": ["suspend"],
    "unrescue": ["rescue"],
    "restore": ["soft_delete"],
    "confirm_resize": ["migrate"],
    "revert_resize": ["migrate"],
    "shelve_offload": ["shelve"],
    "unshelve": ["shelve", "shelve_offload"],
}


_TEMPLATE: list[Path] = []


def _migrated(tmp_path: Path) -> str:
    """A SQLite database at head, copied from one migrated once (alembic per case would dominate the run)."""
    if not _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="lifecycle-pairs-")) / "template.db"
        upgrade(f"sqlite:///{template}")
        _TEMPLATE.append(template)
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE[0], tmp_path / "pairs.db")
    return f"sqlite:///{tmp_path / 'pairs.db'}"


def _cloud(tmp_path: Path) -> tuple[Engine, Fakes]:
    url = _migrated(tmp_path)
    fakes = Fakes()
    engine = Engine(
        url,
        driver_factory=fakes.factory,
        settings=Settings(shutdown_timeout=0, preempt_wait_seconds=10, shelved_offload_time=3600),
    )
    for host in ("h1", "h2"):
        engine.hosts.add(host, "fake://")
        engine.hosts.heartbeat(host)
        engine.hosts.driver(host)
    engine.images.add("cirros", fake_image())
    return engine, fakes


def _start(engine: Engine, op: str, uuid: str | None) -> str:
    """Start ``op`` without waiting; return the instance uuid."""
    if op == "create":
        return engine.create("vm", host="h1", flavor=FLAVOR, image="cirros", wait=False).instance_uuid
    assert uuid is not None
    if op == "resize":
        engine.resize(uuid, BIGGER, wait=False)
    elif op == "migrate":
        engine.migrate(uuid, host="h2", wait=False)
    else:
        engine.run(op, uuid, wait=False)
    return uuid


def _prepared(engine: Engine, op: str) -> str | None:
    if op == "create":
        return None
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    for step in BEFORE.get(op, []):
        if step == "migrate":
            engine.migrate(uuid, host="h2")
        else:
            engine.run(step, uuid)
    if op == "evacuate":  # its host must be down and fenced; the fake still answers, as a host coming back would
        engine.store.hosts.update("h1", last_heartbeat=None)
        engine.hosts.fence("h1", reason="dead", actor="test")
    return uuid


def _calls_of(tmp_path: Path, op: str) -> list[tuple[str, str]]:
    """Run ``op`` once and return the (host, driver call) pairs it made, first occurrence of each."""
    engine, fakes = _cloud(tmp_path / f"probe-{op}")
    uuid = _prepared(engine, op)
    marks = {h: len(f.calls) for h, f in fakes.items()}
    _start(engine, op, uuid)
    engine.runner.wait_idle()
    seen: list[tuple[str, str]] = []
    for host, fake in sorted(fakes.items()):
        for call in fake.calls[marks[host] :]:
            if ":" not in call and (host, call) not in seen:  # "power_off:clean" notes how, it is no call
                seen.append((host, call))
    engine.close()
    return seen


def _cases() -> list[tuple[str, str]]:
    return preemption.pairs()


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    """The driver calls each preemptable operation makes, recorded once per module."""
    root = tmp_path_factory.mktemp("probe")
    return {op: _calls_of(root, op) for op in sorted({victim for _, victim in _cases()})}


def _agree(engine: Engine, fakes: Fakes, uuid: str) -> None:
    i = engine.get(uuid)
    if i.vm_state is V.DELETED:
        assert not any(f.domain_exists(uuid) for f in fakes.values()), "a deleted instance left a domain"
        assert engine.store.claims.of(uuid) == []
        return
    assert i.host is not None
    assert i.power_state == fakes[i.host].get_info(uuid), (i.vm_state, i.power_state)
    for name, fake in fakes.items():
        if name != i.host and i.vm_state is not V.RESIZED:
            assert not fake.domain_exists(uuid), f"a domain left on {name}"


@pytest.mark.parametrize(("preemptor", "victim"), _cases(), ids=[f"{p}-over-{v}" for p, v in _cases()])
def test_preemption_pair_leaves_hypervisor_and_database_agreeing(
    tmp_path: Path, calls: dict[str, list[tuple[str, str]]], preemptor: str, victim: str
) -> None:
    """For each driver call of the victim held in flight, the preemptor wins and nothing disagrees afterwards."""
    assert calls[victim], f"{victim} made no driver call"
    for n, (host, call) in enumerate(calls[victim]):
        engine, fakes = _cloud(tmp_path / f"{n}")
        uuid = _prepared(engine, victim)
        gate = fakes[host].faults.hold(call)
        uuid = _start(engine, victim, uuid)
        assert gate.wait_entered(), f"{victim} never reached {call} on {host}"
        victim_task = engine.get(uuid).task_id
        try:
            took = engine.run(preemptor, uuid, wait=False)
        except InvalidState:
            took = None  # the guard refuses in this task_state: the victim simply finishes
        gate.release()
        engine.runner.wait_idle()
        where = f"{preemptor} over {victim} held in {call} on {host}"
        if took is not None:
            assert engine.task(took.id).outcome is Outcome.SUCCEEDED, where
            assert victim_task is not None and engine.task(victim_task).outcome is Outcome.PREEMPTED, where
            expected = V.DELETED if preemptor in ("delete", "force_delete") else V.ACTIVE
            assert engine.get(uuid).vm_state is expected, where
            if preemptor == "reboot_hard":
                assert engine.get(uuid).power_state is PowerState.RUNNING, where
        if victim == "evacuate":
            engine.hosts.destroy_evacuated("h1")  # what h1's daemon does first when the dead host answers again
        _agree(engine, fakes, uuid)
        check_invariants(engine.store)
        engine.close()


def test_every_pair_has_a_rule_and_the_counts_are_known() -> None:
    """50 delete pairs destroy late, hard reboot waits for pause and suspend and converges with the rest."""
    counts = {r: sum(1 for v in preemption.RULES.values() if v is r) for r in preemption.Rule}
    assert counts == {preemption.Rule.DESTROY_LATE: 50, preemption.Rule.WAIT: 2, preemption.Rule.CONVERGE: 4}
    assert set(preemption.RULES) == set(preemption.pairs())


def test_victims_cover_every_operation(calls: dict[str, list[tuple[str, str]]]) -> None:
    """Delete can take over every operation, so every operation's calls are exercised here."""
    from lifecycle import graph

    assert set(calls) == {op.name for op in graph.OPERATIONS}
    assert all(calls.values()), [op for op, made in calls.items() if not made]
