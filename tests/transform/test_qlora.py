"""Training LoRA over a quantized base (QLoRA) with ``jlora.lora(fn)``.

References, never the quantized path against itself:
- the plain model on ``jlora.merge(jlora.dequantize(lp))`` (a dense base, ``W + s·A·B``
  formed explicitly): outputs, and gradients w.r.t. A and B through that merged path;
- the residuals a naive "dequantize first, then run" step keeps for its backward pass
  (the negative control of the no-dequantized-residuals check);
- the same LoRA tree over the dense base (``jlora.dequantize(lp)``) for several adapters
  and mixed batches, whose factored forward is itself tested against PEFT elsewhere.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from support import models
from support.jaxpr_walk import all_eqns, primitive_names

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

F32 = jlora.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=jnp.float32)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _kernel_shapes(tree) -> set[tuple[int, ...]]:
    """Shapes a dequantized kernel (or one layer of it) has, in any axis order, and as a
    2-D (in, out) / (out, in) matrix."""
    shapes = set()
    for _, q in jlora.quant.quantized_leaves(tree):
        for shape in (q.shape, q.item_shape):
            shapes.add(tuple(sorted(shape)))
        n_in = int(np.prod([s for s, r in zip(q.item_shape, q.roles) if r == "in"]))
        shapes.add(tuple(sorted((n_in, int(np.prod(q.item_shape)) // n_in))))
    return shapes


def _dense_residuals(fn, trainable, shapes) -> list:
    """Float residuals that ``jax.vjp(fn)`` keeps for the backward pass and that are
    shaped like a (layer of a) quantized kernel: dequantized kernels. Traced only."""
    res = jax.eval_shape(lambda t: jax.tree_util.tree_leaves(jax.vjp(fn, t)[1]), trainable)
    return [(x.shape, x.dtype) for x in res
            if jnp.issubdtype(x.dtype, jnp.floating) and tuple(sorted(x.shape)) in shapes]


def test_forward_gradients_and_no_dequantized_residuals():
    """A Linen ``nn.scan(nn.remat(block))`` stack (DenseGeneral kernels, stacked: the scan
    slices the packed codes) under nf4 + double quantization, LoRA on the attention
    projections; the MLP kernels quantized too (dequantized at use). (HF Flax Llama over a
    quantized base: tests/test_qlora_peft.py.)"""
    case = models.linen_scan()
    q = jlora.quantize(case.params, F32)
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False)
    lp = jlora.wrap(q, config, rng=jax.random.key(1))
    forward = jlora.lora(case.apply, on_materialize="error")
    report = jlora.explain(case.apply, lp, case.inputs)
    assert report.materialized == [] and len(report.factored) == len(jlora.lora_leaves(lp))

    trainable, frozen = jlora.partition(lp)
    merged = lambda t: case.apply(jlora.merge(jlora.dequantize(jlora.combine(t, frozen))), case.inputs)  # noqa: E731
    factored = lambda t: forward(jlora.combine(t, frozen), case.inputs)  # noqa: E731
    ct = jax.random.normal(jax.random.key(3), jax.eval_shape(merged, trainable).shape)

    def out_and_grad(f):
        out, vjp = jax.vjp(f, trainable)
        return out, vjp(ct)[0]

    out, grads = jax.jit(lambda: out_and_grad(factored))()
    ref_out, ref_grads = jax.jit(lambda: out_and_grad(merged))()
    assert rel_err(out, ref_out) < 1e-5
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert rel_err(g, r) < 1e-4

    shapes = _kernel_shapes(q)
    assert _dense_residuals(factored, trainable, shapes) == []
    # the negative control: dequantizing the base before running keeps dequantized kernels
    naive = lambda t: jlora.lora(case.apply)(jlora.dequantize(jlora.combine(t, frozen)), case.inputs)  # noqa: E731
    assert len(_dense_residuals(naive, trainable, shapes)) >= len(jlora.lora_leaves(lp))


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(128, name="up")(x))
        h = nn.gelu(nn.Dense(128, name="mid")(h))
        return nn.Dense(64, name="down")(h)


@functools.lru_cache(maxsize=None)
def _mlp():
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (16, 64))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    y = jnp.tanh(x @ jax.random.normal(jax.random.key(2), (64, 64)) / 8)
    return model, params, x, y


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_training_keeps_codes_and_scales_bit_identical(quant_type):
    """A few AdamW steps through ``jlora.optimizer`` (grads with ``allow_int=True``, as
    the codes are integers) and (nf4) through ``partition``/``combine``: the loss falls,
    codes and scales are bit-identical afterwards, the optimizer holds state only for A/B."""
    model, params, x, y = _mlp()
    q = jlora.quantize(params, jlora.QuantConfig(quant_type=quant_type, compute_dtype=jnp.float32))
    lp0 = jlora.wrap(q, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]), rng=jax.random.key(3))
    forward = jlora.lora(lambda p, x: model.apply({"params": p}, x), on_materialize="error")
    loss_fn = lambda lp: jnp.mean((forward(lp, x) - y) ** 2)  # noqa: E731
    tx = jlora.optimizer(optax.adamw(3e-2))

    @jax.jit
    def step(lp, state):
        loss, grads = jax.value_and_grad(loss_fn, allow_int=True)(lp)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, loss

    lp, state = lp0, tx.init(lp0)
    losses = []
    for _ in range(6):
        lp, state, loss = step(lp, state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    # no optimizer state for the base: Adam's two moments of A and B only
    n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(jlora.partition(lp0)[0]))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert n_state == 2 * n_trainable

    if quant_type == "int8":
        return _check_frozen(lp0, lp)
    # the partition/combine loop (differentiating only the trainable half)
    trainable, frozen = jlora.partition(lp0)
    tx2 = optax.adamw(3e-2)
    state2 = tx2.init(trainable)

    @jax.jit
    def step2(t, s):
        loss, g = jax.value_and_grad(lambda t: loss_fn(jlora.combine(t, frozen)))(t)
        u, s = tx2.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    for _ in range(6):
        trainable, state2, loss2 = step2(trainable, state2)
    assert float(loss2) < 0.8 * losses[0]
    _check_frozen(lp0, lp, jlora.combine(trainable, frozen))
    # parameters, not bytes, as PEFT counts (the quantized tree counts what the plain one does)
    plain = jlora.wrap(params, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    assert jlora.count_parameters(lp0) == jlora.count_parameters(plain)


def _check_frozen(lp0, *trained):
    """Every quantized kernel's codes and scales are bit-identical after training."""
    before = jlora.quant.quantized_leaves(lp0)
    assert before
    for after in trained:
        for (_, q0), (_, q1) in zip(before, jlora.quant.quantized_leaves(after)):
            for a, b in zip(jax.tree_util.tree_leaves(q0), jax.tree_util.tree_leaves(q1)):
                assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_several_adapters_and_mixed_batch_over_a_quantized_base():
    model, params, x, _ = _mlp()
    q = jlora.quantize(params, F32)
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "mid"], init_lora_weights=False),
                    rng=jax.random.key(4))
    lp = jlora.add_adapter(lp, "b", jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["mid", "down"],
                                                      init_lora_weights=False), rng=jax.random.key(5))
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    forward = jlora.lora(apply, on_materialize="error")
    names = ["default", "b", "__base__", "b"] * 4
    ids = jlora.adapter_ids(lp, names)
    both = jlora.set_adapter(lp, ["default", "b"])
    for tree, kw in [(both, {}), (lp, {"adapter_ids": ids})]:
        got = jax.jit(lambda t: forward(t, x, **kw))(tree)
        ref = jax.jit(lambda t: jlora.lora(apply)(t, x, **kw))(jlora.dequantize(tree))
        assert rel_err(got, ref) < 1e-5


def test_compute_dtype_and_bfloat16_base():
    """A bfloat16 model over an nf4 base dequantized in bfloat16 (the default
    ``compute_dtype``): the kernels the model sees are bitsandbytes' values cast to bf16."""
    model, params, x, _ = _mlp()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    q = jlora.quantize(params)
    assert q["up"]["kernel"].compute_dtype == jnp.bfloat16
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, target_modules=["up"], init_lora_weights=False))
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    got = jax.jit(jlora.lora(apply, on_materialize="error"))(lp, x.astype(jnp.bfloat16))
    ref = jax.jit(lambda t: apply(jlora.merge(jlora.dequantize(t, jnp.bfloat16)), x.astype(jnp.bfloat16)))(lp)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got.astype(jnp.float32), ref.astype(jnp.float32)) < 2e-2


_SHARDED = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jlora

    mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Auto,))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    k = jax.random.split(jax.random.key(0), 3)
    params = {"up": {"kernel": put(jax.random.normal(k[0], (128, 256)) / 11, P(None, "model"))},
              "down": {"kernel": put(jax.random.normal(k[1], (256, 128)) / 16, P("model", None))}}
    config = jlora.QuantConfig(compute_dtype=jnp.float32)
    model = lambda p, x: jax.nn.gelu(x @ p["up"]["kernel"]) @ p["down"]["kernel"]
    spec = lambda a: list(a.sharding.spec) + [None] * (a.ndim - len(a.sharding.spec))
    for qt in ("nf4", "int8"):
        q = jlora.quantize(params, config.__class__(quant_type=qt, compute_dtype=jnp.float32))
        up, down = q["up"]["kernel"], q["down"]["kernel"]
        out = {"up_codes": spec(up.codes), "up_absmax": spec(up.absmax), "down_codes": spec(down.codes),
               "rel": 0.0}
        if qt == "nf4":  # the forward over the sharded packed arrays
            x = put(jax.random.normal(k[2], (8, 128)), P())
            lp = jlora.wrap(q, jlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
            y = jax.jit(jlora.lora(model, on_materialize="error"))(lp, x)
            ref = model(jlora.merge(jlora.dequantize(jax.device_get(lp))), np.asarray(x))
            out["rel"] = float(np.max(np.abs(np.asarray(y) - ref)) / np.max(np.abs(ref)))
        out["same_codes"] = bool(np.array_equal(np.asarray(up.codes), np.asarray(jlora.quantize_array(
            np.asarray(params["up"]["kernel"]), config.__class__(quant_type=qt)).codes)))
        print(json.dumps({qt: out}))

    # a mesh with Explicit axes (shardings are types): quantized and used the same way
    emesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(emesh):
        eput = lambda a, spec: jax.device_put(a, NamedSharding(emesh, spec))
        eparams = jax.tree_util.tree_map(lambda a, b: eput(np.asarray(a), b.sharding.spec), params, params)
        q = jlora.quantize(eparams, config)
        lp = jlora.wrap(q, jlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
        x = eput(np.asarray(jax.random.normal(k[2], (8, 128))), P())
        y = jax.jit(jlora.lora(model, on_materialize="error"))(lp, x)
        ref = model(jlora.merge(jlora.dequantize(jax.device_get(lp))), np.asarray(x))
        print(json.dumps({"explicit": {"up_codes": spec(q["up"]["kernel"].codes),
                                       "rel": float(np.max(np.abs(np.asarray(y) - ref)) / np.max(np.abs(ref)))}}))
    """
)


def test_packed_arrays_are_sharded_like_their_kernel():
    """On a 2-device CPU mesh (fresh process): a column-parallel kernel's codes and
    absmax are sharded by rows of the PyTorch layout (int8: CB rows, and a row-parallel
    kernel's CB by columns); the codes equal the unsharded kernel's; the jitted LoRA
    forward equals the dense reference. The same on a mesh with Explicit axes (where the
    packed arrays are gathered for the codec and at each use)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            got.update(json.loads(line))
    nf4, int8 = got["nf4"], got["int8"]
    # 4-bit codes and absmax held in the kernel's orientation: (in/2, out), (in/64, out)
    assert nf4["up_codes"] == nf4["up_absmax"] == [None, "model"]
    assert nf4["down_codes"] == [None, None]  # row parallel: replicated within the layer
    assert int8["up_codes"] == ["model", None] and int8["down_codes"] == [None, "model"]
    for out in (nf4, int8):
        assert out["same_codes"] and out["rel"] < 1e-5
    assert got["explicit"]["up_codes"] == [None, "model"] and got["explicit"]["rel"] < 1e-5


def test_nnx_einsum_kernels_quantize_by_use():
    """An NNX Qwen3 (jlora.models: einsum kernels named ``w``, norms named ``w``): with
    ``apply_fn``, ``jlora.quantize`` finds the kernels and their layouts by use (o_proj
    ``(heads, head_dim, embed)`` is ``("in", "in", "out")``), leaves the embedding and the
    head alone, and LoRA over it (wrap with or without ``apply_fn``) equals the dense merge."""
    from flax import nnx

    import jlora.models as M

    cfg = M.DecoderConfig(family="qwen3", vocab_size=128, embed_dim=64, hidden_dim=128, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=16)
    graphdef, state = nnx.split(M.build(cfg))
    apply = lambda st, ids: nnx.merge(graphdef, st)(ids)  # noqa: E731
    ids = jnp.ones((2, 8), jnp.int32)
    q = jlora.quantize(state, F32, apply_fn=apply, example_args=(ids,))
    layouts = {p: k.layout for p, k in jlora.quant.quantized_leaves(q)}
    assert layouts["layers/0/attn/o_proj/w"] == ("in", "in", "out")
    assert layouts["layers/0/attn/q_proj/w"] == ("in", "out", "out")
    assert len(layouts) == 7 and not any("embed" in p or "lm_head" in p for p in layouts)
    config = jlora.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    lp = jlora.wrap(q, config)
    by_use = jlora.wrap(q, config, apply_fn=apply, example_args=(ids,))
    assert [x.layout for _, x in jlora.lora_leaves(lp)] == [x.layout for _, x in jlora.lora_leaves(by_use)]
    got = jax.jit(jlora.lora(apply, on_materialize="error"))(lp, ids)
    assert rel_err(got, jax.jit(lambda t: apply(jlora.merge(jlora.dequantize(t)), ids))(lp)) < 1e-5


def _stack_under_lora(stack, cfg, fn, x, rng):
    """``stack`` quantized with ``cfg`` and wrapped (r=4, random B) as ``fn`` uses it:
    ``(trainable, frozen, frozen dequantized to float32)``."""
    q = jlora.quantize(stack, cfg, apply_fn=fn, example_args=(x,))
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["layers"], init_lora_weights=False),
                    rng=rng, apply_fn=fn, example_args=(x,))
    trainable, frozen = jlora.partition(lp)
    return trainable, frozen, jlora.quant.dequantize(frozen, jnp.float32)


def test_dequantization_is_pinned_to_its_activations_in_a_scan_only():
    """A quantized kernel sliced by a scan over its stack axis is dequantized behind an
    ``optimization_barrier`` with the activations it meets (XLA:TPU otherwise hoisted a
    layer's dequantizations to the top of the scanned body); the same kernel used outside
    a loop is not (there the barrier stopped XLA overlapping dequantizations). Gradients
    equal the dequantized model's either way."""
    k = jax.random.split(jax.random.key(0), 3)
    stack = {"layers": {"kernel": jax.random.normal(k[0], (3, 64, 64)) * 0.1}}
    x = jax.random.normal(k[1], (4, 64))

    def scanned(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["kernel"])[0]

    def unrolled(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p["layers"]["kernel"][i])
        return x

    trainable, frozen, dense = _stack_under_lora(stack, F32, scanned, x, k[2])
    for fn, pinned in ((scanned, True), (unrolled, False)):
        forward = jlora.lora(fn, on_materialize="error")

        def loss(t, base):
            return jnp.sum(jnp.sin(forward(jlora.combine(t, base), x)))

        names = primitive_names(jax.make_jaxpr(jax.grad(lambda t: loss(t, frozen)))(trainable).jaxpr)
        assert ("optimization_barrier" in names) == pinned, fn.__name__
        got, ref = jax.grad(loss)(trainable, frozen), jax.grad(loss)(trainable, dense)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            assert rel_err(a, b) <= 1e-5, fn.__name__


@pytest.mark.parametrize("double_quant", [True, False])
def test_large_kernels_are_multiplied_in_column_chunks(monkeypatch, double_quant):
    """A 4-bit kernel larger than ``jlora.quant.forward.CHUNK_BYTES`` dequantized is
    multiplied one chunk of columns at a time, under a scan, so at most one dequantized
    chunk exists (XLA:TPU kept a layer's dequantized kernels alive together: Llama-3-70B,
    448 MiB each). In a scan over layers each chunk is sliced from the whole stack of codes
    (no copy of the layer's codes). Values and gradients equal the dequantized model's, and
    the whole product's (the chunk size turned up)."""
    k = jax.random.split(jax.random.key(3), 3)
    n_layers, d_in, d_out = 3, 64, 512
    stack = {"layers": {"kernel": jax.random.normal(k[0], (n_layers, d_in, d_out)) * 0.1}}
    x = jax.random.normal(k[1], (2, 5, d_in))
    proj = jax.random.normal(k[2], (d_out, d_in)) * 0.1

    def scanned(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w) @ proj, None), x, p["layers"]["kernel"])[0]

    def unrolled(p, x):
        for i in range(n_layers):
            x = jnp.tanh(x @ p["layers"]["kernel"][i]) @ proj
        return x

    cfg = jlora.QuantConfig(quant_type="nf4", double_quant=double_quant, compute_dtype=jnp.float32)
    trainable, frozen, dense = _stack_under_lora(stack, cfg, scanned, x, k[2])
    codes = jlora.quant.quantized_leaves(frozen)[0][1].codes  # (layers, d_in/2, d_out)

    def run(fn, base):
        forward = jlora.lora(fn, on_materialize="error")

        def loss(t):
            return jnp.sum(jnp.sin(forward(jlora.combine(t, base), x)))

        return jax.value_and_grad(loss)(trainable), jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr

    def chunk_slices(jaxpr, source_shape):
        # dynamic slices of 128 columns of the codes taken from an array of source_shape
        return [e for e in all_eqns(jaxpr) if e.primitive.name == "dynamic_slice"
                and e.invars[0].aval.dtype == jnp.uint8 and tuple(e.invars[0].aval.shape) == source_shape
                and e.outvars[0].aval.shape[-1] == 128]

    for fn, source in ((scanned, tuple(codes.shape)), (unrolled, tuple(codes.shape[1:]))):
        (ref_loss, ref_grads), _ = run(fn, dense)
        monkeypatch.setattr(jlora.quant.forward, "CHUNK_BYTES", 2**30)
        (whole_loss, whole_grads), whole_jaxpr = run(fn, frozen)
        monkeypatch.setattr(jlora.quant.forward, "CHUNK_BYTES", d_in * 128 * 4)  # 4 chunks of 128 columns
        (loss, grads), jaxpr = run(fn, frozen)
        assert not chunk_slices(whole_jaxpr, source), fn.__name__
        assert chunk_slices(jaxpr, source), fn.__name__  # forward, and again in the backward
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert abs(float(loss) - float(whole_loss)) <= 1e-6 * abs(float(whole_loss))
        for a, b, c in zip(*(jax.tree_util.tree_leaves(g) for g in (grads, ref_grads, whole_grads))):
            assert rel_err(a, b) <= 1e-5, fn.__name__
            assert rel_err(a, c) <= 1e-5, fn.__name__


def test_a_scanned_decoder_over_nf4_is_the_same_in_column_chunks(monkeypatch):
    """``jlora.models`` with ``scan_layers`` over an NF4 base: its projections multiply the
    2-D view of a stacked kernel (``Einsum(flat=True)``, a reshape of a 3-D attention
    kernel); in column chunks the loss and the LoRA gradients are the whole product's."""
    from flax import nnx

    import jlora.models as jm

    cfg = jm.DecoderConfig("llama3", 64, 128, 512, 2, 4, 2, 64, scan_layers=True, remat="full")
    graphdef, state = nnx.split(jm.build(cfg, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    q = jlora.quantize(state, F32, apply_fn=apply, example_args=(ids,))
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
                    rng=jax.random.key(2), apply_fn=apply, example_args=(ids,))
    trainable, frozen = jlora.partition(lp)
    loss_fn = jlora.lora(jm.causal_lm_loss_fn(graphdef, chunk_size=4), on_materialize="error")

    def run():
        f = lambda t: loss_fn(jlora.combine(t, frozen), ids)  # noqa: E731
        return jax.value_and_grad(f)(trainable), jax.make_jaxpr(jax.grad(f))(trainable).jaxpr

    monkeypatch.setattr(jlora.quant.forward, "CHUNK_BYTES", 2**30)
    (whole_loss, whole_grads), whole_jaxpr = run()
    monkeypatch.setattr(jlora.quant.forward, "CHUNK_BYTES", 128 * 128 * 4)  # q (2 chunks), gate and up (4)
    (loss, grads), jaxpr = run()

    def chunks(jx):  # 128-column slices of a stack of codes (layers, in/2, out)
        return {tuple(e.invars[0].aval.shape) for e in all_eqns(jx) if e.primitive.name == "dynamic_slice"
                and e.invars[0].aval.dtype == jnp.uint8 and e.invars[0].aval.ndim == 3
                and e.outvars[0].aval.shape[-1] == 128 < e.invars[0].aval.shape[-1]}

    assert not chunks(whole_jaxpr)
    assert chunks(jaxpr) == {(2, 64, 256), (2, 64, 512)}  # q's codes (heads x head_dim = 256), gate's and up's
    assert abs(float(loss) - float(whole_loss)) <= 1e-6 * abs(float(whole_loss))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(whole_grads)):
        assert rel_err(a, b) <= 1e-5


def test_column_chunks_on_a_mesh_with_explicit_axes(monkeypatch):
    """In column chunks on a mesh with Explicit axes (the chunk loop's carry typed with the
    product's sharding): the output keeps the input's sharding, and gradients equal those
    of the same product off the mesh."""
    monkeypatch.setattr(jlora.quant.forward, "CHUNK_BYTES", 64 * 128 * 4)  # 4 chunks of 128 columns
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    k = jax.random.split(jax.random.key(4), 3)
    q = jlora.quantize({"proj": {"kernel": jax.random.normal(k[0], (64, 512)) * 0.1}}, F32)
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), rng=k[1])
    trainable, frozen = jlora.partition(lp)
    forward = jlora.lora(lambda p, x: x @ p["proj"]["kernel"], on_materialize="error")

    def loss(t, x):
        return jnp.sum(jnp.sin(forward(jlora.combine(t, frozen), x)))

    x = jax.random.normal(k[2], (4, 64))
    ref = jax.grad(loss, argnums=(0, 1))(trainable, x)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None)))
        y = jax.jit(forward)(lp, xs)
        got = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, xs)
    assert tuple(jax.typeof(y).sharding.spec)[:1] == ("data",)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert rel_err(a, b) <= 1e-6
