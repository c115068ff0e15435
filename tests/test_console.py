"""Console tokens: unguessable, stored hashed, expiring, revoked on delete, tied to the host."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import sqlalchemy as sa

from lifecycle import Engine, InvalidState
from lifecycle.errors import InvalidInput
from lifecycle.store.tables import ConsoleTokenRow, InstanceRow
from tests.conftest import FLAVOR, Fakes, make_engine


def _token(url: str) -> str:
    path = parse_qs(urlparse(url).query)["path"][0]
    return parse_qs(urlparse(unquote(path)).query)["token"][0]


def test_token_gives_the_console_address_and_is_stored_only_hashed(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """The access URL carries a 256-bit token; checking it returns host and port; the database holds only a hash."""
    uuid = new_instance()
    access = engine.get_vnc_console(uuid)
    assert access.url.startswith(engine.settings.console_base_url + "?path=")
    assert _token(access.url) == access.token and len(access.token) >= 43
    conn = engine.check_console_token(access.token)
    assert conn is not None and (conn.instance_uuid, conn.host) == (uuid, "127.0.0.1") and conn.port >= 5900
    with engine.store.engine.connect() as db:
        stored = db.execute(sa.select(ConsoleTokenRow.__table__)).mappings().one()  # type: ignore[attr-defined]
    assert access.token not in str(dict(stored)) and len(stored["token_hash"]) == 64


def test_tokens_are_unique_and_wrong_ones_fail(engine: Engine, new_instance: Callable[..., str]) -> None:
    """Two tokens for one instance differ; a made-up or altered token gives nothing; junk input is refused."""
    uuid = new_instance()
    a, b = engine.get_vnc_console(uuid).token, engine.get_vnc_console(uuid).token
    assert a != b
    assert engine.check_console_token(a[:-1] + ("A" if a[-1] != "A" else "B")) is None
    assert engine.check_console_token("guess") is None
    with pytest.raises(InvalidInput):
        engine.check_console_token("")


def test_tokens_expire(sqlite_url: str, fakes: Fakes) -> None:
    """A token past its time-to-live is no longer valid."""
    eng = make_engine(sqlite_url, fakes, console_token_ttl=0.0)
    uuid = eng.create("vm", host="h1", flavor=FLAVOR, image="cirros").instance_uuid
    assert eng.check_console_token(eng.get_vnc_console(uuid).token) is None
    eng.close()


def test_delete_revokes_tokens(engine: Engine, new_instance: Callable[..., str]) -> None:
    """After delete the instance's tokens stop working, and no new one can be issued."""
    uuid = new_instance()
    token = engine.get_vnc_console(uuid).token
    engine.delete(uuid)
    assert engine.check_console_token(token) is None
    with pytest.raises(InvalidState):
        engine.get_vnc_console(uuid)


def test_a_moved_instance_invalidates_its_tokens(engine: Engine, new_instance: Callable[..., str]) -> None:
    """A token is bound to the host it was issued for: once the instance lives elsewhere it is refused."""
    uuid = new_instance()
    token = engine.get_vnc_console(uuid).token
    with engine.store.engine.begin() as db:
        table = InstanceRow.__table__  # type: ignore[attr-defined]
        db.execute(sa.update(table).where(table.c.uuid == uuid).values(host="h2"))
    assert engine.check_console_token(token) is None


def test_a_remote_hosts_console_resolves_to_its_own_address(engine: Engine) -> None:
    """A host registered with a console address has its console tokens lead there, not to the engine's vnc_listen."""
    engine.add_host("far", "fake://", console_address="192.0.2.10")
    uuid = engine.create("vm", host="far", flavor=FLAVOR, image="cirros").instance_uuid
    connection = engine.check_console_token(engine.get_vnc_console(uuid).token)
    assert connection is not None and connection.host == "192.0.2.10"


@pytest.mark.parametrize("address", ["", "not an address", "a" * 300, "host\x85name"])
def test_a_bad_console_address_is_refused(engine: Engine, address: str) -> None:
    """A console address must be an IP address or a host name; anything else is refused before the host is added."""
    with pytest.raises(InvalidInput):
        engine.add_host("far", "fake://", console_address=address)
    assert "far" not in [h.name for h in engine.hosts()]


def test_a_token_only_reaches_the_console_its_guest_still_serves(
    engine: Engine, fakes: Fakes, new_instance: Callable[..., str]
) -> None:
    """A stopped guest serves no console, and a rebuilt one another port: the old token leads nowhere (Nova's port check)."""
    uuid = new_instance()
    token = engine.get_vnc_console(uuid).token
    engine.stop(uuid)
    assert engine.check_console_token(token) is None  # its port may be the next guest's now
    engine.start(uuid)
    assert engine.check_console_token(token) is not None  # the same domain serves the same port again
    engine.rebuild(uuid)  # a new domain: a new port
    assert fakes["h1"].get_vnc_console(uuid).port != engine.store.console_token(_hash(token))["console_port"]
    assert engine.check_console_token(token) is None
    fresh = engine.get_vnc_console(uuid).token
    fakes["h1"].unreachable = True  # the hypervisor cannot confirm the port: nothing is bridged
    assert engine.check_console_token(fresh) is None
    fakes["h1"].unreachable = False
    assert engine.check_console_token(fresh) is not None


def _hash(token: str) -> str:
    from lifecycle.console import token_hash

    return token_hash(token)
