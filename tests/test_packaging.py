"""The package as an application installs it: everything under ``lifecycle``, typed, beside the app's own packages."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    """The environment without a path that would put this source tree first (a developer's PYTHONPATH)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this tree (no network: the dev venv has setuptools and wheel)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    (built,) = out.glob("lifecycle-*.whl")
    return built


def test_the_wheel_installs_only_under_lifecycle(wheel: Path) -> None:
    """Every file of the wheel is lifecycle/... or its dist-info: no top-level drivers/ or migrations/ package."""
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"lifecycle"}
    assert "lifecycle/drivers/base.py" in names and "lifecycle/drivers/py.typed" in names
    assert "lifecycle/migrations/env.py" in names and "lifecycle/migrations/script.py.mako" in names
    assert any(n.startswith("lifecycle/migrations/versions/0001_") for n in names)
    assert "lifecycle/py.typed" in names


def test_the_wheel_runs_beside_an_application_with_its_own_drivers_and_migrations(wheel: Path, tmp_path: Path) -> None:
    """In a fresh venv, an app with its own drivers/ and migrations/ packages upgrades a database and creates a VM."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies come from the dev venv's site-packages (appended, so the wheel's lifecycle wins; that
    # directory's own .pth files, among them the editable install's, are not read from an appended path).
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --target installs the wheel's files whatever the dev venv's metadata says is installed already
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(purelib)]
    subprocess.run(
        [*install, str(wheel)], check=True, timeout=300, env={**_clean_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    )
    image = tmp_path / "cirros.img"
    image.write_bytes(b"\0" * 4096)
    app = tmp_path / "app"
    for package in ("drivers", "migrations"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text(f"OWNER = 'the application's own {package}'\n".replace("'s", "s"))
    # What an alembic-using app (Django, Flask-Migrate) has: its own env.py, which must never be run for us.
    (app / "migrations" / "env.py").write_text("raise SystemExit('the application migrations ran')\n")
    (app / "main.py").write_text(
        textwrap.dedent(
            """
            import json, sys
            import drivers, migrations
            import lifecycle
            from lifecycle import Engine, Flavor

            url = "sqlite:///" + sys.argv[1]
            lifecycle.upgrade(url)
            with Engine(url) as engine:
                engine.hosts.add("h1", "fake://")
                engine.hosts.heartbeat("h1")
                engine.images.add("cirros", sys.argv[2])
                vm = engine.create("web-1", flavor=Flavor(1, 64, 1), image="cirros")
                engine.stop(vm.instance_uuid)
                stopped = engine.get(vm.instance_uuid)
            print(json.dumps({
                "lifecycle": lifecycle.__file__, "drivers": drivers.__file__, "migrations": migrations.__file__,
                "engine_drivers": sys.modules["lifecycle.drivers"].__file__,
                "state": stopped.vm_state,
            }))
            """
        )
    )
    run = subprocess.run(
        [str(python), "main.py", str(tmp_path / "app.db"), str(image)],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(),
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["lifecycle"].startswith(str(purelib)), seen  # the wheel's copy, not this source tree
    assert seen["engine_drivers"].startswith(str(purelib / "lifecycle" / "drivers")), seen
    assert seen["drivers"] == str(app / "drivers" / "__init__.py")
    assert seen["migrations"] == str(app / "migrations" / "__init__.py")
    assert seen["state"] == "stopped"


def test_no_code_imports_the_source_trees_top_level_drivers_or_migrations() -> None:
    """Code, tests and benchmarks import lifecycle.drivers and lifecycle.migrations, never drivers or migrations."""
    offenders = []
    for folder in ("lifecycle", "drivers", "migrations", "tests", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [
                    f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("drivers", "migrations")
                ]
    assert offenders == []


def test_mypy_strict_reads_the_installed_package_and_catches_a_mistyped_operation_argument(tmp_path: Path) -> None:
    """From outside the tree, mypy --strict finds the dev install's types: a correct call passes, `wiat=` is caught."""
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            """
            from lifecycle import Engine, Task


            def stop(engine: Engine, uuid: str) -> Task:
                return engine.stop(uuid, wait=False, request_id="req-1")


            def stop_mistyped(engine: Engine, uuid: str) -> None:
                engine.stop(uuid, wiat=True)
            """
        )
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            "app.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert errors == ['app.py:10: error: Unexpected keyword argument "wiat" for "stop" of "Engine"  [call-arg]'], (
        run.stdout
    )


def test_the_sdist_carries_the_whole_test_suite_and_the_example(tmp_path: Path) -> None:
    """The sdist holds every file of tests/ (conftest.py and the helpers too), examples/, and no bytecode."""
    # Built from a copy without egg-info: setuptools would otherwise add the files a former build listed.
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT,
        tree,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "node_modules", "*.egg-info", "*_cache", "__pycache__", "build", "dist"
        ),
    )
    built = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"],
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.split()[-1]
    with tarfile.open(tmp_path / built) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    wanted = {
        path.relative_to(ROOT).as_posix()
        for folder in ("tests", "examples")
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert {"tests/conftest.py", "tests/__init__.py", "tests/asgi.py", "examples/fastapi_app.py"} <= wanted
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
