"""What jlora's checkpoint I/O does differently when JAX runs as several processes.

Under JAX's multi-controller runtime (``jax.distributed.initialize``, one process per
host, one global mesh) every process calls the same jlora function, as with Orbax:

* :func:`agreed_tag`: one random name for a save's temporary directory, drawn on the
  primary process (``jax.process_index() == 0``) and broadcast, so all processes write
  into the same directory (each picking its own is what made ``jlora.save`` hang);
* :func:`barrier`: Orbax's process barrier (``ocp.multihost.sync_global_processes``);
* :func:`to_host`: a (small) LoRA factor as one numpy array on every process, gathered
  with ``jax.experimental.multihost_utils.process_allgather`` when it spans devices of
  other processes (a collective: every process must call it, in the same order);
* :func:`place`: a numpy array that every process holds whole, put on a sharding that
  may span processes; each process builds only its own shards.

With one process all of these are the plain single-process operations.

>>> is_primary(), agreed_tag() != agreed_tag()
(True, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

__all__ = [
    "is_multiprocess", "is_primary", "agreed_tag", "barrier", "to_host", "gather_to_host", "place", "local_device",
]


def is_multiprocess() -> bool:
    """Whether JAX runs as more than one process."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this is the process that writes shared files and renames directories."""
    return jax.process_index() == 0


def local_device() -> jax.Device:
    """This process's first device (``jax.devices()[0]`` belongs to process 0)."""
    return jax.local_devices()[0]


def agreed_tag() -> str:
    """12 random hex digits, the same on every process (drawn on the primary)."""
    local = np.frombuffer(os.urandom(8), np.uint32).copy()
    if is_multiprocess():
        from jax.experimental import multihost_utils

        local = np.asarray(multihost_utils.broadcast_one_to_all(local))
    return "".join(f"{int(v):08x}" for v in local)[:12]


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (unique per use); no-op for one process."""
    if is_multiprocess():
        import orbax.checkpoint as ocp

        ocp.multihost.sync_global_processes(name)


def spans_processes(x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` with shards on other processes' devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def to_host(x: Any) -> np.ndarray:
    """``x`` whole, as numpy, on this process. Gathers across processes when needed
    (a collective: then every process must call it for the same arrays in order)."""
    if spans_processes(x):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _identity(*xs: Any) -> tuple:
    return xs


def _replicated(s: jax.sharding.Sharding) -> Optional[jax.sharding.Sharding]:
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    return None


def gather_to_host(xs: Sequence[Any]) -> list[np.ndarray]:
    """:func:`to_host` of many arrays, with one collective per set of devices (not one
    per array). Every process must call it with the same arrays in the same order."""
    out: list[Optional[np.ndarray]] = [None] * len(xs)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        if spans_processes(x) and _replicated(x.sharding) is not None:
            groups.setdefault(tuple(sorted(d.id for d in x.sharding.device_set)), []).append(i)
        else:
            out[i] = to_host(x)
    for idx in groups.values():
        arrays = [xs[i] for i in idx]
        whole = jax.jit(_identity, out_shardings=tuple(_replicated(x.sharding) for x in arrays))(*arrays)
        for i, x in zip(idx, whole):
            out[i] = np.asarray(x.addressable_data(0))
    return out  # type: ignore[return-value]


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """``x`` (the whole value, identical on every process) on ``sharding``."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable or spans_processes(x):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
