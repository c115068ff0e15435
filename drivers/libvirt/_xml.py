"""Domain and volume XML, built with ElementTree from the instance (a hostile name is data, never markup) and read.

Domains are named ``lifecycle-<uuid>``; the instance's own name lives in
``<title>`` and in the lifecycle ``<metadata>``, which also stamps the
attempt (task id, epoch, move) that made the domain or last took it over.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from lifecycle.drivers.base import Attempt, DomainSpec, Stamp
from lifecycle.drivers.images import valid_uuid

__all__ = [
    "METADATA_NS",
    "NAME_PREFIX",
    "backing_key",
    "disk_sources",
    "domain_xml",
    "empty_volume",
    "mtime",
    "restamped",
    "root_volume",
    "stamp_of",
    "vnc_of",
]

METADATA_NS = "https://lifecycle.invalid/xmlns/instance/1"
NAME_PREFIX = "lifecycle-"


def domain_xml(
    spec: DomainSpec, disk: str, *, domain_type: str, vnc_listen: str, rescue_disk: str | None = None
) -> str:
    """Return the domain XML for ``spec`` booting from ``disk`` (or ``rescue_disk`` first)."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = NAME_PREFIX + valid_uuid(spec.uuid)
    ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "title").text = spec.name
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{METADATA_NS}}}instance")
    ET.SubElement(meta, f"{{{METADATA_NS}}}uuid").text = spec.uuid
    ET.SubElement(meta, f"{{{METADATA_NS}}}name").text = spec.name
    meta.append(_attempt_element(spec.attempt))
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    for tag, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, tag).text = action
    devices = ET.SubElement(dom, "devices")
    disks = [rescue_disk, disk] if rescue_disk is not None else [disk]
    for index, path in enumerate(disks):
        el = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(el, "driver", name="qemu", type="qcow2")
        ET.SubElement(el, "source", file=path)
        ET.SubElement(el, "target", dev=f"vd{'abcdefgh'[index]}", bus="virtio")
    ET.SubElement(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=vnc_listen)
    ET.register_namespace("lifecycle", METADATA_NS)
    return ET.tostring(dom, encoding="unicode")


def _attempt_element(attempt: Attempt | None) -> ET.Element:
    """Return the ``<lifecycle:attempt>`` stamp of ``attempt`` (empty for a call outside any task)."""
    el = ET.Element(f"{{{METADATA_NS}}}attempt")
    if attempt is not None:
        el.set("task", attempt.task_id)
        el.set("epoch", str(attempt.epoch))
        if attempt.migration_id is not None:
            el.set("migration", attempt.migration_id)
    return el


def restamped(xml: str, attempt: Attempt) -> str:
    """Return the lifecycle metadata of the domain ``xml`` stamped with ``attempt``, as libvirt's setMetadata takes it.

    libvirt puts the element in the namespace itself: it is given without one.
    """
    instance = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}instance")
    if instance is None:
        instance = ET.Element(f"{{{METADATA_NS}}}instance")
    for old in instance.findall(f"{{{METADATA_NS}}}attempt"):
        instance.remove(old)
    instance.append(_attempt_element(attempt))
    for el in instance.iter():
        el.tag = el.tag.rsplit("}", 1)[-1]
    return ET.tostring(instance, encoding="unicode")


def stamp_of(xml: str) -> Stamp:
    """Return the attempt a domain's XML is stamped with (no task: made before stamps, or outside any task)."""
    el = ET.fromstring(xml).find(f"./metadata/{{{METADATA_NS}}}instance/{{{METADATA_NS}}}attempt")
    if el is None or not el.get("task"):
        return Stamp(None)
    epoch = el.get("epoch", "0")
    return Stamp(el.get("task"), int(epoch) if epoch.isdigit() else 0, el.get("migration"))


def root_volume(xml: str) -> str | None:
    """Return the name of a domain's root volume (its disk that is not a rescue disk)."""
    for source in disk_sources(xml):
        name = source.rsplit("/", 1)[-1]
        if not name.endswith(".rescue"):
            return name
    return None


def disk_sources(domain_xml: str) -> list[str]:
    """Return the file paths of a domain's disks."""
    return [s.get("file", "") for s in ET.fromstring(domain_xml).iterfind("./devices/disk/source")]


def vnc_of(domain_xml: str) -> tuple[str | None, int]:
    """Return where a domain's VNC server listens: (its listen address if set, its port; -1 when it has none)."""
    graphics = ET.fromstring(domain_xml).find("./devices/graphics[@type='vnc']")
    if graphics is None:
        return None, -1
    return graphics.get("listen") or None, int(graphics.get("port", "-1"))


def empty_volume(name: str) -> str:
    """Return the XML of an empty raw volume ``name`` (what a copy streams into)."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = "0"
    ET.SubElement(ET.SubElement(vol, "target"), "format", type="raw")
    return ET.tostring(vol, encoding="unicode")


def backing_key(volume_xml: str) -> str | None:
    """Return the cache key a disk volume is backed by (``../_base/<key>``), if any."""
    path = ET.fromstring(volume_xml).findtext("./backingStore/path")
    return None if path is None else path.rsplit("/", 1)[-1]


def mtime(volume_xml: str) -> float:
    """Return when a volume was last written (now, when libvirt does not say)."""
    text = ET.fromstring(volume_xml).findtext("./target/timestamps/mtime")
    return float(text) if text else time.time()
