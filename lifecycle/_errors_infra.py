"""The errors of what the engine stands on: hypervisors and the database (see :mod:`lifecycle.errors`)."""

from __future__ import annotations

from collections.abc import Iterable

from lifecycle._errors_base import InvalidInput, LifecycleError

__all__ = [
    "CopyFailed",
    "DatabaseUnavailable",
    "DomainNotFound",
    "DriverError",
    "DriverUnavailable",
    "EvacuatedCopiesPending",
    "InMemoryHostElsewhere",
    "StaleObject",
]


class DriverError(LifecycleError):
    """The hypervisor refused or failed a call."""

    def __init__(self, message: str, *, uuid: str | None = None, call: str | None = None) -> None:
        self.uuid = uuid
        self.call = call
        super().__init__(message)


class DomainNotFound(DriverError):
    """The domain for this instance does not exist on the host."""

    def __init__(self, uuid: str, *, call: str | None = None) -> None:
        super().__init__(f"domain for instance {uuid} not found", uuid=uuid, call=call)


class StaleObject(DriverError):
    """A domain of this instance made by another attempt (an earlier life, another task) is where a call would make one.

    It is never adopted nor started, and the call changed nothing; the
    operation clears such leftovers first (audited), so this means one
    appeared meanwhile.
    """


class CopyFailed(DriverError):
    """A move's disk copy to the destination failed; the destination kept nothing and defined nothing.

    The cause (the source's or destination's error, or a digest mismatch) is
    in the message and is the ``__cause__``. The source still holds the disk,
    so the move can be rolled back onto it.
    """


class EvacuatedCopiesPending(DriverError):
    """A heartbeat refused: the host holds old copies of evacuated instances, and they could not be destroyed.

    A host records a heartbeat only once those copies are gone (a move or an
    unshelve there would find them); its hypervisor failed or did not answer
    while destroying them, so nothing was written. ``instances`` names the
    instances whose copies remain, ``cause`` what the hypervisor said (also the
    ``__cause__``). Retry when the hypervisor answers.
    """

    def __init__(self, host: str, instances: Iterable[str], cause: BaseException) -> None:
        self.host = host
        self.instances = sorted(instances)
        self.cause = f"{type(cause).__name__}: {cause}"
        shown = ", ".join(self.instances[:5]) + (" ..." if len(self.instances) > 5 else "")
        super().__init__(
            f"cannot heartbeat host {host}: it still holds the old copies of {len(self.instances)} instance(s)"
            f" evacuated away from it ({shown}), which must be destroyed first, and its hypervisor could not"
            f" destroy them ({self.cause}); no heartbeat was recorded: retry when it answers",
            call=getattr(cause, "call", None),
        )


class DriverUnavailable(DriverError):
    """Transient: the hypervisor cannot be reached now; retrying later may work."""


class DatabaseUnavailable(LifecycleError):
    """The database could not be reached or read; ``reason`` is its own message.

    ``transient`` when a reconnect may cure it (the server went away, is
    starting, or the file is locked); :func:`lifecycle.feed.follow` then waits and retries,
    and raises this only when told to stop meanwhile (``stopped``).
    """

    def __init__(self, reason: str, *, transient: bool, stopped: str | None = None) -> None:
        self.reason = reason
        self.transient = transient
        self.stopped = stopped
        """Where delivery got to, when the follower was told to stop while the database was away."""
        if stopped is None:
            super().__init__(f"the database cannot be used: {reason}")
        else:
            super().__init__(f"stopped while the database was unreachable ({reason}); {stopped}")


class InMemoryHostElsewhere(InvalidInput):
    """The host is an in-memory fake (``fake://``) another process added: this one sees it empty, and will not sync it.

    Its domains live only in the memory of the process that added it; here
    they would look gone, and a sync would send every instance there to
    error. Nothing was done.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        super().__init__(
            f"host {host!r} is an in-memory fake hypervisor (fake://) added by another process: its domains live"
            " only in that process's memory, and this process would see it empty (syncing its instances to error),"
            " so it does not sync it. Run the daemon in the process that added it (lifecycle.Daemon), or give the"
            " host a state file (fake:///ABS/state.json) that every process shares"
        )


for _error in (
    DriverError,
    DomainNotFound,
    StaleObject,
    CopyFailed,
    EvacuatedCopiesPending,
    DriverUnavailable,
    DatabaseUnavailable,
    InMemoryHostElsewhere,
):
    _error.__module__ = "lifecycle.errors"  # where every error is imported from, and how tracebacks name it
