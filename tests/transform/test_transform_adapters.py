"""`jlora.lora(fn)` with several named adapters (``MultiLoraWeight``) stays factored.

References: the plain model on ``jlora.merge`` of the same tree (which adds the active
adapters' deltas into W), and, for a mixed batch (``adapter_ids=``), each example run
alone through the merged model of its own adapter (or the base model).
"""

from __future__ import annotations



import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jlora  # noqa: E402
from support import models  # noqa: E402

adapters = pytest.importorskip("jlora.adapters")


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _three_adapters(case, targets_b=None):
    cfg = lambda r, t: jlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=t, init_lora_weights=False)  # noqa: E731
    lp = jlora.wrap(case.params, cfg(2, case.targets), rng=jax.random.key(1))
    lp = jlora.add_adapter(lp, "b", cfg(3, targets_b or case.targets), rng=jax.random.key(2))
    lp = jlora.add_adapter(lp, "c", cfg(4, case.targets[:1]), rng=jax.random.key(3))
    return lp


@pytest.mark.parametrize("name", ["nnx_mlp", "conv_embed"])
def test_several_active_adapters_factored_equals_merged(name):
    case = models.ALL[name]()
    lp = jlora.set_adapter(_three_adapters(case), ["default", "b", "c"])
    f = jlora.lora(case.apply, on_materialize="error")
    report = jlora.explain(case.apply, lp, case.inputs)
    assert report.materialized == [] and report.factored

    ref = case.apply(jlora.merge(lp), case.inputs)
    assert rel_err(jax.jit(f)(lp, case.inputs), ref) <= 1e-5
    # only the active ones count
    only_b = jlora.set_adapter(lp, "b")
    assert rel_err(f(only_b, case.inputs), case.apply(jlora.merge(only_b), case.inputs)) <= 1e-5
    assert rel_err(f(jlora.disable_adapter(lp), case.inputs), case.apply(case.params, case.inputs)) <= 1e-6

    # gradients w.r.t. every active adapter's factors equal those through the merged path
    tr, fr = jlora.partition(lp)
    ct = jax.random.normal(jax.random.key(0), ref.shape)
    g = jax.grad(lambda t: jnp.sum(ct * f(jlora.combine(t, fr), case.inputs)))(tr)
    g_ref = jax.grad(lambda t: jnp.sum(ct * case.apply(jlora.merge(jlora.combine(t, fr)), case.inputs)))(tr)
    leaves, leaves_ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
    assert len(leaves) == len(leaves_ref) and len(leaves) >= 6
    for a, b in zip(leaves, leaves_ref):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("name", ["nnx_mlp", "conv_embed"])
def test_mixed_batch_adapter_ids(name):
    case = models.ALL[name]()
    lp = _three_adapters(case)
    per_example = ["b", "__base__", "default", "c"]
    n = len(per_example)
    x = jnp.concatenate([case.inputs] * 2)[:n] if case.inputs.shape[0] < n else case.inputs[:n]
    ids = jlora.adapter_ids(lp, per_example)
    f = jlora.lora(case.apply, on_materialize="error")
    assert jlora.explain(case.apply, lp, x, adapter_ids=ids).materialized == []
    out = f(lp, x, adapter_ids=ids)
    # the adapter order (which ids index) survives flattening: under jit and tree_map
    lp_j = jax.tree_util.tree_map(lambda v: v, lp)
    assert jlora.adapter_names(lp_j) == jlora.adapter_names(lp)
    out_jit = jax.jit(f)(lp_j, x, adapter_ids=ids)
    assert rel_err(out_jit, out) <= 1e-6
    for i, adapter in enumerate(per_example):
        params = case.params if adapter == "__base__" else jlora.merge(jlora.set_adapter(lp, adapter))
        ref = case.apply(params, x[i:i + 1])
        assert rel_err(out[i:i + 1], ref) <= 1e-5, adapter

    with pytest.raises(ValueError, match="adapter_ids"):
        f(lp, x, adapter_ids=ids[:2])
