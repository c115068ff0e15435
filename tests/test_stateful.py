"""Property-based stateful test: random operations, faults, host failures, out-of-band changes and crashes.

One engine drives three fake hosts with tracked resources, so claims matter
and a full host is refused. The rules explore the failure paths: builds that
find no host or fail on every host they try (rescheduled), disabled, down and
removed hosts, driver calls raising any kind of exception (not only
DriverError) before or after acting, hypervisors unreachable for a while,
idempotency keys replayed and reused, sync passes that reap the guests of
deleted instances, and crashes after a random driver call followed by a
restart that recovers once the dead engine's leases ran out (under its owner
name, or another), sometimes while no hypervisor answers. Hosts die (their
guests lose power), are fenced and evacuated, and come back. Guests write
data markers into their disks, and workers stall inside a driver call while
a forced recovery (a second engine under the same owner name) or a delete
takes their task over, then wake up (issue 23: ownership reaches the
hypervisor).

After every step the SPEC section 1 invariants hold, claims equal the sum of
what the live instances hold per host, and every task has ended; no data a
guest wrote is lost from the disk that holds the instance (by design a
rebuild or an evacuation starts from the image, a revert goes back to the
disk kept on the source, and a delete that failed may have destroyed the
disk already); at most one copy of an instance runs across
the hosts; every call either succeeded into a state the operations table
promises, was refused without changing anything, or failed into a state the
table allows.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lifecycle import (
    Engine,
    Flavor,
    HostInUse,
    IdempotencyMismatch,
    InvalidInput,
    InvalidState,
    Outcome,
    PowerState,
    Preempted,
    Settings,
    TaskFailed,
    VmState,
    graph,
    upgrade,
)
from lifecycle.drivers.fake import FakeDriver, Gate, SimulatedCrash
from lifecycle.errors import DomainNotFound, DriverError, DriverUnavailable, EvacuatedCopiesPending, Fenced
from lifecycle.records import Host, Instance, Task
from lifecycle.snapshots import snapshot_of
from tests.conftest import wait_until
from tests.images import fake_image
from tests.invariants import check_claims, check_invariants, check_no_deleted_guests, check_tasks_ended

OPERATIONS = sorted(
    {
        "start",
        "stop",
        "reboot",
        "reboot_hard",
        "pause",
        "unpause",
        "suspend",
        "resume",
        "rescue",
        "unrescue",
        "rebuild",
        "shelve",
        "unshelve",
        "soft_delete",
        "restore",
        "delete",
        "force_delete",
    }
)
MOVES = ["resize", "migrate", "migrate_to", "confirm_resize", "revert_resize"]
DRIVER_CALLS = sorted(
    {
        "spawn",
        "destroy",
        "power_on",
        "power_off",
        "reboot",
        "pause",
        "unpause",
        "suspend",
        "resume",
        "rescue",
        "unrescue",
        "migrate_disk_and_power_off",
        "finish_migration",
        "confirm_migration",
        "finish_revert_migration",
        "get_info",
        "list_instances",
    }
)
"""Every driver method the engine calls on these paths: any of them may fail, with any exception."""
CRASH_CALLS: dict[str, list[str]] = {
    "start": ["power_on"],
    "stop": ["power_off"],
    "reboot": ["reboot"],
    "reboot_hard": ["reboot"],
    "pause": ["pause"],
    "unpause": ["unpause"],
    "suspend": ["suspend"],
    "resume": ["resume"],
    "rescue": ["rescue"],
    "unrescue": ["unrescue"],
    "rebuild": ["destroy", "spawn", "power_off"],
    "shelve": ["power_off", "snapshot", "destroy"],
    "unshelve": ["spawn_from_snapshot", "power_on"],
    "soft_delete": ["confirm_migration", "power_off"],
    "restore": ["power_on"],
    "delete": ["confirm_migration", "power_off", "destroy"],
    "force_delete": ["confirm_migration", "destroy"],
    "resize": ["migrate_disk_and_power_off", "finish_revert_migration", "finish_migration"],
    "migrate": ["migrate_disk_and_power_off", "finish_revert_migration", "finish_migration"],
    "migrate_to": ["migrate_disk_and_power_off", "finish_revert_migration", "finish_migration"],
    "confirm_resize": ["confirm_migration"],
    "revert_resize": ["power_off", "finish_revert_migration", "destroy"],
}
"""Per operation (or move, as spelled in MOVES), the driver calls after which its process may die."""
STALL_CALLS: dict[str, list[str]] = {
    "create": ["spawn", "get_info"],
    "stop": ["power_off"],
    "rebuild": ["remove", "spawn", "power_off"],
    "shelve": ["power_off", "snapshot", "destroy"],
    "unshelve": ["spawn_from_snapshot", "copy", "power_on"],
    "delete": ["power_off", "destroy"],
    "force_delete": ["destroy"],
    "resize": ["migrate_disk_and_power_off", "copy", "finish_migration", "get_info"],
    "migrate": ["migrate_disk_and_power_off", "copy", "finish_migration", "get_info"],
    "migrate_to": ["migrate_disk_and_power_off", "copy", "finish_migration", "get_info"],
    "confirm_resize": ["confirm_migration"],
    "revert_resize": ["power_off", "finish_revert_migration", "destroy"],
}
"""Per operation (or move, as spelled in MOVES), the driver calls its worker may stall in, before or after acting.

``copy`` is one chunk of a disk copy inside finish_migration or
spawn_from_snapshot (held before it only). ``get_info`` is the first power
read: a build's, after its spawn, before its end; a move's, before its steps
(before it picks and claims its destination).
"""
TAKEOVERS = ["recover", "delete", "force_delete"]
"""What takes a stalled worker's task over: a forced recovery by a second engine under the same owner name
(the task's epoch grows: the worker is fenced), or a delete preempting it (the worker is preempted)."""
KNOWN_DEFECTS: dict[tuple[str, str, bool, str], str] = {}
"""(operation, stalled call, held after it acted, takeover) -> a defect of the engine that stall finds: not run."""
STALL_SECONDS = 10.0
"""The bound on every wait of the stall rule: for the worker to reach its call, and to end once released."""
_OPERATION = {"migrate_to": "migrate"}
"""The operation a move of MOVES runs, where the names differ."""
ERRORS: dict[str, Callable[[str], Exception]] = {
    "DriverError": lambda call: DriverError(f"injected failure in {call}", call=call),
    "DriverUnavailable": lambda call: DriverUnavailable(f"{call}: injected outage", call=call),
    "DomainNotFound": lambda call: DomainNotFound("injected", call=call),
    "OSError": lambda call: OSError(28, f"No space left on device ({call})"),
    "JSONDecodeError": lambda call: json.JSONDecodeError("Expecting value", call, 0),
    "RuntimeError": lambda call: RuntimeError(f"bug in {call}"),
}
HOSTS = ("h1", "h2", "h3")
VCPUS, MEMORY_MB, DISK_GB = 4, 512, 3
"""Each host's resources: room for three small guests (disk allocation ratio 1.0), so hosts fill up."""
SMALL = Flavor(1, 64, 1, name="small")
MEDIUM = Flavor(2, 128, 1, name="medium")
LARGE = Flavor(2, 128, 2, name="large")
KEYS = ["k0", "k1", "k2"]
SETTINGS = Settings(shutdown_timeout=0, heartbeat_seconds=3600.0)
"""No clean-shutdown wait; no lease heartbeat thread writing during a step (leases are expired by hand).
Each example keeps its shelve snapshots in its own directory (``image_store_dir``)."""
WIPES = ("rebuild", "evacuate", "delete", "force_delete")
"""Tasks after which an instance's data may be gone by design: a rebuild or an evacuation starts from the image
(success or not: the old disk may be destroyed already), and a delete that failed (the instance ends in error) may
have destroyed the disk, as asked, before it failed."""
RUNNING_POWERS = (PowerState.RUNNING, PowerState.PAUSED)
"""The powers of a copy of a guest that runs (a paused guest holds its memory and resumes in place)."""
Location = tuple[str, str, str]
"""Where an instance's data lives: (uuid, host, root volume name), or (uuid, "snapshot", file path) when offloaded."""
_TEMPLATE: dict[str, Path] = {}


def _template_db() -> Path:
    """Migrate one database per session and copy it for each example (alembic is slow)."""
    if "db" not in _TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="lifecycle-hyp-")) / "template.db"
        upgrade(f"sqlite:///{path}")
        _TEMPLATE["db"] = path
    return _TEMPLATE["db"]


def expire_leases(engine: Engine) -> None:
    """Make the lease of every running task run out, as when its dead owner stopped renewing it long enough."""
    tasks = sa.table("tasks", sa.column("outcome"), sa.column("lease_expires_at", sa.DateTime(timezone=True)))
    past = datetime.now(UTC) - timedelta(seconds=engine.settings.lease_seconds + 1)
    with engine.store.engine.begin() as conn:
        conn.execute(sa.update(tasks).where(tasks.c.outcome == Outcome.RUNNING.value).values(lease_expires_at=past))


def in_order(content: str, markers: list[str]) -> bool:
    """Whether a fake disk's content (``image:<path>|m1|m2...``) holds every one of ``markers``, in that order."""
    written = iter(content.split("|")[1:])
    return all(marker in written for marker in markers)


def guests(fake: FakeDriver) -> dict[str, Any]:
    """Return a fake host's domains (uuid -> domain, with its ``power``) as they are, read without a driver call.

    ``list_instances`` would record a call, consume a fault scripted for it
    and raise while the host does not answer, though its guests still run.
    """
    with fake._lock:
        return dict(fake._domains)


class AfterGate:
    """Holds the next ``call`` of one fake host right after it acted (returned or raised), until released.

    The other half of ``FakeDriver.faults.hold``, which holds a call before it acts.
    A held call goes on by itself after ``timeout`` seconds, so a failing
    test ends instead of hanging the suite.
    """

    def __init__(self, fake: FakeDriver, call: str, timeout: float = 30.0) -> None:
        self.entered = threading.Event()
        self._released = threading.Event()
        self._armed = True
        self._lock = threading.Lock()
        self._fake, self._call = fake, call
        original = getattr(fake, call)

        def held(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    mine, self._armed = self._armed, False
                if mine:
                    self.entered.set()
                    self._released.wait(timeout)

        setattr(fake, call, held)

    def disarm(self) -> None:
        """Let the next calls through unheld (a call held already stays held until released)."""
        with self._lock:
            self._armed = False
        self._fake.__dict__.pop(self._call, None)

    def release(self) -> None:
        """Let the held call return."""
        self._released.set()


@dataclass(frozen=True, slots=True)
class KeyedCall:
    """The call an idempotency key named the first time it started a task."""

    operation: str
    uuid: str
    task_id: str
    outcome: Outcome


class Lifecycle(RuleBasedStateMachine):
    """Drives one engine over three resource-tracked fake hosts."""

    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lifecycle-hyp-"))
        shutil.copy(_template_db(), self.dir / "db.sqlite")
        self.fakes = {name: FakeDriver(name) for name in HOSTS}
        self.settings = replace(SETTINGS, image_store_dir=str(self.dir / "images"))
        self.owner = "stateful"
        self.restarts = 0
        self.engine = self._open()
        for name in HOSTS:
            self._add_host(name)
            self.engine.hosts.heartbeat(name)
        self.engine.images.add("cirros", fake_image("cirros"))
        self.uuids: list[str] = []
        self.keys: dict[str, KeyedCall] = {}
        self.writes = 0
        self.data: dict[str, list[str]] = {}
        """Per live instance, the markers its guest wrote that the disk holding the instance must keep, in order."""
        self.where: dict[str, Location] = {}
        """Per live instance, where its data was when the invariants last looked."""
        self.disks: dict[Location, list[str]] = {}
        """The markers each disk or snapshot holding an instance's data must keep, while it exists (a move's
        source keeps what was written before the move, for a revert)."""
        self.fresh_tasks: set[str] = set()
        """The tasks that may leave an instance's data gone by design (see WIPES) the invariants accounted for."""
        self.rogue: dict[tuple[str, str], Any] = {}
        """(host, uuid) -> the domain started there behind the engine's back: not the engine's copy."""

    def _add_host(self, name: str) -> None:
        self.engine.hosts.add(name, "fake://", vcpus=VCPUS, memory_mb=MEMORY_MB, disk_gb=DISK_GB)

    def _factory(self, host: Host) -> FakeDriver:
        return self.fakes[host.name]

    def _open(self) -> Engine:
        return Engine(
            f"sqlite:///{self.dir / 'db.sqlite'}",
            driver_factory=self._factory,
            owner=self.owner,
            settings=self.settings,
        )

    def teardown(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------

    def _present(self) -> list[str]:
        return [h.name for h in self.engine.hosts.list()]

    def _new_uuid(self) -> str:
        return f"00000000-0000-4000-8000-{len(self.uuids):012d}"

    def _invoke(self, op: str, uuid: str, target: str | None = None, key: str | None = None) -> Task:
        """Run ``op`` (an operation, or a move spelled as in MOVES) on ``uuid``, waiting for its end."""
        if op == "resize":
            flavor = LARGE if self.engine.get(uuid).flavor == MEDIUM else MEDIUM
            return self.engine.resize(uuid, flavor, idempotency_key=key)
        if op in ("migrate", "migrate_to"):
            return self.engine.migrate(uuid, host=target if op == "migrate_to" else None, idempotency_key=key)
        if op == "stop_timeout":
            return self.engine.stop(uuid, timeout=5.0, idempotency_key=key)
        return self.engine.run(op, uuid, idempotency_key=key)

    def _tasks(self, uuid: str) -> list[tuple[str, Outcome]]:
        return [(t.id, t.outcome) for t in self.engine.tasks(uuid)]

    def _check_call(self, op: str, uuid: str, target: str | None = None) -> None:
        """Run a call and check it ended as the table allows: refused unchanged, succeeded or failed into its states."""
        before, tasks = self.engine.get(uuid), self._tasks(uuid)
        name = _OPERATION.get(op, op)
        try:
            self._invoke(op, uuid, target)
        except (InvalidState, InvalidInput):
            assert (self.engine.get(uuid), self._tasks(uuid)) == (before, tasks), "a refused call changed something"
            return
        except TaskFailed as exc:
            after, task = self.engine.get(uuid), self.engine.task(exc.task.id)
            assert after.task_id is None and task.outcome is Outcome.FAILED and task.error and task.traceback, task
            assert after.vm_state in graph.operation(name).failure_states(before.vm_state), (before, after)
            return
        after = self.engine.get(uuid)
        assert after.vm_state in graph.operation(name).result_states() | {before.vm_state}
        assert after.task_state is None

    def _restart(self, crashed_call: str, new_owner: bool, outage: bool) -> None:
        """The process died: drop the faults of the crashed call, let its leases run out, open a new engine, recover.

        An unfired crash must not leak into later steps. The new engine
        carries the dead one's owner name (a restarted process) or another
        one (a second engine taking over). With ``outage`` no hypervisor
        answers while it recovers: every task still ends.
        """
        for fake in self.fakes.values():
            fake.faults.clear(crashed_call)
        self.engine.close()
        if new_owner:
            self.restarts += 1
            self.owner = f"stateful-{self.restarts}"
        self.engine = self._open()
        expire_leases(self.engine)
        reachable = {name: not fake.unreachable for name, fake in self.fakes.items()}
        for fake in self.fakes.values():
            fake.unreachable = fake.unreachable or outage
        self.engine.recover()
        for name, fake in self.fakes.items():
            fake.unreachable = not reachable[name]
        for instance in self.engine.list(include_deleted=True):
            assert instance.task_id is None, f"task left in flight on {instance.uuid} after recovery"

    def _instance_uuid(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(self.uuids), label="instance")

    # -- operations ------------------------------------------------------------

    @rule(
        data=st.data(),
        flavor=st.sampled_from([SMALL, LARGE]),
        named=st.booleans(),
        faults=st.lists(st.tuples(st.sampled_from(HOSTS), st.sampled_from(sorted(ERRORS)), st.booleans()), max_size=3),
    )
    def create(self, data: st.DataObject, flavor: Flavor, named: bool, faults: list[tuple[str, str, bool]]) -> None:
        """Build on a named host or where the scheduler puts it, spawns failing as scripted.

        It ends active on a host, or (no valid host, every attempt failed)
        error with no host and no claim, its domain destroyed wherever one was made.
        """
        present = self._present()
        host = data.draw(st.sampled_from(present), label="host") if named and present else None
        for name, error, after in faults:
            fake = self.fakes[name]
            (fake.faults.fail_after if after else fake.faults.fail_next)("spawn", ERRORS[error]("spawn"))
        calls = {name: len(fake.calls) for name, fake in self.fakes.items()}
        uuid = self._new_uuid()
        self.uuids.append(uuid)
        try:
            self.engine.create(f"vm{len(self.uuids)}", flavor=flavor, image="cirros", host=host, uuid=uuid)
        except TaskFailed as exc:
            task = self.engine.task(exc.task.id)
            assert task.instance_uuid == uuid and task.outcome is Outcome.FAILED and task.error and task.traceback
            i = self.engine.get(uuid)
            assert (i.vm_state, i.host, self.engine.store.claims.of(uuid)) == (VmState.ERROR, None, [])
            for name, fake in self.fakes.items():
                tried = "destroy" in fake.calls[calls[name] :]  # and failed: the reaper's job then
                assert tried or not fake.domain_exists(uuid), f"a failed build left its domain on {name}"
            return
        i = self.engine.get(uuid)
        assert i.vm_state is VmState.ACTIVE and i.host is not None and host in (None, i.host)
        assert self.fakes[i.host].domain_exists(uuid)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), op=st.sampled_from(OPERATIONS))
    def operate(self, data: st.DataObject, op: str) -> None:
        """Run a power, rebuild or delete operation on any instance, deleted and host-less ones included."""
        self._check_call(op, self._instance_uuid(data))

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), op=st.sampled_from(MOVES), dest=st.sampled_from(HOSTS))
    def move(self, data: st.DataObject, op: str, dest: str) -> None:
        """Resize, migrate (scheduled or to a named host), confirm or revert."""
        self._check_call(op, self._instance_uuid(data), dest)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), op=st.sampled_from([*OPERATIONS, "stop_timeout"]), key=st.sampled_from(KEYS))
    def keyed_call(self, data: st.DataObject, op: str, key: str) -> None:
        """A call with an idempotency key: first use runs it, a replay answers it, a reuse is refused."""
        uuid = self._instance_uuid(data)
        before, tasks = self.engine.get(uuid), self._tasks(uuid)
        first = self.keys.get(key)
        try:
            task = self._invoke(op, uuid, key=key)
        except IdempotencyMismatch:
            assert first is not None and (first.operation, first.uuid) != (op, uuid), (key, first)
            assert (self.engine.get(uuid), self._tasks(uuid)) == (before, tasks), "a refused reuse changed something"
            return
        except InvalidState:
            assert first is None, f"key {key} of {first} was not replayed"
            return
        except TaskFailed as exc:
            task = exc.task
        if first is not None:
            assert (first.operation, first.uuid, first.task_id) == (op, uuid, task.id), (key, first, task)
            assert task.outcome is first.outcome
            assert (self.engine.get(uuid), self._tasks(uuid)) == (before, tasks), "a replay ran something"
            return
        assert task.outcome in (Outcome.SUCCEEDED, Outcome.FAILED) and task.idempotency_key == key
        self.keys[key] = KeyedCall(op, uuid, task.id, task.outcome)

    # -- faults ----------------------------------------------------------------

    @rule(
        host=st.sampled_from(HOSTS),
        call=st.sampled_from(DRIVER_CALLS),
        after=st.booleans(),
        error=st.sampled_from(sorted(ERRORS)),
    )
    def inject_fault(self, host: str, call: str, after: bool, error: str) -> None:
        """Make a host's next call of one driver method raise any kind of exception, before or after acting."""
        fake = self.fakes[host]
        (fake.faults.fail_after if after else fake.faults.fail_next)(call, ERRORS[error](call))

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), dest=st.sampled_from(HOSTS), new_owner=st.booleans(), outage=st.booleans())
    def crash_and_recover(self, data: st.DataObject, dest: str, new_owner: bool, outage: bool) -> None:
        """The process dies after one of the driver calls of an operation its guard admits; a new engine recovers."""
        uuid = self._instance_uuid(data)
        vm_state = self.engine.get(uuid).vm_state
        admitted = [op for op in CRASH_CALLS if vm_state in graph.operation(_OPERATION.get(op, op)).allowed_vm_states]
        if not admitted:
            return
        op = data.draw(st.sampled_from(admitted), label="operation")
        call = data.draw(st.sampled_from(CRASH_CALLS[op]), label="crash after")
        for fake in self.fakes.values():
            fake.faults.crash_after(call)
        try:
            self._invoke(op, uuid, dest)
        except SimulatedCrash:
            pass
        except Exception:  # refused or failed without reaching the crash: nothing to recover
            pass
        self._restart(call, new_owner, outage)

    @rule(
        flavor=st.sampled_from([SMALL, LARGE]),
        call=st.sampled_from(["spawn", "destroy"]),
        new_owner=st.booleans(),
        outage=st.booleans(),
    )
    def crash_during_create(self, flavor: Flavor, call: str, new_owner: bool, outage: bool) -> None:
        """A build crashes after a spawn acted, or while destroying a failed spawn's leftover, then is recovered."""
        for fake in self.fakes.values():
            fake.faults.crash_after(call)
        uuid = self._new_uuid()
        self.uuids.append(uuid)
        try:
            self.engine.create(f"vm{len(self.uuids)}", flavor=flavor, image="cirros", uuid=uuid)
        except SimulatedCrash:
            pass
        except TaskFailed:
            pass
        self._restart(call, new_owner, outage)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """The guest of a live instance, running on its recorded host, writes a unique marker into its disk.

        The model then expects the instance's data to hold that marker (see
        no_data_lost). The guest writes into the disk its domain uses, which
        must be the root volume the instance records.
        """
        running: dict[str, str] = {}
        for i in self.engine.list():
            guest = None if i.host is None else guests(self.fakes[i.host]).get(i.uuid)
            if i.host is not None and guest is not None and guest.power == PowerState.RUNNING:
                running[i.uuid] = i.host
        if not running:
            return
        uuid = data.draw(st.sampled_from(sorted(running)), label="writer")
        host = running[uuid]
        fake = self.fakes[host]
        self.writes += 1
        marker = f"w{self.writes}"
        fake.write(uuid, marker)
        location = (uuid, host, fake.disk_of(uuid))
        assert location == self.where.get(uuid), f"{uuid} runs on {location}, not on its recorded disk"
        self.disks[location].append(marker)  # the instance's data (self.data[uuid] is this list)

    @rule(
        data=st.data(),
        op=st.sampled_from(sorted(STALL_CALLS)),
        after=st.booleans(),
        takeover=st.sampled_from(TAKEOVERS),
        dest=st.sampled_from(HOSTS),
    )
    def stall(self, data: st.DataObject, op: str, after: bool, takeover: str, dest: str) -> None:
        """A worker stalls in a driver call; its task is taken over; it wakes up: fenced or preempted, never hung.

        The call is held on every host (the first to reach it holds; the
        others are dropped), before it acts or right after. A forced recovery
        by a second engine under the same owner name finishes or rolls back
        the task (the worker ends Fenced), or a delete preempts it (the worker
        ends Preempted). A worker that never reaches the call ends as usual.
        What the woken worker does must break no invariant (no data lost, no
        second running copy).
        """
        call = data.draw(st.sampled_from(STALL_CALLS[op]), label="stalled call")
        after = after and call != "copy"
        if (op, call, after, takeover) in KNOWN_DEFECTS:
            return
        if op == "create":
            uuid = self._new_uuid()
            self.uuids.append(uuid)
        elif self.uuids:
            uuid = self._instance_uuid(data)
            if self.engine.get(uuid).vm_state not in graph.operation(_OPERATION.get(op, op)).allowed_vm_states:
                return
        else:
            return
        gates: list[Gate | AfterGate] = [
            AfterGate(fake, call) if after else fake.faults.hold(call) for fake in self.fakes.values()
        ]
        ended: list[object] = []

        def work() -> None:
            try:
                if op == "create":
                    ended.append(self.engine.create(f"vm{len(self.uuids)}", flavor=SMALL, image="cirros", uuid=uuid))
                else:
                    ended.append(self._invoke(op, uuid, dest))
            except BaseException as exc:
                ended.append(exc)

        worker = threading.Thread(target=work, name=f"stalled-{op}", daemon=True)
        worker.start()
        held = self._held(gates, worker)
        for gate, fake in zip(gates, self.fakes.values(), strict=True):  # one stall only: drop the other holds
            if isinstance(gate, AfterGate):
                gate.disarm()
            else:
                fake.faults.clear(call)
        if not held:  # the operation ended without reaching the call
            for gate in gates:
                gate.release()
            worker.join(STALL_SECONDS)
            assert not worker.is_alive() and len(ended) == 1, f"{op} neither reached {call} nor ended"
            assert not isinstance(ended[0], SimulatedCrash | AssertionError), ended[0]
            return
        task_id = self.engine.get(uuid).task_id
        assert task_id is not None, f"{op} stalled in {call} with no task on {uuid}"
        if takeover == "recover":
            second = self._open()
            try:
                recovered = second.recover(force=True)
            finally:
                second.close()
            assert [r.task_id for r in recovered] == [task_id], recovered
        else:
            # A delete may fail (a host answering with an error); its task ends all the same.
            with contextlib.suppress(TaskFailed):
                self.engine.run(takeover, uuid)
        for gate in gates:
            gate.release()
        worker.join(STALL_SECONDS)
        assert not worker.is_alive(), f"the {op} worker stalled in {call} hangs once released"
        [result] = ended
        expected = Fenced if takeover == "recover" else Preempted
        assert isinstance(result, expected), f"the {op} worker stalled in {call} ended {result!r}, not {expected}"

    @staticmethod
    def _held(gates: list[Gate | AfterGate], worker: threading.Thread) -> bool:
        """Wait until a gate holds the worker (True) or the worker ended without reaching one (False)."""

        def held() -> bool:
            return any(gate.entered.is_set() for gate in gates)

        what = "the worker to reach its held call or end"
        wait_until(what, lambda: held() or not worker.is_alive(), STALL_SECONDS, interval=0.002)
        return held()

    # -- hosts -----------------------------------------------------------------

    @rule(host=st.sampled_from(HOSTS), up=st.booleans(), answering=st.booleans())
    def host_health(self, host: str, up: bool, answering: bool) -> None:
        """A host's daemon reports or has been silent past host_down_after; its hypervisor answers or not.

        All four combinations matter: a down host whose hypervisor does not
        answer gets local deletes (reaped once it answers again), an up one
        that does not answer fails them, and the scheduler avoids down hosts.
        A host fenced when it died is unfenced once it beats again (its
        evacuated copies destroyed first, or the heartbeat is refused).
        """
        self.fakes[host].unreachable = not answering  # every call raises DriverUnavailable meanwhile
        if host not in self._present():
            return
        if up:
            try:
                self.engine.hosts.heartbeat(host)
            except EvacuatedCopiesPending:  # refused, nothing written: the host's evacuated copies are not destroyed
                assert self.engine.store.moves.evacuations_from(host), (
                    f"{host} refused a heartbeat with nothing pending"
                )
                return
            self.engine.hosts.unfence(host, actor="stateful")  # a no-op unless it was fenced
        else:
            stale = datetime.now(UTC) - timedelta(seconds=SETTINGS.host_down_after + 5)
            self.engine.store.hosts.update(host, last_heartbeat=stale)

    @rule(host=st.sampled_from(HOSTS), answers=st.integers(min_value=1, max_value=4))
    def pool_busy(self, host: str, answers: int) -> None:
        """A host's storage pool answers busy (another call builds a volume there): the next pool calls wait it out.

        The answers stay pending for whichever operations, workers or checks
        come next on the host; nothing may fail for them (every invariant
        holds as if the pool had answered at once).
        """
        self.fakes[host].faults.busy_pool(answers)

    @precondition(lambda self: bool(self._present()))
    @rule(data=st.data(), back=st.booleans())
    def host_dies_and_is_evacuated(self, data: st.DataObject, back: bool) -> None:
        """A host dies (its guests lose power, its hypervisor and daemon go silent); fenced, its instances are evacuated.

        Each instance the guard admits is rebuilt from its image elsewhere (its
        data is lost by design: see no_data_lost). With ``back`` the host then
        returns: its hypervisor answers, its first heartbeat destroys the
        evacuated copies (never starting them), and its fence is lifted (see host_health).
        """
        host = data.draw(st.sampled_from(self._present()), label="host")
        fake = self.fakes[host]
        for uuid, domain in guests(fake).items():
            if domain.power != PowerState.SHUTDOWN:
                fake.set_power(uuid, PowerState.SHUTDOWN, event=False)
        self.host_health(host, up=False, answering=False)
        if not self.engine.hosts.get(host).fenced:
            self.engine.hosts.fence(host, reason="power lost", actor="stateful")
        results = self.engine.hosts.evacuate(host)
        evacuated = [r.uuid for r in results if r.outcome == "evacuated"]
        for uuid in evacuated:
            assert self.engine.get(uuid).host not in (None, host), self.engine.get(uuid)
        if not back:
            return
        fake.faults.clear()  # a heartbeat under injected faults is refused (see host_health)
        self.host_health(host, up=True, answering=True)
        for uuid in evacuated:
            assert not fake.domain_exists(uuid), f"the evacuated copy of {uuid} is still on {host}"
        assert not self.engine.hosts.get(host).fenced

    @rule(data=st.data(), enabled=st.booleans())
    def set_host_enabled(self, data: st.DataObject, enabled: bool) -> None:
        """Disable a host for scheduling (its instances stay and are still served) or enable it again."""
        present = self._present()
        if present:
            self.engine.hosts.set_enabled(data.draw(st.sampled_from(present), label="host"), enabled)

    @rule(data=st.data(), force=st.booleans())
    def remove_host(self, data: st.DataObject, force: bool) -> None:
        """Remove a host: refused while instances live there, else (forced) they are orphaned to error, host-less."""
        present = self._present()
        if not present:
            return
        host = data.draw(st.sampled_from(present), label="host")
        live = {i.uuid: i for i in self.engine.list(host)}
        try:
            orphaned = self.engine.hosts.remove(host, force=force)
        except HostInUse:
            assert host in self._present() and {i.uuid: i for i in self.engine.list(host)} == live
            return
        assert host not in self._present() and sorted(orphaned) == sorted(live)
        for uuid in orphaned:
            i = self.engine.get(uuid)
            assert (i.vm_state, i.host, self.engine.store.claims.of(uuid)) == (VmState.ERROR, None, [])

    @precondition(lambda self: len(self._present()) < len(HOSTS))
    @rule(data=st.data())
    def add_host_back(self, data: st.DataObject) -> None:
        """Register a removed host again (its hypervisor kept whatever domains it had); it is down until it beats."""
        host = data.draw(st.sampled_from(sorted(set(HOSTS) - set(self._present()))), label="host")
        self._add_host(host)

    @precondition(lambda self: bool(self._present()))
    @rule(data=st.data(), every=st.booleans())
    def sync(self, data: st.DataObject, every: bool) -> None:
        """A clean sync pass of one host or of every host leaves no domain of a deleted instance on a reachable one.

        An unreachable host's pass reports its error and the other hosts are synced all the same.
        """
        present = self._present()
        hosts = present if every else [data.draw(st.sampled_from(present), label="host")]
        for host in hosts:
            self.fakes[host].faults.clear()  # a pass under injected faults may leave work for the next one
        summaries = self.engine.hosts.sync(None if every else hosts[0])
        assert [s.host for s in summaries] == hosts
        for summary in summaries:
            fake = self.fakes[summary.host]
            if fake.unreachable:
                assert summary.error is not None and "unreachable" in summary.error
                continue
            assert summary.error is None and summary.errors == 0, summary
            check_no_deleted_guests(self.engine.store, summary.host, fake.list_instances().owned)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), force=st.booleans())
    def delete_on_a_down_host_then_reap(self, data: st.DataObject, force: bool) -> None:
        """Delete an instance whose host is down and does not answer: a local delete; once back, a pass reaps it."""
        uuid = self._instance_uuid(data)
        host = self.engine.get(uuid).host
        if host is None or self.engine.get(uuid).vm_state is VmState.DELETED:
            return
        moving = self.engine.store.moves.open_of(uuid) is not None
        self.host_health(host, up=False, answering=False)
        try:
            self.engine.run("force_delete" if force else "delete", uuid)
        except TaskFailed:
            assert moving, "only the confirm of an open move, on its answering source, may fail such a delete"
        else:
            instance = self.engine.get(uuid)
            assert (instance.vm_state, instance.task_id) == (VmState.DELETED, None)
            assert self.engine.store.claims.of(uuid) == []
        self.host_health(host, up=True, answering=True)
        guest = self.fakes[host].domain_exists(uuid)
        self.fakes[host].faults.clear()
        (summary,) = self.engine.hosts.sync(host)
        assert summary.error is None and summary.errors == 0, summary
        deleted = self.engine.get(uuid).vm_state is VmState.DELETED
        assert (uuid in summary.reaped) == (guest and deleted), summary
        check_no_deleted_guests(self.engine.store, host, self.fakes[host].list_instances().owned)

    # -- out of band -----------------------------------------------------------

    @precondition(lambda self: bool(self.uuids))
    @rule(
        data=st.data(),
        power=st.sampled_from([PowerState.RUNNING, PowerState.SHUTDOWN, PowerState.PAUSED, PowerState.CRASHED]),
    )
    def out_of_band_power_change(self, data: st.DataObject, power: PowerState) -> None:
        """Change a guest's power behind the engine's back."""
        uuid = self._instance_uuid(data)
        instance = self.engine.get(uuid)
        for name, fake in self.fakes.items():
            if fake.domain_exists(uuid):
                fake.set_power(uuid, power)
                engines = instance.vm_state is not VmState.DELETED and name == instance.host
                if power in RUNNING_POWERS and not engines:  # a copy the engine never started: see one_copy_runs
                    self.rogue[(name, uuid)] = guests(fake).get(uuid)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data())
    def out_of_band_undefine(self, data: st.DataObject) -> None:
        """Remove a guest behind the engine's back."""
        uuid = self._instance_uuid(data)
        for fake in self.fakes.values():
            fake.undefine(uuid)

    @invariant()
    def invariants_hold(self) -> None:
        """SPEC section 1, claims equal what the instances hold, and every task has ended."""
        if hasattr(self, "engine"):
            check_invariants(self.engine.store)
            check_claims(self.engine.store)
            check_tasks_ended(self.engine.store)

    @invariant()
    def no_data_lost(self) -> None:
        """Every marker a guest wrote is kept, in order, by the disk that holds its live instance.

        Where an instance's data lives: on its host, the root volume it
        records (and the disk its domain there uses); offloaded, its snapshot
        image's file, which must exist. A new place holds what the previous
        one held (a move or an unshelve copies it, a shelve snapshots it),
        except after a task of WIPES (any outcome) moved it or its disk is
        gone: its markers are lost by design. A move's source keeps its
        disk, with what was written before the move, until confirm; a revert
        goes back to it (what was written on the destination is lost by
        design). Where the recorded disk does not exist (a move that failed
        before its copy was made), another disk of the instance still there
        (the source's kept one) must hold its data.
        """
        if not hasattr(self, "engine"):
            return
        fresh = self._fresh_disks()
        live = {i.uuid: i for i in self.engine.list(include_deleted=True) if i.vm_state is not VmState.DELETED}
        for uuid in set(self.data) - set(live):
            del self.data[uuid], self.where[uuid]
        self.disks = {loc: markers for loc, markers in self.disks.items() if loc[0] in live}
        for uuid, instance in live.items():
            location = self._location(instance)
            if location is None:
                continue
            moved = location != self.where.get(uuid)
            if uuid in fresh and (moved or self._content(location) is None):
                self.disks[location] = []  # started from the image (or its old disk destroyed): by design
            elif moved and location not in self.disks:
                self.disks[location] = list(self.data.get(uuid, []))  # a copy of the previous place
            elif not moved:
                continue
            self.data[uuid], self.where[uuid] = self.disks[location], location
        contents = {location: self._content(location) for location in self.disks}
        for uuid, instance in live.items():
            location = self.where.get(uuid)
            if location is None or contents.get(location) is not None or not self.data[uuid]:
                continue
            assert instance.vm_state is not VmState.SHELVED_OFFLOADED, f"{uuid} offloaded, its snapshot file is gone"
            kept = [
                loc
                for loc, content in contents.items()
                if loc[0] == uuid and content is not None and in_order(content, self.data[uuid])
            ]
            assert kept, f"{uuid} ({instance.vm_state}) lost its disk {location}; data {self.data[uuid]}"
        for location, content in contents.items():
            uuid, host, _ = location
            markers = self.disks[location]
            if content is None:
                del self.disks[location]  # destroyed (confirmed, unshelved, offloaded, cleared by a rebuild)
                continue
            assert in_order(content, markers), f"{location} holds {content!r}, lost some of {markers}"
            used = self.fakes[host].domain_disk(uuid) if location == self.where[uuid] and host in self.fakes else None
            assert used is None or in_order(used, markers), f"the domain of {uuid} on {host} uses {used!r}"

    @invariant()
    def one_copy_runs(self) -> None:
        """At most one copy of any instance runs (or is paused) across every host, answering or not.

        A copy started behind the engine's back (an out-of-band power change
        on a host that is not the instance's) is the operator's, not the engine's.
        """
        if not hasattr(self, "engine"):
            return
        running: dict[str, list[str]] = {}
        for name, fake in self.fakes.items():
            for uuid, domain in guests(fake).items():
                rogue = self.rogue.get((name, uuid))
                if domain.power in RUNNING_POWERS and rogue is not domain:
                    running.setdefault(uuid, []).append(name)
                elif rogue is not None:
                    del self.rogue[(name, uuid)]  # stopped or replaced since
        twice = {uuid: hosts for uuid, hosts in running.items() if len(hosts) > 1}
        if twice:
            twice = self._not_build_leftovers(twice)
        assert not twice, f"instances running on more than one host: {twice}"

    def _not_build_leftovers(self, twice: dict[str, list[str]]) -> dict[str, list[str]]:
        """Drop from ``twice`` the copies a rescheduled build left running where its spawn failed.

        DEFECT (build leftover running): a spawn that started the guest, then
        reported a failure, whose clean-up destroy also failed, is rescheduled
        and started on another host; the first copy keeps running (logged as
        failed_build_not_cleaned), and sync passes only log it as a domain of
        an instance living elsewhere (domains_of_instances_elsewhere), never
        stopping it (lifecycle/operations/build.py _build, lifecycle/sweep.py
        _living_elsewhere). Such a copy is the only one this invariant lets
        pass: on a host the instance is not recorded on, stamped by its create task.
        """
        rows = self.engine.store.sync.instances_by_uuid(sorted(twice))
        query = sa.text("SELECT instance_uuid, id FROM tasks WHERE operation = 'create'")
        with self.engine.store.engine.connect() as conn:
            builds: dict[str, str] = {row[0]: row[1] for row in conn.execute(query)}

        def build_leftover(uuid: str, host: str) -> bool:
            row, build = rows.get(uuid), builds.get(uuid)
            if row is None or row.vm_state is VmState.DELETED or host == row.host or build is None:
                return False
            return bool(guests(self.fakes[host])[uuid].task_id == build)

        return {
            uuid: hosts
            for uuid, hosts in twice.items()
            if len([host for host in hosts if not build_leftover(uuid, host)]) > 1
        }

    def _fresh_disks(self) -> set[str]:
        """Return the instances a task of WIPES (any outcome) ended on since the last look."""
        tasks = sa.table("tasks", sa.column("id"), sa.column("instance_uuid"), sa.column("operation"))
        query = sa.select(tasks.c.id, tasks.c.instance_uuid).where(tasks.c.operation.in_(WIPES))
        with self.engine.store.engine.connect() as conn:
            rows = [(task_id, uuid) for task_id, uuid in conn.execute(query) if task_id not in self.fresh_tasks]
        self.fresh_tasks.update(task_id for task_id, _ in rows)
        return {uuid for _, uuid in rows}

    def _location(self, instance: Instance) -> Location | None:
        if instance.vm_state is VmState.SHELVED_OFFLOADED:
            image = snapshot_of(self.engine.store, instance.uuid)
            assert image is not None, f"{instance.uuid} is offloaded without its snapshot image"
            return (instance.uuid, "snapshot", image.path)
        if instance.host is None:
            return None
        return (instance.uuid, instance.host, instance.disk or instance.uuid)

    def _content(self, location: Location) -> str | None:
        _, host, name = location
        if host == "snapshot":
            path = Path(name)
            return path.read_text() if path.is_file() else None
        return self.fakes[host].volumes().get(name)


# Derandomized: the same examples on every run, so the fast tier never flakes (about 20 s on two cores).
# To hunt for new defects, run a subclass of Lifecycle.TestCase with derandomize=False, more examples and
# steps, under several --hypothesis-seed values.
Lifecycle.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_lifecycle_state_machine = Lifecycle.TestCase
test_lifecycle_state_machine.__doc__ = (
    "Random operations, faults, host failures, out-of-band changes and crashes never break an invariant."
)
