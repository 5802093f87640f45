"""Checksums jlora records when it writes an adapter and verifies when it reads one.

Two kinds, one per format:

* **Orbax checkpoints**: :func:`array_checksums`, a 64-bit hash of an array's *values*
  that does not depend on how the array is sharded, on how many processes hold it, or
  on the backend. With ``u`` the element bits as unsigned integers (a ``float32`` is its
  32 bits; 8/16-bit types are zero-extended; a 64-bit element is two 32-bit words) in
  C order, ``i`` the flat position and ``fmix`` MurmurHash3's 32-bit finaliser::

      lane_k = Σ_i fmix(u_i ⊕ fmix(i·0x9E3779B9 + seed_k))  (mod 2³²),   k = 0, 1
      checksum = "%08x%08x" % (lane_0, lane_1)

  A sum of per-element hashes is exact integer arithmetic, so XLA computes it on the
  sharded array itself (one small jitted program per shape and sharding): on save every process
  hashes only its own shards, and on load a process that read only its shards can
  still verify the whole array; the result is the same for 1 or N processes.
* **PEFT files** (read whole by every process): SHA-256 of each tensor's bytes as
  stored in ``adapter_model.safetensors`` (:func:`sha256_hex`), so anyone can check it.

Metadata is covered too: :func:`json_digest` (SHA-256 of canonical JSON) of jlora's
Orbax metadata and of the ``adapter_config.json`` keys that change the loaded tree.

>>> array_checksums({"a": np.zeros((2, 3), np.float32)})["a"]
'8ccf333c6cb41514'
>>> sha256_hex(np.zeros(2, np.float32))[:16]
'af5570f5a1810b7a'
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ARRAY_ALGORITHM", "array_checksums", "sha256_hex", "json_digest"]

ARRAY_ALGORITHM = "jlora-fmix64-v1"
_SEEDS = (0x243F6A88, 0x85A308D3)


def _fmix(h: jax.Array) -> jax.Array:
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The element bits of ``x`` as uint32 words (C order; 64-bit elements: 2 words)."""
    dt = jnp.dtype(x.dtype)
    if dt == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jax.dtypes.itemsize_bits(dt)
    if bits == 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if bits in (8, 16):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
    # sub-byte types (int4, float4): their value as a 32-bit integer / float
    if jnp.issubdtype(dt, jnp.integer):
        return x.astype(jnp.int32).view(jnp.uint32)
    return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)


def _hash(x: jax.Array) -> jax.Array:
    u = _words(x)
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= int(u.shape[d])
    pos = idx * jnp.uint32(0x9E3779B9)
    lanes = [jnp.sum(_fmix(u ^ _fmix(pos + jnp.uint32(s))), dtype=jnp.uint32) for s in _SEEDS]
    return jnp.stack(lanes)


# One small program per (shape, dtype, sharding): the layers of a model share them, so a
# deep model compiles no more than a shallow one.
_hash_jit = jax.jit(_hash)


def array_checksums(tree: Any) -> Any:
    """The checksum (16 hex digits, see the module docstring) of every array in ``tree``.

    Arrays may be sharded over a global mesh: then every process must call this (it is
    one jitted computation over the global arrays), and all get the same strings.
    ``numpy`` arrays are hashed on this process's first local device.

    >>> array_checksums([np.arange(3, dtype=np.int32)])
    ['5a43cc6cf57b0be0']
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return tree
    local = jax.local_devices()[0]
    vals = [x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x), local) for x in leaves]
    # dispatched in the same order on every process, so the collectives line up; all
    # are in flight before the first result is fetched
    out = [_hash_jit(v) for v in vals]
    res = []
    for lanes in out:
        v = np.asarray(lanes.addressable_data(0)).astype(np.uint64)  # replicated: any shard has it
        res.append(f"{int(v[0]):08x}{int(v[1]):08x}")
    return jax.tree_util.tree_unflatten(treedef, res)


def sha256_hex(x: np.ndarray) -> str:
    """SHA-256 of the bytes of ``x`` in C order (as a safetensors file stores them)."""
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def json_digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
