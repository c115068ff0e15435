"""Benchmark: how long CLI commands take to start and answer, against the interpreter's own floor, same run.

Floors: ``python -c pass`` and ``python -c "import sqlmodel"`` on the same
interpreter. Commands: ``lifecycle --help`` and ``lifecycle graph`` (no
database: target at most 3x ``pass``), ``lifecycle show UUID`` and
``lifecycle list`` on a SQLite database of ``--instances`` instances (they
need the database layer: target at most 1.3x ``import sqlmodel``). Medians of
``--runs`` runs each, after one warm-up run, interleaved so that machine noise
hits all alike. The CPU time each command used (user + system) is printed
beside its wall time: on a machine shared with other work it varies less.

Bytecode: with ``--bytecode cached`` (the default) every command, the floors
included, runs with its compiled modules cached in a scratch directory
(``PYTHONPYCACHEPREFIX``), as an installed package has them even where
``PYTHONDONTWRITEBYTECODE`` is set; ``--bytecode as-is`` keeps the caller's
environment, so with ``PYTHONDONTWRITEBYTECODE=1`` and an editable install the
project's modules are compiled again at every start (~15 ms of ``--help``).

    python bench/cli.py [--instances 1000] [--runs 9] [--bytecode cached|as-is]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/transitions.py, which would shadow the `transitions`
# library the engine imports: take the folder off sys.path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import logging
import os
import resource
import statistics
import subprocess
import tempfile
import time

import structlog

from lifecycle import Engine, Flavor, upgrade


def main() -> int:
    """Build the database, time every command, print medians and ratios."""
    args = _parse()
    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    with tempfile.TemporaryDirectory(prefix="lifecycle-bench-cli-") as scratch:
        url = f"sqlite:///{Path(scratch) / 'cli.db'}"
        uuid = _populate(url, Path(scratch), args.instances)
        exe = str(Path(sys.executable).with_name("lifecycle"))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import sqlmodel'": [sys.executable, "-c", "import sqlmodel"],
            "lifecycle --help": [exe, "--help"],
            "lifecycle graph": [exe, "graph"],
            "lifecycle show UUID": [exe, "--db", url, "show", uuid],
            "lifecycle list": [exe, "--db", url, "list"],
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
        if args.bytecode == "cached":
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(Path(scratch) / "pycache")
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for run in range(args.runs + 1):
            for name, command in commands.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
                elapsed = time.perf_counter() - started
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if done.returncode != 0:
                    raise SystemExit(f"{name} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
                if run > 0:  # the first run warms the caches (and compiles the bytecode, when cached)
                    times[name].append(elapsed)
                    cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"{args.instances} instances; medians of {args.runs} runs; bytecode {args.bytecode}")
    for name, seconds in median.items():
        print(f"{name:<30} {seconds * 1000:8.1f} ms  (cpu {median_cpu[name] * 1000:6.1f} ms)")
    for names, floor, target in (
        (("lifecycle --help", "lifecycle graph"), "python -c pass", 3),
        (("lifecycle show UUID", "lifecycle list"), "python -c 'import sqlmodel'", 1.3),
    ):
        for name in names:
            ratio, ratio_cpu = median[name] / median[floor], median_cpu[name] / median_cpu[floor]
            print(f"ratio {name} / {floor}: {ratio:.2f}x (cpu {ratio_cpu:.2f}x; target <= {target}x)")
    return 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument(
        "--bytecode", choices=("cached", "as-is"), default="cached", help="see the module docstring (default cached)"
    )
    return parser.parse_args()


def _populate(url: str, scratch: Path, count: int) -> str:
    """Create ``count`` instances on a fake host; return one uuid."""
    upgrade(url)
    image = scratch / "base.img"
    image.write_bytes(b"\0" * 512)
    with Engine(url) as engine:
        engine.hosts.add("h1", f"fake://{scratch / 'h1.json'}")
        engine.images.add("base", str(image))
        uuid = ""
        for i in range(count):
            uuid = engine.create(f"vm{i}", host="h1", flavor=Flavor(1, 64, 1), image="base").instance_uuid
    return uuid


if __name__ == "__main__":
    sys.exit(main())
