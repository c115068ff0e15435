"""What each operation does beside its table row, found by name: the other half of an operation's one record.

An operation is its row in :mod:`lifecycle.graph` (data: guards, walk, ends,
failure rule, preemption class, whether it moves the instance, whether the
lock applies) and a :class:`Definition` made in its own module under
:mod:`lifecycle.operations` (code: steps, preparation, roll-back, extra
guard, parameter schema), which that module registers here when imported.
The runner, recovery and preemption look both up by name and name no
operation themselves: adding one is a row and a module (or, for a test or an
embedder, a row and a definition given to :func:`register`).

Importing :mod:`lifecycle.operations` registers the engine's own operations;
it checks that every row of the table has its definition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lifecycle import graph, validation
from lifecycle.config import Settings
from lifecycle.errors import InvalidInput
from lifecycle.records import Cause, Flavor, Image, Instance
from lifecycle.states import TaskState
from lifecycle.store import Store
from lifecycle.tasks import Hook, Steps

__all__ = [
    "Call",
    "Definition",
    "Guard",
    "Schema",
    "definitions",
    "find",
    "flavor_param",
    "register",
    "registered",
    "target_host",
    "unregister",
]


@dataclass(frozen=True, slots=True)
class Call:
    """One call of an operation as its extra guard sees it: checked by the table's guard, nothing written yet."""

    store: Store
    settings: Settings
    instance: Instance
    """The instance as read (for an operation that creates one, the record about to be written)."""
    params: Mapping[str, Any]
    """The arguments, as the parameter schema returned them."""
    image: Image
    """The image the task runs with (its argument, or the instance's)."""
    cause: Cause


Guard = Callable[[Call], None]
"""A check beyond the table's guard: raises (:class:`InvalidInput`, :class:`HostNotEvacuable`...) to refuse."""
Schema = Callable[[Mapping[str, Any]], dict[str, Any]]
"""The operation's arguments checked alone and returned as stored on the task (:class:`InvalidInput` to refuse)."""


def _any_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return dict(params)


def flavor_param(value: object, operation: str) -> dict[str, Any]:
    """Check an operation's ``flavor`` argument and return it as :meth:`Flavor.as_dict` encodes it (extra specs too)."""
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{operation} needs a flavor, as Flavor.as_dict() gives it")
    try:
        return Flavor.from_dict(value).as_dict()
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"{operation}'s flavor must be Flavor.as_dict() data, got {value!r}") from exc


def target_host(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check the ``host`` an operation is sent to, if given (default: where the scheduler puts it): a schema."""
    checked = dict(params)
    if checked.get("host") is not None:
        checked["host"] = validation.name("host", checked["host"])
    return checked


@dataclass(frozen=True, slots=True)
class Definition:
    """What an operation's module does for it; ``row`` is its line of the operations table."""

    row: graph.Operation
    steps: Steps
    """Walk the task from its first task_state to its last (see :mod:`lifecycle.operations`)."""
    prepare: Hook | None = None
    """Run when its task is started or resumed, before the steps (a move gets its scheduler)."""
    roll_back: Hook | None = None
    """Run when recovery ends a crashed task failed instead of resuming it (a move goes back onto its source)."""
    roll_back_in: Mapping[TaskState, str] = field(default_factory=lambda: MappingProxyType({}))
    """The task_states a crashed task is rolled back from, each with why (nothing to resume onto yet); it is
    resumed from any other."""
    guard: Guard | None = None
    """Checks beyond the table's guard, before the task starts (nothing is written on a refusal)."""
    params: Schema = _any_params
    """Check the arguments alone, before anything is read (default: taken as given)."""

    def __post_init__(self) -> None:
        stray = sorted(t.value for t in self.roll_back_in if t not in self.row.walk)
        if stray:
            raise ValueError(f"{self.row.name} rolls back from {', '.join(stray)}, which its walk never enters")

    @property
    def name(self) -> str:
        """The operation's name, as stored on tasks and audit rows."""
        return str(self.row.name)


_DEFINITIONS: dict[str, Definition] = {}


def register(definition: Definition) -> Definition:
    """Register an operation's definition (and its row, when the table does not hold it yet); return it.

    A row already in the table must be that very row: an operation has one.
    """
    name = definition.name
    if name in _DEFINITIONS:
        raise ValueError(f"operation {name!r} is defined already")
    try:
        row = graph.operation(name)
    except KeyError:
        graph.register(definition.row)
    else:
        if row is not definition.row:
            raise ValueError(f"operation {name!r} has a row in the table already, not this one")
    _DEFINITIONS[name] = definition
    return definition


def unregister(name: str) -> None:
    """Forget a definition :func:`register` added, and its row unless the table holds it itself."""
    if _DEFINITIONS.pop(name, None) is not None and all(op.name != name for op in graph.OPERATIONS):
        graph.unregister(name)


@contextmanager
def registered(definition: Definition) -> Iterator[Definition]:
    """Register ``definition`` for the block (a test's operation): gone again afterwards, whatever happened."""
    register(definition)
    try:
        yield definition
    finally:
        unregister(definition.name)


def find(name: object) -> Definition | None:
    """Return the definition of operation ``name``, or None when there is none."""
    return _DEFINITIONS.get(name) if isinstance(name, str) else None


def definitions() -> list[Definition]:
    """Return every registered definition, by name."""
    return [_DEFINITIONS[name] for name in sorted(_DEFINITIONS)]
