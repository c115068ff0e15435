"""A note (something done on the hypervisor, no state changed) chains from the instance as it is when written."""

from __future__ import annotations

from collections.abc import Callable

from lifecycle import Cause, Engine, VmState
from lifecycle.audit import Why
from tests.invariants import check_invariants


def test_a_note_from_a_stale_read_chains_from_the_current_row(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A worker taken over notes what its late call destroyed: the note starts where the takeover left the row."""
    uuid = new_instance()
    stale = engine.get(uuid)
    engine.delete(uuid)  # the takeover ends the instance while the late worker still holds its old read
    engine.store.writes.note(
        stale, Why(actor="api", cause=Cause.API, operation="rebuild", message="destroyed a leftover")
    )
    last = engine.history(uuid)[-1]
    assert (last.message, last.from_vm_state, last.to_vm_state) == ("destroyed a leftover", "deleted", "deleted")
    assert engine.get(uuid).vm_state is VmState.DELETED
    check_invariants(engine.store)
