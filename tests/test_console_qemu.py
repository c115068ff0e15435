"""Browser consoles end to end: a real QEMU guest, `lifecycle console`, `lifecycle console-proxy`, headless Chromium.

Chromium is Debian's (``/usr/bin/chromium``, installed by ``scripts/bootstrap.sh``), driven by
Playwright for Python with a new, empty profile; the page and noVNC come from ``console/dist``
(``scripts/console-assets.sh``). The guests have no OS: their screen is SeaBIOS's text saying so.
Each test keeps its canvas screenshot as an artifact: under its ``tmp_path``, and in
``$LIFECYCLE_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from lifecycle.console_proxy import PAGE_DIR
from tests.conftest import QEMU_URI, RemoteHost, holds_for, qemu_ready, require, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

LIFECYCLE = str(Path(sys.executable).with_name("lifecycle"))
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_COLOURS_JS = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width || !canvas.height) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length && seen.size < 8; i += 4) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  return seen.size;
}"""


_LIT_JS = """() => {
  const canvas = document.querySelector('#screen canvas');
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) lit++;
  return lit;
}"""
"""How many pixels of the canvas differ from its top left corner's (the screen's background)."""


def chromium_ready() -> None:
    """Require Debian's chromium, Playwright for Python, and the built console page."""
    require("chromium", CHROMIUM.is_file(), "apt-get install chromium (scripts/bootstrap.sh does, as root)")
    require("playwright", importlib.util.find_spec("playwright") is not None, "pip install -e '.[dev]'")
    require("the console page", (PAGE_DIR / "vnc_lite.html").is_file(), "run scripts/console-assets.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Setup:
    """A database with hosts a (qemu:///system) and b (the second libvirtd), the CLI and the console proxy."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.tmp_path = tmp_path
        config = tmp_path / "lifecycle.toml"
        config.write_text(
            f'database_url = "sqlite:///{tmp_path / "console.db"}"\n'
            'libvirt_domain_type = "qemu"\n'
            "shutdown_timeout = 0\n"
            f'console_base_url = "http://127.0.0.1:{self.port}/vnc_lite.html"\n'
            f'console_proxy_listen = "127.0.0.1:{self.port}"\n'
        )
        self.env = {**os.environ, "LIFECYCLE_CONFIG": str(config)}
        self.env.pop("LIFECYCLE_DB_URL", None)
        self.proxy: subprocess.Popen[str] | None = None

    def __call__(self, *args: str) -> Any:
        done = subprocess.run([LIFECYCLE, *args, "--json"], capture_output=True, text=True, env=self.env, timeout=180)
        assert done.returncode == 0, f"lifecycle {' '.join(args)}: {done.stderr[-2000:]}"
        return json.loads(done.stdout) if done.stdout.strip() else None

    def create(self, host: str) -> str:
        return str(self("create", "vm", "--host", host, "--flavor", "vcpus=1,ram=64,disk=1", "--image", "base")["uuid"])

    def start_proxy(self) -> None:
        """Start ``lifecycle console-proxy`` (its address from the config file) and wait until it serves the page."""
        # Its log goes to a file: a pipe nobody reads until the end fills up and blocks the proxy's event loop.
        with (self.tmp_path / "proxy.log").open("w") as log:
            self.proxy = subprocess.Popen(
                [LIFECYCLE, "--log-level", "info", "console-proxy"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )
        wait_until("the console proxy to serve its page", self._serving, 60, interval=0.1)

    def _serving(self) -> bool:
        """Whether the proxy answers for its page (it must still run)."""
        assert self.proxy is not None and self.proxy.poll() is None, self.log()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/vnc_lite.html", timeout=5).close()
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def stop_proxy(self) -> str:
        """Stop the proxy by its pid (SIGTERM) and return its log; it must exit 0."""
        assert self.proxy is not None
        if self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGTERM)
        try:
            self.proxy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proxy.kill()
            self.proxy.wait(timeout=10)
        err = self.log()
        assert self.proxy.returncode == 0, err[-4000:]
        return err

    def log(self) -> str:
        """What the proxy logged so far."""
        return (self.tmp_path / "proxy.log").read_text(errors="replace")


@pytest.fixture
def setup(tmp_path: Path, base_image: Path) -> Iterator[Setup]:
    """Host a (qemu:///system, VNC on 127.0.0.1), an image, and the settings in a config file."""
    qemu_ready()
    chromium_ready()
    tmp_path.chmod(0o755)
    run = Setup(tmp_path)
    run("db", "upgrade")
    run("host", "add", "a", "--uri", QEMU_URI, "--instances-path", str(tmp_path / "a"))
    run("host", "heartbeat", "a")
    run("image", "add", "base", "--path", str(base_image))
    yield run
    if run.proxy is not None and run.proxy.poll() is None:
        run.stop_proxy()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's) with a new, empty profile, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 900, "height": 560},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _png_colours(png: bytes) -> set[bytes]:
    """Decode an 8-bit, non-interlaced RGB(A) PNG (as Chromium writes them) and return its distinct pixels."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        data = png[pos + 8 : pos + 8 + length]
        header, idat = (data, idat) if kind == b"IHDR" else (header, idat + data if kind == b"IDAT" else idat)
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and interlace == 0 and colour_type in (2, 6)
    bpp = 3 if colour_type == 2 else 4
    raw, stride, prev, colours = zlib.decompress(idat), width * bpp, bytearray(width * bpp), set()
    for row in range(height):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for x in range(stride):
            a, b = (line[x - bpp] if x >= bpp else 0), prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            p = a + b - c
            predictor = [
                0,
                a,
                b,
                (a + b) // 2,
                a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c,
            ]
            line[x] = (line[x] + predictor[kind]) & 255
        colours.update(bytes(line[x : x + 3]) for x in range(0, stride, bpp))
        prev = line
    return colours


def _see_the_screen(browser: Any, url: str, name: str, tmp_path: Path) -> Any:
    """Open the console URL; wait until the guest's screen is drawn; keep and check a screenshot of the canvas."""
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#status[data-state=connected]", timeout=60_000)
    # Polled from here: wait_for_function compiles its predicate inside the page, which the page's CSP
    # (no 'unsafe-eval') refuses; evaluate runs through the DevTools protocol, which the CSP does not cover.
    wait_until("the guest's screen drawn", lambda: page.evaluate(_COLOURS_JS) > 1, 60, interval=0.25)
    lit = [0]

    def settled() -> bool:
        """Whether no new line of text appeared since the last look (a blinking cursor is a few pixels)."""
        before, lit[0] = lit[0], page.evaluate(_LIT_JS)
        return lit[0] - before < 32

    wait_until("the firmware's lines written out (a screenshot worth keeping)", settled, 30, interval=0.5)
    canvas = page.locator("#screen canvas")
    shot = canvas.screenshot()
    kept = {name: shot, name.replace(".png", "-page.png"): page.screenshot()}  # the canvas, and the whole page
    for folder in (tmp_path, os.environ.get("LIFECYCLE_TEST_ARTIFACTS")):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            for file, png in kept.items():
                (Path(folder) / file).write_bytes(png)
    colours = _png_colours(shot)
    assert len(colours) > 1, f"the screenshot is one colour: {colours}"
    return page


def test_the_console_url_shows_the_guests_screen_and_a_stopped_proxy_closes_cleanly(
    setup: Setup, browser: Any, tmp_path: Path
) -> None:
    """Chromium opens `lifecycle console`'s URL and shows the guest's firmware screen; SIGTERM to the proxy closes it cleanly."""
    uuid = setup.create("a")
    url = setup("console", uuid)["url"]
    assert url.startswith(f"http://127.0.0.1:{setup.port}/vnc_lite.html?path=")
    setup.start_proxy()
    page = _see_the_screen(browser, url, "console.png", tmp_path)
    log = setup.stop_proxy()
    page.wait_for_selector("#status[data-state=disconnected]", timeout=30_000)
    assert page.evaluate("document.body.dataset.clean") == "true"  # noVNC saw a close frame, not a dropped socket
    assert "console_opened" in log and "console_closed" in log
    assert url.split("token%3D")[1] not in log
    setup("delete", uuid)


def test_a_console_on_the_remote_host_and_refused_once_the_guest_is_deleted(
    setup: Setup, browser: Any, tmp_path: Path, remote_host: RemoteHost, remote_instances: PurePosixPath
) -> None:
    """A guest on the second libvirtd is shown through 127.0.0.2; after its delete the same URL is refused in the browser."""
    b = ["--uri", remote_host.uri, "--instances-path", str(remote_instances), "--console-address", "127.0.0.2"]
    setup("host", "add", "b", *b)
    setup("host", "heartbeat", "b")
    uuid = setup.create("b")
    url = setup("console", uuid)["url"]
    setup.start_proxy()
    page = _see_the_screen(browser, url, "console-remote.png", tmp_path)
    page.close()
    setup("delete", uuid)
    again = browser.new_page()
    again.goto(url)
    again.wait_for_selector("#status[data-state=failed]", timeout=30_000)
    log = setup.stop_proxy()
    opened = [json.loads(line) for line in log.splitlines() if '"console_opened"' in line]
    refused = [json.loads(line) for line in log.splitlines() if '"console_refused"' in line]
    assert [o["host"] for o in opened] == ["127.0.0.2"]
    assert [r["reason"] for r in refused] == ["invalid_token"]


def _token(url: str) -> str:
    """The token inside a console URL (``...?path=%3Ftoken%3D<token>``)."""
    from urllib.parse import parse_qs, unquote, urlsplit

    path = parse_qs(urlsplit(url).query)["path"][0]
    return parse_qs(urlsplit(unquote(path)).query)["token"][0]


def _handshake(setup: Setup, token: str) -> tuple[int, float]:
    """Open a websocket to the proxy with ``token``: (101 or the refusal's HTTP status, seconds it took)."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    started = time.monotonic()
    origin = f"http://127.0.0.1:{setup.port}"
    try:
        with connect(
            f"ws://127.0.0.1:{setup.port}/websockify?token={token}",
            additional_headers={"Origin": origin},
            open_timeout=30,
        ) as ws:
            ws.recv(timeout=10)  # the guest's RFB greeting
            return 101, time.monotonic() - started
    except InvalidStatus as refused:
        return refused.response.status_code, time.monotonic() - started


def _into(codes: list[int], setup: Setup, token: str) -> None:
    codes.append(_handshake(setup, token)[0])


def test_the_proxy_survives_handshakes_to_a_stalled_host_and_its_resume(
    setup: Setup, remote_host: RemoteHost, remote_instances: PurePosixPath
) -> None:
    """8 handshakes to b's guest while its libvirtd is stopped, then its resume, 3 times: the proxy lives, a's answer within 1 s."""
    import threading

    from websockets.sync.client import connect

    from tests.test_fleet_qemu import frozen

    b = ["--uri", remote_host.uri, "--instances-path", str(remote_instances), "--console-address", "127.0.0.2"]
    setup("host", "add", "b", *b)
    setup("host", "heartbeat", "b")
    here, there = setup.create("a"), setup.create("b")
    near, far = _token(setup("console", here)["url"]), _token(setup("console", there)["url"])
    setup.env["PYTHONFAULTHANDLER"] = "1"
    setup.start_proxy()
    origin = {"Origin": f"http://127.0.0.1:{setup.port}"}

    def a_answers() -> bool:
        code, took = _handshake(setup, near)
        assert (code, took < 1.0) == (101, True), (code, took)
        session.ping().wait(1.0)  # the open session to a's guest stays open
        return True

    def b_answers() -> bool:
        assert setup.proxy is not None and setup.proxy.poll() is None, setup.log()
        return _handshake(setup, far)[0] == 101

    with connect(f"ws://127.0.0.1:{setup.port}/websockify?token={near}", additional_headers=origin) as session:
        session.recv(timeout=10)
        for _ in range(3):
            codes: list[int] = []
            with frozen(remote_host):
                stuck = [threading.Thread(target=_into, args=(codes, setup, far)) for _ in range(8)]
                for thread in stuck:
                    thread.start()
                holds_for("a's console answering within 1 s, its open session open", a_answers, 30, interval=1.0)
                for thread in stuck:
                    thread.join(30)
                assert codes == [503] * 8, codes
            wait_until("b's console back (b answers again)", b_answers, 90, interval=1.0)
    assert setup.proxy is not None and setup.proxy.poll() is None
    setup.stop_proxy()
    for uuid in (here, there):
        setup("delete", uuid)
