"""Property tests (hypothesis): the factored forward against the merged kernel on random
kernel layouts, and LoraConfig's JSON round trip on random configs.

The reference for the forward is the model run on ``jlora.merge(lp)``, i.e. on the
kernel ``W + s·A·B`` formed explicitly, for kernels whose axes are any arrangement of
input and output axes (with or without a leading layer-stack axis), and their gradients
with respect to A and B; materialisation is forbidden, so every case is factored.
"""

from __future__ import annotations

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jlora  # noqa: E402

# derandomized: the same examples every run (CI stays reproducible); each forward example compiles.
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
FORWARD_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def kernels(draw):
    """A kernel layout: roles of W's axes (a permutation of in/out axes, maybe a leading
    stack axis), their sizes, the rank and the batch size."""
    n_in = draw(st.integers(1, 2))
    n_out = draw(st.integers(1, 2))
    roles = draw(st.permutations(["in"] * n_in + ["out"] * n_out))
    stacked = draw(st.booleans())
    if stacked:
        roles = ["stack", *roles]
    sizes = [draw(st.integers(2, 5)) for _ in roles]
    r = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return tuple(roles), tuple(sizes), r, batch, seed


def _einsum_for(roles):
    """x: (*stack, batch, *in) · W -> (*stack, batch, *out), as an einsum string."""
    letters = iter(string.ascii_lowercase[:20])
    w = [next(letters) for _ in roles]
    stack = [c for c, role in zip(w, roles) if role == "stack"]
    ins = [c for c, role in zip(w, roles) if role == "in"]
    outs = [c for c, role in zip(w, roles) if role == "out"]
    return f"{''.join(stack)}z{''.join(ins)},{''.join(w)}->{''.join(stack)}z{''.join(outs)}"


@FORWARD_SETTINGS
@given(kernels())
def test_factored_forward_and_grads_equal_merged_on_any_layout(case):
    roles, sizes, r, batch, seed = case
    k_w, k_x, k_lora = jax.random.split(jax.random.key(seed), 3)
    params = {"proj": {"kernel": jax.random.normal(k_w, sizes)}}
    x_shape = [s for s, role in zip(sizes, roles) if role == "stack"] + [batch]
    x_shape += [s for s, role in zip(sizes, roles) if role == "in"]
    x = jax.random.normal(k_x, x_shape)
    spec = _einsum_for(roles)

    def f(p, x):
        return jnp.einsum(spec, x, p["proj"]["kernel"])

    config = jlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False)
    lp = jlora.wrap(params, config, rng=k_lora, layouts={"proj": roles})
    lw = lp["proj"]["kernel"]
    assert lw.layout == roles

    factored = jlora.lora(f, on_materialize="error")
    y = factored(lp, x)
    y_ref = f(jlora.merge(lp), x)
    scale = float(jnp.abs(y_ref).max())
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=1e-5 * scale)

    def loss_factored(ab):
        return jnp.sum(jnp.sin(factored(_with_factors(lp, ab), x)))

    def loss_merged(ab):
        return jnp.sum(jnp.sin(f(jlora.merge(_with_factors(lp, ab)), x)))

    g = jax.grad(loss_factored)((lw.a, lw.b))
    g_ref = jax.grad(loss_merged)((lw.a, lw.b))
    for got, want in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                                   atol=1e-4 * max(float(jnp.abs(want).max()), 1e-6))


def _with_factors(lp, ab):
    a, b = ab
    return {"proj": {"kernel": lp["proj"]["kernel"].replace(a=a, b=b)}}


configs = st.builds(
    lambda r, alpha, targets, dropout, bias, rslora, init, ranks, layers: jlora.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias=bias, use_rslora=rslora,
        init_lora_weights=init, rank_pattern={t: k for t, k in zip(targets, ranks)} if isinstance(targets, list) else {},
        layers_to_transform=layers if isinstance(targets, list) else None,  # a regex names its layers itself
    ),
    r=st.integers(1, 64),
    alpha=st.integers(1, 128),
    targets=st.one_of(
        st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "c_attn", "query", "dense"]), min_size=1, max_size=4,
                 unique=True),
        st.just(".*attn.*"),
        st.just("all-linear"),
    ),
    dropout=st.sampled_from([0.0, 0.05, 0.1]),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    rslora=st.booleans(),
    init=st.sampled_from([True, False, "gaussian"]),
    ranks=st.lists(st.integers(1, 32), max_size=4),
    layers=st.one_of(st.none(), st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True)),
)


@SETTINGS
@given(configs)
def test_config_json_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert data["peft_type"] == "LORA"
    assert jlora.LoraConfig.from_dict(data) == config
