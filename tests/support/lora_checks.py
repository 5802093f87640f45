"""Shared checks: a LoRA tree stays factored under ``jlora.lora`` and computes what the
merged model computes, forward and backward."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def rel_err(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def target_paths(lp: Any) -> set[str]:
    return {p for p, _ in jlora.lora_leaves(lp)}


def assert_all_factored(fn: Callable, lp: Any, *args: Any) -> jlora.LoraReport:
    """Every target of ``lp`` is factored at every use, none materialised."""
    report = jlora.explain(fn, lp, *args)
    assert report.materialized == [], str(report)
    assert set(report.factored) == target_paths(lp), str(report)
    return report


def assert_factored_equals_merged(fn: Callable, lp: Any, *args: Any, rtol: float = 1e-5, grads: bool = True) -> None:
    """``lora(fn, on_materialize="error")`` == ``fn`` on the merged tree, forward and
    for the gradients of every factor (``lp`` should have non-zero factors, e.g.
    ``init_lora_weights=False``; with ``lora_alpha=r`` the delta is of the size of ``W``,
    so float32 rounding stays near 1e-6 in both computations)."""
    forward = jlora.lora(fn, on_materialize="error")
    if not grads:
        assert rel_err(jax.jit(forward)(lp, *args), jax.jit(fn)(jlora.merge(lp), *args)) <= rtol
        return
    trainable, frozen = jlora.partition(lp)

    def output_and_grad(f):
        # f(trainable) -> y; returns y and the gradient of sum(sin(y)): one compile each
        def run(t):
            y, pull = jax.vjp(f, t)
            return y, pull(jnp.cos(y))[0]

        return jax.jit(run)(trainable)

    got, g = output_and_grad(lambda t: forward(jlora.combine(t, frozen), *args))
    want, g_ref = output_and_grad(lambda t: fn(jlora.merge(jlora.combine(t, frozen)), *args))
    assert rel_err(got, want) <= rtol
    leaves, ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
    assert len(leaves) == len(ref) == 2 * len(target_paths(lp))
    for a, b in zip(leaves, ref):
        assert float(np.abs(np.asarray(b)).max()) > 0  # the check can fail: gradients are not all zero
        assert rel_err(a, b) <= rtol
