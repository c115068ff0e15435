"""The console page's files, served by the console proxy over plain HTTP, and its small responses."""

from __future__ import annotations

from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["PAGE_DIR", "page_file", "response", "text"]

PAGE_DIR = Path(__file__).resolve().parents[1] / "console" / "dist"
"""Where ``scripts/console-assets.sh`` builds the page in a checkout (used when console_page_dir is empty)."""

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the page's URL holds the token
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
    ),
}


def page_file(page_dir: Path, path: str) -> Response:
    """Answer ``GET path``: ``/`` redirects to the page, a file of ``page_dir`` of a known type is served, else 404."""
    if path == "/":
        return response(302, "Found", Headers({"Location": "/vnc_lite.html"}), b"")
    if not (page_dir / "vnc_lite.html").is_file():
        return text(404, "Not Found", f"console page not built in {page_dir}: run scripts/console-assets.sh\n")
    root = page_dir.resolve()
    try:
        file = (root / path.lstrip("/")).resolve()
        found = file.is_relative_to(root) and file.is_file()
    except (OSError, ValueError):  # a name too long, a NUL: no such file
        found = False
    content_type = _TYPES.get(file.suffix) if found else None
    if not found or content_type is None:
        return text(404, "Not Found", "not found\n")
    return response(200, "OK", Headers({"Content-Type": content_type, **_PAGE_HEADERS}), file.read_bytes())


def response(status: int, reason: str, headers: Headers, body: bytes) -> Response:
    """Return an HTTP response with its Content-Length."""
    headers["Content-Length"] = str(len(body))
    return Response(status, reason, headers, body)


def text(status: int, reason: str, body: str) -> Response:
    """Return a plain-text HTTP response."""
    headers = Headers({"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"})
    return response(status, reason, headers, body.encode())
