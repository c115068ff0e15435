"""The libvirt driver's disk calls: a move's two sides, snapshots, and the clean-up of the host's disks.

A moved disk travels as a sparse stream (:mod:`lifecycle.drivers.storage`), from the
source host's connection into a volume named after the destination's attempt,
and is checked on arrival by a checksum read back. A snapshot is read over
the host's connection and made whole on the engine's side (``qemu-img``, on
files of the engine's own), and a disk made from one is sent back the same
way as a move's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any

from lifecycle.drivers.base import Attempt, DiskRead, DiskSource, DomainSpec, Progress, volume_name
from lifecycle.drivers.images import inspect_image, qemu_img, valid_uuid
from lifecycle.drivers.libvirt._core import Core, holds
from lifecycle.drivers.libvirt._mapping import ERR_NO_DOMAIN
from lifecycle.drivers.libvirt._xml import backing_key, disk_sources, empty_volume, mtime, root_volume
from lifecycle.drivers.storage import file_segments, image_key, read_volume, volume_digest, write_file, write_volume
from lifecycle.errors import CopyFailed, DomainNotFound, DriverError, StaleObject

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = ["DiskCalls"]


class DiskCalls(Core):
    """The contract's calls that move, copy, snapshot or clean up disks."""

    def migrate_disk_and_power_off(
        self,
        uuid: str,
        *,
        timeout: float,
        retry_interval: float,
        disk: str | None = None,
        attempt: Attempt | None = None,
    ) -> str:
        call = "migrate_disk_and_power_off"
        with self._calling(call, uuid) as conn:
            try:
                dom = self._domain(conn, uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != ERR_NO_DOMAIN:
                    raise
                dom = None  # repeated: the disk is already kept
            if dom is None:
                kept = disk or valid_uuid(uuid)
                self._disk(conn, uuid, call, kept)  # neither domain nor disk: not found
                return kept
            kept = root_volume(dom.XMLDesc(0)) or disk or valid_uuid(uuid)
            self._point("migrate:begin")
            self._still_ours(dom, uuid, attempt)
            if dom.isActive() and not (timeout > 0 and self._clean_shutdown(dom, timeout, retry_interval)):
                self._still_ours(dom, uuid, attempt)
                self._hard_stop(dom)
            if dom.hasManagedSaveImage(0):
                dom.managedSaveRemove(0)
            self._still_ours(dom, uuid, attempt)
            dom.undefine()
            self.storage.delete(conn, self.storage.disks_pool, self.storage.disk_names(uuid)[1])
        return kept

    def read_disk(self, uuid: str, disk: str | None = None) -> AbstractContextManager[DiskRead]:
        return self._reading(uuid, disk or valid_uuid(uuid))

    @contextmanager
    def _reading(self, uuid: str, disk: str) -> Iterator[DiskRead]:
        with self._calling("read_disk", uuid) as conn:
            vol = self.storage.volume(conn, self.storage.disks_pool, disk)
            if vol is None:
                raise DomainNotFound(uuid, call="read_disk")
            total = int(vol.info()[2])
            reading = read_volume(conn, vol)
            segments = reading.__enter__()
        # Outside the source's own error mapping: what the reader raises while writing (the destination's
        # error) is the destination's, never read as this host's missing domain.
        try:
            yield DiskRead(segments=self._source_segments(segments, conn), total=total)
        except BaseException as exc:
            reading.__exit__(type(exc), exc, exc.__traceback__)
            raise
        reading.__exit__(None, None, None)

    def _source_segments(self, segments: Iterator[bytes | int], conn: Any) -> Iterator[bytes | int]:
        """Yield a source disk's segments; the source's own stream errors are mapped as this host's."""
        try:
            yield from segments
        except libvirt.libvirtError as exc:
            raise self._map_error(exc, "read_disk", None, conn) from exc

    def finish_migration(
        self, spec: DomainSpec, source: DiskSource, *, power_on: bool, progress: Progress | None = None
    ) -> str:
        return self._arrive("finish_migration", spec, source, power_on, progress)

    def _arrive(
        self, call: str, spec: DomainSpec, source: DiskSource, power_on: bool, progress: Progress | None
    ) -> str:
        """Take this task's domain here, or copy ``source`` into this attempt's volume and define one; start it."""
        with self._calling(call, spec.uuid) as conn:
            dom = self._adopt(conn, spec, call)
            if dom is None:
                disk = self._receive(conn, spec, source, progress, call)
                try:
                    holds(spec.attempt)  # right before the define: a worker stalled mid-copy stops here
                    dom = conn.defineXML(self._xml(spec, disk))
                except BaseException:
                    with suppress(Exception):  # this attempt's own copy, never another's
                        self.storage.delete(conn, self.storage.disks_pool, volume_name(spec.uuid, spec.attempt))
                    raise
            self._point("arrive:defined")
            self._start(dom, spec, power_on)
            return root_volume(dom.XMLDesc(0)) or spec.root

    def _receive(self, conn: Any, spec: DomainSpec, source: DiskSource, progress: Progress | None, call: str) -> str:
        """Copy the moved disk into this attempt's new volume here, check its digest, grow it; return its path."""
        self._base(conn, spec)  # the disk's backing store, in this host's cache before the disk arrives
        name = volume_name(spec.uuid, spec.attempt)
        self.storage.delete(conn, self.storage.disks_pool, name)  # this attempt's own partial copy at most
        vol = self.storage.pool(conn, self.storage.disks_pool).createXML(empty_volume(name), 0)
        try:
            self._point("receive:created")
            with source() as read:
                sent = write_volume(conn, vol, read.segments, progress, read.total)
            vol = self.storage.volume(conn, self.storage.disks_pool, name)  # re-read: now a qcow2 overlay
            if vol is None:
                raise DriverError(f"the copy of {spec.uuid}'s disk vanished", uuid=spec.uuid, call=call)
            received = volume_digest(conn, vol)
            if received.hexdigest() != sent.hexdigest() or received.length != sent.length:
                raise DriverError(
                    f"disk of {spec.uuid} arrived different from what was sent "
                    f"(sent {sent.hexdigest()}, {sent.length} bytes; "
                    f"received {received.hexdigest()}, {received.length} bytes)",
                    uuid=spec.uuid,
                    call=call,
                )
            self.storage.grow(vol, spec.root_gb)
            return str(vol.path())
        except BaseException as exc:
            with suppress(Exception):  # named after this attempt: a recovered attempt's copy is never this one
                self.storage.delete(conn, self.storage.disks_pool, name)
            if isinstance(exc, libvirt.libvirtError):
                exc = self._map_error(exc, call, None, conn)
            if isinstance(exc, DriverError) and not isinstance(exc, CopyFailed):
                raise CopyFailed(f"disk copy of {spec.uuid} failed: {exc}", uuid=spec.uuid, call=call) from exc
            raise

    def snapshot(self, spec: DomainSpec, target: Path) -> None:
        # Files of this call's own (two workers of one task, an old one and its recovery, never share one),
        # readable by the engine's user alone: they hold a guest's disk.
        part, download = _scratch(target, ".part"), _scratch(target, ".download")
        try:
            with self._calling("snapshot", spec.uuid) as conn:
                disk = spec.root
                with suppress(libvirt.libvirtError):  # no domain: the disk alone is what is read
                    dom = self._domain(conn, spec.uuid)
                    if dom.isActive():
                        raise DriverError(
                            f"cannot snapshot {spec.uuid}: domain is running", uuid=spec.uuid, call="snapshot"
                        )
                    disk = root_volume(dom.XMLDesc(0)) or disk
                vol = self.storage.volume(conn, self.storage.disks_pool, disk)
                if vol is None:
                    raise DomainNotFound(spec.uuid, call="snapshot")
                backing = backing_key(vol.XMLDesc(0))
                with read_volume(conn, vol) as segments:
                    write_file(download, segments)
            _flatten(download, part, backing, spec)
            inspect_image(part, "qcow2")  # as any image: qcow2 through and through, no backing or data file
            part.chmod(0o600)
            part.replace(target)
        finally:
            download.unlink(missing_ok=True)
            part.unlink(missing_ok=True)

    def spawn_from_snapshot(
        self, spec: DomainSpec, snapshot: Path, *, power_on: bool = True, progress: Progress | None = None
    ) -> str:
        @contextmanager
        def delta() -> Iterator[DiskRead]:
            with self._calling("spawn_from_snapshot", spec.uuid) as conn:
                key, _ = self._base(conn, spec)
            with _difference(snapshot, spec, key) as path, _file_source(path)() as read:
                yield read

        return self._arrive("spawn_from_snapshot", spec, delta, power_on, progress)

    def confirm_migration(self, uuid: str, disk: str | None = None) -> None:
        with self._calling("confirm_migration", uuid) as conn:
            name = disk or valid_uuid(uuid)
            if self._in_use(conn, uuid, name):
                return  # a domain here uses the disk (the move was reverted): it is not kept, keep it
            self._delete_volume(conn, name)
            self.storage.delete(conn, self.storage.disks_pool, self.storage.disk_names(uuid)[1])

    def finish_revert_migration(self, spec: DomainSpec, *, power_on: bool) -> None:
        call = "finish_revert_migration"
        with self._calling(call, spec.uuid) as conn:
            disk = self._disk(conn, spec.uuid, call, spec.root)  # nothing kept: DomainNotFound
            try:
                dom = self._domain(conn, spec.uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != ERR_NO_DOMAIN:
                    raise
                holds(spec.attempt)
                dom = conn.defineXML(self._xml(spec, disk))
            else:
                if root_volume(dom.XMLDesc(0)) != spec.root:
                    raise StaleObject(
                        f"{call}: the domain of {spec.uuid} on {self.uri} uses {root_volume(dom.XMLDesc(0))}, not"
                        f" the kept disk {spec.root}: never adopted",
                        uuid=spec.uuid,
                        call=call,
                    )
                if spec.attempt is not None:
                    self._restamp(dom, spec.attempt)
            self._start(dom, spec, power_on)

    def cleanup_images(
        self, max_age_seconds: float, moving: frozenset[str] = frozenset(), keep: frozenset[str] | None = None
    ) -> list[str]:
        with self._calling("cleanup_images") as conn:
            moment = time.time()
            removed = [] if keep is None else self._orphan_disks(conn, keep | moving, max_age_seconds, moment)
            used = {backing_key(vol.XMLDesc(0)) for vol in self.storage.disks(conn)}
            for base in self.storage.bases(conn):
                if base.name() in used or moment - mtime(base.XMLDesc(0)) < max_age_seconds:
                    continue
                with suppress(libvirt.libvirtError):  # taken into use or removed meanwhile: leave it
                    if base.name() not in {backing_key(v.XMLDesc(0)) for v in self.storage.disks(conn)}:
                        base.delete(0)
                        removed.append(f"{self.storage.cache_pool}/{base.name()}")
            return removed

    def _orphan_disks(self, conn: Any, keep: frozenset[str], max_age_seconds: float, moment: float) -> list[str]:
        """Delete instance disks of instances not in ``keep``, used by no domain, older than the age."""
        in_use = {src for dom in conn.listAllDomains(0) for src in disk_sources(dom.XMLDesc(0))}
        removed = []
        for vol in self.storage.disks(conn):
            name = vol.name()
            uuid = name.split(".", 1)[0]  # <uuid>, <uuid>.<attempt tag>, <uuid>.rescue
            try:
                valid_uuid(uuid)
            except DriverError:
                continue  # not a name this driver gives: never touch what we did not make
            xml = vol.XMLDesc(0)
            if uuid in keep or vol.path() in in_use or moment - mtime(xml) < max_age_seconds:
                continue
            with suppress(libvirt.libvirtError):  # taken or removed meanwhile
                vol.delete(0)
                removed.append(f"{self.storage.disks_pool}/{name}")
        return removed

    def drop_storage(self) -> None:
        """Delete this host's pools and every volume in them: for scratch hosts (demo, benchmarks), never a fleet's."""
        with self._calling("drop_storage") as conn:
            self.storage.drop(conn)


def _flatten(download: Path, target: Path, backing: str | None, spec: DomainSpec) -> None:
    """Make a downloaded disk whole: onto the engine's copy of its base image, then into one qcow2 file."""
    if backing is not None:
        base = Path(spec.image_path).resolve()
        expected = image_key(base)
        if backing != expected:
            raise DriverError(
                f"disk of {spec.uuid} is backed by {backing}, not by its image {base} ({expected})",
                uuid=spec.uuid,
                call="snapshot",
            )
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", spec.image_format, str(download))
    qemu_img("convert", "-O", "qcow2", "-f", "qcow2", str(download), str(target))


@contextmanager
def _difference(snapshot: Path, spec: DomainSpec, key: str) -> Iterator[Path]:
    """Yield a qcow2 file holding what ``snapshot`` adds to ``spec``'s image, backed as a host disk is."""
    inspect_image(snapshot, "qcow2")
    base = Path(spec.image_path).resolve()
    delta = _scratch(snapshot, ".delta")
    try:
        qemu_img(
            "convert", "-O", "qcow2", "-f", "qcow2", "-B", str(base), "-F", spec.image_format, str(snapshot), str(delta)
        )
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", f"../_base/{key}", "-F", spec.image_format, str(delta))
        yield delta
    finally:
        delta.unlink(missing_ok=True)


def _scratch(beside: Path, suffix: str) -> Path:
    """Return a new empty file of this call's own next to ``beside`` (mode 0600)."""
    fd, name = tempfile.mkstemp(prefix=f"{beside.name}.", suffix=suffix, dir=beside.parent)
    os.close(fd)
    return Path(name)


def _file_source(path: Path) -> DiskSource:
    """Read a local file as a move reads a kept disk: sparse segments."""

    @contextmanager
    def reading() -> Iterator[DiskRead]:
        with path.open("rb") as handle:
            yield DiskRead(segments=file_segments(handle.fileno()), total=path.stat().st_size)

    return reading
