"""Targets and layouts found by use (``wrap(..., apply_fn=, example_args=)``), whatever
the leaves are called; errors for uses no layout serves; inference without apply_fn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jlora
from support import usage_models as um
from jlora.layouts.from_use import find_kernel_uses
from support.lora_checks import assert_all_factored, assert_factored_equals_merged, rel_err

TUNIX_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GEMMA_TARGETS = ["q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"]

# The layouts the einsum strings in usage_models.py imply (written out by hand).
TUNIX_LAYOUTS = {
    "q_proj/w": ("in", "out", "out"), "k_proj/w": ("in", "out", "out"), "v_proj/w": ("in", "out", "out"),
    "o_proj/w": ("in", "in", "out"), "gate_proj/kernel": ("in", "out"), "up_proj/kernel": ("in", "out"),
    "down_proj/kernel": ("in", "out"),
}
GEMMA_LAYOUTS = {
    "q_einsum/w": ("out", "in", "out"), "kv_einsum/w": ("out", "out", "in", "out"),
    "attn_vec_einsum/w": ("in", "in", "out"), "gate_proj/kernel": ("in", "out"),
    "up_proj/kernel": ("in", "out"), "down_proj/kernel": ("in", "out"),
}


def call(m, ids):
    return m(ids)


def _layouts(lp):
    return {"/".join(p.split("/")[-2:]): w.layout for p, w in jlora.lora_leaves(lp)}


@functools.lru_cache(maxsize=None)
def wrapped(family: str, targets: str = "named"):
    """The family's model wrapped with layouts found by use; Gemma's k/v axis of
    kv_einsum declared a stack axis (one adapter per slice), its embedding targeted too."""
    model = um.tunix() if family == "tunix" else um.gemma()
    named = TUNIX_TARGETS if family == "tunix" else GEMMA_TARGETS + ["input_embedding"]
    config = jlora.LoraConfig(
        r=2, lora_alpha=2, target_modules="all-linear" if targets == "all-linear" else named,
        init_lora_weights=False,
    )
    layouts = {".*kv_einsum": ("stack", "out", "in", "out")} if family == "gemma" and targets == "named" else None
    return jlora.wrap(model, config, rng=jax.random.key(1), apply_fn=call, example_args=(um.ids(),), layouts=layouts)


@pytest.mark.parametrize("family", ["tunix", "gemma"])
def test_einsum_kernels_found_by_use_stay_factored(family):
    """tunix/bonsai and gemma trees: the einsum kernels under `w` (and the nnx.Linear MLP)
    are targets with the layouts of their einsums; every use is factored; factored ==
    merged forward and for the factors' gradients."""
    lp = wrapped(family)
    want = dict(TUNIX_LAYOUTS if family == "tunix" else GEMMA_LAYOUTS)
    if family == "gemma":
        want.update({"kv_einsum/w": ("stack", "out", "in", "out"), "embedder/input_embedding": ("in", "out")})
    assert _layouts(lp) == want
    assert len(jlora.lora_leaves(lp)) == um.L * (len(want) - (family == "gemma")) + (family == "gemma")
    assert type(lp) is type(um.tunix() if family == "tunix" else um.gemma())
    report = assert_all_factored(call, lp, um.ids())
    # tunix: gradients are checked on the same tree under nnx.remat (test_remat.py)
    assert_factored_equals_merged(call, lp, um.ids(), grads=family == "gemma")
    if family == "gemma":
        # the embedding is gathered by rows and read transposed by the tied head (x·Eᵀ):
        # one layout (in, out) serves both uses, both factored
        emb = [e.primitive for e in report.events if e.path == "embedder/input_embedding"]
        assert sorted(emb) == ["dot_general", "gather"]
        # kv_einsum's slice c gets its own adapter: ΔW[c] = s·A[c]·B[c], in (K, D, H) order
        w0 = dict(jlora.lora_leaves(lp))["layers/0/attn/kv_einsum/w"]
        assert w0.a.shape == (2, um.D, 2) and w0.b.shape == (2, 2, um.K, um.H)
        d = jlora.merge(lp).layers[0].attn.kv_einsum.w[...] - um.gemma().layers[0].attn.kv_einsum.w[...]
        for c in range(2):
            assert rel_err(d[c], w0.scale * jnp.einsum("dr,rkh->kdh", w0.a[c], w0.b[c])) <= 1e-5


@pytest.mark.parametrize("family", ["tunix", "gemma"])
def test_all_linear_takes_einsum_kernels_not_head_or_embedding(family):
    """all-linear: every kernel used in a dot_general (einsum kernels included) with the
    layout of its use (kv_einsum's k/v axis kept in the output: 'out'), not the output
    head or the embedding."""
    lp = wrapped(family, "all-linear")
    assert _layouts(lp) == (TUNIX_LAYOUTS if family == "tunix" else GEMMA_LAYOUTS)
    assert len(jlora.lora_leaves(lp)) == um.L * len(TUNIX_LAYOUTS if family == "tunix" else GEMMA_LAYOUTS)
    assert not any(p.startswith(("lm_head", "embedder")) for p, _ in jlora.lora_leaves(lp))


def test_head_and_embedding_by_name():
    """lm_head/w (D, V) and the bare embedder/input_embedding (V, D), named explicitly:
    (in, out) each, the embedding gathered by rows, both factored."""
    config = jlora.LoraConfig(r=2, target_modules=["lm_head", "input_embedding"])
    lp = jlora.wrap(um.tunix(), config, apply_fn=call, example_args=(um.ids(),))
    assert {p: w.layout for p, w in jlora.lora_leaves(lp)} == {
        "lm_head/w": ("in", "out"), "embedder/input_embedding": ("in", "out")
    }
    report = assert_all_factored(call, lp, um.ids())
    assert sorted(e.primitive for e in report.events) == ["dot_general", "gather"]


def test_layouts_checked_against_use():
    config = jlora.LoraConfig(r=2, target_modules=["q_einsum"])
    with pytest.raises(ValueError, match=r"q_einsum/w.*layouts= gives \('in', 'out', 'out'\).*BTD,NDH->BTNH"):
        jlora.wrap(um.gemma(), config, apply_fn=call, example_args=(um.ids(),),
                   layouts={".*q_einsum": ("in", "out", "out")})


def test_nested_jaxprs_and_stacks_in_a_pure_function():
    """A leaf is followed through jit, custom_vjp, custom_jvp, checkpoint, scan (scanned
    over), fori_loop (W[i]), cond (x·Wᵀ), a free stack axis and a reshape."""
    d = 8

    @jax.custom_vjp
    def cv(x, w):
        return x @ w

    cv.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    @jax.custom_jvp
    def cj(x, w):
        return jnp.tanh(x @ w)

    cj.defjvp(lambda p, t: (cj(*p), (t[0] @ p[1] + p[0] @ t[1]) * (1 - cj(*p) ** 2)))

    def f(p, x):  # side by side, so that each gradient is a short chain
        outs = [
            jax.jit(lambda x, w: x @ w)(x, p["jit"]),
            cv(x, p["cvjp"]),
            cj(x, p["cjvp"]),
            jax.checkpoint(lambda h, w: jnp.einsum("bd,de->be", h, w))(x, p["remat"]),
            jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["scan"])[0],
            jax.lax.fori_loop(0, 2, lambda i, h: h @ p["loop"][i], x),
            jax.lax.cond(x.sum() > 0, lambda h: h @ p["cond"].T, lambda h: 2 * h @ p["cond"].T, x),
        ]
        h = jnp.einsum("bd,ldk->blk", x, p["free_stack"]).reshape(x.shape[0], -1)
        return jnp.concatenate(outs + [h @ p["flat"].reshape(16, -1)], axis=-1)

    keys = iter(jax.random.split(jax.random.key(0), 10))
    rnd = lambda *s: 0.3 * jax.random.normal(next(keys), s)  # noqa: E731
    p = {
        "jit": rnd(d, d), "cvjp": rnd(d, d), "cjvp": rnd(d, d), "remat": rnd(d, d), "scan": rnd(2, d, d),
        "loop": rnd(2, d, d), "cond": rnd(d, d), "free_stack": rnd(2, d, 8), "flat": rnd(4, 4, 8),
    }
    x = rnd(3, d)
    want = {
        "jit": ("in", "out"), "cvjp": ("in", "out"), "cjvp": ("in", "out"), "remat": ("in", "out"),
        "scan": ("stack", "in", "out"), "loop": ("stack", "in", "out"), "cond": ("out", "in"),
        "free_stack": ("out", "in", "out"), "flat": ("in", "in", "out"),
    }
    uses = find_kernel_uses(f, p, (x,))
    assert {u.path: u.layout() for u in uses.values()} == want
    # bare leaves are their own modules: target_modules names them
    lp = jlora.wrap(p, jlora.LoraConfig(r=2, target_modules=list(want), init_lora_weights=False),
                    apply_fn=f, example_args=(x,))
    assert {path: w.layout for path, w in jlora.lora_leaves(lp)} == want
    assert_all_factored(f, lp, x)
    # forward only: the gradients of each of these rules are tested in test_transform.py
    assert_factored_equals_merged(f, lp, x, grads=False)


def test_two_incompatible_uses_raise_naming_leaf_and_both_uses():
    p = {"proj": {"w": jnp.ones((8, 8, 4))}}
    x = jnp.ones((2, 8))

    def f(p, x):
        w = p["proj"]["w"]
        return jnp.einsum("bd,dek->bek", x, w).sum() + jnp.einsum("be,dek->bdk", x, w).sum()

    with pytest.raises(ValueError, match=r"proj/w .*two incompatible ways.*bd,dek->bek.*be,dek->bdk"):
        jlora.wrap(p, jlora.LoraConfig(r=2, target_modules=["proj"]), apply_fn=f, example_args=(x,))
    # the same leaf not targeted: no error
    jlora.wrap({**p, "other": {"kernel": jnp.ones((8, 3))}}, jlora.LoraConfig(r=2, target_modules=["other"]),
               apply_fn=lambda p, x: f(p, x) + (x @ p["other"]["kernel"]).sum(), example_args=(x,))


def test_use_that_fits_no_layout_raises():
    p = {"proj": {"w": jnp.ones((8, 8, 4))}}

    def f(p, x):  # axis 1 of w split: one part contracted, one kept
        return jnp.einsum("bdi,dij->bj", x, p["proj"]["w"].reshape(8, 2, 16))

    with pytest.raises(ValueError, match=r"proj/w .*fits no kernel layout.*split"):
        jlora.wrap(p, jlora.LoraConfig(r=2, target_modules=["proj"]), apply_fn=f,
                   example_args=(jnp.ones((2, 8, 2)),))


def test_ambiguous_without_apply_fn_says_what_to_pass():
    for params, name in [({"proj": {"weight": jnp.ones((8, 8))}}, "proj/weight"), ({"proj": jnp.ones((8, 6))}, "proj")]:
        with pytest.raises(ValueError, match=rf"{name}: cannot tell the layout.*apply_fn=.*layouts="):
            jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["proj"]))
    x = jnp.ones((2, 8))
    lp = jlora.wrap({"proj": jnp.ones((8, 6))}, jlora.LoraConfig(r=2, target_modules=["proj"]),
                    apply_fn=lambda p, x: x @ p["proj"], example_args=(x,))
    assert jlora.lora_leaves(lp)[0][1].layout == ("in", "out")
    # a 2-D `weight` with a bias of a non-square kernel: (out, in) as torch stores it
    lp = jlora.wrap({"proj": {"weight": jnp.ones((6, 8)), "bias": jnp.zeros(6)}},
                    jlora.LoraConfig(r=2, target_modules=["proj"]))
    assert jlora.lora_leaves(lp)[0][1].layout == ("out", "in")


def test_w_leaves_inferred_without_apply_fn():
    """Without apply_fn, `w` leaves are oriented by the model width where that is
    unambiguous: the same layouts use finds."""
    for family, targets, want in [("tunix", TUNIX_TARGETS, TUNIX_LAYOUTS), ("gemma", GEMMA_TARGETS, GEMMA_LAYOUTS)]:
        model = um.tunix() if family == "tunix" else um.gemma()
        lp = jlora.wrap(model, jlora.LoraConfig(r=2, target_modules=targets))
        assert _layouts(lp) == want


def test_non_param_variables_are_never_kernels():
    """A contracted nnx.Cache (a KV-cache-like buffer) is no target, even for all-linear."""

    class WithCache(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
            self.cache = nnx.Cache(jnp.ones((8, 8)))

        def __call__(self, x):
            return self.proj(x) @ self.cache[...]

    lp = jlora.wrap(WithCache(), jlora.LoraConfig(r=2, target_modules="all-linear"),
                    apply_fn=call, example_args=(jnp.ones((2, 8)),))
    assert [p for p, _ in jlora.lora_leaves(lp)] == ["proj/kernel"]
