"""jlora.models at real sizes: stacked (scanned) layers, remat modes, memory-efficient
attention and the chunked loss, each against a reference: transformers' torch models and
PEFT on them (stacked trees), the plain unstacked model without remat, the reference
attention (float32 logits), and optax's cross-entropy over the full logits."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.models as jm
from support.jaxpr_walk import all_eqns
from support.family_models import FAMILIES, NNX_TARGETS, TARGETS, case, peft_adapter, torch_logits
from jlora.models.attention import attention, attention_inputs

pytestmark = pytest.mark.torch  # the family cases are built from transformers' torch models

TOL = 1e-4  # against torch (as the other family tests)
EXACT = 1e-5  # jlora against jlora, float32


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _tree_err(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(_max_err(a[k], b[k]) for k in a)


def _scale(x) -> float:
    return max(1.0, float(np.max(np.abs(np.asarray(x)))))


@functools.lru_cache(maxsize=None)
def stacked(family: str, **overrides):
    """The family case's torch weights in a scan_layers=True model: (model, graphdef, state)."""
    model = jm.from_torch(case(family).torch_model, scan_layers=True, **overrides)
    graphdef, state = nnx.split(model)
    return model, graphdef, state


def torch_named(graphdef, tree) -> dict:
    """A state-shaped tree (parameters or their gradients) as {PyTorch name: array}: stacked
    and unstacked trees become comparable name by name."""
    return jm.state_dict(nnx.merge(graphdef, tree))


def _lora_leaves(lp) -> dict:
    return dict(jlora.lora_leaves(lp))


# --------------------------------------------------------------------------------------
# scan_layers: the stacked tree, its logits, its checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_tree_and_logits(family):
    """Every layer leaf stacked on a leading axis; the same weights as the torch model
    (state_dict exactly equal); logits equal the unstacked model's and torch's."""
    c = case(family)
    model, _, state = stacked(family)
    L = len(c.model.layers)
    def shapes_of(tree):
        return {"/".join(jlora.core.paths.path_names(p)): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    shapes, flat = shapes_of(state), shapes_of(c.state)
    layer_leaves = [p for p in shapes if p.startswith("layers/")]
    assert len(layer_leaves) == len([p for p in flat if p.startswith("layers/0/")])
    for p in layer_leaves:
        assert shapes[p] == (L,) + flat[p.replace("layers/", "layers/0/", 1)], p
    assert shapes["layers/mlp/down_proj/kernel"] == (L, 64, 32)
    if family == "gemma3":
        assert shapes["layers/attn/kv_einsum/w"] == (L, 2, 2, 32, 8)
    sd = jm.state_dict(model)
    want = {k: v.numpy() for k, v in c.torch_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if c.model.config.tie_embeddings:
        want.pop("lm_head.weight", None)
    assert _tree_err(sd, want) == 0.0
    ids = jnp.asarray(c.ids)
    got = np.asarray(model(ids))
    assert _max_err(got, c.model(ids)) <= EXACT * _scale(got)
    assert _max_err(got, torch_logits(c.torch_model, c.ids)) <= TOL
    # one scan in the program, whatever the depth
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x))(nnx.state(model), ids)
    assert sum(e.primitive.name == "scan" for e in jaxpr.eqns) == 1


def test_gemma_interleave_is_a_scanned_flag():
    """Gemma 3's sliding/global layers in one scanned body: the per-layer flag picks the
    window and the RoPE table; with padding (left, and right) still equal to torch."""
    import torch

    c = case("gemma3")
    assert c.model.config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    model, _, _ = stacked("gemma3")
    ids = np.random.RandomState(3).randint(0, 100, (2, 12))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    ref = torch_logits(c.torch_model, ids, attention_mask=torch.tensor(mask))
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert _max_err(got[valid], ref[valid]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_checkpoints_round_trip(family, tmp_path):
    """save_pretrained of a stacked model loads in transformers with the same logits;
    from_pretrained(scan_layers=True) of a torch checkpoint equals from_torch."""
    import transformers

    c = case(family)
    model, _, _ = stacked(family)
    jm.save_pretrained(model, tmp_path / "ours")
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert _max_err(torch_logits(tm, c.ids), torch_logits(c.torch_model, c.ids)) <= TOL
    assert "scan_layers" not in json.loads((tmp_path / "ours" / "config.json").read_text())
    c.torch_model.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    back = jm.from_pretrained(tmp_path / "theirs", scan_layers=True)
    assert back.config.scan_layers
    assert _tree_err(jm.state_dict(back), jm.state_dict(model)) == 0.0


@functools.lru_cache(maxsize=None)
def loaded_stacked(family: str):
    d, _ = peft_adapter(family)
    return jlora.load_peft(d, stacked(family)[2])


@functools.lru_cache(maxsize=None)
def forward_stacked(family: str):
    graphdef = stacked(family)[1]
    return jax.jit(jlora.lora(lambda s, x: nnx.merge(graphdef, s)(x), on_materialize="error"))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_files_both_ways_on_stacked_tree(family, tmp_path):
    """PEFT's adapter (one tensor per layer) loads onto the stacked tree as stacked
    factors and computes PEFT's logits; save_peft writes back PEFT's own file bit for bit,
    which PeftModel loads."""
    import peft
    from safetensors.numpy import load_file

    c = case(family)
    d, ref = peft_adapter(family)
    lp = loaded_stacked(family)
    leaves = _lora_leaves(lp)
    L = len(c.model.layers)
    assert len(leaves) == (6 if family == "gemma3" else 7)
    if family == "gemma3":
        kv = leaves["layers/attn/kv_einsum/w"]
        assert kv.layout == ("stack", "stack", "out", "in", "out") and kv.a.shape == (L, 2, 32, 4)
    else:
        assert leaves["layers/attn/q_proj/w"].layout == ("stack", "in", "out", "out")
        assert leaves["layers/attn/q_proj/w"].a.shape == (L, 32, 4)
    assert _max_err(forward_stacked(family)(lp, jnp.asarray(c.ids)), ref) <= TOL

    jlora.save_peft(tmp_path, lp)
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = load_file(f"{d}/adapter_model.safetensors")
    assert set(ours) == set(theirs)
    assert max(_max_err(theirs[k], ours[k]) for k in theirs) == 0.0
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == sorted(TARGETS)
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path))
    assert _max_err(torch_logits(pm, c.ids), ref) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_by_use_on_stacked_tree_trains_and_saves_for_peft(family, tmp_path):
    """wrap(apply_fn=...) on the stacked tree ("all-linear": the projections, not the
    stacked norm scales), every target factored through the scan, a few AdamW steps with
    the chunked loss, W untouched; PEFT loads the saved adapter and agrees."""
    import peft

    c = case(family)
    _, graphdef, state = stacked(family, attention="blockwise", remat="full", attention_block_size=4)
    ids = jnp.asarray(c.ids)

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lp = jlora.wrap(state, config, rng=jax.random.key(0), apply_fn=apply, example_args=(ids,),
                    layouts=jlora.name_maps.layouts(state))
    leaves = _lora_leaves(lp)
    assert len(leaves) == len(NNX_TARGETS[family])
    assert all(p.rsplit("/", 2)[-2] in NNX_TARGETS[family] for p in leaves)
    report = jlora.explain(jm.causal_lm_loss_fn(graphdef, chunk_size=4), lp, ids)
    assert not report.materialized and len(set(report.factored)) == len(leaves)

    loss_fn = jlora.lora(jm.causal_lm_loss_fn(graphdef, chunk_size=4), on_materialize="error")
    tx = jlora.optimizer(optax.adam(1e-2))

    @jax.jit
    def step(lp, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(lp, ids)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    opt_state, new, losses = tx.init(lp), lp, []
    for _ in range(3):
        new, opt_state, loss = step(new, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for path, w in leaves.items():
        np.testing.assert_array_equal(np.asarray(_lora_leaves(new)[path].w), np.asarray(w.w), err_msg=path)
    jlora.save_peft(tmp_path, new, config=config)
    pm = peft.PeftModel.from_pretrained(c.fresh_torch(), str(tmp_path))
    got = jax.jit(jlora.lora(apply))(new, ids)
    assert _max_err(torch_logits(pm, c.ids), got) <= TOL


# --------------------------------------------------------------------------------------
# remat and attention: equal to the plain model, value and gradient


_eqns = all_eqns


def _ce(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


@functools.lru_cache(maxsize=None)
def plain_value_and_grad(family: str):
    c = case(family)
    ids = jnp.asarray(c.ids)
    loss, grads = jax.value_and_grad(lambda s: _ce(nnx.merge(c.graphdef, s)(ids), ids))(c.state)
    return float(loss), torch_named(c.graphdef, grads)


def _check_value_and_grad(family: str, **overrides) -> tuple[float, float]:
    c = case(family)
    ids = jnp.asarray(c.ids)
    model = jm.from_torch(c.torch_model, **overrides)
    graphdef, state = nnx.split(model)
    loss, grads = jax.jit(jax.value_and_grad(lambda s: _ce(nnx.merge(graphdef, s)(ids), ids)))(state)
    want_loss, want_grads = plain_value_and_grad(family)
    err_v, err_g = abs(float(loss) - want_loss), _tree_err(torch_named(graphdef, grads), want_grads)
    assert err_v <= EXACT, overrides
    assert err_g <= EXACT, overrides
    return err_v, err_g


# unstacked remat="full" is nnx.remat as before (tests/test_nnx_families.py)
@pytest.mark.parametrize(("family", "remat", "scan"), [(f, r, True) for f in FAMILIES for r in ("full", "dots")]
                         + [("gemma3", "dots", False)])
def test_remat_modes_equal_the_plain_model(family, remat, scan):
    _check_value_and_grad(family, remat=remat, scan_layers=scan)
    model = jm.from_torch(case(family).torch_model, remat=remat, scan_layers=scan)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x))(nnx.state(model), jnp.asarray(case(family).ids))
    policies = [e.params["policy"] for e in _eqns(jaxpr.jaxpr) if "policy" in e.params]
    assert len(policies) == (1 if scan else len(case(family).model.layers))  # one per layer, or the scanned body
    want = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    assert all(p is want for p in policies), policies


@pytest.mark.parametrize(("family", "scan"), [("llama3", True), ("gemma3", True), ("qwen3", False)])
def test_activation_sharding_constrains_each_layer_input(family, scan):
    """``activation_sharding``: the residual stream is constrained at every layer's input
    (once in the scanned body, once per listed layer), to the sharding given; values and
    gradients those of the plain model (a one-device mesh here; the per-chip memory it
    saves is checked compiled for TPU chips in tests/benchmarks/test_tpu_compile.py)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None, None))
    _check_value_and_grad(family, activation_sharding=sharding, scan_layers=scan)
    model = jm.from_torch(case(family).torch_model, activation_sharding=sharding, scan_layers=scan)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(nnx.graphdef(model), s)(x))(nnx.state(model), jnp.asarray(case(family).ids))
    constraints = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "sharding_constraint"]
    assert len(constraints) == (1 if scan else model.config.num_layers), constraints
    assert all(e.params["sharding"] == sharding and e.invars[0].aval.shape[-1] == model.config.embed_dim
               for e in constraints)
    with pytest.raises(ValueError, match="activation_sharding.*jax.sharding.Sharding"):
        model.config.replace(activation_sharding=("fsdp", None, None))


@pytest.mark.parametrize(("family", "scan"), [("qwen3", True), ("llama3", True), ("gemma3", True), ("gemma3", False)])
@pytest.mark.parametrize("impl", ["dot_product", "blockwise"])
def test_attention_implementations_equal_the_reference(family, impl, scan):
    """Block size 4 over 10 tokens: padded tiles, skipped tiles, Gemma's window of 4 (a
    scanned flag, or each layer's own)."""
    _check_value_and_grad(family, attention=impl, attention_block_size=4, scan_layers=scan)


def test_remat_bool_aliases_and_bad_settings():
    cfg = case("qwen3").model.config
    assert cfg.replace(remat=True).remat == "full" and cfg.replace(remat=False).remat == "none"
    assert cfg.remat == "none"
    m = jm.from_torch(case("qwen3").torch_model, remat=True)
    assert m.layers[0].remat == "full"
    with pytest.raises(ValueError, match="remat"):
        cfg.replace(remat="everything")
    with pytest.raises(ValueError, match="attention"):
        cfg.replace(attention="flash")
    with pytest.raises(ValueError, match="softcap"):
        case("gemma3").model.config.replace(attn_logit_softcapping=20.0, attention="dot_product")


def _reference_cases():
    rng = np.random.RandomState(0)
    B, T, N, K, H = 2, 11, 4, 2, 8
    q = jnp.asarray(rng.randn(B, T, N, H), jnp.float32)
    k = jnp.asarray(rng.randn(B, T, K, H), jnp.float32)
    v = jnp.asarray(rng.randn(B, T, K, H), jnp.float32)
    pad = np.ones((B, T), np.int32)
    pad[0, :3] = 0  # left padding: rows 0..2 of the first sequence see no key at all
    pad[1, -2:] = 0
    return q, k, v, jnp.asarray(pad)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_functions_against_reference(window, softcap):
    """GQA, causal, sliding window (also as a traced per-layer flag), padding (fully masked
    rows included), softcap; tiles that do not divide T; value and gradient of q, k, v."""
    q, k, v, pad = _reference_cases()
    B, T = q.shape[:2]
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
    impls = ["blockwise"] + (["dot_product"] if softcap is None else [])

    @functools.partial(jax.jit, static_argnums=(0, 1, 2))
    def f(impl, static_sliding, block, flag, mask, q, k, v):
        def loss(q, k, v):
            inputs = attention_inputs(impl, B, T, None, mask, window)
            out = attention(q, k, v, inputs, sliding=True if static_sliding else flag, window=window, scale=0.3,
                            softcap=softcap, implementation=impl, block_size=block)
            return jnp.sum(out * w), out

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    # sliding: static, or a traced per-layer flag (True / False); tiles of 4 and 3 over 11
    # tokens, and one tile bigger than the sequence
    cases = [(None, True, None, 3), (pad, False, True, 4), (pad, False, False, 16)]
    for mask, static, flag, block in cases:
        (_, ref), gref = f("xla", static, 0, flag, mask, q, k, v)
        for impl in impls:
            (_, out), g = f(impl, static, block, flag, mask, q, k, v)
            assert _max_err(out, ref) <= EXACT, (impl, block, static, flag)
            assert max(_max_err(a, b) for a, b in zip(g, gref)) <= EXACT, (impl, block, static, flag)


# --------------------------------------------------------------------------------------
# the chunked loss


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_optax(family):
    """Value and gradient against optax's cross-entropy over the full logits of the plain
    model: Qwen3 with an lm_head, Llama 3 tied, Gemma 3 tied and soft-capped; chunks that
    do not divide T; a loss mask on the stacked, remat'd, blockwise model."""
    c = case(family)
    assert (c.model.config.final_logit_softcapping is not None) == (family == "gemma3")
    ids = jnp.asarray(c.ids)
    mask = jnp.asarray(np.random.RandomState(2).randint(0, 2, ids.shape)).at[:, 1].set(1)

    def plain(s, graphdef, loss_mask):
        logits = nnx.merge(graphdef, s)(ids)[:, :-1].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        wts = jnp.ones_like(ce) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
        return jnp.sum(ce * wts) / jnp.sum(wts)

    # chunks of 3 and 4 over 10 positions: a padded last chunk
    want, gwant = plain_value_and_grad(family)
    got, g = jax.jit(jax.value_and_grad(jm.causal_lm_loss_fn(c.graphdef, chunk_size=3)))(c.state, ids)
    assert abs(float(got) - want) <= EXACT
    assert _tree_err(torch_named(c.graphdef, g), gwant) <= EXACT
    _, graphdef, state = stacked(family, attention="blockwise", remat="full", attention_block_size=4)
    want, gwant = jax.jit(jax.value_and_grad(plain), static_argnums=1)(c.state, c.graphdef, mask)
    fn = jm.causal_lm_loss_fn(graphdef, chunk_size=4, loss_mask=mask)
    got, g = jax.jit(jax.value_and_grad(fn))(state, ids)
    assert abs(float(got) - float(want)) <= EXACT
    assert _tree_err(torch_named(graphdef, g), torch_named(c.graphdef, gwant)) <= EXACT
    # on the module itself
    assert abs(float(jm.causal_lm_loss(c.model, ids)) - float(_ce(c.model(ids), ids))) <= EXACT


def test_chunked_loss_never_forms_full_logits():
    """The (B, T, V) float32 logits exist in no equation of the forward or backward
    program, only (B, chunk, V) tiles (the plain loss has them)."""
    c = case("qwen3")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 100, (2, 32)))
    fn = jax.grad(jm.causal_lm_loss_fn(c.graphdef, chunk_size=8))
    shapes = {tuple(v.aval.shape) for e in _eqns(jax.make_jaxpr(fn)(c.state, ids).jaxpr)
              for v in e.outvars if hasattr(v.aval, "shape")}
    assert (2, 8, 100) in shapes
    assert not any(len(s) >= 3 and s[-1] == 100 and s[-2] > 8 for s in shapes), sorted(s for s in shapes if s and s[-1] == 100)
    plain = jax.make_jaxpr(jax.grad(lambda s: _ce(nnx.merge(c.graphdef, s)(ids), ids)))(c.state, )
    assert any(tuple(v.aval.shape) == (2, 32, 100) for e in plain.jaxpr.eqns for v in e.outvars)


def test_blockwise_attention_never_forms_the_square():
    """No (B, heads, T, T) array in the blockwise program, forward or backward."""
    c = case("llama3")
    model = jm.from_torch(c.torch_model, attention="blockwise", attention_block_size=4, scan_layers=True)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 100, (2, 16)))
    jaxpr = jax.make_jaxpr(jax.grad(jm.causal_lm_loss_fn(graphdef, chunk_size=8)))(state, ids)

    def squares(jaxpr):  # (B, heads..., T, T) arrays: batch 2, rank 4 or more, a 16 x 16 tail
        return {tuple(v.aval.shape) for e in _eqns(jaxpr) for v in e.outvars
                if hasattr(v.aval, "shape") and len(v.aval.shape) >= 4 and v.aval.shape[0] == 2
                and tuple(v.aval.shape[-2:]) == (16, 16)}

    assert not squares(jaxpr.jaxpr), squares(jaxpr.jaxpr)
    # nor per-tile values stacked over the tiles or the layers for the backward pass (what
    # autodiff through the tile loop would keep): no (..., 4, 4) tile of rank > 5
    tiles = {tuple(v.aval.shape) for e in _eqns(jaxpr.jaxpr) for v in e.outvars
             if hasattr(v.aval, "shape") and tuple(v.aval.shape[-2:]) == (4, 4)}
    assert tiles and max(len(t) for t in tiles) == 5, tiles
    ref = jm.from_torch(c.torch_model, scan_layers=True)
    plain = jax.make_jaxpr(jax.grad(jm.causal_lm_loss_fn(nnx.graphdef(ref), chunk_size=8)))(nnx.state(ref), ids)
    assert squares(plain.jaxpr)  # the reference attention forms them: the check can fail


@pytest.mark.parametrize("impl", ["blockwise", "dot_product"])
def test_lora_through_scan_remat_attention_and_chunked_loss(impl):
    """Gemma 3 (its local/global flag scanned) under jlora.lora with every memory setting
    on: nothing materialised (on_materialize="error", explain), loss and gradients of the
    factors equal those of the plain model's forward with the same adapter."""
    family = "gemma3"
    c = case(family)
    ids = jnp.asarray(c.ids)
    lp_plain = jlora.load_peft(peft_adapter(family)[0], c.state)
    _, graphdef, state = stacked(family, attention=impl, remat="dots", attention_block_size=4)
    lp = jlora.load_peft(peft_adapter(family)[0], state)
    fwd = jlora.lora(lambda s, x: nnx.merge(c.graphdef, s)(x), on_materialize="error")
    want, gwant = jax.jit(jax.value_and_grad(lambda p: _ce(fwd(p, ids), ids)))(lp_plain)
    loss_fn = jlora.lora(jm.causal_lm_loss_fn(graphdef, chunk_size=4), on_materialize="error")
    report = jlora.explain(jm.causal_lm_loss_fn(graphdef, chunk_size=4), lp, ids)
    assert not report.materialized and len(set(report.factored)) == 6
    got, g = jax.jit(jax.value_and_grad(loss_fn))(lp, ids)
    assert abs(float(got) - float(want)) <= EXACT
    # the stacked factors are the per-layer ones stacked
    per_layer = _lora_leaves(gwant)
    for path, x in _lora_leaves(g).items():
        for i in range(x.a.shape[0]):
            name = path.replace("layers/", f"layers/{i}/", 1)
            assert _max_err(x.a[i], per_layer[name].a) <= EXACT, name
            assert _max_err(x.b[i], per_layer[name].b) <= EXACT, name
