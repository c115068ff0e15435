"""A task run's ending recorded once, and the outcome vocabularies of recovery, duties and evacuation as text."""

from __future__ import annotations

import enum
import json

import pytest

from lifecycle.duties import DutyOutcome, DutyResult
from lifecycle.ending import Ending
from lifecycle.evacuation import EvacuationOutcome
from lifecycle.records import Outcome
from lifecycle.recovery import RecoveryOutcome


def test_an_ending_is_recorded_once() -> None:
    """A run that ended cannot end again: a second record is a programming error, and the first one stays."""
    ending = Ending()
    ending.record(Outcome.FAILED, error="DriverError: gone", trace="Traceback ...")
    with pytest.raises(AssertionError, match="already ended failed"):
        ending.record(Outcome.SUCCEEDED)
    assert (ending.outcome, ending.error, ending.trace) == (Outcome.FAILED, "DriverError: gone", "Traceback ...")


def test_the_summary_line_says_what_each_end_carries() -> None:
    """The finished-operation log line adds the error to a failure, the preemptor to a preemption, nothing to a success."""
    failed, preempted, succeeded = Ending(), Ending(), Ending()
    failed.record(Outcome.FAILED, error="E: x", trace="t")
    preempted.record(Outcome.PREEMPTED, preempted_by="t2", fenced=False)
    succeeded.record(Outcome.SUCCEEDED)
    assert failed.log_extra() == {"error": "E: x"}
    assert preempted.log_extra() == {"preempted_by": "t2", "fenced": False}
    assert succeeded.log_extra() == {}


@pytest.mark.parametrize("vocabulary", [RecoveryOutcome, DutyOutcome, EvacuationOutcome])
def test_an_outcome_reads_as_its_text_everywhere(vocabulary: type[enum.StrEnum]) -> None:
    """Each outcome member equals, formats and serialises as its text, so logs, JSON and the CLI read as before."""
    for member in vocabulary:
        assert member == member.value
        assert (f"{member}", str(member), json.dumps(member)) == (member.value, member.value, json.dumps(member.value))


def test_a_duty_result_serialises_its_outcome_as_text() -> None:
    """The CLI's JSON of a duty's result carries the outcome's text, byte for byte as when it was a string."""
    result = DutyResult("u1", DutyOutcome.TIMED_OUT)
    assert json.dumps({"uuid": result.uuid, "outcome": result.outcome}) == '{"uuid": "u1", "outcome": "timed_out"}'
