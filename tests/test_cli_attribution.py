"""The CLI's create names whom an instance is for: --project, --user and repeated --meta KEY=VALUE."""

from __future__ import annotations

import json

from tests.test_cli import cli  # noqa: F401  (the fixture)

CREATE = ("create", "vm", "--host", "h1", "--flavor", "vcpus=1,ram=64,disk=1", "--image", "cirros")


def test_create_with_project_user_and_meta_shows_them(cli) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """`create --project --user --meta k=v --meta k2=v2` makes an instance whose --json shows all three."""
    code, out, _ = cli(*CREATE, "--project", "p1", "--user", "u1", "--meta", "role=web", "--meta", "tier=", "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["project_id"], data["user_id"], data["metadata"]) == ("p1", "u1", {"role": "web", "tier": ""})
    assert "owner" in data["task"]  # the CLI, an operator's tool, shows the task's internals


def test_a_bad_meta_exits_2_and_makes_nothing(cli) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A --meta without '=', repeated, or over Nova's limits exits 2 with one line, and no instance is made."""
    for bad, needle in (
        ("nokeyvalue", "--meta takes KEY=VALUE"),
        ("=v", "--meta takes KEY=VALUE"),
        (f"k={'v' * 256}", "at most 255 characters"),
    ):
        code, _, err = cli(*CREATE, "--meta", bad)
        assert code == 2 and needle in err, err
    code, _, err = cli(*CREATE, "--meta", "k=1", "--meta", "k=2")
    assert code == 2 and "--meta 'k' given twice" in err
    assert cli("list", "--all")[1].strip() == "no instances"
