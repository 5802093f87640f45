"""Where things are: the repository root, ``tests/``, the examples, and the environment a
subprocess needs to import jlora and ``support``."""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
EXAMPLES = ROOT / "examples"


def subprocess_pythonpath(*extra: os.PathLike) -> str:
    """A ``PYTHONPATH`` with the repository root, ``tests/`` (for ``support``) and ``extra``."""
    parts = [str(ROOT), str(TESTS), *map(str, extra), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)
