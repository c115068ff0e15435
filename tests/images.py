"""Image files for tests over fake hosts: the engine refuses paths that do not exist."""

from __future__ import annotations

import tempfile
from pathlib import Path

_DIR = Path(tempfile.gettempdir()) / "lifecycle-test-images"


def fake_image(name: str = "cirros") -> str:
    """Return the absolute path of an (empty) image file named ``name``, made on first use."""
    _DIR.mkdir(exist_ok=True)
    path = _DIR / f"{name}.qcow2"
    path.touch()
    return str(path)
