"""Everything the command line prints: one-line text renderings, strict JSON, and errors.

Text output escapes control and format characters in names (:func:`safe`),
as older databases may hold them; JSON output uses the library's field names
and is strict (never NaN: :func:`emit`).
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

from lifecycle import validation
from lifecycle.errors import InvalidState, LifecycleError

if TYPE_CHECKING:
    import argparse

    from lifecycle.audit import AuditEntry
    from lifecycle.records import Host, Image, Instance, Migration, Task
    from lifecycle.sweep import PassSummary

__all__ = [
    "emit",
    "error",
    "history_entry",
    "host_line",
    "image_line",
    "instance_line",
    "migration_line",
    "pass_line",
    "progress",
    "safe",
    "task_result",
]


def safe(text: object) -> str:
    """Return ``text`` with the characters a terminal would act on escaped as ``repr`` escapes them.

    Controls, format characters (bidirectional overrides...), line and
    paragraph separators: names written before the engine refused them may
    still hold them, and printed raw they could rewrite what the reader sees.
    """
    value = str(text)
    if validation.unsafe_character(value) is None:
        return value
    return "".join(repr(c)[1:-1] if validation.unsafe_character(c) else c for c in value)


def _finite(data: Any) -> Any:
    """Return ``data`` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print ``data`` as strict JSON under ``--json``, else ``text``."""
    if not args.json:
        print(text)
        return
    try:
        out = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError:  # a NaN read back from an older database: print null rather than invalid JSON
        out = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)
    print(out)


def error(exc: LifecycleError, *, as_json: bool) -> None:
    """Print ``exc`` as one line on stderr and, under ``--json``, as an object on stdout."""
    message = safe(exc)  # escapes newlines too: one line, whatever the message holds
    print(f"error: {message}", file=sys.stderr)  # first: it still reaches the user if stdout is gone
    if as_json:
        data: dict[str, Any] = {"error": type(exc).__name__, "message": message}
        if isinstance(exc, InvalidState):
            data |= {"allowed_vm_states": exc.allowed_vm_states, "allowed_task_states": exc.allowed_task_states}
        print(json.dumps(data, indent=2, sort_keys=True))


def instance_line(i: Instance) -> str:
    """Render an instance: uuid, name, host, status and its three states."""
    task = i.task_state.value if i.task_state else "-"
    states = f"vm={i.vm_state.value} task={task} power={int(i.power_state)}"
    return f"{i.uuid}  {safe(i.name):<20} {safe(i.host or '-'):<12} {i.status:<14} {states}"


def task_result(args: argparse.Namespace, task: Task, instance: Instance) -> None:
    """Print a task's outcome with its instance as the task left it."""
    from lifecycle.records import to_plain

    data = {**to_plain(instance), "task": task.to_dict(internal=True)}
    emit(args, data, f"task {task.id} {task.operation} {task.outcome.value}\n{instance_line(instance)}")


def history_entry(entry: AuditEntry) -> AuditEntry:
    """Return an audit entry with its text fields escaped, for :func:`lifecycle.audit.format_history`."""
    import dataclasses

    # The message is printed with repr() by format_history, so it is already escaped.
    texts: dict[str, Any] = {
        f.name: safe(v)
        for f in dataclasses.fields(entry)
        if f.name != "message" and isinstance(v := getattr(entry, f.name), str)
    }
    return dataclasses.replace(entry, **texts)


def progress(done: int | None, total: int | None) -> str:
    """Render a disk copy's progress: `` (copied 12.0 of 512.0 MiB, 2%)``, or nothing before it began."""
    if done is None or total is None:
        return ""
    share = f", {100 * done // total}%" if total else ""
    return f" (copied {done / 2**20:.1f} of {total / 2**20:.1f} MiB{share})"


def migration_line(m: Migration) -> str:
    """Render a migration: instance, kind, status, hosts, flavors, times and copy progress."""
    done = m.finished_at.isoformat(timespec="seconds") if m.finished_at else "-"
    return safe(
        f"{m.id}  {m.instance_uuid}  {m.kind:<9} {m.status.value:<14} {m.source_host} -> {m.dest_host or '-'}"
        f"  {m.old_flavor} -> {m.new_flavor}  started {m.created_at.isoformat(timespec='seconds')} finished {done}"
        + progress(m.bytes_done, m.bytes_total)
    )


def host_line(h: Host) -> str:
    """Render a host: name, URI, zone, whether enabled, its resources, heartbeat and any fence."""
    if h.vcpus is None:
        usage = "resources untracked"
    else:
        usage = f"vcpus {h.vcpus_used}/{h.vcpus} ram {h.memory_mb_used}/{h.memory_mb} MiB"
        usage += f" disk {h.disk_gb_used}/{h.disk_gb} GiB"
    state = "enabled" if h.enabled else "disabled"
    beat = h.last_heartbeat.isoformat(timespec="seconds") if h.last_heartbeat else "never"
    where = f"{safe(h.name)}  {safe(h.driver_uri)}  zone={safe(h.availability_zone)}"
    fenced = ""
    if h.fenced_at is not None:
        at = h.fenced_at.isoformat(timespec="seconds")
        fenced = f"  FENCED by {safe(h.fenced_by)} at {at}: {safe(h.fenced_reason)}"
    return f"{where}  {state}  {usage}  heartbeat={beat}{fenced}"


def image_line(i: Image) -> str:
    """Render an image: name, format and path."""
    return f"{safe(i.name)}  {i.disk_format}  {safe(i.path)}"


def pass_line(s: PassSummary) -> str:
    """Render one host's sync pass, or why it failed."""
    if s.error is not None:
        return f"{safe(s.host)}: pass failed: {safe(s.error)}"
    return (
        f"{safe(s.host)}: {s.instances} instances, {s.in_sync} in sync, {s.drifted} drifted, {s.acted} acted,"
        f" {s.skipped} skipped, {s.missing_unconfirmed} missing (unconfirmed), {s.lost_races} lost races,"
        f" {s.errors} errors, reaped: {', '.join(s.reaped) or 'none'},"
        f" unknown domains: {safe(', '.join(s.unknown_domains) or 'none')}"
    )
