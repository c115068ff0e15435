"""The README's library example runs as written (on a fake host and scratch paths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.images import fake_image

README = Path(__file__).parents[1] / "README.md"


def test_library_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first python block of the README executes without error and ends with a resumed, active instance."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    source = (
        code.group(1)
        .replace('"sqlite:///lifecycle.db"', repr(f"sqlite:///{tmp_path / 'readme.db'}"))
        .replace('"qemu:///system"', '"fake://"')
        .replace('"/var/lib/images/cirros.qcow2"', repr(fake_image()))
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    engine = namespace["engine"]
    uuid = namespace["uuid"]
    assert engine.get(uuid).vm_state.value == "active"  # type: ignore[attr-defined]
    assert [t.operation for t in engine.tasks(uuid)][-2:] == ["suspend", "resume"]  # type: ignore[attr-defined]
