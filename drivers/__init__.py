"""Hypervisor drivers behind one contract (``lifecycle.drivers.base``).

``connect(uri, ...)`` picks the driver from the URI scheme: ``fake://`` is an
in-memory fake host, ``fake:///ABS/state.json`` a fake host kept in a file so
separate processes share it; every other URI (``test:///...``,
``qemu:///system``, ``qemu+ssh://...``) goes to the libvirt driver.
``validate_uri(uri)`` checks a URI against those forms without connecting.
"""

from __future__ import annotations

import os.path
import unicodedata
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from lifecycle.drivers.base import Driver
from lifecycle.errors import InvalidInput

__all__ = ["connect", "hypervisor_identity", "validate_uri"]

_ALLOWED = (
    "fake://, fake:///ABS/state.json, test:///default, test:///ABS/node.xml, qemu:///system, qemu:///session,"
    " qemu+{ssh,tls,tcp,libssh,libssh2}://HOST/system, qemu+unix:///system"
)
_QEMU_REMOTE = frozenset({"qemu+ssh", "qemu+tls", "qemu+tcp", "qemu+libssh", "qemu+libssh2"})
_QEMU_PATHS = frozenset({"/system", "/session"})


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
        from lifecycle.drivers.fake import FakeDriver

        return FakeDriver(name, state_path=rest or None)
    from lifecycle.drivers.libvirt import LibvirtDriver

    return LibvirtDriver(
        uri, instances_path, domain_type=domain_type, vnc_listen=vnc_listen, soft_reboot_seconds=soft_reboot_seconds
    )


def validate_uri(uri: str) -> str:
    """Return ``uri`` normalised if it names a hypervisor :func:`connect` can open, without connecting.

    Normalising strips surrounding whitespace, lower-cases the scheme and
    collapses ``..`` and repeated slashes in file paths. Local files are
    checked now: a ``fake:///`` state file's folder must exist (the file may
    not, it is created on first use), a ``test:///`` node file must exist.

    Raises :class:`~lifecycle.errors.InvalidInput` naming the allowed forms
    when ``uri`` is empty, holds control characters, has no ``scheme://``, a
    scheme other than fake, test and qemu (with a transport), a relative or
    missing path, or a qemu path other than ``/system`` or ``/session``.
    """
    text = uri.strip()
    if not text:
        raise _invalid(uri, "it is empty")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _invalid(uri, "it holds control characters")
    scheme, sep, rest = text.partition("://")
    if not sep or not scheme:
        raise _invalid(uri, "it is not of the form scheme://...")
    scheme = scheme.lower()
    if scheme == "fake":
        return _fake(uri, rest)
    return _libvirt(uri, text, scheme)


def _libvirt(uri: str, text: str, scheme: str) -> str:
    """Check a libvirt URI by scheme: syntax first, then the test or qemu rules."""
    if any(c.isspace() for c in text):
        raise _invalid(uri, "a libvirt URI holds no spaces (escape them as %20)")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise _invalid(uri, f"it does not parse ({exc})") from None
    if parts.fragment:
        raise _invalid(uri, "a libvirt URI has no #fragment")
    parts = parts._replace(scheme=scheme)
    if scheme == "test":
        return _test(uri, parts)
    if scheme == "qemu" or scheme == "qemu+unix" or scheme in _QEMU_REMOTE:
        return _qemu(uri, parts)
    raise _invalid(uri, f"scheme {scheme!r} is not a hypervisor this engine drives")


def _fake(uri: str, rest: str) -> str:
    """Check the part of a fake URI after ``fake://``: nothing (in memory) or an absolute file path."""
    if not rest:
        return "fake://"
    if not rest.startswith("/"):
        raise _invalid(
            uri, "a relative state file path is ambiguous across processes: use an absolute path fake:///abs/path.json"
        )
    if "?" in rest or "#" in rest:
        raise _invalid(uri, "a fake URI has no ?query or #fragment")
    path = _abspath(rest)
    if path.suffix != ".json":
        raise _invalid(uri, "a fake state file ends in .json (its lock and temporary files take other suffixes)")
    if not path.parent.is_dir():
        raise _invalid(uri, f"folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise _invalid(uri, f"{path} exists and is not a file")
    return f"fake://{path}"


def _test(uri: str, parts: SplitResult) -> str:
    """Check a libvirt test-driver URI: the built-in ``/default`` host or an existing node file."""
    if parts.netloc or parts.query:
        raise _invalid(uri, "a test URI has no host and no ?query: use test:///default or test:///abs/node.xml")
    if parts.path == "/default":
        return "test:///default"
    if not parts.path.startswith("/"):
        raise _invalid(uri, "a test node file needs an absolute path: use test:///abs/node.xml")
    path = _abspath(parts.path)
    if not Path(unquote(str(path))).is_file():  # libvirt unescapes the path
        raise _invalid(uri, f"test node file {path} is not an existing file")
    return f"test://{path}"


def _qemu(uri: str, parts: SplitResult) -> str:
    """Check a libvirt QEMU URI: path ``/system`` or ``/session``, a host exactly when the transport is remote."""
    if parts.path not in _QEMU_PATHS:
        raise _invalid(uri, f"a qemu URI's path is /system or /session, not {parts.path or 'empty'!r}")
    if parts.scheme in _QEMU_REMOTE and not parts.hostname:
        raise _invalid(uri, f"{parts.scheme} needs a host: {parts.scheme}://HOST{parts.path}")
    if parts.scheme == "qemu+unix" and parts.netloc:
        raise _invalid(uri, f"qemu+unix is local and takes no host: qemu+unix://{parts.path}")
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def _abspath(path: str) -> Path:
    """Return the absolute ``path`` with ``..``, ``.`` and repeated slashes collapsed (symlinks kept)."""
    return Path("/" + os.path.normpath(path).lstrip("/"))


def _invalid(uri: str, reason: str) -> InvalidInput:
    return InvalidInput(f"invalid hypervisor URI {uri!r}: {reason}; allowed: {_ALLOWED}")


_DEFAULT_PORTS = {"tcp": 16509, "tls": 16514, "ssh": 22}
_LOCAL_NAMES = {"", "localhost", "127.0.0.1", "::1"}


def hypervisor_identity(uri: str) -> str | None:
    """Return what names one libvirtd behind a qemu URI, or None for other drivers (each its own hypervisor).

    ``qemu:///system``, ``qemu+unix:///system`` and ``qemu://localhost/system``
    are the machine's own libvirtd; ``qemu+tcp://h/system`` and
    ``qemu+tcp://h:16509/system`` are one (default ports filled in); the query
    does not change which daemon answers.
    """
    parts = urlsplit(uri.strip())
    scheme, _, transport = parts.scheme.lower().partition("+")
    if scheme != "qemu":
        return None
    host = (parts.hostname or "").lower()
    if transport == "unix" or (transport == "" and host in _LOCAL_NAMES):
        return f"local{parts.path}"
    transport = transport or "tls"  # libvirt's default for a remote host
    port = parts.port or _DEFAULT_PORTS.get(transport, 0)
    if host in _LOCAL_NAMES:
        host = "local"
    return f"{transport}://{host}:{port}{parts.path}"
