"""Shared test set-up: ``tests/`` on ``sys.path`` (for ``support``), the markers, and the
clean skip of tests that need PyTorch (torch, PEFT, bitsandbytes, transformers' torch models)
where torch is not installed.

Files whose every test needs torch import it through ``pytest.importorskip`` (the module
is skipped at collection) or set ``pytestmark = pytest.mark.torch``; single tests carry
``@pytest.mark.torch``. Checked by running the suite in a virtual environment without
torch (CHANGELOG 0.2.0).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def _has_torch() -> bool:
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
