"""A resize is scheduled by its new flavor's extra specs, which the flavor keeps through the move."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lifecycle import Engine, Flavor, Outcome, Settings, TaskFailed, VmState
from tests.conftest import FLAVOR, Fakes
from tests.images import fake_image
from tests.invariants import check_claims, check_invariants

SSD = Flavor(2, 128, 2, name="ssd", extra_specs=(("capabilities:ssd", "true"),))


@pytest.fixture
def cloud(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """Three fake hosts: h1 with no capabilities, h2 with spinning disks, h3 with an SSD."""
    engine = Engine(db_url, driver_factory=fakes.factory, settings=Settings(shutdown_timeout=0))
    for name, capabilities in (("h1", {}), ("h2", {"ssd": "false"}), ("h3", {"ssd": "true"})):
        engine.hosts.add(name, "fake://", capabilities=capabilities)
        engine.hosts.heartbeat(name)
    engine.images.add("cirros", fake_image("cirros"))
    yield engine
    check_invariants(engine.store)
    check_claims(engine.store)
    engine.close()


def test_a_resize_goes_to_the_host_its_extra_specs_ask_for(cloud: Engine) -> None:
    """Of the hosts with room, only the one having the capability the new flavor asks for is chosen."""
    uuid = cloud.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    task = cloud.resize(uuid, SSD)
    resized = cloud.get(uuid)
    assert (task.outcome, resized.vm_state, resized.host) == (Outcome.SUCCEEDED, VmState.RESIZED, "h3")
    assert task.params["flavor"]["extra_specs"] == {"capabilities:ssd": "true"}
    (migration,) = cloud.migrations()
    assert (migration.new_flavor, resized.flavor) == (SSD, SSD)  # kept with the move and on the instance
    cloud.confirm_resize(uuid)
    assert cloud.get(uuid).flavor == SSD


def test_a_resize_no_host_can_satisfy_is_refused_by_the_scheduler(cloud: Engine) -> None:
    """With the only SSD host disabled, the resize fails scheduling (NoValidHost naming the capability) and stays put."""
    uuid = cloud.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    cloud.hosts.set_enabled("h3", False)
    with pytest.raises(
        TaskFailed, match="h2: ComputeCapabilitiesFilter: capability ssd is 'false', flavor wants 'true'"
    ):
        cloud.resize(uuid, SSD)
    after = cloud.get(uuid)
    assert (after.vm_state, after.host, after.flavor, after.task_state) == (VmState.ACTIVE, "h1", FLAVOR, None)
    assert cloud.migrations() == []  # refused before a destination was claimed or a move recorded
