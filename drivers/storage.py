"""A host's disks through libvirt's storage API: two ``dir`` pools, volumes and sparse streams.

The engine reaches a hypervisor only through its libvirt connection, local or
remote, so every byte of host-side disk work goes through it; this module
never opens a path of the host. Per host (its instances path ``I``, a path on
that host)::

    I/_base   pool lifecycle-<h>-cache   one volume per image content: <sha256>-<bytes>
    I/disks   pool lifecycle-<h>-disks   <uuid> (root disk), <uuid>.rescue

``<h>`` is a digest of ``I``, so two hosts sharing one libvirtd (tests, or a
host serving two cells) never share a pool. An instance disk is a qcow2
volume whose backing store is the relative path ``../_base/<key>``: the same
bytes are valid on every host whatever its instances path, so a disk copied
to another host needs no rebase (libvirt has no rebase call).

A base reaches a host by an upload stream once per content; a volume whose
size is short of the image's is an upload in flight (wait) or abandoned
(remove it and upload again). Disks move between hosts as sparse streams,
source download piped into destination upload, with a checksum of the logical
content (holes count as zeros) computed on both sides.

libvirt errors are left to the caller (the driver maps them, keeping
libvirt's message), except the storage driver's busy answers, which are
waited out (:mod:`lifecycle.drivers._busy`). A pool is refreshed only to list it (what
libvirt did not make, such as a file a crashed libvirtd left, shows after a
refresh), and a listing whose refresh is refused as busy lists what libvirtd
knows, which is every volume made through libvirt by any process: a lookup
never needs one. The streams are in :mod:`lifecycle.drivers._streams`; this module
re-exports them.
"""

from __future__ import annotations

import hashlib
import threading
import time
import xml.etree.ElementTree as ET
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.drivers._busy import BUSY_SECONDS, busy, patiently
from lifecycle.drivers._streams import (
    Content,
    file_segments,
    quietly,
    read_volume,
    volume_digest,
    write_file,
    write_volume,
)
from lifecycle.drivers.images import ImageInfo, valid_uuid

try:
    import libvirt
except ImportError:  # pragma: no cover - the driver refuses to start without it
    libvirt = None

__all__ = [
    "BUSY_SECONDS",
    "Content",
    "HostStorage",
    "busy",
    "file_segments",
    "image_key",
    "patiently",
    "read_volume",
    "volume_digest",
    "write_file",
    "write_volume",
]


_ERR_NO_POOL = 49  # VIR_ERR_NO_STORAGE_POOL
_ERR_NO_VOL = 50  # VIR_ERR_NO_STORAGE_VOL
_ERR_VOL_EXISTS = 90  # VIR_ERR_STORAGE_VOL_EXIST: a racing process created it first
_STALL_SECONDS = 10.0  # a partial base that does not grow for this long was abandoned (or its uploader stalled)
_upload_locks: dict[tuple[str, str, str], threading.Lock] = {}
_upload_locks_guard = threading.Lock()
_keys: dict[tuple[str, int, int, int], str] = {}


def image_key(path: Path) -> str:
    """Return the cache name of an image file: its content's sha256 and size (memoized per file version)."""
    st = path.stat()
    version = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    key = _keys.get(version)
    if key is None:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        key = _keys[version] = f"{digest.hexdigest()}-{st.st_size}"
    return key


@dataclass(frozen=True, slots=True)
class HostStorage:
    """Where one host keeps its image cache and instance disks, as libvirt pools."""

    instances_path: str

    @property
    def _tag(self) -> str:
        return hashlib.sha256(self.instances_path.encode()).hexdigest()[:12]

    @property
    def cache_pool(self) -> str:
        """The name of the host's image cache pool."""
        return f"lifecycle-{self._tag}-cache"

    @property
    def disks_pool(self) -> str:
        """The name of the host's instance disks pool."""
        return f"lifecycle-{self._tag}-disks"

    # -- pools ---------------------------------------------------------------

    def pool(self, conn: Any, name: str) -> Any:
        """Return the started pool ``name``; define, build and start it (autostart) when missing.

        Serialized per pool within the process, and tolerant of another
        process doing the same at once (a define or start that lost the race
        finds the pool there).
        """
        with _lock_for("pool", self.instances_path, name):
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_POOL:
                    raise
                pool = self._define(conn, name)
            if not pool.isActive():
                try:
                    pool.create(0)
                except libvirt.libvirtError:
                    if not pool.isActive():  # started by a racing process meanwhile is fine
                        raise
            return pool

    def _define(self, conn: Any, name: str) -> Any:
        sub = "_base" if name == self.cache_pool else "disks"
        xml = ET.Element("pool", type="dir")
        ET.SubElement(xml, "name").text = name
        ET.SubElement(ET.SubElement(xml, "target"), "path").text = str(Path(self.instances_path) / sub)
        try:
            pool = conn.storagePoolDefineXML(ET.tostring(xml, encoding="unicode"), 0)
        except libvirt.libvirtError:
            return conn.storagePoolLookupByName(name)  # defined by a racing process meanwhile
        pool.build(0)  # creates the directory (and its parents); a no-op when it exists
        pool.setAutostart(1)
        return pool

    def volume(self, conn: Any, pool_name: str, name: str) -> Any | None:
        """Return the volume ``name`` of a pool, or None when it does not exist.

        No refresh: a volume any client made through libvirtd is in its pool at once.
        """
        pool = self.pool(conn, pool_name)
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_NO_VOL:
                raise
        return None

    def delete(self, conn: Any, pool_name: str, name: str) -> bool:
        """Delete a volume, waiting out a build or stream still on it; True if there was one (gone counts as done)."""
        vol = self.volume(conn, pool_name, name)
        if vol is None:
            return False
        try:
            patiently(vol.delete, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_NO_VOL:
                raise
        return True

    def _listed(self, pool: Any) -> list[Any]:
        """Return a pool's volumes after a refresh; one refused as busy is skipped (libvirtd lists what it made)."""
        try:
            pool.refresh(0)
        except libvirt.libvirtError as exc:
            if not busy(exc):
                raise
        return list(pool.listAllVolumes(0))

    # -- the image cache -----------------------------------------------------

    def ensure_base(self, conn: Any, uri: str, image: Path, info: ImageInfo) -> str:
        """Make the inspected ``image`` present in the host's cache (uploading it once); return its key.

        The key is returned only once the volume of that name holds every
        byte, checked after an upload too: libvirt deletes a volume while a
        stream still writes into it, so a process stalled mid-upload whose
        partial another process took for abandoned (no growth for a while)
        and replaced finishes into a deleted file, and must not build on the
        other's partial. It waits for that upload instead (or takes it over).
        """
        key = image_key(image)
        size = int(key.rsplit("-", 1)[1])
        with _lock_for(uri, self.cache_pool, key):
            while True:
                vol = self.volume(conn, self.cache_pool, key)
                if vol is not None and _physical(vol) >= size:
                    return key
                if vol is not None and _growing(vol):
                    continue  # another process is uploading it: wait for it
                if vol is not None and _physical(vol) < size:
                    try:  # abandoned by a process that died or stalled mid-upload
                        patiently(vol.delete, 0)
                    except libvirt.libvirtError as exc:
                        if exc.get_error_code() != _ERR_NO_VOL:
                            raise
                self._upload(conn, key, image)  # the next turn checks what the name holds

    def _upload(self, conn: Any, key: str, image: Path) -> bool:
        """Upload ``image`` as the base ``key``; False when another process created that volume first."""
        pool = self.pool(conn, self.cache_pool)
        xml = _volume_xml(key, 0, "raw")  # an empty file: it ends up holding the image's bytes and nothing else
        try:
            vol = pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_VOL_EXISTS:
                raise
            return False  # another process's upload: the caller waits for it
        try:
            with image.open("rb") as handle:
                write_volume(conn, vol, file_segments(handle.fileno()), None)
        except BaseException:
            quietly(patiently, vol.delete, 0)
            raise
        return True

    def bases(self, conn: Any) -> list[Any]:
        """Return the cache pool's volumes."""
        return self._listed(self.pool(conn, self.cache_pool))

    # -- instance disks ------------------------------------------------------

    def create_disk(self, conn: Any, name: str, key: str, info: ImageInfo, size_gb: int) -> Any:
        """Create ``name`` in the disks pool as a qcow2 overlay on base ``key``, at least ``size_gb`` GiB."""
        vol = self.volume(conn, self.disks_pool, name)
        if vol is not None:
            return vol
        capacity = max(info.virtual_size, size_gb * 1024**3)
        xml = _volume_xml(name, capacity, "qcow2", backing=(f"../_base/{key}", info.format))
        pool = self.pool(conn, self.disks_pool)
        try:
            return pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != _ERR_VOL_EXISTS:
                raise
        return pool.storageVolLookupByName(name)  # made meanwhile by a racing call of the same attempt

    def grow(self, vol: Any, size_gb: int) -> None:
        """Grow a volume (not in use) to ``size_gb`` GiB; never shrink."""
        if size_gb * 1024**3 > vol.info()[1]:
            patiently(vol.resize, size_gb * 1024**3, 0)

    def disk_names(self, uuid: str) -> tuple[str, str]:
        """Return the volume names of an instance's root and rescue disks."""
        name = valid_uuid(uuid)
        return name, f"{name}.rescue"

    def drop(self, conn: Any) -> None:
        """Delete every volume of both pools, then the pools themselves (a scratch host's clean-up)."""
        for name in (self.disks_pool, self.cache_pool):
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != _ERR_NO_POOL:
                    raise
                continue
            if pool.isActive():
                patiently(pool.refresh, 0)
                for vol in pool.listAllVolumes(0):
                    patiently(vol.delete, 0)
                patiently(pool.destroy)
            with suppress(libvirt.libvirtError):  # the folder may be gone already
                patiently(pool.delete, 0)
            patiently(pool.undefine)

    def disks(self, conn: Any) -> list[Any]:
        """Return the disks pool's volumes."""
        return self._listed(self.pool(conn, self.disks_pool))


def _volume_xml(name: str, capacity: int, fmt: str, backing: tuple[str, str] | None = None) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=fmt)
    if fmt == "qcow2" and backing is not None:
        ET.SubElement(target, "compat").text = "1.1"
    if backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", type=backing[1])
    return ET.tostring(vol, encoding="unicode")


def _physical(vol: Any) -> int:
    return int(vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)[2])


def _growing(vol: Any) -> bool:
    """Return whether a partial volume grows within the stall time (an upload in flight elsewhere)."""
    before = _physical(vol)
    deadline = time.monotonic() + _STALL_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if _physical(vol) != before:
            return True
    return False


def _lock_for(uri: str, pool: str, name: str) -> threading.Lock:
    with _upload_locks_guard:
        return _upload_locks.setdefault((uri, pool, name), threading.Lock())
