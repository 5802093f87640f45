"""Repository-wide pytest set-up: JAX on the CPU, and the names every doctest of the
package may use without importing them (``pytest`` collects ``jlora/`` with
``--doctest-modules``)."""

from __future__ import annotations

import os

import pytest

# jax[tpu] (the test extra, for compiling TPU programs ahead of time) must not try to open a
# TPU on a machine without one; TPU topologies are still compiled for (tests/benchmarks).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora

    doctest_namespace.update(jax=jax, jnp=jnp, np=np, jlora=jlora)
    try:
        from flax import nnx

        doctest_namespace["nnx"] = nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        pass


def pytest_ignore_collect(collection_path, config):
    """``--doctest-modules`` would collect every ``.py``; under ``tests/`` only the test files
    are collected (``conftest.py`` and ``support/`` are imported by the tests themselves)."""
    try:
        rel = collection_path.relative_to(config.rootpath)
    except ValueError:
        return None
    if collection_path.suffix == ".py" and rel.parts[:1] == ("tests",) and not collection_path.name.startswith("test_"):
        return True
    return None
