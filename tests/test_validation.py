"""The pure argument checks: what each accepts and normalises, and what it refuses with InvalidInput."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from lifecycle import validation
from lifecycle.errors import InvalidFlavor, InvalidInput
from lifecycle.records import Flavor

UUID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


@pytest.mark.parametrize(
    "value",
    ["a", "web-1", "x" * 255, "café", "名前", "with space", "tab\u00a0nbsp", "emoji 🙂"],
)
def test_name_accepts_printable_text(value: str) -> None:
    """Names of 1-255 printable characters, any script, come back unchanged."""
    assert validation.name("instance", value) == value


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "1 to 255 characters, got 0"),
        ("x" * 256, "1 to 255 characters, got 256"),
        (None, "must be a string, got NoneType"),
        (7, "must be a string, got int"),
        (b"bytes", "must be a string, got bytes"),
        ("a\x00b", "U+0000"),
        ("a\nb", "U+000A"),
        ("a\x1bb", "U+001B"),
        ("a\x7fb", "U+007F"),
        ("a\x85b", "U+0085"),
        ("a\x9fb", "U+009F"),
        ("a\u2028b", "U+2028 (LINE SEPARATOR)"),
        ("a\u2029b", "U+2029 (PARAGRAPH SEPARATOR)"),
        ("a\u202eb", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("a\u200bb", "U+200B (ZERO WIDTH SPACE)"),
        ("a\ufeffb", "U+FEFF"),
        ("a\udcffb", "U+DCFF"),
    ],
)
def test_name_refuses(value: object, needle: str) -> None:
    """Empty, too long, non-str, controls (C0, DEL, C1), format characters, separators and surrogates are refused."""
    with pytest.raises(InvalidInput, match="instance name") as info:
        validation.name("instance", value)
    assert needle in str(info.value)
    assert "\n" not in str(info.value) and "\x85" not in str(info.value)


def test_name_error_is_short_for_a_huge_value() -> None:
    """A megabyte-long name is refused with a message of bounded length."""
    with pytest.raises(InvalidInput) as info:
        validation.name("host", "x" * 1_000_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UUID, UUID),
        (UUID.upper(), UUID),
        (UUID.replace("-", ""), UUID),
    ],
)
def test_uuid_normalises(value: str, expected: str) -> None:
    """Canonical, upper-case and dash-less uuids come back canonical and lower-case."""
    assert validation.uuid(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "nonsense",
        UUID[:-1],
        UUID + "0",
        "{" + UUID + "}",
        "urn:uuid:" + UUID,
        " " + UUID,
        UUID.replace("3", "\u0663"),  # Arabic-Indic digit three: uuid.UUID() would take it
        UUID.replace("-", "_"),
        None,
        42,
    ],
)
def test_uuid_refuses(value: object) -> None:
    """Anything but 8-4-4-4-12 (or 32) ASCII hex digits is refused, naming the kind."""
    with pytest.raises(InvalidInput, match="invalid task uuid"):
        validation.uuid(value, "task")


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [(0, 0, validation.MAX_INT), (validation.MAX_INT, 0, validation.MAX_INT), (5, 1, 10), (-3, -5, 0)],
)
def test_count_accepts_integers_in_range(value: int, low: int, high: int) -> None:
    """Integers from low to high inclusive come back unchanged."""
    assert validation.count("vcpus", value, low=low, high=high) == value


@pytest.mark.parametrize(
    "value",
    [
        -1,
        validation.MAX_INT + 1,
        2**63,
        pytest.param(10**5000, id="10**5000"),
        True,
        False,
        1.0,
        "1",
        None,
        Fraction(1),
    ],
)
def test_count_refuses(value: object) -> None:
    """Negatives, values beyond 32 bits, bools, floats, strings and None are refused with the label."""
    with pytest.raises(InvalidInput, match=r"^host vcpus must be an integer from 0 to 2147483647, got ") as info:
        validation.count("host vcpus", value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (30, 30.0), (0.5, 0.5), (Fraction(1, 4), 0.25)])
def test_seconds_accepts_finite_non_negative_numbers(value: object, expected: float) -> None:
    """Ints, floats and other real numbers come back as float seconds."""
    assert validation.seconds("stop timeout", value) == expected


@pytest.mark.parametrize(
    "value",
    [-0.001, -1, math.nan, math.inf, -math.inf, validation.MAX_SECONDS * 2, True, "5", None, complex(1, 0)],
)
def test_seconds_refuses(value: object) -> None:
    """Negatives, NaN, infinities, absurdly long durations, bools, strings, None and complex numbers are refused."""
    with pytest.raises(InvalidInput, match=r"^stop timeout must be a"):
        validation.seconds("stop timeout", value)


@pytest.mark.parametrize(
    ("value", "minimum", "ok"),
    [(0.1, 0.1, True), (600, 0.1, True), (0.05, 0.1, False), (0, 0.1, False), (-1, 0.1, False), (math.nan, 0.1, False)],
)
def test_period_has_a_floor(value: float, minimum: float, ok: bool) -> None:
    """A period below its minimum (zero and negatives included) or NaN is refused, so a loop cannot spin a core."""
    if ok:
        assert validation.period("sync interval", value, minimum) == float(value)
    else:
        with pytest.raises(InvalidInput, match=r"sync interval must be a finite number of seconds from 0\.1"):
            validation.period("sync interval", value, minimum)


def test_image_path_accepts_an_absolute_regular_file_and_a_symlink_to_one(tmp_path: Path) -> None:
    """An existing regular file, or a symlink to one, given by absolute path, is accepted unchanged."""
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"x")
    link = tmp_path / "link.qcow2"
    link.symlink_to(image)
    assert validation.image_path(str(image)) == str(image)
    assert validation.image_path(str(link)) == str(link)


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda tmp: str(tmp / "missing.qcow2"), "does not exist"),
        (lambda tmp: str(tmp), "is a directory"),
        (lambda tmp: "relative.qcow2", "must be absolute"),
        (lambda tmp: "", "1 to 1024 characters"),
        (lambda tmp: "/" + "x" * 1024, "1 to 1024 characters"),
        (lambda tmp: f"{tmp}/a\x00b", "U+0000"),
        (lambda tmp: f"{tmp}/a\nb", "U+000A"),
        (lambda tmp: None, "must be a string"),
        (lambda tmp: tmp, "must be a string"),  # a Path object, not text
        (_fifo, "not a regular file"),
    ],
)
def test_image_path_refuses(tmp_path: Path, make: Callable[[Path], Any], needle: str) -> None:
    """Missing files, directories, relative or empty or overlong paths, control characters and non-files are refused."""
    with pytest.raises(InvalidInput, match="image path") as info:
        validation.image_path(make(tmp_path))
    assert needle in str(info.value)


def test_metrics_returns_floats() -> None:
    """Metric values of any real type come back as floats under their names."""
    assert validation.metrics({"cpu.percent": 12, "io": 0.5}) == {"cpu.percent": 12.0, "io": 0.5}


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ([("cpu", 1.0)], "must be a mapping"),
        ({"cpu": "high"}, "must be a finite number"),
        ({"cpu": math.nan}, "must be a finite number"),
        ({"cpu": math.inf}, "must be a finite number"),
        ({"cpu": True}, "must be a finite number"),
        ({"cpu": None}, "must be a finite number"),
        ({1: 1.0}, "must be a string"),
        ({"": 1.0}, "1 to 255 characters"),
        ({"c\x1bpu": 1.0}, "U+001B"),
    ],
)
def test_metrics_refuses(value: object, needle: str) -> None:
    """Non-mappings, non-numeric or non-finite values and bad metric names are refused."""
    with pytest.raises(InvalidInput) as info:
        validation.metrics(value)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("vcpus=\u0661\u0662,ram=64,disk=1", "digits 0-9, got '١٢'"),
        ("vcpus=1_000,ram=64,disk=1", "digits 0-9, got '1_000'"),
        ("vcpus= +3,ram=64,disk=1", "digits 0-9, got '+3'"),
        ("vcpus=-1,ram=64,disk=1", "digits 0-9, got '-1'"),
        ("vcpus=1.5,ram=64,disk=1", "digits 0-9, got '1.5'"),
        ("vcpus=,ram=64,disk=1", "digits 0-9, got ''"),
        ("vcpus=\t1,ram=64,disk=1", "digits 0-9"),
        ("vcpus=999999999999999999999,ram=64,disk=1", "vcpus must be an integer from 1 to 1024"),
        ("vcpus=" + "9" * 5000 + ",ram=64,disk=1", "vcpus must be an integer from 1 to 1024"),
        ("vcpus=2000,ram=64,disk=1", "vcpus must be an integer from 1 to 1024, got 2000"),
    ],
)
def test_flavor_parse_takes_ascii_digits_only(text: str, needle: str) -> None:
    """Flavor numbers are ASCII digits: other scripts' digits, underscores, signs and huge numbers are refused."""
    with pytest.raises(InvalidFlavor) as info:
        Flavor.parse(text)
    assert needle in str(info.value)


def test_flavor_parse_tolerates_spaces_around_parts() -> None:
    """ASCII spaces around keys, values and parts are allowed, as a person types them."""
    assert Flavor.parse(" vcpus = 2 , ram=64, disk=1 ") == Flavor(2, 64, 1)


@pytest.mark.parametrize(
    "specs",
    [
        (("capabilities:ssd", "true"),),
        (("hw:cpu_policy", "dedicated"), ("capabilities:cpu_info:features", "<in> avx")),
        (("quota:disk_read_bytes_sec", ""),),
    ],
)
def test_flavor_accepts_namespaced_extra_specs(specs: tuple[tuple[str, str], ...]) -> None:
    """Extra specs given as a tuple of namespace:key and printable value pairs are kept as given."""
    assert Flavor(1, 64, 1, extra_specs=specs).extra_specs == specs


@pytest.mark.parametrize(
    ("specs", "needle"),
    [
        ([("capabilities:ssd", "true")], "must be a mapping or a tuple"),
        ({"capabilities:ssd": 1}, "(key, value) pair of strings"),
        ((["capabilities:ssd", "true"],), "(key, value) pair of strings"),
        (("capabilities:ssd",), "(key, value) pair of strings"),
        ((("capabilities:ssd", 1),), "(key, value) pair of strings"),
        ((("ssd", "true"),), "must be namespace:key"),
        ((("capabilities:", "true"),), "must be namespace:key"),
        ((("capabilities:s d", "true"),), "must be namespace:key"),
        ((("capabilities:ssd\n", "true"),), "must be namespace:key"),
        ((("capabilities:" + "x" * 300, "true"),), "at most 255"),
        ((("capabilities:ssd", "a\x85b"),), "printable characters"),
        ((("capabilities:ssd", "x" * 256),), "printable characters"),
        ((("capabilities:ssd", "true"), ("capabilities:ssd", "false")), "given twice"),
    ],
)
def test_flavor_refuses_bad_extra_specs(specs: object, needle: str) -> None:
    """Extra specs that are not a tuple of unique namespace:key string pairs with printable values are refused."""
    with pytest.raises(InvalidFlavor) as info:
        Flavor(1, 64, 1, extra_specs=specs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_flavor_name_refuses_a_trailing_newline() -> None:
    """A flavor name must match entirely: a trailing newline is not let through by the pattern's end anchor."""
    with pytest.raises(InvalidFlavor, match="name 'tiny\\\\n'"):
        Flavor(1, 64, 1, name="tiny\n")


def test_unsafe_character_finds_the_first_one() -> None:
    """The helper names the first unsafe character, and None for printable text."""
    assert validation.unsafe_character("plain text") is None
    assert validation.unsafe_character("a\u00a0b") is None  # a no-break space is printable enough for a name
    assert validation.unsafe_character("ok\x1b[31mred\u202e") == "\x1b"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u@127.0.0.1:5/db?password=hunter3",
        "postgresql+psycopg://u@h/db?sslmode=require&sslpassword=hunter3",
        "postgresql+psycopg://u@h/db?PASSWORD=hunter3#x",
        "postgresql+psycopg://u@[::1/db?password=hunter3",
    ],
)
def test_a_password_in_a_database_urls_query_is_never_shown(url: str) -> None:
    """Both ways a URL is printed mask a password or sslpassword given in the query, parsed or not."""
    from lifecycle.store.db import shown_url

    for shown in (validation.shown_url(url), shown_url(url)):
        assert "hunter3" not in shown and "***" in shown, shown
