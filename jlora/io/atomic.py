"""Atomic replacement of a checkpoint directory, shared by the Orbax and PEFT writers.

A save writes a complete new directory beside the target, ``.NAME.jlora-tmp-TAG``, then
swaps it in with two renames::

    NAME            ──rename──▶  .NAME.jlora-old-TAG      (the previous version, kept)
    .NAME.jlora-tmp-TAG ──rename──▶  NAME                 (the new version)
    .NAME.jlora-old-TAG  removed

A process killed at any point leaves either the old or the new version at ``NAME``, or
(between the two renames) the old one beside it, which :func:`recover_interrupted_save`
finds. Readers call it before opening ``NAME``.

>>> tmp = temp_sibling(Path("out/adapter"), "abc")           # doctest: +SKIP
>>> ...write everything into tmp...                          # doctest: +SKIP
>>> replace_directory(tmp, Path("out/adapter"), "abc")        # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["temp_sibling", "replace_directory", "remove_stale_siblings", "recover_interrupted_save"]


def temp_sibling(path: Path, tag: str) -> Path:
    """The temporary directory a save of ``path`` writes into before the swap."""
    return path.parent / f".{path.name}.jlora-tmp-{tag}"


def _old_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.jlora-old-{tag}"


def remove_stale_siblings(path: Path) -> None:
    """Removes what earlier saves of ``path`` that were killed mid-write left beside it."""
    for stale in list(path.parent.glob(f".{path.name}.jlora-old-*")) + list(
        path.parent.glob(f".{path.name}.jlora-tmp-*")
    ):
        shutil.rmtree(stale, ignore_errors=True)


def replace_directory(tmp: Path, path: Path, tag: str) -> Path:
    """Moves the complete directory ``tmp`` to ``path``, replacing what is there, so that a
    kill at any moment leaves a loadable version (see the module docstring)."""
    if path.exists():
        old = _old_sibling(path, tag)
        os.rename(path, old)  # from here until the next rename, readers recover `old`
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
    remove_stale_siblings(path)
    return path


def recover_interrupted_save(path: Path, complete: Callable[[Path], bool]) -> Path:
    """``path``, or the previous version a save killed mid-swap left beside it
    (``.NAME.jlora-old-*``, moved aside just before the new version was renamed in) if
    ``complete(old)`` says it is a whole checkpoint; ``path`` itself when neither exists."""
    if path.exists():
        return path
    olds = sorted(path.parent.glob(f".{path.name}.jlora-old-*"), key=lambda p: p.stat().st_mtime)
    for old in reversed(olds):
        if complete(old):
            return old
    return path
