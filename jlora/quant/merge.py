"""Merging a LoRA tree over a quantized base (used by :func:`jlora.merge`).

The default merge returns a dense tree: each quantized kernel dequantized to its
``compute_dtype``, plus its adapters' ``s·ΔW`` (``dequant(W) + s·ΔW``, the model that was
trained). ``merge(lp, requantize=True)`` re-quantizes the merged kernels with their own
:class:`~jlora.QuantConfig` (what PEFT's ``merge_and_unload`` does on a bitsandbytes
base) and reports how much of each update survived: a small ``ΔW`` mostly rounds back to
the same 4-bit codes.

For a target with base ``W₀ = dequant(q)``, update ``ΔW`` and re-quantized merge
``W₁ = dequant(quantize(W₀ + ΔW))``, the kept update is ``D = W₁ − W₀`` and

    survival = ⟨D, ΔW⟩ / ‖ΔW‖²        error = ‖D − ΔW‖ / ‖ΔW‖

(1 and 0 for a lossless merge; ``survival`` is the share of ``ΔW`` along which the merged
weights moved).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..core.paths import path_names
from .array import QuantizedArray, is_quantized, quantize_array

__all__ = ["RequantizeReport", "RequantizeWarning", "dequantize_bases", "has_quantized_base", "requantize_merge"]


class RequantizeWarning(UserWarning):
    """``merge(requantize=True)``: re-quantizing the merged kernels dropped part of ΔW."""


@dataclasses.dataclass(frozen=True)
class RequantizeReport:
    """Per re-quantized target: ``(survival, error)`` (see the module docstring), and the
    totals over all targets (``survival = Σ⟨D, ΔW⟩ / Σ‖ΔW‖²``)."""

    kernels: dict[str, tuple[float, float]]
    survival: float
    error: float

    def __str__(self) -> str:
        rows = [f"{'target':<40}  survival  error"]
        rows += [f"{p:<40}  {s:8.1%}  {e:5.3f}" for p, (s, e) in self.kernels.items()]
        rows.append(f"{'(all)':<40}  {self.survival:8.1%}  {self.error:5.3f}")
        return "\n".join(rows)


def has_quantized_base(tree: Any) -> bool:
    return any(is_quantized(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))


def dequantize_bases(tree: Any) -> Any:
    """Every quantized kernel dequantized to its ``compute_dtype`` (inside LoRA weights too)."""
    return jax.tree_util.tree_map(
        lambda x: x.dequantize(x.compute_dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def _original(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized)


@jax.jit
def _stats(w0: jax.Array, merged: jax.Array, w1: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    f = jnp.float32
    d = merged.astype(f) - w0.astype(f)
    kept = w1.astype(f) - w0.astype(f)
    return jnp.vdot(kept, d), jnp.sum(d * d), jnp.sum((kept - d) ** 2)


def requantize_merge(lp: Any, merge_fn: Callable[[Any], Any], is_node: Callable[[Any], bool],
                     is_target: Callable[[Any], bool]) -> tuple[Any, RequantizeReport]:
    """``merge_fn`` over the base dequantized to its original dtype, then every merged
    target whose base was quantized quantized again like its base; quantized kernels that
    are not targets stay as they are (bit for bit)."""
    merged = merge_fn(_original(lp))
    kernels: dict[str, tuple[float, float]] = {}
    totals = [0.0, 0.0, 0.0]

    def fold(path, x, m):
        if is_quantized(x):
            return x
        if not (is_target(x) and is_quantized(x.w)):
            return m
        name = "/".join(path_names(path))
        q: QuantizedArray = x.w
        requant = quantize_array(m, q.config, q.layout, path=name)
        k_dot, k_norm, k_err = (float(v) for v in _stats(q.dequantize(jnp.float32), m, requant.dequantize(jnp.float32)))
        kernels[name] = (k_dot / k_norm if k_norm else 1.0, (k_err / k_norm) ** 0.5 if k_norm else 0.0)
        for i, v in enumerate((k_dot, k_norm, k_err)):
            totals[i] += v
        return requant

    out = jax.tree_util.tree_map_with_path(fold, lp, merged, is_leaf=lambda x: is_node(x) or is_quantized(x))
    dot, norm, err = totals
    return out, RequantizeReport(kernels, dot / norm if norm else 1.0, (err / norm) ** 0.5 if norm else 0.0)


def warn_requantized(report: RequantizeReport) -> None:
    values = sorted(s for s, _ in report.kernels.values())
    median = values[len(values) // 2] if values else 1.0
    warnings.warn(
        f"jlora.merge(requantize=True): re-quantizing the merged kernels kept {report.survival:.1%} of the LoRA "
        f"update (median per kernel {median:.1%}, relative error {report.error:.3f}); a small update mostly "
        "rounds back to the same codes, as PEFT's merge into a 4-bit base does. jlora.merge(lp) (no requantize) "
        "keeps all of it in a dense base; merge(..., with_report=True) gives the numbers per kernel.",
        RequantizeWarning,
        stacklevel=3,
    )

