"""Console tokens: unguessable, stored hashed, expiring, revoked on delete, tied to the host, purged when dead."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import sqlalchemy as sa

from lifecycle import Engine, InvalidState, TaskFailed, VmState, console, duties
from lifecycle.clock import ManualClock
from lifecycle.drivers.fake import FakeDriver
from lifecycle.errors import InvalidInput
from lifecycle.store.tables import CONSOLE_TOKENS, INSTANCES
from tests.conftest import FLAVOR, Fakes, all_logs
from tests.images import fake_image


def _token(url: str) -> str:
    path = parse_qs(urlparse(url).query)["path"][0]
    return parse_qs(urlparse(unquote(path)).query)["token"][0]


def test_token_gives_the_console_address_and_is_stored_only_hashed(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """The access URL carries a 256-bit token; checking it returns host and port; the database holds only a hash."""
    uuid = new_instance()
    access = engine.consoles.get_vnc_console(uuid)
    assert access.url.startswith(engine.settings.console_base_url + "?path=")
    assert _token(access.url) == access.token and len(access.token) >= 43
    conn = engine.consoles.check_token(access.token)
    assert conn is not None and (conn.instance_uuid, conn.host) == (uuid, "127.0.0.1") and conn.port >= 5900
    with engine.store.engine.connect() as db:
        stored = db.execute(sa.select(CONSOLE_TOKENS)).mappings().one()
    assert access.token not in str(dict(stored)) and len(stored["token_hash"]) == 64


def test_tokens_are_unique_and_wrong_ones_fail(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Two tokens for one instance differ; a made-up or altered token gives nothing; junk input is refused."""
    uuid = new_instance()
    a, b = engine.consoles.get_vnc_console(uuid).token, engine.consoles.get_vnc_console(uuid).token
    assert a != b
    assert engine.consoles.check_token(a[:-1] + ("A" if a[-1] != "A" else "B")) is None
    assert engine.consoles.check_token("guess") is None
    with pytest.raises(InvalidInput):
        engine.consoles.check_token("")


def test_tokens_expire(engine: Engine, new_instance: Callable[..., str], clock: ManualClock) -> None:
    """A token is valid until the clock reaches its time-to-live (console_token_ttl, 600 s), and not from then on."""
    token = engine.consoles.get_vnc_console(new_instance()).token
    clock.advance(engine.settings.console_token_ttl - 1)
    assert engine.consoles.check_token(token) is not None
    clock.advance(1)
    assert engine.consoles.check_token(token) is None


def test_delete_revokes_tokens(engine: Engine, new_instance: Callable[..., str]) -> None:
    """After delete the instance's tokens stop working, and no new one can be issued."""
    uuid = new_instance()
    token = engine.consoles.get_vnc_console(uuid).token
    engine.delete(uuid)
    assert engine.consoles.check_token(token) is None
    with pytest.raises(InvalidState):
        engine.consoles.get_vnc_console(uuid)


def test_a_moved_instance_invalidates_its_tokens(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A token is bound to the host it was issued for: once the instance lives elsewhere it is refused."""
    uuid = new_instance()
    token = engine.consoles.get_vnc_console(uuid).token
    with engine.store.engine.begin() as db:
        table = INSTANCES
        db.execute(sa.update(table).where(table.c.uuid == uuid).values(host="h2"))
    assert engine.consoles.check_token(token) is None


def test_a_remote_hosts_console_resolves_to_its_own_address(engine: Engine) -> None:
    """A host registered with a console address has its console tokens lead there, not to the engine's vnc_listen."""
    engine.hosts.add("far", "fake://", console_address="192.0.2.10")
    uuid = engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
    connection = engine.consoles.check_token(engine.consoles.get_vnc_console(uuid).token)
    assert connection is not None and connection.host == "192.0.2.10"


@pytest.mark.parametrize("address", ["", "not an address", "a" * 300, "host\x85name"])
def test_a_bad_console_address_is_refused(engine: Engine, address: str) -> None:
    """A console address must be an IP address or a host name; anything else is refused before the host is added."""
    with pytest.raises(InvalidInput):
        engine.hosts.add("far", "fake://", console_address=address)
    assert "far" not in [h.name for h in engine.hosts.list()]


def test_a_token_only_reaches_the_console_its_guest_still_serves(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A stopped guest serves no console, and a rebuilt one another port: the old token leads nowhere (Nova's port check)."""
    uuid = new_instance()
    token = engine.consoles.get_vnc_console(uuid).token
    engine.stop(uuid)
    assert engine.consoles.check_token(token) is None  # its port may be the next guest's now
    engine.start(uuid)
    assert engine.consoles.check_token(token) is not None  # the same domain serves the same port again
    engine.rebuild(uuid)  # a new domain: a new port
    assert fakes["h1"].get_vnc_console(uuid).port != engine.store.consoles.token(_hash(token))["console_port"]
    assert engine.consoles.check_token(token) is None
    fresh = engine.consoles.get_vnc_console(uuid).token
    fakes["h1"].unreachable = True  # the hypervisor cannot confirm the port: nothing is bridged
    assert engine.consoles.check_token(fresh) is None
    fakes["h1"].unreachable = False
    assert engine.consoles.check_token(fresh) is not None


def _hash(token: str) -> str:
    from lifecycle.console import token_hash

    return token_hash(token)


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu+tcp://far.example/system", True),
        ("qemu+tls://far.example/system", True),
        ("qemu+ssh://root@far.example/system", True),
        ("qemu+libssh://far.example/system", True),
        ("qemu+libssh2://far.example/system?known_hosts=/k", True),
        ("qemu+tcp://127.0.0.2/system", True),  # a transport is a remote libvirtd, whatever its address
        ("qemu+tcp://localhost/system", True),
        ("qemu://far.example/system", True),  # libvirt's default transport: TLS
        ("QEMU+TCP://far.example/system", True),
        ("qemu:///system", False),
        ("qemu:///session", False),
        ("qemu+unix:///system", False),
        ("qemu://localhost/system", False),
        ("qemu://localhost:16514/system", False),  # libvirt's own TLS port, spelled out
        ("qemu://localhost:16515/system", True),  # a forwarded port: a tunnel to any machine
        ("qemu:///system?socket=/run/ssh-forward/x", True),  # a forwarded socket
        ("qemu+unix:///system?socket=/srv/fwd/sock", True),
        ("qemu:///system?socket=/run/libvirt/libvirt-sock", False),  # libvirtd's own socket
        ("qemu:///system?socket=/var/run/libvirt/libvirt-sock", False),
        ("qemu:///session?socket=/run/user/1000/libvirt/libvirt-sock", False),
        ("qemu:///session?socket=/run/libvirt/libvirt-sock", True),  # the system socket is not the session's
        ("test:///default", False),
        ("fake://", False),
    ],
)
def test_which_hosts_need_a_console_address(uri: str, remote: bool) -> None:
    """A qemu URI with a network transport or another machine's name needs a console address; local ones do not."""
    assert console.requires_console_address(uri) is remote


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "127.1",
        "0",
        "::1",
        "::ffff:127.0.0.1",
        "localhost",
        "LocalHost",
        "a.localhost",
        "0.0.0.0",
        "::",
    ],
)
@pytest.mark.parametrize(
    "uri", ["qemu+tcp://10.0.0.5/system", "qemu://localhost:16515/system", "qemu:///system?socket=/f/s"]
)
def test_a_remote_host_with_a_console_address_of_this_machine_is_refused(
    engine: Engine, uri: str, address: str
) -> None:
    """A host needing a console address is refused one that is loopback, localhost or unspecified, and not added."""
    with pytest.raises(InvalidInput, match="this machine"):
        engine.hosts.add("far", uri, "/srv/far", console_address=address)
    assert "far" not in [h.name for h in engine.hosts.list()]


@pytest.mark.parametrize(
    ("uri", "address"),
    [
        ("qemu+tcp://10.0.0.5/system", "10.0.0.5"),
        ("qemu+tcp://127.0.0.2/system", "127.0.0.2"),  # a libvirtd listening on that loopback address
        ("qemu:///system", "127.0.0.1"),  # this machine's own libvirtd
        ("fake://", "::1"),
    ],
)
def test_a_console_address_that_is_where_the_guests_are_is_accepted(engine: Engine, uri: str, address: str) -> None:
    """A routable address, the loopback address the URI itself names, or loopback for a local host is accepted."""
    assert engine.hosts.add("h", uri, "/srv/h", console_address=address).console_address == address


def test_a_uri_that_does_not_parse_is_invalid_input() -> None:
    """An unclosed IPv6 bracket or a bad port is InvalidInput naming the URI, not a ValueError."""
    for uri in ("qemu+tcp://[::1/system", "qemu+tcp://far:99999/system"):
        with pytest.raises(InvalidInput, match="does not parse"):
            console.requires_console_address(uri)


@pytest.fixture
def far_engine(db_url: str, fakes: Fakes) -> Iterator[Engine]:
    """An engine whose host ``far`` is remote (qemu+tcp; a fake hypervisor answers) and has no console address.

    ``far`` is registered through the store, as hosts registered before the rule were.
    """
    eng = Engine(db_url, driver_factory=lambda host: fakes.setdefault(host.name, FakeDriver(host.name)))
    eng.images.add("cirros", fake_image("cirros"))
    eng.store.hosts.add("far", "qemu+tcp://far.example/system", "/var/lib/lifecycle/instances")
    yield eng
    eng.close()


def _token_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.store.engine.connect() as db:
        return [dict(r) for r in db.execute(sa.select(CONSOLE_TOKENS)).mappings()]


def test_a_remote_host_without_console_address_gets_no_token(far_engine: Engine, fakes: Fakes) -> None:
    """No token is issued for a guest of a remote host with no console address: InvalidInput naming host and fix."""
    uuid = far_engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
    with pytest.raises(InvalidInput) as refused:
        far_engine.consoles.get_vnc_console(uuid)
    message = str(refused.value)
    assert "host far (qemu+tcp://far.example/system)" in message and "--console-address" in message
    assert _token_rows(far_engine) == []
    far_engine.store.hosts.update("far", console_address="192.0.2.7")
    connection = far_engine.consoles.check_token(far_engine.consoles.get_vnc_console(uuid).token)
    assert connection is not None and connection.host == "192.0.2.7"


def test_a_token_issued_before_the_rule_never_leads_to_loopback(
    far_engine: Engine, fakes: Fakes, logged: list[MutableMapping[str, Any]]
) -> None:
    """A token a remote host without console address got earlier (leading to 127.0.0.1) is refused by check and lookup."""
    uuid = far_engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
    port = fakes["far"].get_vnc_console(uuid).port
    far_engine.store.consoles.add_token(
        _hash("old-token"), far_engine.get(uuid), "127.0.0.1", port, datetime.now(UTC) + timedelta(hours=1)
    )
    assert far_engine.consoles.check_token("old-token") is None
    assert console.lookup(far_engine.store, "old-token") is None
    assert any(e["event"] == "console_no_address" and e["host"] == "far" for e in logged), logged


def test_the_console_refusal_of_a_hostless_instance_never_lists_its_own_state_as_allowed(engine: Engine) -> None:
    """A host-less error or offloaded instance is refused naming the missing host, never its state as allowed."""
    uuid = engine.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    engine.shelve(uuid)  # shelved_offload_time 0: offloaded at once, no host
    with pytest.raises(InvalidState) as offloaded:
        engine.consoles.get_vnc_console(uuid)
    assert engine.get(uuid).vm_state is VmState.SHELVED_OFFLOADED
    assert "shelved_offloaded" not in offloaded.value.allowed_vm_states
    engine.hosts.set_enabled("h1", False)
    engine.hosts.set_enabled("h2", False)
    with pytest.raises(TaskFailed) as failed:
        engine.create("nowhere", flavor=FLAVOR, image="cirros")
    with pytest.raises(InvalidState, match="no host, so no console") as hostless:
        engine.consoles.get_vnc_console(failed.value.task.instance_uuid)
    assert hostless.value.vm_state is VmState.ERROR and "error" not in hostless.value.allowed_vm_states
    assert "allowed from vm_state active," in str(hostless.value)


@pytest.fixture
def logged() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture the library's log events of every level (a CLI run earlier in the session may have set a level filter)."""
    with all_logs() as events:
        yield events


def _age(engine: Engine, token: str, **moments: datetime) -> None:
    with engine.store.engine.begin() as db:
        table = CONSOLE_TOKENS
        db.execute(sa.update(table).where(table.c.token_hash == _hash(token)).values(**moments))


def test_the_purge_deletes_revoked_and_long_expired_tokens_and_keeps_live_ones(
    engine: Engine, new_instance: Callable[..., str], logged: list[MutableMapping[str, Any]], clock: ManualClock
) -> None:
    """The purge duty deletes revoked tokens and those expired beyond the grace; live and recently expired ones stay."""
    uuid = new_instance()
    old = engine.consoles.get_vnc_console(uuid).token
    clock.advance(120)
    recent = engine.consoles.get_vnc_console(uuid).token
    clock.advance(engine.settings.console_token_ttl + console.EXPIRED_GRACE - 60)  # old: past the grace by 60 s
    live, revoked = (engine.consoles.get_vnc_console(uuid).token for _ in range(2))
    _age(engine, revoked, revoked_at=clock.now())
    assert {r["token_hash"] for r in _token_rows(engine)} == {_hash(t) for t in (old, recent, live, revoked)}
    assert duties.purge_console_tokens(engine.services) == 2
    assert {r["token_hash"] for r in _token_rows(engine)} == {_hash(live), _hash(recent)}
    assert engine.consoles.check_token(live) is not None
    assert [(e["expired"], e["revoked"]) for e in logged if e["event"] == "console_tokens_purged"] == [(1, 1)]
    assert duties.purge_console_tokens(engine.services) == 0
    assert duties.purge_console_tokens(engine.services, grace=0) == 1  # the recently expired one, with no grace
    assert {r["token_hash"] for r in _token_rows(engine)} == {_hash(live)}
