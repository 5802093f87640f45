"""LoRA on the NNX Qwen3 / Llama 3 / Gemma 3 trees, against PEFT on the torch models of
the same weights: PEFT files both ways (name maps recognised from the paths, Gemma's
kv_einsum as PEFT's k_proj + v_proj), every target factored, factored == merged, the
base untouched by training."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from support.family_models import FAMILIES, NNX_TARGETS, TARGETS, case, peft_adapter, torch_logits

pytestmark = pytest.mark.torch  # the references are torch / PEFT

TOL = 1e-4


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@functools.lru_cache(maxsize=None)
def loaded(family: str):
    """The PEFT adapter of ``family`` loaded by jlora over the NNX state (no name_map,
    no layouts: both come from the family map recognised in the paths)."""
    d, _ = peft_adapter(family)
    return jlora.load_peft(d, case(family).state)


@functools.lru_cache(maxsize=None)
def wrapped(family: str):
    """``jlora.wrap`` over the NNX state, the seven projections by their NNX names, targets
    and layouts found by use, non-zero factors (``init_lora_weights=False``, as PEFT)."""
    c = case(family)
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=NNX_TARGETS[family], init_lora_weights=False)
    lp = jlora.wrap(c.state, config, rng=jax.random.key(0), apply_fn=c.apply, example_args=(jnp.asarray(c.ids),))
    return config, lp


@functools.lru_cache(maxsize=None)
def forward(family: str):
    return jax.jit(jlora.lora(case(family).apply, on_materialize="error"))


def _lora_leaves(lp) -> dict[str, jlora.LoraWeight]:
    flat = jax.tree_util.tree_flatten_with_path(lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))[0]
    return {"/".join(jlora.core.paths.path_names(p)): x for p, x in flat if isinstance(x, jlora.LoraWeight)}


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_and_matches_peft(family):
    c = case(family)
    _, ref = peft_adapter(family)
    lp = loaded(family)
    leaves = _lora_leaves(lp)
    n_modules = 6 if family == "gemma3" else 7
    assert len(leaves) == n_modules * len(c.model.layers)
    if family == "gemma3":
        kv = leaves["layers/0/attn/kv_einsum/w"]
        assert kv.layout == ("stack", "out", "in", "out") and kv.a.shape == (2, 32, 4) and kv.b.shape == (2, 4, 2, 8)
        assert leaves["layers/0/attn/q_einsum/w"].layout == ("out", "in", "out")
    else:
        assert leaves["layers/0/attn/q_proj/w"].layout == ("in", "out", "out")
        assert leaves["layers/0/attn/o_proj/w"].layout == ("in", "in", "out")
    base = torch_logits(c.torch_model, c.ids)
    assert _max_err(ref, base) > 0.05  # the adapter changes the logits
    assert _max_err(forward(family)(lp, jnp.asarray(c.ids)), ref) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_save_peft_loads_in_peft(family, tmp_path):
    import peft
    from safetensors.numpy import load_file

    c = case(family)
    lp = loaded(family)
    jlora.save_peft(tmp_path, lp)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (2 * 8, 4)
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 4 * 8)
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path))
    got = forward(family)(lp, jnp.asarray(c.ids))
    assert _max_err(torch_logits(pm, c.ids), got) <= TOL
    # The round trip is exact: PEFT's own file and ours hold the same numbers.
    d, _ = peft_adapter(family)
    theirs = load_file(f"{d}/adapter_model.safetensors")
    assert set(theirs) == set(tensors)
    assert max(_max_err(theirs[k], tensors[k]) for k in theirs) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_target_factored(family):
    """All seven projections (q/k/v/o, gate/up/down) adapted, none ever materialised:
    ``explain`` and ``on_materialize="error"``, on the wrapped tree and the loaded one."""
    c = case(family)
    n_modules = 6 if family == "gemma3" else 7
    _, lp = wrapped(family)
    leaves = _lora_leaves(lp)
    assert len(leaves) == n_modules * len(c.model.layers)
    assert all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())
    for tree in (lp, loaded(family)):
        report = jlora.explain(c.apply, tree, jnp.asarray(c.ids))
        assert not report.materialized
        assert len(set(report.factored)) == n_modules * len(c.model.layers)
    forward(family)(lp, jnp.asarray(c.ids))  # on_materialize="error": raises on any materialisation


@pytest.mark.parametrize("family", FAMILIES)
def test_factored_equals_merged(family):
    c = case(family)
    _, lp = wrapped(family)
    merged = jlora.merge(lp)
    assert not _lora_leaves(merged)
    want = np.asarray(jax.jit(c.apply)(merged, jnp.asarray(c.ids)))
    got = np.asarray(forward(family)(lp, jnp.asarray(c.ids)))
    assert _max_err(got, want) <= 1e-5 * float(np.abs(want).max())
    assert _max_err(want, jax.jit(c.apply)(c.state, jnp.asarray(c.ids))) > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_training_changes_factors_only_and_saves_for_peft(family, tmp_path):
    """A few AdamW steps: W bit-identical, every factor moved; the trained adapter, written
    by save_peft with the wrap config (NNX module names), loads in PEFT on the torch
    model and computes what jlora computes."""
    import peft

    c = case(family)
    config, lp = wrapped(family)
    fwd = jlora.lora(c.apply, on_materialize="error")
    ids = jnp.asarray(c.ids)

    def loss_fn(lp):
        logits = fwd(lp, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = jlora.optimizer(optax.adam(1e-2))
    opt_state = tx.init(lp)

    @jax.jit
    def step(lp, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(lp)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    losses = []
    new = lp
    for _ in range(3):
        new, opt_state, loss = step(new, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    before, after = _lora_leaves(lp), _lora_leaves(new)
    for path, w in before.items():
        np.testing.assert_array_equal(np.asarray(after[path].w), np.asarray(w.w), err_msg=path)
        assert _max_err(after[path].a, w.a) > 0, path
    # every other leaf (norms, embedding) is untouched too
    plain = lambda t: [x for x in jax.tree.leaves(t, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))  # noqa: E731
                       if not isinstance(x, jlora.LoraWeight)]
    for x, y in zip(plain(lp), plain(new)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    jlora.save_peft(tmp_path, new, config=config)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)  # PyTorch names, not the NNX ones
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path))
    assert _max_err(torch_logits(pm, c.ids), forward(family)(new, ids)) <= TOL


def test_orbax_and_cli_convert_keep_the_family_names(tmp_path):
    """Orbax stores which map named the adapter; ``jlora convert`` writes PEFT files
    from it without the base, and PEFT loads them (Gemma: kv_einsum → k_proj + v_proj)."""
    import peft

    from jlora import cli

    c = case("gemma3")
    lp = loaded("gemma3")
    jlora.save(tmp_path / "orbax", lp)
    back = jlora.load(tmp_path / "orbax", c.state)
    for path, w in _lora_leaves(lp).items():
        np.testing.assert_array_equal(np.asarray(_lora_leaves(back)[path].a), np.asarray(w.a))
    assert jlora.io.read_metadata(tmp_path / "orbax")["name_map"] == "gemma3"
    assert cli.main(["convert", str(tmp_path / "orbax"), str(tmp_path / "peft")]) == 0
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path / "peft"))
    assert _max_err(torch_logits(pm, c.ids), peft_adapter("gemma3")[1]) <= TOL


def test_modules_to_save_named_for_peft(tmp_path):
    """modules_to_save=["embedder"] (the NNX name) trains the embedding in full; the PEFT
    config names it as PEFT's model does (embed_tokens), and PEFT loads it."""
    import peft

    c = case("qwen3")
    ids = jnp.asarray(c.ids)
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=NNX_TARGETS["qwen3"], init_lora_weights=False,
                              modules_to_save=["embedder"])
    lp = jlora.wrap(c.state, config, rng=jax.random.key(0), apply_fn=c.apply, example_args=(ids,))
    node = lambda x: isinstance(x, (jlora.Trainable, jlora.LoraWeight))  # noqa: E731
    lp = jax.tree_util.tree_map(lambda x: jlora.Trainable(x.value * 1.5) if isinstance(x, jlora.Trainable) else x,
                                lp, is_leaf=node)
    jlora.save_peft(tmp_path, lp, config=config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens"]
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path))
    assert _max_err(torch_logits(pm, c.ids), forward("qwen3")(lp, ids)) <= TOL
