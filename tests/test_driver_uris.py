"""Hypervisor URIs: which ones ``lifecycle.drivers.validate_uri`` accepts, how it normalises them, and why it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lifecycle.drivers import validate_uri
from lifecycle.errors import InvalidInput

# {tmp} is the test's existing tmp_path; {node} an existing test-driver node file in it.
ACCEPTED = [
    ("fake://", "fake://"),
    ("fake://{tmp}/h1.json", "fake://{tmp}/h1.json"),
    ("fake://{tmp}/existing.json", "fake://{tmp}/existing.json"),
    ("  fake://{tmp}/h1.json\n", "fake://{tmp}/h1.json"),
    ("FAKE://{tmp}/h1.json", "fake://{tmp}/h1.json"),
    ("fake://{tmp}/sub/../h1.json", "fake://{tmp}/h1.json"),
    ("fake:///{tmp}//h1.json", "fake://{tmp}/h1.json"),
    ("test:///default", "test:///default"),
    ("test://{node}", "test://{node}"),
    ("qemu:///system", "qemu:///system"),
    ("qemu:///session", "qemu:///session"),
    ("Qemu:///system", "qemu:///system"),
    ("qemu://compute-1.example/system", "qemu://compute-1.example/system"),
    ("qemu+ssh://root@compute-1/system", "qemu+ssh://root@compute-1/system"),
    ("qemu+ssh://root@compute-1:2222/system?keyfile=/k", "qemu+ssh://root@compute-1:2222/system?keyfile=/k"),
    ("qemu+tls://compute-1/system", "qemu+tls://compute-1/system"),
    ("qemu+tcp://10.0.0.5:16509/system", "qemu+tcp://10.0.0.5:16509/system"),
    ("qemu+libssh://compute-1/system", "qemu+libssh://compute-1/system"),
    ("qemu+libssh2://compute-1/system?known_hosts=/kh", "qemu+libssh2://compute-1/system?known_hosts=/kh"),
    ("qemu+unix:///system", "qemu+unix:///system"),
    (
        "qemu+unix:///session?socket=/run/user/1000/libvirt/sock",
        "qemu+unix:///session?socket=/run/user/1000/libvirt/sock",
    ),
]

# (uri, a fragment of the reason the refusal must give)
REFUSED = [
    ("", "it is empty"),
    ("   ", "it is empty"),
    ("\t\n", "it is empty"),
    ("fake://{tmp}/h\x00.json", "control characters"),
    ("qemu:///sys\x1btem", "control characters"),
    ("qemu:///system\x7f", "control characters"),
    ("foo", "not of the form scheme://"),
    ("qemu:/system", "not of the form scheme://"),
    ("://x", "not of the form scheme://"),
    ("http://x", "scheme 'http' is not a hypervisor"),
    ("ftp://", "scheme 'ftp' is not a hypervisor"),
    ("xen:///system", "scheme 'xen' is not a hypervisor"),
    ("fake://relative.json", "use an absolute path fake:///abs/path.json"),
    ("fake://host/abs.json", "use an absolute path fake:///abs/path.json"),
    ("fake://{tmp}/missing-folder/h1.json", "does not exist"),
    ("fake://{tmp}", "ends in .json"),
    ("fake://{tmp}/h1.lock", "ends in .json"),
    ("fake://{tmp}/dir.json", "is not a file"),
    ("fake://{tmp}/h1.json?x=1", "no ?query"),
    ("test://default", "has no host"),
    ("test:///default?x=1", "has no host"),
    ("test:///{tmp}/missing.xml", "is not an existing file"),
    ("test:///{tmp}", "is not an existing file"),
    ("test://relative.xml", "has no host"),
    ("qemu://", "/system or /session"),
    ("qemu:///", "/system or /session"),
    ("qemu:///system/", "/system or /session"),
    ("qemu:///root", "/system or /session"),
    ("qemu+ssh:///system", "qemu+ssh needs a host"),
    ("qemu+tls://user@/system", "qemu+tls needs a host"),
    ("qemu+unix://compute-1/system", "takes no host"),
    ("qemu+tcp://compute-1:port/system", "does not parse"),
    ("qemu+ssh://compute 1/system", "no spaces"),
    ("qemu:///system#frag", "no #fragment"),
    ("qemu+http://compute-1/system", "scheme 'qemu+http' is not a hypervisor"),
]


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A folder holding an existing fake state file, a folder named like one, and a test-driver node file."""
    (tmp_path / "existing.json").write_text("{}")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "node.xml").write_text("<node/>")
    return tmp_path


def _fill(template: str, tmp: Path) -> str:
    return template.format(tmp=tmp, node=tmp / "node.xml")


@pytest.mark.parametrize(("uri", "normalised"), ACCEPTED)
def test_accepted_uris_come_back_normalised(tmp: Path, uri: str, normalised: str) -> None:
    """Each allowed URI is accepted and returned with whitespace stripped, the scheme lower-cased and paths collapsed."""
    assert validate_uri(_fill(uri, tmp)) == _fill(normalised, tmp)


@pytest.mark.parametrize(("uri", "reason"), REFUSED)
def test_refused_uris_say_why_and_what_is_allowed(tmp: Path, uri: str, reason: str) -> None:
    """Each refused URI raises InvalidInput quoting the URI, the reason and the list of allowed forms."""
    with pytest.raises(InvalidInput) as info:
        validate_uri(_fill(uri, tmp))
    message = str(info.value)
    assert reason in message
    assert f"invalid hypervisor URI {_fill(uri, tmp)!r}" in message
    assert "allowed: fake://, fake:///ABS/state.json, test:///default" in message


def test_the_state_file_need_not_exist_and_is_not_created(tmp_path: Path) -> None:
    """A fake state file in an existing folder is accepted before it exists, and validating does not create it."""
    path = tmp_path / "later.json"
    assert validate_uri(f"fake://{path}") == f"fake://{path}"
    assert not path.exists()


def test_an_escaped_test_node_path_is_checked_unescaped(tmp_path: Path) -> None:
    """A test:/// node path with %20 is checked as libvirt reads it, with a space."""
    (tmp_path / "my node.xml").write_text("<node/>")
    assert validate_uri(f"test://{tmp_path}/my%20node.xml") == f"test://{tmp_path}/my%20node.xml"


def test_validating_opens_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A qemu URI for a host that does not exist is accepted: validate_uri never connects."""
    from lifecycle import drivers

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("validate_uri connected")

    monkeypatch.setattr(drivers, "connect", refuse)
    assert validate_uri("qemu+ssh://no-such-host.invalid/system") == "qemu+ssh://no-such-host.invalid/system"


def test_one_libvirtd_is_one_host(tmp_path: Path) -> None:
    """A second host on a qemu URI another host uses is refused and not added; re-adding the same name is not this check."""
    from lifecycle import Engine, upgrade

    url = f"sqlite:///{tmp_path / 'uris.db'}"
    upgrade(url)
    with Engine(url) as engine:
        engine.hosts.add("a", "qemu+tcp://10.0.0.5/system", "/srv/a", console_address="10.0.0.5")
        with pytest.raises(InvalidInput, match="names the libvirtd of host a"):
            engine.hosts.add("b", "qemu+tcp://10.0.0.5/system", "/srv/b", console_address="10.0.0.5")
        assert [h.name for h in engine.hosts.list()] == ["a"]
        # another machine may use the same path
        engine.hosts.add("c", "qemu+tcp://10.0.0.6/system", "/srv/a", console_address="10.0.0.6")
        engine.hosts.add("d", "fake://", "/srv/d")
        engine.hosts.add("e", "fake://", "/srv/e")  # fake hosts are each their own hypervisor


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("qemu:///system", "qemu+unix:///system"),
        ("qemu:///system", "qemu://localhost/system"),
        ("qemu:///system", "qemu:///system?socket=/run/libvirt/libvirt-sock"),
        ("qemu+tcp://10.0.0.5/system", "qemu+tcp://10.0.0.5:16509/system"),
        ("qemu+tls://h.example/system", "qemu://h.example:16514/system"),
    ],
)
def test_two_spellings_of_one_libvirtd_are_one_host(tmp_path: Path, first: str, second: str) -> None:
    """URIs that reach the same libvirtd (transport, default port, localhost, query) are refused as a second host."""
    from lifecycle import Engine, upgrade
    from lifecycle.drivers import hypervisor_identity

    assert hypervisor_identity(first) == hypervisor_identity(second)
    url = f"sqlite:///{tmp_path / 'uris.db'}"
    upgrade(url)
    with Engine(url) as engine:
        engine.hosts.add("a", first, "/srv/a", console_address="10.0.0.9")
        with pytest.raises(InvalidInput, match="names the libvirtd of host a"):
            engine.hosts.add("b", second, "/srv/b", console_address="10.0.0.9")


def test_other_libvirtds_are_other_hosts() -> None:
    """Another address, port, transport to another daemon, or /session are different hypervisors."""
    from lifecycle.drivers import hypervisor_identity

    ids = {
        hypervisor_identity(u)
        for u in (
            "qemu:///system",
            "qemu:///session",
            "qemu+tcp://127.0.0.2/system",
            "qemu+tcp://127.0.0.3/system",
            "qemu+tcp://10.0.0.5:16600/system",
            "qemu+ssh://root@10.0.0.5/system",
        )
    }
    assert len(ids) == 6 and hypervisor_identity("fake://") is None


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+tcp://10.0.0.5/system",
        "qemu+tls://compute-1/system",
        "qemu+ssh://root@compute-1/system",
        "qemu+libssh2://root@compute-1/system",
        "qemu://compute-1.example/system",
    ],
)
def test_a_remote_host_without_a_console_address_is_refused_and_not_added(tmp_path: Path, uri: str) -> None:
    """A remote qemu URI without console_address is InvalidInput naming the flag, and no host row is written."""
    from lifecycle import Engine, upgrade

    url = f"sqlite:///{tmp_path / 'uris.db'}"
    upgrade(url)
    with Engine(url) as engine:
        with pytest.raises(InvalidInput, match="--console-address"):
            engine.hosts.add("r", uri, "/srv/r")
        assert engine.hosts.list() == []
        engine.hosts.add("local", "qemu:///system", "/srv/l")  # this machine's libvirtd needs none
        assert [h.name for h in engine.hosts.list()] == ["local"]


def test_host_add_of_a_remote_uri_without_console_address_exits_2(tmp_path: Path) -> None:
    """`lifecycle host add` of a qemu+tcp URI without --console-address exits 2 with the advice and adds nothing."""
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    base = [sys.executable, "-m", "lifecycle.cli", "--db", db]
    assert subprocess.run([*base, "db", "upgrade"], env=env, capture_output=True, check=False).returncode == 0
    done = subprocess.run(
        [*base, "host", "add", "r", "--uri", "qemu+tcp://10.0.0.5/system"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "--console-address" in done.stderr and "Traceback" not in done.stderr
    listed = subprocess.run([*base, "host", "list", "--json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(listed.stdout) == []
