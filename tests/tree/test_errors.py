"""Bad input to `wrap` gets a clear ValueError/TypeError and leaves the input unchanged.

Reference: the input tree itself, snapshotted before the call (structure and the identity
of every leaf), and the module paths of the model (which the messages must list).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import pytest

import jlora

transformers = pytest.importorskip("transformers")

_GPT2: dict = {}


def gpt2_shapes():
    """Tiny GPT-2 params as ShapeDtypeStructs, in a plain nested dict (mutable containers,
    so an in-place change would show)."""
    if not _GPT2:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
        model = transformers.FlaxGPT2LMHeadModel(cfg, _do_init=False)
        _GPT2["p"] = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
    return jax.tree_util.tree_map(lambda x: x, _GPT2["p"])  # fresh containers, same leaves


def small_tree():
    """A concrete two-layer dict tree: dense kernels, biases, a norm."""
    lin = lambda i, o: {"kernel": jnp.ones((i, o)), "bias": jnp.zeros((o,))}  # noqa: E731
    return {"layers": {"0": {"q": lin(4, 4), "norm": {"scale": jnp.ones((4,))}}, "1": {"q": lin(4, 4)}},
            "head": lin(4, 2)}


def _snapshot(tree):
    flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
    return treedef, [id(x) for x in flat], copy.copy(flat)


def _assert_unchanged(tree, snap):
    treedef, ids, _ = snap
    flat, now = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
    assert now == treedef
    assert [id(x) for x in flat] == ids


def _raises(tree, config_kwargs, exc, *needles, **wrap_kwargs):
    snap = _snapshot(tree)
    with pytest.raises(exc) as info:
        jlora.wrap(tree, jlora.LoraConfig(**config_kwargs), **wrap_kwargs)
    _assert_unchanged(tree, snap)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return str(info.value)


@pytest.mark.parametrize(
    "kwargs, needle",
    [(dict(r=0), "r=0"), (dict(lora_alpha=-1), "lora_alpha=-1"), (dict(bias="x"), "bias='x'")],
)
def test_bad_config_values(kwargs, needle):
    """r=0, lora_alpha=-1, bias='x': ValueError naming the field before anything is wrapped."""
    tree = gpt2_shapes()
    snap = _snapshot(tree)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        jlora.wrap(tree, jlora.LoraConfig(target_modules=["c_attn"], **kwargs))
    _assert_unchanged(tree, snap)


def test_target_entry_matching_nothing_lists_candidates():
    """One misspelt entry among good ones: ValueError naming the entry and listing the module
    paths that could match (the real c_attn paths of the model)."""
    msg = _raises(gpt2_shapes(), dict(target_modules=["c_attn", "c_atn"]), ValueError,
                  "'c_atn'", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc")
    assert "transformer.h.0.ln_1" not in msg  # norms hold no kernel: not candidates


def test_targets_matching_nothing_at_all():
    """No entry matches: ValueError listing candidate paths."""
    _raises(gpt2_shapes(), dict(target_modules=["q_proj", "v_proj"]), ValueError,
            "matched no kernel", "transformer.h.1.attn.c_proj")


def test_layer_selection_leaving_an_entry_empty():
    """layers_to_transform beyond the model's layers leaves the entries without a module."""
    _raises(gpt2_shapes(), dict(target_modules=["c_attn"], layers_to_transform=[7], layers_pattern="h"),
            ValueError, "c_attn", "layers_to_transform")


def test_regex_matching_only_biases():
    """A regex that fullmatches bias leaf paths but no module: ValueError that says so and
    shows the leaf paths it matched."""
    _raises(gpt2_shapes(), dict(target_modules=r".*c_attn\.bias"), ValueError,
            "transformer.h.0.attn.c_attn.bias", "only biases")


def test_regex_matching_only_modules_without_kernel():
    """A regex matching LayerNorm modules only (scale/bias, no kernel): ValueError naming them."""
    _raises(gpt2_shapes(), dict(target_modules=r".*\.ln_[12]"), ValueError,
            "transformer.h.0.ln_1", "no kernel")


def test_non_array_leaf_where_a_kernel_is_expected():
    """A string where a targeted kernel should be: TypeError naming the path; nothing changed."""
    tree = small_tree()
    tree["layers"]["1"]["q"]["kernel"] = "not an array"
    _raises(tree, dict(target_modules=["q"]), TypeError, "layers/1/q/kernel", "str")
    shapes = gpt2_shapes()
    shapes["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"] = None
    # None is an empty subtree in JAX: the module then holds no kernel for that layer
    jlora.wrap(shapes, jlora.LoraConfig(target_modules=["c_attn"]))


def test_kernel_with_one_axis():
    """A targeted 'kernel' with fewer than 2 axes cannot carry A·B: ValueError naming it."""
    tree = small_tree()
    tree["head"]["kernel"] = jnp.ones((4,))
    _raises(tree, dict(target_modules=["head"]), ValueError, "head/kernel", "(4,)")


def test_wrapping_a_wrapped_tree():
    """Wrapping an already wrapped tree: ValueError that names the path and says to unload."""
    lp = jlora.wrap(small_tree(), jlora.LoraConfig(target_modules=["q"]))
    _raises(lp, dict(target_modules=["head"]), ValueError, "layers/0/q/kernel", "already", "unload")
    lp = jlora.wrap(small_tree(), jlora.LoraConfig(target_modules=["q"], bias="all"))
    _raises(lp, dict(target_modules=["head"]), ValueError, "already")


def test_config_must_be_a_lora_config():
    """A dict where a LoraConfig is expected: TypeError (use LoraConfig.from_dict)."""
    tree = small_tree()
    snap = _snapshot(tree)
    with pytest.raises(TypeError, match="LoraConfig"):
        jlora.wrap(tree, {"r": 8, "target_modules": ["q"]})
    _assert_unchanged(tree, snap)


def test_target_modules_none():
    """target_modules=None (PEFT would look up model defaults): ValueError saying what to name."""
    _raises(small_tree(), dict(target_modules=None), ValueError, "target_modules")


def test_modules_to_save_matching_nothing():
    """A modules_to_save entry that matches no module: ValueError naming it."""
    _raises(small_tree(), dict(target_modules=["q"], modules_to_save=["classifier"]), ValueError, "'classifier'")


def test_layers_to_transform_on_stacked_layers():
    """layers_to_transform cannot select rows of an nn.scan-stacked kernel: ValueError."""
    tree = {"layers": {"query": {"kernel": jnp.ones((3, 8, 2, 4)), "bias": jnp.zeros((3, 2, 4))},
                       "norm": {"scale": jnp.ones((3, 8))}},
            "final": {"scale": jnp.ones((8,))}}
    _raises(tree, dict(target_modules=["query"], layers_to_transform=[0]), ValueError, "stacked")


def test_wrong_layout_override():
    """A ``layouts=`` override whose length does not fit the kernel: ValueError naming the shape."""
    _raises(small_tree(), dict(target_modules=["q"]), ValueError, "(4, 4)",
            layouts={"q": ("in", "in", "out")})
