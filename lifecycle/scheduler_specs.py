"""Nova's language for a flavor's extra specs, as the capabilities filter matches them against a host.

A wanted value is ``>= N``, ``<= N``, ``== N``, ``!= N`` (numbers),
``s== x``, ``s!= x``, ``s>= x``, ``s<= x`` (strings), ``<in> x`` (a
substring), ``<or> a <or> b`` (one of), or else a plain value compared for
equality. Pure: :mod:`lifecycle.scheduler` calls :func:`spec_matches`.
"""

from __future__ import annotations

import operator

__all__ = ["spec_matches"]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


_NUMERIC = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
_STRING = {"s==": operator.eq, "s!=": operator.ne, "s>=": operator.ge, "s<=": operator.le}


def spec_matches(actual: str | None, wanted: str) -> bool:
    """Match one extra spec as Nova does: ``>= N``, ``<= N``, ``== N``, ``s== x``, ``<in> x``, ``<or>``, or equality."""
    words = wanted.split()
    if actual is None:
        return False
    if words and words[0] in _NUMERIC and len(words) == 2:
        a, w = _number(actual), _number(words[1])
        return a is not None and w is not None and bool(_NUMERIC[words[0]](a, w))
    if words and words[0] in _STRING and len(words) == 2:
        return bool(_STRING[words[0]](actual, words[1]))
    if words[:1] == ["<in>"]:
        return wanted.split(None, 1)[1] in actual
    if words[:1] == ["<or>"]:
        return actual in [w.strip() for w in wanted.split("<or>") if w.strip()]
    return actual == wanted
