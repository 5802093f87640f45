"""Issue 16, inputs: no silently wrong result from an out-of-range adapter id, a
non-tree passed to ``wrap``, or a rank no kernel can use.

References: the base model (``jlora.unload``) computed directly, and each adapter run
alone on its own examples; the kernel's own shape for the rank bound.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def _tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "q": {"kernel": jax.random.normal(k[0], (4, 6))},
        "v": {"kernel": jax.random.normal(k[1], (6, 3))},
    }


def _apply(p, x):
    return jnp.tanh(x @ p["q"]["kernel"]) @ p["v"]["kernel"]


@pytest.fixture(scope="module")
def two_adapters():
    cfg = lambda r: jlora.LoraConfig(r=r, target_modules=["q", "v"], init_lora_weights=False)  # noqa: E731
    lp = jlora.wrap(_tree(), cfg(2), rng=jax.random.key(1))
    lp = jlora.add_adapter(lp, "b", cfg(3), rng=jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 4))
    return lp, x


@pytest.mark.parametrize("ids", [[5, 7, 0, 1], [0, -2, 1, 0], [0, 1, 2, 0]])
def test_concrete_ids_out_of_range_raise(two_adapters, ids):
    lp, x = two_adapters
    for as_array in (np.asarray, jnp.asarray):
        with pytest.raises(ValueError) as err:
            jlora.lora(_apply)(lp, x, adapter_ids=as_array(ids))
        msg = str(err.value)
        bad = next(i for i in ids if i < -1 or i > 1)
        assert f"= {bad} is out of range" in msg
        assert "-1 (the base model) and 0..1" in msg and "'default'" in msg and "'b'" in msg


def test_valid_ids_match_each_adapter_alone(two_adapters):
    lp, x = two_adapters
    ids = jlora.adapter_ids(lp, ["b", "__base__", "default", "b"])
    y = np.asarray(jlora.lora(_apply)(lp, x, adapter_ids=ids))
    alone = {n: np.asarray(jlora.lora(_apply)(jlora.set_adapter(lp, n), x)) for n in ("default", "b")}
    base = np.asarray(_apply(jlora.unload(lp), x))
    np.testing.assert_allclose(y[0], alone["b"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[1], base[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[2], alone["default"][2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        jlora.adapter_ids(lp, ["c"])


def test_traced_out_of_range_ids_give_the_base_model(two_adapters):
    """Documented: under jit the ids cannot be checked; an unknown index selects no adapter."""
    lp, x = two_adapters
    run = jax.jit(lambda p, x, ids: jlora.lora(_apply)(p, x, adapter_ids=ids))
    y = np.asarray(run(lp, x, jnp.array([5, -7, 1, 0])))
    base = np.asarray(_apply(jlora.unload(lp), x))
    alone_b = np.asarray(jlora.lora(_apply)(jlora.set_adapter(lp, "b"), x))
    np.testing.assert_allclose(y[:2], base[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[2], alone_b[2], rtol=1e-5, atol=1e-6)
    assert np.abs(y[2] - base[2]).max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("bad", [5, "params", None, 3.0, {"a": 5, "b": "x"}, [1, 2]])
def test_wrap_of_a_non_tree_is_a_type_error(bad):
    with pytest.raises(TypeError) as err:
        jlora.wrap(bad, jlora.LoraConfig(target_modules=["q"]))
    msg = str(err.value)
    assert "params must be a parameter pytree of arrays" in msg
    assert type(bad).__name__ in msg


def test_rank_above_the_smaller_side_warns_naming_the_target():
    tree = _tree()  # q: 4 -> 6, v: 6 -> 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp = jlora.wrap(tree, jlora.LoraConfig(r=4, target_modules=["q", "v"]))
    msgs = [str(w.message) for w in caught if "r=4 is above" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("v/kernel:") and "out_features=3" in msgs[0]
    assert caught[0].filename == __file__  # points at the user's call
    assert lp["v"]["kernel"].a.shape == (6, 4)  # accepted, as PEFT accepts it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.wrap(tree, jlora.LoraConfig(r=3, target_modules=["q", "v"]))  # r == min side: no warning
