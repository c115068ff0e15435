"""Hypervisor drivers behind one contract (``drivers.base``).

``connect(uri, ...)`` picks the driver from the URI scheme: ``fake://`` is an
in-memory fake host, ``fake:///ABS/state.json`` a fake host kept in a file so
separate processes share it; every other URI (``test:///...``,
``qemu:///system``, ``qemu+ssh://...``) goes to the libvirt driver.
"""

from __future__ import annotations

from drivers.base import Driver

__all__ = ["connect"]


def connect(
    uri: str,
    name: str = "host",
    instances_path: str = "/var/lib/lifecycle/instances",
    *,
    domain_type: str = "kvm",
    vnc_listen: str = "127.0.0.1",
    soft_reboot_seconds: float = 120.0,
) -> Driver:
    """Open the driver for ``uri``; ``domain_type`` and the rest apply to libvirt only."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "fake":
        from drivers.fake import FakeDriver

        return FakeDriver(name, state_path=rest or None)
    from drivers.libvirt import LibvirtDriver

    return LibvirtDriver(
        uri, instances_path, domain_type=domain_type, vnc_listen=vnc_listen, soft_reboot_seconds=soft_reboot_seconds
    )
