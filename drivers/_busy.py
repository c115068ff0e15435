"""The libvirt storage driver's busy answers: transient refusals, waited out.

:mod:`lifecycle.drivers.storage` re-exports them.

Many workers of many processes build, move and delete on one host at once,
and libvirt's storage driver (``src/storage/storage_driver.c``, libvirt 9.0)
refuses some calls for as long as another call works on the same pool or
volume. These answers are **transient**: each ends by itself when the other
call does, so they are retried with a bounded backoff (:func:`patiently`),
never taken for a missing disk or another permanent failure:

- ``pool '<p>' has asynchronous jobs running.`` (``VIR_ERR_INTERNAL_ERROR``):
  a refresh, destroy, delete or undefine of a pool while a volume of it is
  being built (``createXML`` runs ``qemu-img``), by any client of libvirtd;
- ``volume '<v>' is still being allocated.`` (``VIR_ERR_OPERATION_INVALID``):
  a delete, resize, upload or download of a volume whose build has not ended;
- ``volume '<v>' is still in use.`` (``VIR_ERR_OPERATION_INVALID``): a delete
  of a volume a stream (an upload, a download) is open on.

Codes 1 and 55 also carry permanent errors, so libvirt's text decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lifecycle.drivers._wait import wait_out

try:
    import libvirt
except ImportError:  # pragma: no cover - the driver refuses to start without it
    libvirt = None

__all__ = ["BUSY_SECONDS", "busy", "patiently"]

_BUSY_CODES = (1, 55)  # VIR_ERR_INTERNAL_ERROR, VIR_ERR_OPERATION_INVALID
_BUSY_TEXTS = ("has asynchronous jobs running", "is still being allocated", "is still in use")
BUSY_SECONDS = 60.0
"""How long a busy answer is waited out before it is raised as itself (a build's qemu-img is seconds)."""


def busy(exc: Any) -> bool:
    """Return whether a libvirt error is one of the storage driver's transient busy answers (module docstring)."""
    if exc.get_error_code() not in _BUSY_CODES:
        return False
    text = str(exc.get_error_message() or exc)
    return any(busy_text in text for busy_text in _BUSY_TEXTS)


def patiently(call: Callable[..., Any], *args: Any, seconds: float = BUSY_SECONDS) -> Any:
    """Run a libvirt storage call, waiting out busy answers with a backoff (0.05 s doubling to 1 s) for ``seconds``.

    Any other error, or a busy answer past ``seconds``, is raised as libvirt's own.
    """
    return wait_out(lambda: call(*args), _busy_error, seconds=seconds)


def _busy_error(exc: BaseException) -> bool:
    return isinstance(exc, libvirt.libvirtError) and busy(exc)
