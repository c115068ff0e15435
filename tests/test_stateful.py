"""Property-based stateful test: random operations, faults, out-of-band changes and crashes.

After every step the SPEC section 1 invariants hold, and every call either
succeeded into the state the operations table promises, was refused by its
guard without changing anything, or failed into a state the table allows. A
crash (after a random driver call) is followed by a restart: a new engine
with the same owner name recovers, and no task is left in flight.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from drivers.fake import FakeDriver, SimulatedCrash
from lifecycle import Engine, Flavor, InvalidState, PowerState, Settings, TaskFailed, graph, upgrade
from lifecycle.records import Host
from tests.images import fake_image
from tests.invariants import check_invariants

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
        "soft_delete",
        "restore",
        "delete",
        "force_delete",
    }
)
FAULTY_CALLS = [
    "power_on",
    "power_off",
    "reboot",
    "pause",
    "unpause",
    "suspend",
    "resume",
    "rescue",
    "destroy",
    "rebuild",
]
_TEMPLATE: dict[str, Path] = {}


def _template_db() -> Path:
    """Migrate one database per session and copy it for each example (alembic is slow)."""
    if "db" not in _TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="lifecycle-hyp-")) / "template.db"
        upgrade(f"sqlite:///{path}")
        _TEMPLATE["db"] = path
    return _TEMPLATE["db"]


class Lifecycle(RuleBasedStateMachine):
    """Drives one engine on one fake host."""

    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lifecycle-hyp-"))
        shutil.copy(_template_db(), self.dir / "db.sqlite")
        self.fake = FakeDriver("h1")

        def factory(_host: Host) -> FakeDriver:
            return self.fake

        self.factory = factory
        self.engine = self._open()
        self.engine.add_host("h1", "fake://")
        self.engine.add_image("cirros", fake_image("cirros"))
        self.uuids: list[str] = []

    def _open(self) -> Engine:
        return Engine(
            f"sqlite:///{self.dir / 'db.sqlite'}",
            driver_factory=self.factory,
            owner="stateful",
            settings=Settings(shutdown_timeout=0),
        )

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), op=st.sampled_from(OPERATIONS), call=st.sampled_from(FAULTY_CALLS))
    def crash_and_recover(self, data: st.DataObject, op: str, call: str) -> None:
        uuid = data.draw(st.sampled_from(self.uuids))
        self.fake.crash_after(call)
        try:
            self.engine.run(op, uuid)
        except SimulatedCrash:
            pass
        except Exception:  # refused or failed without reaching the crash: nothing to recover
            pass
        self.fake._faults.pop(call, None)  # an unfired crash must not leak into later steps
        self.engine.close()
        self.engine = self._open()
        self.engine.recover()
        for instance in self.engine.list(include_deleted=True):
            assert instance.task_id is None, f"task left in flight on {instance.uuid} after recovery"

    def teardown(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(fail=st.booleans())
    def create(self, fail: bool) -> None:
        if fail:
            self.fake.fail_next("spawn")
        try:
            task = self.engine.create(f"vm{len(self.uuids)}", host="h1", flavor=Flavor(1, 64, 1), image="cirros")
            uuid = task.instance_uuid
        except TaskFailed as exc:
            uuid = exc.task.instance_uuid
            assert self.engine.get(uuid).vm_state.value == "error"
        self.uuids.append(uuid)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data(), op=st.sampled_from(OPERATIONS))
    def operate(self, data: st.DataObject, op: str) -> None:
        uuid = data.draw(st.sampled_from(self.uuids))
        before = self.engine.get(uuid)
        try:
            self.engine.run(op, uuid)
        except InvalidState:
            assert self.engine.get(uuid) == before, "a refused call changed the instance"
            return
        except TaskFailed:
            after = self.engine.get(uuid)
            assert after.task_id is None
            assert after.vm_state in graph.operation(op).failure_states(before.vm_state)
            return
        after = self.engine.get(uuid)
        assert after.vm_state in graph.operation(op).result_states() | {before.vm_state}
        assert after.task_state is None

    @rule(call=st.sampled_from(FAULTY_CALLS), after=st.booleans())
    def inject_fault(self, call: str, after: bool) -> None:
        (self.fake.fail_after if after else self.fake.fail_next)(call)

    @precondition(lambda self: bool(self.uuids))
    @rule(
        data=st.data(),
        power=st.sampled_from([PowerState.RUNNING, PowerState.SHUTDOWN, PowerState.PAUSED, PowerState.CRASHED]),
    )
    def out_of_band_power_change(self, data: st.DataObject, power: PowerState) -> None:
        uuid = data.draw(st.sampled_from(self.uuids))
        if self.fake.domain_exists(uuid):
            self.fake.set_power(uuid, power)

    @precondition(lambda self: bool(self.uuids))
    @rule(data=st.data())
    def out_of_band_undefine(self, data: st.DataObject) -> None:
        self.fake.undefine(data.draw(st.sampled_from(self.uuids)))

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "engine"):
            check_invariants(self.engine.store)


Lifecycle.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_lifecycle_state_machine = Lifecycle.TestCase
test_lifecycle_state_machine.__doc__ = "Random operations, faults and out-of-band changes never break an invariant."
