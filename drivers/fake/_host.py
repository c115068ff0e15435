"""The fake host's model: domains and volumes under one lock (and a state file), events, and the calls' frame.

Disks are volumes with a content (a string): a new one holds its image's
name, ``write`` appends a data marker to a running guest's disk, and a move or
a snapshot carries the content over, so a test can check no data is lost.
Domains carry the stamp of the attempt that made or last took them, and
volumes are named after it, as on libvirt. With a state file the model is
reloaded and saved around every change, under an exclusive flock.
"""

from __future__ import annotations

import fcntl
import json
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lifecycle.drivers.base import (
    Attempt,
    Console,
    DomainSpec,
    EventListener,
    LifecycleEvent,
    Listing,
    Transition,
)
from lifecycle.drivers.fake._faults import Faults
from lifecycle.errors import DomainNotFound, DriverError, Fenced, StaleObject
from lifecycle.states import PowerState

__all__ = ["Domain", "Host", "holds", "spec_values", "split_tag"]

P = PowerState
_TRANSITIONS = {P.RUNNING: Transition.STARTED, P.SHUTDOWN: Transition.STOPPED, P.PAUSED: Transition.PAUSED}


@dataclass(slots=True)
class Domain:
    """A fake domain: what it was defined from, its power, its disk and the attempt that made or last took it."""

    spec: dict[str, Any]
    power: int
    disk: str
    rescued: bool = False
    saved: bool = False
    ignores_acpi: bool = False
    vnc_port: int = 5900
    task_id: str | None = None
    epoch: int = 0

    def stamp(self, attempt: Attempt | None) -> None:
        self.task_id = None if attempt is None else attempt.task_id
        self.epoch = 0 if attempt is None else attempt.epoch

    def task_tag(self) -> str | None:
        return None if self.task_id is None else self.task_id.replace("-", "")[:12]


class Host(Faults):
    """One fake host's state and what every call does around its act; the contract's calls are in subclasses."""

    def __init__(self, name: str = "fake", *, state_path: str | Path | None = None) -> None:
        super().__init__(name)
        self._domains: dict[str, Domain] = {}
        self._volumes: dict[str, str] = {}
        """Root volume name to content."""
        self._foreign: list[str] = []
        self._listener: EventListener | None = None
        self._events: queue.Queue[LifecycleEvent | None] = queue.Queue()
        self._dispatcher: threading.Thread | None = None
        self._state_path = Path(state_path) if state_path else None
        self._next_port = 5900

    # -- behind the engine's back ----------------------------------------------

    def set_power(self, uuid: str, power: PowerState, *, event: bool = True) -> None:
        """Change a domain's power behind the engine's back; ``event=False`` does it silently (only a pass sees it)."""
        with self._state():
            self._domain(uuid, "set_power").power = int(power)
        if event:
            self._emit(uuid, power)

    def copy_domain_from(self, other: Host, uuid: str) -> None:
        """Define here the same domain and disk ``other`` has (a guest that seems to live on two hosts)."""
        with other._state():
            dom = other._domain(uuid, "copy_domain_from")
            content = other._volumes.get(dom.disk, "")
        with self._state():
            self._domains[uuid] = Domain(**asdict(dom))
            self._volumes[dom.disk] = content

    def undefine(self, uuid: str) -> None:
        """Remove a domain behind the engine's back (its disk stays)."""
        with self._state():
            self._domains.pop(uuid, None)

    def write(self, uuid: str, marker: str) -> None:
        """Write ``marker`` into a running guest's disk (what a guest's user does between operations)."""
        with self._state():
            dom = self._domain(uuid, "write")
            if dom.power != P.RUNNING:
                raise DriverError(f"cannot write to {uuid}: guest is not running", uuid=uuid, call="write")
            self._volumes[dom.disk] = self._volumes.get(dom.disk, "") + f"|{marker}"

    def volumes(self) -> dict[str, str]:
        """Return every root volume here with its content."""
        with self._state():
            return dict(self._volumes)

    def domain_disk(self, uuid: str) -> str | None:
        """Return the content of the disk the domain of ``uuid`` uses (None: no domain)."""
        with self._state():
            dom = self._domains.get(uuid)
            return None if dom is None else self._volumes.get(dom.disk)

    def add_foreign(self, name: str) -> None:
        """Add a domain that no instance owns."""
        with self._state():
            self._foreign.append(name)

    def set_ignores_acpi(self, uuid: str, ignores: bool = True) -> None:
        """Make a guest ignore clean shutdown requests (a guest with no OS)."""
        with self._state():
            self._domain(uuid, "set_ignores_acpi").ignores_acpi = ignores

    def domain_exists(self, uuid: str) -> bool:
        """Return whether a domain is defined for ``uuid``."""
        with self._state():
            return uuid in self._domains

    def disk_of(self, uuid: str) -> str:
        """Return the name of the domain's disk (changes on rebuild)."""
        with self._state():
            return self._domain(uuid, "disk_of").disk

    def kept_disks(self) -> list[str]:
        """Return the uuids that have a root volume here no domain uses (a move's kept disk, a leftover)."""
        with self._state():
            used = {d.disk for d in self._domains.values()}
            return sorted({n.split(".", 1)[0] for n in self._volumes if n not in used})

    # -- reads and events ------------------------------------------------------

    def get_info(self, uuid: str) -> PowerState:
        self._before("get_info")
        with self._state():
            return PowerState(self._domain(uuid, "get_info").power)

    def list_instances(self) -> Listing:
        self._before("list_instances")
        with self._state():
            owned = {u: PowerState(d.power) for u, d in self._domains.items()}
            return Listing(owned=owned, foreign=tuple(self._foreign))

    def get_vnc_console(self, uuid: str) -> Console:
        self._before("get_vnc_console")
        with self._state():
            dom = self._domain(uuid, "get_vnc_console")
            if dom.power not in (P.RUNNING, P.PAUSED):  # as QEMU: a guest that is not running serves no VNC
                raise DriverError(
                    f"domain of {uuid} has no VNC port (is it running?)", uuid=uuid, call="get_vnc_console"
                )
            return Console(host="127.0.0.1", port=dom.vnc_port)

    def register_event_listener(self, listener: EventListener | None) -> None:
        with self._lock:
            self._listener = listener
            if listener is not None and self._dispatcher is None:
                # One thread, one queue: events reach the listener off the caller's
                # thread and in the order they happened (STOPPED before STARTED).
                self._dispatcher = threading.Thread(target=self._dispatch, name=f"fake-events-{self.name}", daemon=True)
                self._dispatcher.start()

    def _dispatch(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            listener = self._listener
            if listener is not None:
                listener(event)

    def close(self) -> None:
        with self._lock:  # a listener being registered on another thread starts its dispatcher under the lock
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            self._events.put(None)
            dispatcher.join(timeout=5)

    # -- machinery -------------------------------------------------------------

    def _adopt(self, spec: DomainSpec, call: str) -> Domain | None:
        """Return the domain of ``spec`` here if the call may take it (stamped anew), None if there is none."""
        dom = self._domains.get(spec.uuid)
        if dom is None:
            return None
        attempt = spec.attempt
        if attempt is not None and dom.task_id == attempt.task_id and dom.epoch > attempt.epoch:
            raise Fenced(attempt.task_id, spec.uuid, attempt.epoch, dom.epoch)
        if dom.task_id != (None if attempt is None else attempt.task_id) and dom.disk != spec.disk:
            raise StaleObject(
                f"{call}: a domain of {spec.uuid} made by another attempt (task {dom.task_id}, epoch {dom.epoch},"
                f" disk {dom.disk}) is on {self.name}: never adopted nor started",
                uuid=spec.uuid,
                call=call,
            )
        dom.stamp(attempt)
        return dom

    def _domains_disk(self, uuid: str) -> str:
        with self._state():
            return self._domain(uuid, "spawn").disk

    def _names(self, uuid: str) -> list[str]:
        return sorted(n for n in self._volumes if n == uuid or n.startswith(uuid + "."))

    def _call(self, call: str, uuid: str, act: Callable[[], PowerState | None]) -> None:
        after = self._before(call)
        with self._state():
            changed = act()
        if changed is not None:
            self._emit(uuid, changed)
        if after is not None:
            raise after

    def _domain(self, uuid: str, call: str) -> Domain:
        dom = self._domains.get(uuid)
        if dom is None:
            raise DomainNotFound(uuid, call=call)
        return dom

    def _change(self, uuid: str, call: str, allowed: set[PowerState], to: PowerState) -> PowerState | None:
        dom = self._domain(uuid, call)
        if dom.power not in allowed:
            state = PowerState(dom.power).name.lower()
            raise DriverError(f"cannot {call} {uuid}: domain is {state}", uuid=uuid, call=call)
        return self._set(dom, to)

    @staticmethod
    def _set(dom: Domain, power: PowerState) -> PowerState | None:
        if dom.power == power:
            return None
        dom.power = int(power)
        return power

    def _port(self) -> int:
        self._next_port += 1
        return self._next_port - 1

    def _emit(self, uuid: str, power: PowerState) -> None:
        transition = _TRANSITIONS.get(power)
        if self._listener is not None and transition is not None:
            self._events.put(LifecycleEvent(uuid, transition, datetime.now(UTC)))

    @contextmanager
    def _state(self) -> Iterator[None]:
        """Hold the state: the thread lock, and with a state file an exclusive flock.

        With a file, the state is reloaded, acted on and saved under the flock,
        so several processes share one consistent host.
        """
        with self._lock:
            if self._state_path is None:
                yield
                return
            with open(self._state_path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self._state_path.exists():
                    self._load()
                yield
                self._save()

    def _save(self) -> None:
        assert self._state_path is not None
        data = {
            "domains": {u: asdict(d) for u, d in self._domains.items()},
            "volumes": self._volumes,
            "next_port": self._next_port,
        }
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self._state_path)

    def _load(self) -> None:
        assert self._state_path is not None
        data = json.loads(self._state_path.read_text())
        self._domains = {u: Domain(**d) for u, d in data["domains"].items()}
        self._volumes = dict(data.get("volumes", {}))
        self._next_port = data["next_port"]


def spec_values(spec: DomainSpec) -> dict[str, Any]:
    """Return what a fake domain keeps of its spec (plain values: saved as JSON)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name != "attempt"}


def holds(spec: DomainSpec) -> None:
    """Check the call's attempt still holds (right before a destructive step)."""
    if spec.attempt is not None:
        spec.attempt.holds()


def split_tag(tag: str | None) -> tuple[str | None, int | None]:
    """Split a volume's attempt tag into its task tag and epoch."""
    if tag is None or "-" not in tag:
        return None, None
    task_tag, _, epoch = tag.rpartition("-")
    return task_tag, int(epoch) if epoch.isdigit() else None
