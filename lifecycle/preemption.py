"""What happens on the hypervisor when a task is taken over while its worker is inside a driver call.

A compare-and-swap keeps the rows right; it cannot stop a driver call that was
already in flight when its task lost the instance. Each (preempting
operation, preempted operation) pair the operations table allows has one rule,
read from the two rows (the preemptor's preemption class,
:class:`lifecycle.graph.Takeover`, and the power each leaves the guest in),
so that once both workers have returned the hypervisor and the database agree:

- ``DESTROY_LATE`` (a delete took over: class ``destroy_late``): the preempted worker, when its call
  returns and it finds the task lost, destroys the domain again on every host
  it touched and releases any claim it took late. It never writes the row.
  Should that worker die first, the daemon's reaper destroys the domain of a
  deleted instance on its next pass. The delete does not wait: a hung
  hypervisor must not hold a delete up. Over an evacuate this destroys what
  its late spawn made on the destination; the dead host's old copy is
  destroyed when that host answers again (:mod:`lifecycle.evacuation`).
- ``WAIT`` (a hard reboot, class ``by_power``, took over a pause or a suspend:
  an operation not known to leave the guest in the power the preemptor ends
  in): the late call would leave the guest paused or saved after the reboot ran it. The hard reboot
  waits, before its own driver call, until the preempted worker has ended
  (its lease released, or run out, or ``preempt_wait_seconds``), so that the
  reset comes last and the guest ends running, as the row says.
- ``CONVERGE`` (a hard reboot took over a soft reboot, an unpause, a resume,
  or another hard reboot: an operation whose row ends in the preemptor's own
  end power): the late call leaves the guest running, which is
  what the hard reboot ends in too. Nothing waits: waiting for a stuck soft
  reboot is exactly what a hard reboot exists to avoid.

Takeovers by recovery are fenced instead (:class:`lifecycle.errors.Fenced`):
the old worker stops before its next driver call.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from lifecycle import graph

__all__ = ["RULES", "Rule", "pairs", "rule"]


class Rule(enum.StrEnum):
    """How a preempted worker's late driver call is reconciled."""

    DESTROY_LATE = "destroy_late"
    WAIT = "wait"
    CONVERGE = "converge"


def pairs() -> list[tuple[str, str]]:
    """Every (preempting, preempted) operation pair the table allows, in table order."""
    result = []
    for preemptor in graph.rows():
        for victim in graph.rows():
            if any(state in preemptor.preempts for state in victim.walk):
                result.append((preemptor.name, victim.name))
    return result


def _decide(preemptor: graph.Operation, victim: graph.Operation) -> Rule:
    """Return the rule of one pair, read from the two rows (the table's check makes every preemptor have a class)."""
    if preemptor.takeover is graph.Takeover.DESTROY_LATE:
        return Rule.DESTROY_LATE
    if preemptor.takeover is graph.Takeover.BY_POWER:
        # A victim whose row does not say it leaves the guest as the preemptor does (suspend) is waited for.
        same = victim.end_power is not None and victim.end_power is preemptor.end_power
        return Rule.CONVERGE if same else Rule.WAIT
    raise AssertionError(f"{preemptor.name} takes over {victim.name} but has no preemption class in the table")


def rule(preemptor: str, victim: str) -> Rule:
    """Return the rule for ``preemptor`` taking over a task of ``victim``."""
    return _decide(graph.operation(preemptor), graph.operation(victim))


RULES: Mapping[tuple[str, str], Rule] = {pair: rule(*pair) for pair in pairs()}
"""The rule of every pair of the table as it is at import."""
