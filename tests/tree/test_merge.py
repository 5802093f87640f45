"""The forward with LoRA vs the base and the merged model; the merge family.

References: the base model's forward (a zero-init adapter must not change it, bit for
bit), the plain model run on ``jlora.merge(lp)`` (the factored ``lora(f)`` forward must
agree with it), the original tree (``unload``, ``unmerge_adapter``), and ΔW written out
in numpy float64 (merge of a bfloat16 base).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

import jlora
from support.models import ALL

MODELS = ["gpt2", "llama", "bert", "linen_scan", "nnx_mlp", "conv_embed"]
_CACHE: dict = {}


def _case(name):
    """(case, lp with B = 0, lp with random A and B), built once per model."""
    if name not in _CACHE:
        case = ALL[name]()
        cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets)
        zero = jlora.wrap(case.params, cfg, rng=jax.random.key(1))
        rand = jlora.wrap(case.params, cfg.replace(init_lora_weights=False), rng=jax.random.key(2))
        _CACHE[name] = (case, zero, rand)
    return _CACHE[name]


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", MODELS)
def test_zero_init_is_identity(name):
    """With B = 0 (default init), ``lora(f)(wrap(p), x)`` equals ``f(p, x)`` exactly."""
    case, zero, _ = _case(name)
    want = case.apply(case.params, case.inputs)
    got = jlora.lora(case.apply)(zero, case.inputs)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("name", MODELS)
def test_lora_forward_equals_merged_forward(name):
    """With random non-zero A and B, the factored forward equals the base model run on the
    merged kernels (float32 relative error ≤ 1e-5), and differs clearly from the base."""
    case, _, rand = _case(name)
    merged_out = case.apply(jlora.merge(rand), case.inputs)
    got = jlora.lora(case.apply)(rand, case.inputs)
    assert _rel_err(got, merged_out) <= 1e-5
    base = case.apply(case.params, case.inputs)
    assert _rel_err(base, merged_out) > 1e-3, "the adapter should change the output"


@pytest.mark.parametrize("name", MODELS)
def test_merge_output_structure_and_dtype(name):
    """``merge`` returns a plain tree with exactly the original treedef (containers included:
    dict, FrozenDict, nnx.State) and every leaf's shape and dtype."""
    case, _, rand = _case(name)
    merged = jlora.merge(rand)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(case.params)
    for m, p in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(case.params)):
        assert (m.shape, m.dtype) == (p.shape, p.dtype)
    if isinstance(case.params, nnx.State):
        assert isinstance(merged, nnx.State)


@pytest.mark.parametrize("name", ["gpt2", "linen_scan", "nnx_mlp"])
def test_unload_returns_the_original_tree(name):
    """``unload`` gives back the very arrays and the exact structure that were wrapped,
    also when biases / modules_to_save were marked Trainable."""
    case, _, rand = _case(name)
    for lp in (rand, jlora.wrap(case.params, jlora.LoraConfig(target_modules=case.targets, bias="all"))):
        base = jlora.unload(lp)
        assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(case.params)
        assert all(x is y for x, y in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(case.params)))


@pytest.mark.parametrize("name", ["gpt2", "linen_scan", "nnx_mlp"])
def test_merge_adapter_roundtrip_and_no_double_add(name):
    """merge_adapter → unmerge_adapter gives W back within float32 rounding (A, B bit-identical);
    a forward through ``lora(f)`` on the merge_adapter'd tree equals the merged model's
    forward (the delta is not added twice), and ``merge`` of it equals ``merge(lp)``."""
    case, _, rand = _case(name)
    merged_lp = jlora.merge_adapter(rand)
    assert all(lw.merged for _, lw in jlora.lora_leaves(merged_lp))
    back = jlora.unmerge_adapter(merged_lp)
    assert not any(lw.merged for _, lw in jlora.lora_leaves(back))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(rand)
    for (path, lw0), (_, lw1), (_, lwm) in zip(jlora.lora_leaves(rand), jlora.lora_leaves(back),
                                               jlora.lora_leaves(merged_lp)):
        np.testing.assert_array_equal(lw1.a, lw0.a)
        np.testing.assert_array_equal(lw1.b, lw0.b)
        tol = 4 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(lwm.w)))
        np.testing.assert_allclose(lw1.w, lw0.w, rtol=0, atol=tol, err_msg=path)
        assert float(jnp.max(jnp.abs(lwm.w - lw0.w))) > 100 * tol, "merge_adapter should change W"
    # non-LoRA leaves untouched
    for x, y in zip(jax.tree_util.tree_leaves(jlora.unload(back)), jax.tree_util.tree_leaves(case.params)):
        assert x.shape == y.shape
    merged_out = case.apply(jlora.merge(rand), case.inputs)
    assert _rel_err(jlora.lora(case.apply)(merged_lp, case.inputs), merged_out) <= 1e-5
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6),
                           jlora.merge(merged_lp), jlora.merge(rand))


def test_merge_bfloat16_base_keeps_dtype_and_rounds_once():
    """A bfloat16 base merges to bfloat16 kernels equal to (W + s·ΔW) computed in float64 and
    rounded to bfloat16 (within one bfloat16 step); A and B stay float32."""
    case = ALL["gpt2"]()
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), case.params)
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    lp = jlora.wrap(params, cfg, rng=jax.random.key(0))
    merged = jlora.merge(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))
    lw = lp["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"]
    assert lw.a.dtype == jnp.float32
    w64 = np.asarray(lw.w.astype(jnp.float32), np.float64)
    want = w64 + lw.scale * (np.asarray(lw.a, np.float64) @ np.asarray(lw.b, np.float64)).T  # (out, in) layout
    got = np.asarray(merged["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"].astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-6)
    # the bfloat16 rounding happens once: the result is the float32 sum rounded to bfloat16
    exact = np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(got == exact) > 0.99


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_safe_merge_names_the_non_finite_target(bad):
    """``merge(safe=True)`` raises ValueError naming the first target whose merged kernel is not
    finite; with finite factors it returns what ``merge`` returns."""
    case, _, rand = _case("linen_scan")
    jax.tree_util.tree_map(np.testing.assert_array_equal, jlora.merge(rand, safe=True), jlora.merge(rand))
    lw = rand["layers"]["value"]["kernel"]
    broken = dict(rand)
    broken["layers"] = dict(rand["layers"])
    broken["layers"]["value"] = {**rand["layers"]["value"], "kernel": lw.replace(b=lw.b.at[1, 0, 2, 3].set(bad))}
    with pytest.raises(ValueError, match="layers/value/kernel"):
        jlora.merge(broken, safe=True)
    # unsafe merge goes through and propagates the bad value (the reference behaviour of W + s·A·B)
    assert not np.all(np.isfinite(jlora.merge(broken)["layers"]["value"]["kernel"]))


def test_merge_with_trainable_leaves_returns_plain_values():
    """bias='all' and modules_to_save leaves (Trainable) merge to their plain value; the
    tree (a FrozenDict here) keeps the original structure."""
    case = ALL["linen_scan"]()
    params = FrozenDict(case.params)
    cfg = jlora.LoraConfig(r=2, target_modules=["query"], bias="all", modules_to_save=["head"])
    lp = jlora.wrap(params, cfg)
    assert isinstance(lp["head"]["kernel"], jlora.Trainable)
    merged = jlora.merge(lp)
    assert isinstance(merged, FrozenDict)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])
    np.testing.assert_array_equal(merged["layers"]["fc"]["bias"], params["layers"]["fc"]["bias"])


def test_merge_of_an_abstract_tree_allocates_nothing():
    """``jax.eval_shape(merge)`` on a wrapped GPT-2 small of ShapeDtypeStructs gives the
    original abstract tree back (same treedef, shapes and dtypes)."""
    import transformers

    model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(), _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
    lp = jlora.wrap(shapes, jlora.LoraConfig(r=8, target_modules=["c_attn", "c_proj"], bias="all"))
    merged = jax.eval_shape(jlora.merge, lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(shapes)
    for m, p in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(shapes)):
        assert isinstance(m, jax.ShapeDtypeStruct) and (m.shape, m.dtype) == (p.shape, p.dtype)
