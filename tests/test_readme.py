"""The README's library example runs as written (on a fake host and scratch paths)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def _embedding() -> str:
    """The README's "Embedding in a web control plane" section."""
    text = README.read_text()
    return text.split("## Embedding in a web control plane", 1)[1].split("\n## ", 1)[0]


def test_embedding_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 202-and-async example and the serialization example run as written and print what their comments say."""
    blocks = re.findall(r"```python\n(.*?)```", _embedding(), re.S)
    runnable = [b for b in blocks if "upgrade(url)" in b or "engine.list(project_id" in b]
    assert len(runnable) == 2
    source = "\n".join(runnable).replace('"/var/lib/images/cirros.qcow2"', repr(fake_image()))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:5] == [
        "running",
        "succeeded ACTIVE",
        "succeeded SHUTOFF",
        "succeeded",
        "ACTIVE acme {'role': 'web'}",
    ]
    assert printed[5] == "acme alice"
    assert namespace["pages"] == [["web-2"]]


def test_the_errors_table_is_the_example_apps_mapping() -> None:
    """Each row of the README's errors-to-HTTP table names the classes the example maps to that code, in its order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastapi_app", README.parent / "examples" / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    table = _embedding().split("### Errors to HTTP", 1)[1].split("###", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    rows = [[re.sub(r"\s*\([^)]*\)", "", names), code] for names, code in rows]  # (subclasses) are examples
    readme = [
        (name, int(code))
        for names, code in rows
        for name in re.findall(r"^`(\w+)`|, `(\w+)`", names.strip())
        for name in name
        if name
    ]
    assert readme == [(kind.__name__, code) for kind, code in app.STATUS]


def test_the_engine_reference_names_every_public_method_and_group_call() -> None:
    """The reference lists each public Engine method once, and each group's calls are exactly its public methods."""
    from lifecycle import Engine

    reference = _embedding().split("### Engine reference", 1)[1]
    listed = re.findall(r"^\| `(\w+)` \|", reference, re.M)
    public = sorted(n for n in dir(Engine) if not n.startswith("_") and callable(getattr(Engine, n)))
    assert sorted(listed) == public and len(listed) == len(set(listed))
    groups = dict(re.findall(r"`engine\.(\w+)` \(([^)]*)\)", reference.replace("\n", " ")))
    from lifecycle.facade import Consoles, Duties, Feed, Hosts, Images

    for name, cls in (
        ("hosts", Hosts),
        ("images", Images),
        ("feed", Feed),
        ("duties", Duties),
        ("consoles", Consoles),
    ):
        calls = {c.strip() for c in groups[name].split(",")}
        mine = {n for n in dir(cls) if not n.startswith("_")}
        assert calls == mine, (name, calls ^ mine)


def test_the_testing_example_holds_a_stop_and_lets_it_finish(engine: Any, new_instance: Callable[..., str]) -> None:
    """The README's fake-host example holds a stop inside the driver, then releases it, and the stop succeeds."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", _embedding(), re.S) if "faults.hold" in b]
    engine.hosts.heartbeat("h1")
    uuid = new_instance()
    namespace: dict[str, object] = {"engine": engine, "uuid": uuid}
    exec(compile(block, "README.md", "exec"), namespace)
    task = namespace["task"]
    assert engine.task(task.id).outcome.value == "succeeded"  # type: ignore[attr-defined]
    assert engine.get(uuid).vm_state.value == "stopped"
