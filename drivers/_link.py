"""One libvirt connection and the discipline every caller follows on it (the libvirt driver's machinery).

What libvirt guarantees, and what it does not. libvirt's FAQ says a
``virConnect`` may be used by several threads at once, and its RPC client
does pass one socket between concurrent callers ("passing the buck",
``src/rpc/virnetclient.c``). But in libvirt 9.0 (Debian 12), when keepalive
kills a connection while two calls are in flight on it, the waiting caller
inherits the I/O loop of a dead socket with a watch still attached that
points into the first caller's stack frame; when the peer resumes, that
watch fires and the process segfaults (reproduced with libvirt-python alone:
five crashes in five 30 s stalls with two threads calling; none in eleven
with every call serialized). libvirt-python adds no lock of its own, and
``virConnectClose`` while another thread is inside a call on the connection
is a use after free (calls take no reference for their duration).

So, here:

- every call on a connection, or on anything it made (domains, pools,
  volumes, streams: all RPCs on the same client), holds that connection's
  lock: one call in flight per connection, never two. The lock is fair
  (first come, first served), so a disk copy's chunks never starve a
  heartbeat. A caller waits as long as calls keep returning; once the call
  in flight has not returned for ``deadline`` seconds (a call stuck on a hung
  host holds the lock until keepalive ends it) the waiters get
  :class:`DriverUnavailable` instead of waiting on. A queue of quick calls is
  load, not a hang: the driver spreads its calls over a few connections
  (:class:`Link` is one of them) so that many workers on one host wait for
  each other only as long as libvirtd itself makes them;
- an open is never abandoned: one open per host runs at a time, on a thread
  of its own; a caller waits for it up to its deadline, and an open that
  completes late is kept as the next connection (the host answers again),
  not closed under anybody;
- a connection is closed only by :meth:`Link.close`, under its lock (so no
  call is in flight), and every connection stays referenced until then: no
  last reference ever drops inside a libvirt callback;
- the close callback only marks the link dead (it takes no lock a libvirt
  call may hold), and no thread calls on a dead link again.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from lifecycle.errors import DriverUnavailable

try:
    import libvirt
except ImportError:  # pragma: no cover - exercised where libvirt-python is absent
    libvirt = None

__all__ = ["Guarded", "Link", "Opener"]

_GUARDED_TYPES: tuple[type, ...] = (
    ()
    if libvirt is None
    else (libvirt.virConnect, libvirt.virDomain, libvirt.virStoragePool, libvirt.virStorageVol, libvirt.virStream)
)


class _FairLock:
    """A lock granted in the order it was asked for; a waiter keeps its place until it gives up."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def acquire(self, give_up: Callable[[], bool], poll: float = 0.2) -> bool:
        """Wait for the lock in turn; False as soon as ``give_up()`` (asked every ``poll`` seconds) says so."""
        with self._mutex:
            if not self._held and not self._waiters:
                self._held = True
                return True
            turn = threading.Event()
            self._waiters.append(turn)
        while not turn.wait(poll):
            if give_up():
                with self._mutex:
                    if turn.is_set():  # granted just as it gave up: it is ours
                        return True
                    self._waiters.remove(turn)
                    return False
        return True

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()  # handed over: still held, now by the next in line
            else:
                self._held = False

    @property
    def load(self) -> int:
        """How many callers hold or wait for the lock."""
        with self._mutex:
            return len(self._waiters) + self._held


class Link:
    """One open connection to a host: its lock, its liveness, and the calls made under them."""

    def __init__(self, conn: Any, uri: str, deadline: float) -> None:
        self.raw = conn
        self.uri = uri
        self.deadline = deadline
        self.dead = False
        """Set by the close callback (keepalive, the peer closing) or on a lost-connection error: no more calls."""
        self.closed = False
        self._lock = _FairLock()
        self._since: float | None = None
        """When the call in flight began (monotonic), None between calls."""

    @property
    def load(self) -> int:
        """How many calls are in flight on this connection or waiting for it."""
        return self._lock.load

    def stuck_for(self) -> float:
        """Seconds the call in flight has not returned for (0 when none is in flight)."""
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def call(self, name: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one libvirt call under this connection's lock; DriverUnavailable once the link hangs or dies.

        It hangs when the call in flight has not returned for ``deadline``
        seconds: however long the queue, a waiter gives up only then.
        """
        if self.dead:
            raise DriverUnavailable(f"{name}: the connection to {self.uri} was closed (keepalive or peer)", call=name)
        stuck = [0.0]

        def give_up() -> bool:
            stuck[0] = self.stuck_for()
            return self.dead or stuck[0] >= self.deadline

        if not self._lock.acquire(give_up):
            if self.dead:
                raise DriverUnavailable(f"{name}: the connection to {self.uri} was closed while waiting", call=name)
            raise DriverUnavailable(
                f"{name}: {self.uri} is busy with a call that has not returned for {stuck[0]:.0f} s (libvirtd hung?)",
                call=name,
            )
        try:
            if self.closed or self.dead:
                raise DriverUnavailable(f"{name}: the connection to {self.uri} is closed", call=name)
            self._since = time.monotonic()
            return guard(method(*args, **kwargs), self)
        finally:
            self._since = None
            self._lock.release()

    def close(self, before: Callable[[Any], None] | None = None) -> None:
        """Close the connection once no call is in flight on it (``before`` runs first, under the lock)."""
        if not self._lock.acquire(lambda: self.stuck_for() >= self.deadline):
            return  # a call is stuck on it: it stays referenced (and open) rather than freed under that call
        try:
            if self.closed:
                return
            self.closed = True
            if before is not None:
                before(self.raw)
            with contextlib.suppress(libvirt.libvirtError):
                self.raw.close()
        finally:
            self._lock.release()


class Guarded:
    """A libvirt object whose method calls hold its connection's lock; libvirt objects it returns are guarded too.

    Attributes that are not methods (``_o``, which libvirt-python reads off an
    argument such as a stream) pass through untouched.
    """

    __slots__ = ("_link", "_obj")

    def __init__(self, obj: Any, link: Link) -> None:
        self._obj = obj
        self._link = link

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return attr
        link = self._link

        def call(*args: Any, **kwargs: Any) -> Any:
            return link.call(name, attr, *args, **kwargs)

        return call


def guard(value: Any, link: Link) -> Any:
    """Wrap the libvirt objects in a call's result (alone, or in a list or tuple) so their calls hold the lock."""
    if isinstance(value, _GUARDED_TYPES):
        return Guarded(value, link)
    if isinstance(value, list):
        return [guard(item, link) for item in value]
    if isinstance(value, tuple):
        return tuple(guard(item, link) for item in value)
    return value


class Opener:
    """The one open of a host's connection in flight at a time, never abandoned.

    ``libvirt.open`` has no time limit (keepalive starts once it returned): it
    runs on a thread of its own, callers wait for it up to their deadline, and
    one that completes after every caller gave up is kept for the next caller.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._pending: Future[Any] | None = None

    def open(self, timeout: float, call: str) -> Any:
        """Return a new raw connection; DriverUnavailable past ``timeout``, libvirt's error if the open failed."""
        with self._lock:
            pending = self._pending
            if pending is None or (pending.done() and pending.exception() is not None):
                pending = self._pending = Future()
                threading.Thread(
                    target=self._run, args=(pending,), name=f"libvirt-open-{self.uri}", daemon=True
                ).start()
        started = time.monotonic()
        try:
            conn = pending.result(timeout)
        except TimeoutError:
            raise DriverUnavailable(
                f"{call}: {self.uri} did not answer within {time.monotonic() - started:.0f} s (libvirtd hung?);"
                " the open goes on and its connection is used once it answers",
                call=call,
            ) from None
        with self._lock:
            if self._pending is pending:
                self._pending = None  # taken: the next open starts afresh
        return conn

    def _run(self, pending: Future[Any]) -> None:
        try:
            pending.set_result(libvirt.open(self.uri))
        except BaseException as exc:  # handed to the waiting caller
            pending.set_exception(exc)
