"""Hypervisor drivers behind one contract (``drivers.base``).

``connect(uri)`` picks the driver from the URI scheme: ``fake://`` is an
in-memory fake host, ``fake:///ABS/state.json`` a fake host kept in a file so
separate processes share it.
"""

from __future__ import annotations

from drivers.base import Driver
from lifecycle.errors import InvalidInput

__all__ = ["connect"]


def connect(uri: str, name: str = "host") -> Driver:
    """Open the driver for ``uri``; :class:`InvalidInput` for an unsupported scheme."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "fake":
        from drivers.fake import FakeDriver

        return FakeDriver(name, state_path=rest or None)
    raise InvalidInput(f"unsupported driver URI {uri!r}: expected fake:// or fake:///ABS/PATH.json")
