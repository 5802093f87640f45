"""Shared test set-up: ``tests/`` on ``sys.path`` (for ``support``), the markers, and the
clean skip of tests that need PyTorch (torch, PEFT, bitsandbytes, transformers' torch models)
where torch is not installed.

``JLORA_TEST_HIDE_TORCH=1`` runs the suite as if torch, PEFT and bitsandbytes were not
installed (they cannot be imported), to check that the torch-free part runs on its own.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_TORCH_PACKAGES = ("torch", "peft", "bitsandbytes", "sentence_transformers", "torchvision", "torchaudio")


class _HideTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _TORCH_PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by JLORA_TEST_HIDE_TORCH)", name=name)
        return None


if os.environ.get("JLORA_TEST_HIDE_TORCH") == "1":
    sys.meta_path.insert(0, _HideTorch())


def _has_torch() -> bool:
    if os.environ.get("JLORA_TEST_HIDE_TORCH") == "1":
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft"))


HAS_TORCH = _has_torch()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about 30 s on 2 CPU cores (deselect with -m 'not slow')")
    config.addinivalue_line(
        "markers", "torch: needs PyTorch and PEFT (the reference implementations); skipped when they are absent"
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("torch") is not None and not HAS_TORCH:
        pytest.skip("needs torch and PEFT (pip install 'jlora[test]')")
