"""The fake driver's disk calls: a move's two sides and snapshots; a copy is a ``copy`` call per chunk."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from lifecycle.drivers.base import Attempt, DiskRead, DiskSource, DomainSpec, Progress, volume_name
from lifecycle.drivers.fake._faults import SimulatedCrash
from lifecycle.drivers.fake._host import Domain, Host, P, holds, spec_values
from lifecycle.errors import CopyFailed, DomainNotFound, DriverError, Fenced, StaleObject
from lifecycle.states import PowerState

__all__ = ["Moves"]

_CHUNK = 16 * 1024
_HOLE = 1024 * 1024


class Moves(Host):
    """The contract's calls that move, copy or snapshot disks, with the reference semantics."""

    def migrate_disk_and_power_off(
        self,
        uuid: str,
        *,
        timeout: float,
        retry_interval: float,
        disk: str | None = None,
        attempt: Attempt | None = None,
    ) -> str:
        kept = [disk or uuid]

        def act() -> PowerState | None:
            dom = self._domains.get(uuid)
            if dom is None:
                if kept[0] in self._volumes:
                    return None
                raise DomainNotFound(uuid, call="migrate_disk_and_power_off")
            if attempt is not None and dom.task_id == attempt.task_id and dom.epoch > attempt.epoch:
                raise Fenced(attempt.task_id, uuid, attempt.epoch, dom.epoch)
            if attempt is not None:
                attempt.holds()
            del self._domains[uuid]
            kept[0] = dom.disk
            return P.SHUTDOWN if dom.power != P.SHUTDOWN else None

        self._call("migrate_disk_and_power_off", uuid, act)
        return kept[0]

    def read_disk(self, uuid: str, disk: str | None = None) -> AbstractContextManager[DiskRead]:
        return self._reading(uuid, disk or uuid)

    @contextmanager
    def _reading(self, uuid: str, disk: str) -> Iterator[DiskRead]:
        self._before("read_disk")
        with self._state():
            content = self._volumes.get(disk)
            if content is None:
                raise DomainNotFound(uuid, call="read_disk")
        data = content.encode()
        # The content, a hole, then four chunks of padding: enough for progress and faults between chunks.
        segments: list[bytes | int] = [data, _HOLE, *(bytes([n]) * _CHUNK for n in range(1, 5))]
        yield DiskRead(segments=iter(segments), total=len(data) + 4 * _CHUNK)

    def finish_migration(
        self, spec: DomainSpec, source: DiskSource, *, power_on: bool, progress: Progress | None = None
    ) -> str:
        return self._receive("finish_migration", spec, source, power_on, progress)

    def _receive(
        self, call: str, spec: DomainSpec, source: DiskSource, power_on: bool, progress: Progress | None
    ) -> str:
        """Define the domain on a copy of ``source`` unless this task's exists, start it if ``power_on``."""
        after = self._before(call)
        with self._state():
            dom = self._adopt(spec, call)
        if dom is None:
            name = volume_name(spec.uuid, spec.attempt)
            with self._state():
                self._volumes[name] = ""  # the copy's volume, this attempt's own
            try:
                content = self._copy(call, source, progress)
            except BaseException as exc:
                if not isinstance(exc, SimulatedCrash):  # a dead process cleans nothing up: its copy stays
                    with self._state():
                        self._volumes.pop(name, None)  # its own partial copy only: named after this attempt
                raise
            with self._state():
                holds(spec)  # the epoch, right before the define: a stalled worker stops here
                self._volumes[name] = content
                dom = self._adopt(spec, call) or Domain(spec_values(spec), int(P.SHUTDOWN), name, vnc_port=self._port())
                dom.stamp(spec.attempt)
                self._domains[spec.uuid] = dom
        with self._state():
            dom = self._domain(spec.uuid, call)  # read again: with a state file, each hold reloads it
            if power_on:
                holds(spec)
            changed = self._set(dom, P.RUNNING) if power_on else None
        if changed is not None:
            self._emit(spec.uuid, changed)
        if after is not None:
            raise after
        return dom.disk

    def _copy(self, call: str, source: DiskSource, progress: Progress | None) -> str:
        """Read the moved disk chunk by chunk (each a ``copy`` call); return the content it carried."""
        done, content = 0, None
        try:
            with source() as read:
                for segment in read.segments:
                    if isinstance(segment, int):
                        continue
                    after = self._before("copy")
                    content = segment if content is None else content
                    done += len(segment)
                    if progress is not None:
                        progress(done, read.total)
                    if after is not None:
                        raise after
        except DriverError as exc:
            raise CopyFailed(f"disk copy failed: {exc}", call=call) from exc
        return (content or b"").decode()

    def snapshot(self, spec: DomainSpec, target: Path) -> None:
        def act() -> PowerState | None:
            dom = self._domains.get(spec.uuid)
            if dom is not None and dom.power == P.RUNNING:
                raise DriverError(f"cannot snapshot {spec.uuid}: domain is running", uuid=spec.uuid, call="snapshot")
            disk = dom.disk if dom is not None else spec.root
            if disk not in self._volumes:
                raise DomainNotFound(spec.uuid, call="snapshot")
            part = target.with_name(target.name + ".part")
            part.write_text(self._volumes[disk])
            part.replace(target)
            return None

        self._call("snapshot", spec.uuid, act)

    def spawn_from_snapshot(
        self, spec: DomainSpec, snapshot: Path, *, power_on: bool = True, progress: Progress | None = None
    ) -> str:
        return self._receive("spawn_from_snapshot", spec, _file_source(snapshot), power_on, progress)

    def confirm_migration(self, uuid: str, disk: str | None = None) -> None:
        def act() -> PowerState | None:
            name = disk or uuid
            if name not in {d.disk for d in self._domains.values()}:
                self._volumes.pop(name, None)
            return None

        self._call("confirm_migration", uuid, act)

    def finish_revert_migration(self, spec: DomainSpec, *, power_on: bool) -> None:
        def act() -> PowerState | None:
            dom = self._domains.get(spec.uuid)
            if dom is not None and dom.disk != spec.root:
                raise StaleObject(
                    f"finish_revert_migration: the domain of {spec.uuid} on {self.name} uses {dom.disk}, not the kept"
                    f" disk {spec.root}: never adopted",
                    uuid=spec.uuid,
                    call="finish_revert_migration",
                )
            if dom is None:
                if spec.root not in self._volumes:
                    raise DomainNotFound(spec.uuid, call="finish_revert_migration")
                holds(spec)
                dom = Domain(spec_values(spec), int(P.SHUTDOWN), spec.root, vnc_port=self._port())
                self._domains[spec.uuid] = dom
            dom.stamp(spec.attempt)
            if power_on:
                holds(spec)
            return self._set(dom, P.RUNNING if power_on else P.SHUTDOWN)

        self._call("finish_revert_migration", spec.uuid, act)


def _file_source(path: Path) -> DiskSource:
    """Read a snapshot file the way a move reads a kept disk (one segment: a fake disk's content is its name)."""

    @contextmanager
    def reading() -> Iterator[DiskRead]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DriverError(
                f"snapshot {path} unreadable: {exc.strerror or exc}", call="spawn_from_snapshot"
            ) from None
        yield DiskRead(segments=iter([data]), total=len(data))

    return reading
