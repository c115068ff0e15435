"""Pure checks for values that cross into the engine from callers and the command line.

Each function takes the value as given (``object``: callers may pass
anything), returns it normalised, or raises :class:`InvalidInput` naming what
was wrong, what was given and what is allowed. They read no database and
change nothing; the only one that looks outside is :func:`image_path`, which
asks the filesystem what the path is.

Limits are chosen so every supported database stores the value: integers fit
a 32-bit signed column, names fit the 255-character columns, and text never
holds characters a terminal or a log line would act on (controls, format
characters such as bidirectional overrides, line and paragraph separators) or
that cannot be encoded (lone surrogates from undecodable command-line bytes).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import unicodedata
from collections.abc import Mapping
from numbers import Real

from lifecycle.errors import InvalidInput

__all__ = [
    "MAX_INT",
    "MAX_SECONDS",
    "count",
    "database_url",
    "host_address",
    "image_path",
    "labels",
    "masked_query",
    "metrics",
    "name",
    "period",
    "seconds",
    "short_name",
    "shown_url",
    "unsafe_character",
    "uuid",
]

MAX_INT = 2**31 - 1
"""The largest integer every supported database stores in an INTEGER column."""
MAX_SECONDS = float(MAX_INT)
"""The longest duration accepted (about 68 years): far beyond any real setting, still a valid timedelta."""
MAX_PATH = 1024
"""The length of the path columns."""

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}", re.ASCII)


def unsafe_character(text: str) -> str | None:
    """Return the first character of ``text`` no name may hold, or None.

    Those are controls (C0, DEL, C1: category Cc), format characters (Cf:
    bidirectional overrides, zero-width spaces), line and paragraph
    separators (Zl, Zp) and lone surrogates (Cs).
    """
    if text.isprintable():  # the fast path: printable text holds none of them
        return None
    return next((c for c in text if unicodedata.category(c) in _UNSAFE_CATEGORIES), None)


_KINDS = {"Cc": "a control character", "Cf": "a format character", "Cs": "a lone surrogate"}


def _describe(char: str) -> str:
    name = unicodedata.name(char, "")
    kind = _KINDS.get(unicodedata.category(char), "a line or paragraph separator")
    return f"U+{ord(char):04X}{f' ({name})' if name else ''}, {kind},"


def _number(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"


def name(kind: str, value: object) -> str:
    """Return ``value`` if it is a usable name for a ``kind`` (instance, host, image...).

    1 to 255 characters, none of them unsafe (see :func:`unsafe_character`).
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{kind} name must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= 255:
        raise InvalidInput(f"invalid {kind} name {_clip(value)}: 1 to 255 characters, got {len(value)}")
    bad = unsafe_character(value)
    if bad is not None:
        raise InvalidInput(
            f"invalid {kind} name {_clip(value)}: {_describe(bad)} is not allowed (only printable characters are)"
        )
    return value


def uuid(value: object, kind: str = "instance") -> str:
    """Return ``value`` as a canonical lowercase uuid (``8-4-4-4-12`` hex digits, or 32 without dashes)."""
    if not isinstance(value, str) or _UUID.fullmatch(value.lower()) is None:
        raise InvalidInput(f"invalid {kind} uuid {_clip(value)}: expected 8-4-4-4-12 hexadecimal digits")
    digits = value.lower().replace("-", "")
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def count(label: str, value: object, *, low: int = 0, high: int = MAX_INT) -> int:
    """Return ``value`` if it is an integer (not a bool) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{label} must be an integer from {low} to {high}, got {_clip(value)}")
    return value


def seconds(label: str, value: object, *, low: float = 0.0, high: float = MAX_SECONDS) -> float:
    """Return ``value`` as float seconds if it is a finite real number (not a bool) from ``low`` to ``high``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidInput(f"{label} must be a number of seconds, got {_clip(value)}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidInput(
            f"{label} must be a finite number of seconds from {_number(low)} to {_number(high)}, got {_clip(value)}"
        )
    return number


def period(label: str, value: object, minimum: float = 0.1) -> float:
    """Return ``value`` as the seconds between two runs of a periodic job: at least ``minimum``.

    A zero or negative period would make a loop spin a core; NaN and infinity
    would make it never run or never stop waiting.
    """
    return seconds(label, value, low=minimum)


def image_path(path: object) -> str:
    """Return ``path`` if it names an existing regular file by an absolute path (symlinks followed)."""
    if not isinstance(path, str):
        raise InvalidInput(f"image path must be a string, got {type(path).__name__}")
    shown = _clip(path)
    if not path or len(path) > MAX_PATH:
        raise InvalidInput(f"invalid image path {shown}: 1 to {MAX_PATH} characters, got {len(path)}")
    bad = unsafe_character(path)
    if bad is not None or "\0" in path:
        raise InvalidInput(f"invalid image path {shown}: {_describe(bad or chr(0))} is not allowed in a path")
    if not os.path.isabs(path):
        raise InvalidInput(f"image path {shown} must be absolute")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InvalidInput(f"image path {shown} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"image path {shown} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise InvalidInput(f"image path {shown} is {kind}: expected an image file")
    return path


def database_url(label: str, value: object) -> str:
    """Return ``value``, stripped, if SQLAlchemy parses it as a database URL with a usable host part.

    Refused (:class:`InvalidInput` naming ``label``, where the URL came from): an empty or non-string
    value, one SQLAlchemy cannot parse (an unclosed IPv6 bracket, a port that is not a number), a port
    past 65535, and a host part holding ``@``: a password holding ``@`` must be percent-encoded (``%40``),
    else the text after its ``@`` is taken for the host and shows up in connection errors. The URL is
    shown by :func:`shown_url`, never with its password.
    """
    import sqlalchemy as sa  # here: only reading a configuration needs it

    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(
            f"{label}: a database URL is a non-empty string (e.g. sqlite:///lifecycle.db), got {_clip(value)}"
        )
    text = value.strip()
    shown = shown_url(text)
    if unsafe_character(text):
        raise InvalidInput(f"{label}: database URL {shown} holds a control or format character")
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError:
        raise InvalidInput(
            f"{label}: {shown} is not a database URL (dialect[+driver]://user:password@host:port/database,"
            " or sqlite:///path)"
        ) from None
    except ValueError:  # its own text may hold the password: never shown
        raise InvalidInput(
            f"{label}: database URL {shown} does not parse: its port must be a number from 1 to 65535 and an IPv6"
            " host goes in brackets ([::1]); a password holding : / @ ? # must be percent-encoded"
        ) from None
    if url.host is not None and "@" in url.host:
        raise InvalidInput(
            f"{label}: the host part of database URL {shown} holds '@': a password holding @ must be"
            " percent-encoded (@ as %40; urllib.parse.quote(password, safe='') encodes it)"
        )
    if url.port is not None and not 1 <= url.port <= 65535:
        raise InvalidInput(f"{label}: database URL {shown} has port {url.port}: a port is from 1 to 65535")
    return text


_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


def shown_url(url: str) -> str:
    """Return a URL as it may be printed: whatever stands between ``user:`` and the last ``@`` is masked.

    Unlike SQLAlchemy's own masking this needs no parse, so it also masks URLs that do not parse,
    and the whole of a password holding an unencoded ``@``. A ``password`` or ``sslpassword`` in
    the query (libpq takes both there) is masked too.
    """
    return masked_query(_shown_authority(url))


def masked_query(url: str) -> str:
    """Return ``url`` with the value of a ``password`` or ``sslpassword`` query parameter masked."""
    return _QUERY_PASSWORD.sub(r"\1***", url)


def _shown_authority(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and not userinfo.startswith("/"):  # sqlite:///a@b.db has no user part
        user, colon, _password = userinfo.partition(":")
        return _clip(f"{scheme}://{user}{':***' if colon else ''}@{host}", 200)
    authority, slash, path = rest.partition("/")
    name, colon, port = authority.rpartition(":")
    if sep and colon and not port.isdigit() and "]" not in port:  # user:password with no @host: not a port
        return _clip(f"{scheme}://{name}:***{slash}{path}", 200)
    return _clip(url, 200)


def labels(kind: str, value: object) -> dict[str, str]:
    """Validate a mapping of names to short strings (capabilities, image properties); None is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{kind} must be a mapping of strings, got {type(value).__name__}")
    for key, text in value.items():
        name(f"{kind} key", key)
        if not isinstance(text, str) or len(text) > 255 or unsafe_character(text):
            raise InvalidInput(f"{kind} {key!r} must be a printable string of at most 255 characters, got {text!r}")
    return dict(value)


MAX_METADATA_ITEMS = 128
"""Nova's ``metadata_items`` quota default: the most key/value pairs an instance's metadata holds."""


def metadata(value: object) -> dict[str, str]:
    """Validate an instance's metadata as Nova does: at most 128 pairs, keys 1-255, values 0-255 printable chars."""
    checked = labels("metadata", value)
    if len(checked) > MAX_METADATA_ITEMS:
        raise InvalidInput(f"metadata has {len(checked)} items: at most {MAX_METADATA_ITEMS}")
    return checked


def short_name(kind: str, value: object, limit: int) -> str:
    """Validate a name of at most ``limit`` characters."""
    text = name(kind, value)
    if len(text) > limit:
        raise InvalidInput(f"{kind} {text[:40]!r}... is {len(text)} characters: at most {limit}")
    return text


def host_address(kind: str, value: object) -> str | None:
    """Validate an IP address or a DNS host name (None stays None)."""
    if value is None:
        return None
    text = short_name(kind, value, 255)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?", text):
            raise InvalidInput(f"{kind} {text!r} is neither an IP address nor a host name") from None
    return text


def metrics(value: object) -> dict[str, float]:
    """Return host metrics as a dict of metric name to finite float."""
    if not isinstance(value, Mapping):
        raise InvalidInput(f"metrics must be a mapping of name to number, got {type(value).__name__}")
    result: dict[str, float] = {}
    for key, number in value.items():
        label = f"metric {name('metric', key)!r}"
        result[key] = _finite(label, number)
    return result


def _finite(label: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise InvalidInput(f"{label} must be a finite number, got {_clip(value)}")
    return float(value)


def _clip(value: object, limit: int = 80) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, so a huge argument cannot flood an error line."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for str() (sys.get_int_max_str_digits)
        return f"an integer of {value.bit_length() if isinstance(value, int) else '?'} bits"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
