"""What the engine's services are given instead of the engine: its store, drivers, settings, runner, metrics, clock.

Sync (:mod:`lifecycle.sweep`, :mod:`lifecycle.events`), the operator duties,
evacuation, the resize window and the webhooks take a :class:`Context` and
never the engine (:class:`lifecycle.Engine`): a worker or a request handler
can run them with the parts alone, and none of them imports the facade.
The engine builds one :class:`Services` when it opens and passes it down.
Its clock is the engine's (:mod:`lifecycle.clock`): every time a service compares with or writes comes from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lifecycle.clock import Clock
    from lifecycle.config import Settings
    from lifecycle.drivers.base import Driver
    from lifecycle.metrics import Metrics
    from lifecycle.runner import Runner
    from lifecycle.store import Store

__all__ = ["Context", "Services"]


class Context(Protocol):
    """What a service needs: the database, a host's driver, the settings, the task runner, the metrics, the clock."""

    @property
    def store(self) -> Store:
        """The database every state write goes through."""

    @property
    def settings(self) -> Settings:
        """The engine's settings."""

    @property
    def runner(self) -> Runner:
        """Starts an operation's task as the engine's own calls do (guards, lock, preemption, leases)."""

    @property
    def metrics(self) -> Metrics:
        """Where passes, events and errors are counted."""

    @property
    def clock(self) -> Clock:
        """What time it is for the lifecycle's policy (the store's own clock)."""

    def driver(self, host: str, /) -> Driver:
        """Return the driver of ``host`` (opened once and kept)."""


@dataclass(frozen=True, slots=True)
class Services:
    """The :class:`Context` an engine builds once, of its own parts."""

    store: Store
    settings: Settings
    runner: Runner
    metrics: Metrics
    driver: Callable[[str], Driver]
    clock: Clock
