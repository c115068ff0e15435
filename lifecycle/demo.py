"""``lifecycle demo``: the engine end to end on a scratch SQLite database.

It builds an instance, walks it through the power operations, shows a driver
failure that leaves the vm_state intact, a stop preempted by a force delete
while the stop is stuck inside the hypervisor, and prints the audit log that
explains every change.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from drivers.base import Driver
from drivers.fake import FakeDriver
from lifecycle.audit import format_history
from lifecycle.engine import Engine
from lifecycle.errors import Preempted, TaskFailed
from lifecycle.records import Flavor, Host, to_plain
from lifecycle.store import upgrade

__all__ = ["run_demo"]


def run_demo(keep: str | None = None, *, as_json: bool = False) -> dict[str, Any]:
    """Run the demonstration; print as it goes (or one JSON document) and return the summary."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return _demo(Path(keep), as_json)
    with tempfile.TemporaryDirectory(prefix="lifecycle-demo-") as scratch:
        return _demo(Path(scratch), as_json)


def _demo(workdir: Path, as_json: bool) -> dict[str, Any]:
    say = (lambda *_: None) if as_json else print
    url = f"sqlite:///{workdir / 'lifecycle.db'}"
    upgrade(url)
    hypervisors: dict[str, FakeDriver] = {}

    def driver_for(host: Host) -> Driver:
        return hypervisors.setdefault(host.name, FakeDriver(host.name))

    summary: dict[str, Any] = {"database": url, "instances": {}}
    with Engine(url, driver_factory=driver_for) as engine:
        engine.add_host("compute-1", "fake://", str(workdir / "instances"))
        engine.add_image("cirros", str(workdir / "cirros.qcow2"))
        say(f"database: {url}\nhost compute-1 (fake hypervisor), image cirros\n")

        web = engine.create("web-1", host="compute-1", flavor=Flavor(1, 64, 1), image="cirros").instance_uuid
        say(f"created web-1 {web}: {engine.get(web).status}")
        for op in ("stop", "start", "reboot", "pause", "unpause", "suspend", "resume", "rescue", "unrescue"):
            engine.run(op, web)
            say(f"  {op:<9} -> {engine.get(web).status}")
        engine.reboot(web, hard=True)
        say(f"  reboot --hard -> {engine.get(web).status}")

        hypervisors["compute-1"].fail_next("pause")
        try:
            engine.pause(web)
        except TaskFailed as exc:
            say(f"\npause failed inside the hypervisor: {exc.error}")
            say(f"  guest unchanged, so the vm_state stays: {engine.get(web).status}")

        db = engine.create("db-1", host="compute-1", flavor=Flavor(2, 128, 2), image="cirros").instance_uuid
        gate = hypervisors["compute-1"].hold("power_off")
        stopper = threading.Thread(target=_stop_quietly, args=(engine, db))
        stopper.start()
        gate.wait_entered()
        say(f"\ncreated db-1 {db}; its stop is stuck in the hypervisor: task_state {engine.get(db).task_state}")
        engine.force_delete(db)
        say(f"  force_delete took over: {engine.get(db).status}")
        gate.release()
        stopper.join()
        stop_task = engine.tasks(db)[1]
        say(f"  the stop task ended {stop_task.outcome.value} by {stop_task.preempted_by}; the row was left alone")

        for name, uuid in (("web-1", web), ("db-1", db)):
            history = engine.history(uuid)
            summary["instances"][name] = {"instance": to_plain(engine.get(uuid)), "history": to_plain(history)}
            say(f"\naudit log of {name}:\n{format_history(history)}")
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _stop_quietly(engine: Engine, uuid: str) -> None:
    with contextlib.suppress(Preempted):
        engine.stop(uuid)
