"""Webhooks: every change posted, signed and in order; URLs, names, senders and secrets checked before anything runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import lifecycle.feed as feed
from lifecycle import Engine, InvalidInput
from lifecycle.cli import main
from lifecycle.errors import ConsumerInUse
from lifecycle.webhooks import Webhook, consumer_name, deliver, signature, verify
from tests.conftest import FLAVOR
from tests.test_feed import POSTGRES_ONLY, STOPPED, WAIT, wait_until
from tests.test_feed_outage import all_logs, kill_other_sessions

SECRET = b"a shared secret of some length"
OLD_SECRET = b"the secret being rotated out"


class Receiver(ThreadingHTTPServer):
    """An endpoint on 127.0.0.1 that keeps what it accepted; ``fail_odd`` answers 500 to every other request."""

    def __init__(self, *, fail_odd: bool = True, keys: tuple[bytes, ...] = (SECRET,)) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail_odd, self.keys = fail_odd, keys
        self.requests = 0
        self.accepted: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        stamp, signed = self.headers["X-Lifecycle-Timestamp"], self.headers["X-Lifecycle-Signature"]
        with self.server.lock:
            self.server.requests += 1
            self.server.headers_seen.append(dict(self.headers))
            fail = self.server.fail_odd and self.server.requests % 2 == 1
            if not all(verify(key, stamp, body, signed) for key in self.server.keys):
                self.server.bad_signatures += 1
            elif not fail:
                self.server.accepted.append({**json.loads(body), "header": self.headers["X-Lifecycle-Position"]})
        self.send_response(500 if fail else 204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:  # the test's output stays quiet
        pass


@contextmanager
def running(server: Receiver) -> Iterator[Receiver]:
    """Serve in a thread for the block."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def readable(engine: Engine) -> None:
    """Wait until the changes committed so far are readable (on PostgreSQL a transaction open elsewhere in a shared cluster holds them back a moment)."""
    wait_until("the changes committed so far readable", lambda: not engine.store.feed.held_back())


@contextmanager
def delivering(engine: Engine, hook: Webhook) -> Iterator[list[int]]:
    """Run the webhook in a thread for the block; yield where its count lands once it stopped."""
    stop, result = threading.Event(), []
    deliver(engine.services, hook, stop=STOPPED)  # registers its consumer at the newest change, here and now
    thread = threading.Thread(target=lambda: result.append(deliver(engine.services, hook, stop=stop)), daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join(WAIT)
        assert not thread.is_alive(), "the webhook did not stop when told"


def test_a_receiver_failing_half_its_requests_still_gets_every_change_in_order(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """Each change reaches the endpoint once accepted, in feed order, signed; every failed post was retried."""
    with running(Receiver()) as receiver:
        hook = Webhook(receiver.url, SECRET, first_backoff=0.005, max_backoff=0.02)
        with delivering(engine, hook) as result:
            uuid = new_instance()
            engine.stop(uuid)
            engine.start(uuid)
            readable(engine)
            feed = [c for c in engine.feed.changes(limit=10_000) if c.instance_uuid == uuid]
            wait_until("every change accepted", lambda: len(receiver.accepted) >= len(feed))
        assert result == [len(feed)]
    assert [a["position"] for a in receiver.accepted] == [str(c.position) for c in feed]
    assert [a["header"] for a in receiver.accepted] == [a["position"] for a in receiver.accepted]
    assert receiver.bad_signatures == 0 and receiver.requests == 2 * len(feed)
    (consumer,) = engine.feed.consumers()
    assert (consumer.name, consumer.position) == (consumer_name(hook.url), feed[-1].position)


def test_a_dead_endpoint_blocks_no_write_and_loses_nothing(engine: Engine, new_instance: Callable[..., str]) -> None:
    """With nothing listening, operations still commit; the webhook keeps its position and stops when told."""
    with running(Receiver()) as receiver:
        dead = receiver.url
    hook = Webhook(dead, SECRET, timeout=1.0, first_backoff=0.01, max_backoff=0.05)
    with delivering(engine, hook) as result:
        uuid = new_instance()
        engine.stop(uuid)
        engine.start(uuid)
        readable(engine)
        (consumer,) = engine.feed.consumers()
    assert result == [0]
    assert engine.feed.consumers() == [consumer], "nothing was delivered, so the position did not move"
    assert len([c for c in engine.feed.changes(after=consumer.position, limit=10_000) if c.instance_uuid == uuid]) == 9


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"url": "ftp://host/x"}, "http:// or https://"),
        ({"url": "http:///nohost"}, "with a host"),
        ({"url": "http://h/\x1b"}, "webhook URL"),
        ({"url": "http://[::1"}, "malformed: Invalid IPv6 URL"),
        ({"url": "http://[::1/hook"}, "malformed"),
        ({"url": "http://127.0.0.1:99999/hook"}, "malformed: Port out of range"),
        ({"url": "http://127.0.0.1:http/hook"}, "malformed"),
        ({"url": "http://127.0.0.1:0/hook"}, "port 0"),
        ({"url": "http://h/a b"}, "printable ASCII without spaces"),
        ({"url": "http://hôte/x"}, "punycode"),
        ({"url": "h" * 1025}, "1 to 1024"),
        ({"secret": b"short"}, "at least 16 bytes"),
        ({"secret": "a str, not bytes, long"}, "must be bytes"),
        ({"nova": "yes"}, "nova must be True or False"),
        ({"previous_secrets": (b"short",)}, "previous webhook secret must be at least 16 bytes"),
        ({"previous_secrets": [OLD_SECRET]}, "tuple of bytes"),
        ({"timeout": 0}, "webhook timeout"),
        ({"first_backoff": 2.0, "max_backoff": 1.0}, "webhook max backoff"),
    ],
)
def test_a_bad_webhook_is_refused(kw: dict[str, Any], needle: str) -> None:
    """A URL that is not http(s) with a host and a port in range, a short or non-bytes secret, or bad timings is InvalidInput."""
    values: dict[str, Any] = {"url": "http://127.0.0.1:9/hook", "secret": SECRET, **kw}
    with pytest.raises(InvalidInput, match=needle):
        Webhook(**values)


@pytest.mark.parametrize(
    "url",
    ["http://user:hunter2-pw@127.0.0.1:9/hook", "https://hunter2-pw@example.com/", "http://u:hunter2-pw@[::1/x"],
)
def test_a_url_with_a_password_is_refused_never_printed_and_registers_nothing(engine: Engine, url: str) -> None:
    """A user or password in the URL is InvalidInput, the error and the Webhook's repr never show it, and no consumer row is left."""
    with pytest.raises(InvalidInput) as caught:
        engine.feed.deliver_webhook(url, SECRET, stop=STOPPED)
    assert "hunter2" not in str(caught.value)
    assert engine.feed.consumers() == []
    assert "a shared secret" not in repr(Webhook("http://127.0.0.1:9/hook", SECRET, previous_secrets=(OLD_SECRET,)))


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]]/",
        "http://[v1.x]/",
        "http://[fe80::1%25lo]/",
        "http://a..b/",
        "http://-a.example/",
        "http://a_b.example/",
        f"http://{'a' * 64}.example/",
        f"http://{'a.' * 127}a/",
    ],
)
def test_a_host_no_request_can_reach_is_refused(engine: Engine, url: str) -> None:
    """A bracketed host that is not a plain IPv6 address, or a DNS name with a bad label or over 253 characters, is refused and registers nothing."""
    with pytest.raises(InvalidInput, match="host"):
        engine.feed.deliver_webhook(url, SECRET, stop=STOPPED)
    assert engine.feed.consumers() == []


@pytest.mark.parametrize(
    "url", ["http://[::1]:8080/x", "http://10.0.0.1/", f"http://{'a' * 63}.example.com./", "https://x-1.example/"]
)
def test_a_reachable_host_is_taken(url: str) -> None:
    """An IPv6 or IPv4 address, or a DNS name of 63-character labels (a trailing dot allowed), is a valid webhook host."""
    assert Webhook(url, SECRET).url == url


@pytest.mark.parametrize(
    "spelling",
    [
        "HTTP://127.0.0.1:18082/s",
        "http://127.0.0.1:0018082/s",
        "http://127.0.0.1:18082/s?",
        "http://127.0.0.1:18082/s#",
        "hTTp://127.0.0.1:18082/s?#",
    ],
)
def test_spellings_of_one_url_are_one_consumer(engine: Engine, spelling: str) -> None:
    """Scheme case, a port's leading zeros and an empty ? or # name the endpoint the normal spelling does: one consumer, one lock, that URL stored."""
    normal = "http://127.0.0.1:18082/s"
    assert consumer_name(spelling) == consumer_name(normal)
    engine.feed.deliver_webhook(spelling, SECRET, stop=STOPPED)
    assert engine.feed.webhook_urls() == {consumer_name(normal): normal}


@pytest.mark.parametrize(
    ("spelling", "normal"),
    [("http://EXAMPLE.com:80/A?b=C#d", "http://example.com/A?b=C#d"), ("https://[::1]:443/", "https://[::1]/")],
)
def test_a_url_is_stored_in_its_normal_spelling(spelling: str, normal: str) -> None:
    """The host is lowercased and a default port dropped, the path, query and fragment kept as written."""
    assert Webhook(spelling, SECRET).url == normal


def test_a_normally_spelled_url_keeps_its_consumer_name() -> None:
    """A URL already in its normal spelling keeps the name it always had (sha256 of the URL), so deployments keep their position."""
    assert (
        consumer_name("http://127.0.0.1:18082/s")
        == "webhook:" + hashlib.sha256(b"http://127.0.0.1:18082/s").hexdigest()[:16]
    )


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999/x", "http://127.0.0.1:x/", "gopher://h/"])
def test_a_malformed_url_registers_no_consumer(engine: Engine, url: str) -> None:
    """A URL refused by the sender's checks leaves no feed consumer row behind."""
    with pytest.raises(InvalidInput):
        engine.feed.deliver_webhook(url, SECRET, stop=STOPPED)
    assert engine.feed.consumers() == []


@pytest.mark.parametrize("name", ["webhook:abc", "WebHook:0123456789abcdef", consumer_name("http://127.0.0.1:9/")])
def test_webhook_consumer_names_are_reserved_for_senders(engine: Engine, name: str) -> None:
    """engine.feed.follow with a webhook: name (any case) is InvalidInput and registers nothing; forget still takes such a name."""
    with pytest.raises(InvalidInput, match="reserved"):
        engine.feed.follow(name, lambda c: None, stop=STOPPED)
    assert engine.feed.consumers() == []
    engine.feed.deliver_webhook("http://127.0.0.1:9/", SECRET, stop=STOPPED)
    engine.feed.forget_consumer(consumer_name("http://127.0.0.1:9/"))
    assert engine.feed.consumers() == []


def test_rotation_signs_with_both_secrets_so_either_key_verifies(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """With a previous secret each request carries two sha256= signatures, current first; a receiver holding either key verifies, another key does not."""
    with running(Receiver(fail_odd=False, keys=(SECRET, OLD_SECRET))) as receiver:
        hook = Webhook(receiver.url, SECRET, previous_secrets=(OLD_SECRET,), first_backoff=0.01)
        with delivering(engine, hook):
            new_instance()
            wait_until("a change accepted", lambda: len(receiver.accepted) >= 1)
    assert receiver.bad_signatures == 0
    headers = receiver.headers_seen[0]
    stamp, signed = headers["X-Lifecycle-Timestamp"], headers["X-Lifecycle-Signature"]
    current, previous = signed.split(", ")
    assert current.startswith("sha256=") and previous.startswith("sha256=")
    body = json.dumps({k: v for k, v in receiver.accepted[0].items() if k != "header"}, sort_keys=True).encode()
    assert current == signature(SECRET, stamp, body) and previous == signature(OLD_SECRET, stamp, body)
    assert not verify(b"some other receiver's secret", stamp, body, signed)


def test_one_secret_signs_as_it_always_did(engine: Engine, new_instance: Callable[..., str]) -> None:
    """With one secret the signature header is exactly one sha256= HMAC of TIMESTAMP.BODY (receivers of old keep working)."""
    receiver = Receiver(fail_odd=False)
    with running(receiver), delivering(engine, Webhook(receiver.url, SECRET, first_backoff=0.01)):
        new_instance()
        wait_until("a change accepted", lambda: len(receiver.accepted) >= 1)
    headers = receiver.headers_seen[0]
    body = json.dumps({k: v for k, v in receiver.accepted[0].items() if k != "header"}, sort_keys=True).encode()
    assert headers["X-Lifecycle-Signature"] == signature(SECRET, headers["X-Lifecycle-Timestamp"], body)
    assert "," not in headers["X-Lifecycle-Signature"]


def test_verify_refuses_an_old_timestamp_and_a_forged_body() -> None:
    """A signature older than the tolerance, over another body, or with a timestamp that is not digits does not verify."""
    now, body = str(int(time.time())), b'{"position": "0:1"}'
    old = str(int(time.time()) - 301)
    assert verify(SECRET, now, body, signature(SECRET, now, body))
    assert not verify(SECRET, old, body, signature(SECRET, old, body))
    assert not verify(SECRET, now, body + b" ", signature(SECRET, now, body))
    assert not verify(SECRET, "1e9", body, signature(SECRET, "1e9", body))


def test_a_second_sender_to_one_url_is_refused_and_delivers_nothing(
    engine: Engine, new_instance: Callable[..., str]
) -> None:
    """While a sender runs, another for the same URL raises ConsumerInUse at once; once the first stopped, one may start."""
    with running(Receiver(fail_odd=False)) as receiver:
        hook = Webhook(receiver.url, SECRET, first_backoff=0.01)
        with delivering(engine, hook):
            uuid = new_instance()
            readable(engine)
            made = len([c for c in engine.feed.changes(limit=10_000) if c.instance_uuid == uuid])
            wait_until("the first sender delivers", lambda: len(receiver.accepted) == made)
            give_up = threading.Timer(5.0, lambda: second_stop.set())  # a second sender let through must end
            second_stop = threading.Event()
            give_up.start()
            try:
                with pytest.raises(ConsumerInUse, match=r"another sender delivers to http://127\.0\.0\.1"):
                    deliver(engine.services, hook, stop=second_stop)
            finally:
                give_up.cancel()
            assert not second_stop.is_set(), "the second sender was refused at once"
        assert deliver(engine.services, hook, stop=STOPPED) == 0, (
            "the lock went with the first sender; nothing was left to send"
        )
    assert receiver.requests == made


# -- the command line -----------------------------------------------------------------------------------------


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A migrated SQLite database with host h1 and image cirros, made the CLI's through LIFECYCLE_DB_URL."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("LIFECYCLE_DB_URL", url)
    monkeypatch.delenv("LIFECYCLE_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("LIFECYCLE_WEBHOOK_SECRET_PREVIOUS", raising=False)
    assert main(["db", "upgrade"]) == 0
    with Engine(url) as engine:
        engine.hosts.add("h1", f"fake://{tmp_path / 'h1.json'}")
        image = tmp_path / "cirros.qcow2"
        image.write_bytes(b"QFI\xfb")
        engine.images.add("cirros", str(image))
    return url


def test_cli_refuses_a_url_with_a_password_without_printing_it(
    cli_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """changes webhook http://user:pass@... exits 2 with one error line that never shows the password, and registers nothing."""
    monkeypatch.setenv("LIFECYCLE_WEBHOOK_SECRET", SECRET.decode())
    code = main(["changes", "webhook", "http://alice:hunter2-pw@127.0.0.1:9/hook", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "hunter2" not in out + err and json.loads(out)["error"] == "InvalidInput"
    with Engine(cli_db) as engine:
        assert engine.feed.consumers() == []


def test_cli_refuses_a_secret_that_is_not_utf8(
    cli_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LIFECYCLE_WEBHOOK_SECRET (or _PREVIOUS) holding bytes that are not UTF-8 is a typed error, exit 2, no traceback."""
    for variable in ("LIFECYCLE_WEBHOOK_SECRET", "LIFECYCLE_WEBHOOK_SECRET_PREVIOUS"):
        monkeypatch.setenv("LIFECYCLE_WEBHOOK_SECRET", SECRET.decode())
        monkeypatch.setenv(variable, os.fsdecode(b"sixteen bytes or more \xff\xfe"))
        code = main(["changes", "webhook", "http://127.0.0.1:9/hook"])
        _, err = capsys.readouterr()
        assert code == 2 and err == f"error: {variable} must be UTF-8 text: its byte 22 is not UTF-8\n", err
    with Engine(cli_db) as engine:
        assert engine.feed.consumers() == []


def test_cli_refuses_a_reserved_consumer_name(cli_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """changes --consumer webhook:... (read or --follow) exits 2 and registers nothing."""
    for argv in (["changes", "--consumer", "webhook:x"], ["changes", "--follow", "--consumer", "WEBHOOK:y"]):
        assert main(argv) == 2
        assert "reserved" in capsys.readouterr().err
    with Engine(cli_db) as engine:
        assert engine.feed.consumers() == []


def _lifecycle(*argv: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Start ``lifecycle ARGV`` as a process of its own (stderr: JSON log lines)."""
    exe = Path(sys.executable).with_name("lifecycle")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "lifecycle.cli"]
    return subprocess.Popen(
        [*command, *argv],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def sender_process(url: str, hook_url: str, secret: bytes = SECRET) -> Iterator[subprocess.Popen[str]]:
    """Run ``lifecycle changes webhook HOOK_URL`` on ``url`` for the block; killed afterwards if still running."""
    process = _lifecycle(
        "changes", "webhook", hook_url, env={"LIFECYCLE_DB_URL": url, "LIFECYCLE_WEBHOOK_SECRET": secret.decode()}
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=WAIT)


def test_cli_second_sender_exits_2_and_a_killed_sender_frees_its_url(
    db_url: str, engine: Engine, new_instance: Callable[..., str]
) -> None:
    """A second `changes webhook` process for a running sender's URL exits 2 naming it; after the first is SIGKILLed a new sender runs; consumers shows the URL."""
    with running(Receiver(fail_odd=False)) as receiver:
        with sender_process(db_url, receiver.url) as first:
            wait_until("the first sender registers", lambda: bool(engine.feed.consumers()), 60)
            new_instance()
            wait_until("the first sender delivers", lambda: len(receiver.accepted) >= 1, 60)
            second = _lifecycle(
                "changes",
                "webhook",
                receiver.url,
                env={"LIFECYCLE_DB_URL": db_url, "LIFECYCLE_WEBHOOK_SECRET": SECRET.decode()},
            )
            _, err = second.communicate(timeout=60)
            assert second.returncode == 2, err
            assert err.splitlines()[-1].startswith("error: feed consumer 'webhook:") and "in use" in err
            first.send_signal(signal.SIGKILL)
            first.wait(WAIT)
        wait_until("the killed sender's lock to go", lambda: _can_send(engine, receiver.url), 30)
    shown = subprocess.run(
        [sys.executable, "-m", "lifecycle.cli", "changes", "consumers", "--json"],
        env={**os.environ, "LIFECYCLE_DB_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (row,) = json.loads(shown.stdout)
    assert (row["name"], row["url"]) == (consumer_name(receiver.url), receiver.url)
    assert engine.feed.webhook_urls() == {consumer_name(receiver.url): receiver.url}


def _can_send(engine: Engine, url: str) -> bool:
    try:
        deliver(engine.services, Webhook(url, SECRET, timeout=0.2, first_backoff=0.01), stop=STOPPED)
    except ConsumerInUse:
        return False
    return True


def test_cli_consumers_shows_each_webhook_url_and_never_a_secret(
    cli_db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """changes consumers (text and --json) prints the webhook's URL beside its consumer, null for others, and no secret."""
    with Engine(cli_db) as engine:
        engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
        engine.feed.deliver_webhook("http://127.0.0.1:9/hook", SECRET, stop=STOPPED, previous_secrets=(OLD_SECRET,))
        engine.feed.follow("billing", lambda c: None, stop=STOPPED)
    assert main(["changes", "consumers", "--json"]) == 0
    rows = {r["name"]: r["url"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"billing": None, consumer_name("http://127.0.0.1:9/hook"): "http://127.0.0.1:9/hook"}
    assert main(["changes", "consumers"]) == 0
    text = capsys.readouterr().out
    assert "http://127.0.0.1:9/hook" in text and "secret" not in text


# -- PostgreSQL: a sender's lock across a lost session ----------------------------------------------------


@POSTGRES_ONLY
def test_a_sender_that_lost_its_lock_to_another_stops_with_consumer_in_use(
    db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a killed session drops a sender's lock and a second sender takes it first, the first stops (ConsumerInUse) and only the second delivers."""
    monkeypatch.setattr(feed, "RECONNECT_FIRST", 1.0)
    first_errors: list[BaseException] = []
    with running(Receiver(fail_odd=False)) as receiver:
        hook = Webhook(receiver.url, SECRET, first_backoff=0.01)
        deliver(engine.services, hook, stop=STOPPED)
        stops = [threading.Event(), threading.Event()]

        def first() -> None:
            try:
                deliver(engine.services, hook, stop=stops[0])
            except BaseException as exc:
                first_errors.append(exc)

        threads = [threading.Thread(target=first, daemon=True)]
        threads[0].start()
        with all_logs() as logs:
            wait_until("the first sender holds its lock", lambda: _locks(engine) == 1)
            kill_other_sessions(engine)
            wait_until("the first sender lost", lambda: any(e["event"] == "feed_database_lost" for e in logs))
            threads.append(threading.Thread(target=deliver, args=(engine, hook), kwargs={"stop": stops[1]}))
            threads[1].start()
            threads[0].join(WAIT)
            assert not threads[0].is_alive(), "the first sender went on without its lock"
            engine.create("vm", host="h1", flavor=FLAVOR, image="cirros")
            wait_until("the second sender delivers", lambda: len(receiver.accepted) >= 1)
        for stop, thread in zip(stops, threads, strict=True):
            stop.set()
            thread.join(WAIT)
    assert len(first_errors) == 1 and isinstance(first_errors[0], ConsumerInUse), first_errors


def _locks(engine: Engine) -> int:
    """Advisory locks held on this test's database (the senders')."""
    query = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with engine.store.engine.connect() as conn:
        return int(conn.execute(sa.text(query)).scalar_one())


class _KillingHandler(_Handler):
    """Kills the sender's sessions while it answers the first request, and notes whether a lock was held at each."""

    def do_POST(self) -> None:
        server: Any = self.server
        server.held.append(_locks(server.engine))
        if len(server.held) == 1:
            kill_other_sessions(server.engine)
        super().do_POST()


@POSTGRES_ONLY
@pytest.mark.parametrize("fail_odd", [False, True], ids=["taken", "retried"])
def test_a_sender_posts_only_while_it_holds_its_lock(engine: Engine, fail_odd: bool) -> None:
    """A sender whose session (and lock) is lost mid-batch posts nothing more, retries included, until it holds the lock again, and keeps order."""
    receiver = Receiver(fail_odd=fail_odd)
    receiver.RequestHandlerClass = _KillingHandler
    server: Any = receiver
    server.engine, server.held = engine, []
    with running(receiver):
        hook = Webhook(receiver.url, SECRET, first_backoff=0.01)
        readable(engine)
        deliver(engine.services, hook, stop=STOPPED)
        before = len(engine.feed.changes(limit=10_000))
        for name in ("a", "b"):
            engine.create(name, host="h1", flavor=FLAVOR, image="cirros")
        readable(engine)  # else a transaction open elsewhere in the cluster may leave nothing to deliver
        want = [str(c.position) for c in engine.feed.changes(limit=10_000)][before:]
        stop = threading.Event()
        thread = threading.Thread(target=deliver, args=(engine, hook), kwargs={"stop": stop}, daemon=True)
        thread.start()
        wait_until("every change taken", lambda: len(receiver.accepted) >= len(want))
        stop.set()
        thread.join(WAIT)
    assert server.held[1:] and all(held == 1 for held in server.held[1:]), server.held
    assert [a["position"] for a in receiver.accepted] == want


@pytest.mark.parametrize("stamp", ["1" * 5000, "1" * 21, "", " 1", "+1", "1.0", "١٢٣"])
def test_verify_is_false_for_a_timestamp_not_of_1_to_20_ascii_digits(stamp: str) -> None:
    """A timestamp of thousands of digits, signs, spaces or non-ASCII digits is False, never a ValueError."""
    assert verify(SECRET, stamp, b"{}", signature(SECRET, stamp, b"{}"), tolerance=1e30) is False


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), -1, -0.5, "300", True])
def test_verify_refuses_a_tolerance_that_is_not_a_finite_number_of_seconds(tolerance: Any) -> None:
    """A tolerance of nan, inf, below 0 or not a number is InvalidInput (inf would accept any replay)."""
    stamp = str(int(time.time()))
    with pytest.raises(InvalidInput, match="tolerance"):
        verify(SECRET, stamp, b"{}", signature(SECRET, stamp, b"{}"), tolerance=tolerance)


def test_verify_takes_spaces_and_bounds_a_header_of_many_values() -> None:
    """Spaces around values are ignored, and a header of 100,000 values is answered (False) quickly without a crash."""
    stamp = str(int(time.time()))
    good = signature(SECRET, stamp, b"{}")
    assert verify(SECRET, stamp, b"{}", f"  {good}  ,  sha256=00 ")
    started = time.monotonic()
    assert verify(SECRET, stamp, b"{}", ", ".join(["sha256=00"] * 100_000 + [good])) is False
    assert time.monotonic() - started < 0.5
