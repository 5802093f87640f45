"""Benchmark: jlora's train steps compiled for TPU topologies on this CPU machine (XLA's
TPU compiler from ``libtpu``, ahead of time): peak HBM per chip, FLOPs, bytes accessed and
a time estimate, side by side with the frozen floor, full fine-tuning and qwix.

Nothing runs on a TPU: every figure is the TPU compiler's (``memory_analysis()``,
``cost_analysis()``, the optimised HLO), for a program whose arguments are abstract
(``jax.ShapeDtypeStruct`` on the described chips). See ``tpu_compile.py`` for the
helpers and for how the time estimate is made (a per-fusion roofline; XLA's own
``optimal_seconds`` is -1 for each op it cannot cost).

Scenarios are registered by name in :data:`SCENARIOS` (``@scenario(...)``); each builds,
for a topology, the function to compile and its abstract arguments. Scenarios of one
``group`` share a model and batch and are printed as one table, with ratios to the
group's ``floor``. To add one (a model-scale step, a decode step, an MoE step), write a
builder returning :class:`Built` and decorate it; the model helpers below
(:func:`llama_parts`, :func:`benchutil.train_step`, :func:`place`) do most of the work.

Usage::

    python benchmarks/tpu_aot.py                         # every scenario on every topology, print
    python benchmarks/tpu_aot.py --only lora --only floor --topology v5e:1x1
    python benchmarks/tpu_aot.py --list                  # the scenarios and topologies
    python benchmarks/tpu_aot.py --hlo lora --topology v5e:1x1   # + slowest ops / largest buffers
    python benchmarks/tpu_aot.py --write                 # all of it, into BENCHMARKS.md

Environment: ``JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1`` (set here if unset) and libtpu
(``pip install "jax[tpu]==<the installed jax>"``, in jlora's ``bench`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tpu_compile as tc  # noqa: E402  (sets the environment before jax starts)

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import benchutil  # noqa: E402
import jlora  # noqa: E402
import jlora.models as jm  # noqa: E402

LR, WEIGHT_DECAY = 1e-4, 0.01
DEFAULT_TOPOLOGIES = ("v5e:1x1", "v6e:1x1", "v5p:1", "v5p:2x2x2")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    """What a scenario compiles: ``fn(*args)`` with ``args`` abstract (placed on the
    topology's chips), the arguments donated, and a note for the table."""

    fn: Callable[..., Any]
    args: tuple
    donate_argnums: Any = 0
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A named program to compile: ``build(topology) -> Built``. Scenarios of one
    ``group`` share a model and batch; the group's ``floor`` (a scenario named ``floor``
    or ``*-floor``) is the baseline of its ratios. Names are unique across groups."""

    name: str
    group: str
    title: str
    build: Callable[[tc.Topology], Built]
    topologies: tuple[str, ...] = DEFAULT_TOPOLOGIES


SCENARIOS: dict[str, Scenario] = {}
GROUPS: dict[str, str] = {}  # group -> description (model and batch)


def scenario(name: str, group: str, title: str, topologies: Sequence[str] = DEFAULT_TOPOLOGIES):
    """Registers ``build(topology) -> Built`` as the scenario ``name``."""

    def register(build: Callable[[tc.Topology], Built]) -> Callable[[tc.Topology], Built]:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        SCENARIOS[name] = Scenario(name, group, title, build, tuple(topologies))
        return build

    return register


# ----------------------------------------------------------------------------------
# Model helpers
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepShape:
    """A decoder and a batch: ``batch x seq`` tokens, LoRA rank ``rank`` (alpha 2r)."""

    cfg: jm.DecoderConfig
    batch: int
    seq: int
    rank: int = 16

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


#: The step of issue 22: a Llama-3.2-1B-shaped decoder (width 2048, 32/8 heads of 64,
#: SwiGLU 8192, vocabulary 128256) cut to 4 layers, bfloat16, batch 4 x 1024, r = 16.
LLAMA_2048 = StepShape(
    jm.DecoderConfig("llama3", 128256, 2048, 8192, 4, 32, 8, 64, rope_theta=500_000.0, param_dtype="bfloat16"),
    batch=4, seq=1024, rank=16,
)
GROUPS["llama-2048"] = (
    "Llama-3.2-1B shape cut to 4 layers (width 2048, 32/8 heads of 64, SwiGLU 8192, vocabulary 128256), "
    "bfloat16 weights and activations, batch 4 x 1024, LoRA r=16 alpha=32 on every linear layer (q, k, v, o, "
    "gate, up, down; not the head), factors float32 (jlora's default)"
)


def model_parts(cfg: jm.DecoderConfig):
    """``(graphdef, abstract state)`` of ``cfg``'s decoder, nothing allocated."""
    return nnx.split(jm.abstract(cfg))


def llama_parts(shape: StepShape):
    """``(graphdef, abstract state, apply)`` of ``shape``'s decoder (``jlora.models``,
    under ``nnx.eval_shape``): ``apply(state, ids) -> logits``."""
    graphdef, state = model_parts(shape.cfg)

    def apply(s, ids):
        return nnx.merge(graphdef, s)(ids)

    return graphdef, state, apply


def lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean token cross-entropy, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def batch_spec(shape: StepShape) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """``(ids, labels)``, both ``int32 (batch, seq)``."""
    s = jax.ShapeDtypeStruct((shape.batch, shape.seq), jnp.int32)
    return s, s


def _fsdp_spec(shape: tuple[int, ...], n: int, axes: tuple[str, ...]) -> jax.sharding.PartitionSpec:
    """Shard the largest axis divisible by ``n`` over ``axes`` (ZeRO-3 / FSDP); else replicate."""
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % n == 0 and shape[i] >= n:
            entries = [None] * len(shape)
            entries[i] = axes
            return jax.sharding.PartitionSpec(*entries)
    return jax.sharding.PartitionSpec()


#: FSDP shards arrays of at least this many elements; smaller ones (LoRA factors, norm
#: scales, their optimizer states) are replicated.
FSDP_MIN_SIZE = 2**20


def batch_mesh(topo: tc.Topology, batch_size: int) -> tuple[jax.sharding.Mesh, jax.sharding.PartitionSpec]:
    """The ``("data", "seq")`` mesh of :func:`place` and the spec of a (batch, seq) array:
    the batch over as many chips as divide it, the sequence over the rest."""
    data = int(np.gcd(batch_size, topo.n_chips))
    mesh = topo.mesh((data, topo.n_chips // data), ("data", "seq"))
    return mesh, jax.sharding.PartitionSpec("data", "seq" if topo.n_chips > data else None)


def place(topo: tc.Topology, params: Any, batch: Any) -> tuple[Any, Any]:
    """``(params, batch)`` as abstract arrays on ``topo``: one chip holds everything; on a
    mesh, FSDP: every parameter (and optimizer state) of at least :data:`FSDP_MIN_SIZE`
    elements sharded along its largest divisible axis over all chips, smaller ones (LoRA
    factors, norms) replicated; the batch along its batch axis over as many chips as
    divide it and along the sequence over the rest (a 4 x 1024 batch on 8 chips: 4 x 2).

    (Measured: LoRA factors sharded along an axis their kernel is not sharded on, e.g.
    ``B`` along an output axis while ``W`` is sharded along its input axis, made XLA:TPU
    shard the attention inputs by head dimension on 8 v5p chips: 2.2x the floor's time.
    jlora.wrap shards factors like their kernel, A along its input axes and B along its
    output axes, which has no such conflict.)"""
    if topo.n_chips == 1:
        s = topo.replicated()
        return tc.abstract(params, s), tc.abstract(batch, s)
    leaves = jax.tree_util.tree_leaves(batch)
    mesh, b_spec = batch_mesh(topo, leaves[0].shape[0])
    axes = ("data", "seq")
    p_sh = jax.tree_util.tree_map(
        lambda x: jax.sharding.NamedSharding(
            mesh, _fsdp_spec(tuple(x.shape), topo.n_chips, axes) if np.prod(x.shape) >= FSDP_MIN_SIZE
            else jax.sharding.PartitionSpec()), params)
    # (batch, seq) arrays over both axes; per-example arrays (adapter_ids) over the batch axis only
    b_sh = jax.tree_util.tree_map(
        lambda x: jax.sharding.NamedSharding(mesh, b_spec if len(x.shape) > 1 else jax.sharding.PartitionSpec("data")),
        batch)
    return tc.abstract(params, p_sh), tc.abstract(batch, b_sh)


def _adamw():
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


def lora_build(topo: tc.Topology, shape: StepShape, *, quant: Optional[jlora.QuantConfig] = None,
               use_dora: bool = False, factor_dtype: Any = jnp.float32) -> Built:
    """jlora's LoRA train step on ``shape`` (optionally over a quantized base, or DoRA),
    written as the ``jlora.partition`` docstring says: gradient of the trainable part,
    ``jlora.optimizer(optax.adamw)``, state donated."""
    _, state, apply = llama_parts(shape)
    ids, labels = batch_spec(shape)
    example = (jax.ShapeDtypeStruct((1, 8), jnp.int32),)
    base = state
    if quant is not None:
        base = jlora.quantize(state, quant, apply_fn=apply, example_args=example)
    config = jlora.LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=LLAMA_TARGETS,
                              use_dora=use_dora)
    lp = jlora.wrap(base, config, rng=jax.random.key(0), apply_fn=apply, example_args=example, dtype=factor_dtype)
    trainable, frozen = jlora.partition(lp)
    tx = jlora.optimizer(_adamw())
    forward = jlora.lora(apply, on_materialize="error")
    step = benchutil.train_step(lambda t, fr, b: lm_loss(forward(jlora.combine(t, fr), b[0]), b[1]), tx)
    opt = jax.eval_shape(tx.init, trainable)
    (st, fr), bt = place(topo, ((trainable, opt), frozen), (ids, labels))
    return Built(step, (st, fr, bt))


def floor_build(topo: tc.Topology, shape: StepShape) -> Built:
    """The frozen floor: the same model and loss, one trainable leaf (the first layer's
    first norm scale), so the backward pass reaches every layer's input but computes no
    kernel gradient and no LoRA branch: the least a LoRA step on this model costs."""
    _, state, apply = llama_parts(shape)
    ids, labels = batch_spec(shape)
    leaf = state["layers"][0]["input_layernorm"]["w"]

    def loss_of(v, st, b):
        st = jax.tree_util.tree_map(lambda x: x, st)  # a copy of the containers
        st["layers"][0]["input_layernorm"]["w"] = v
        return lm_loss(apply(st, b[0]), b[1])

    tx = _adamw()
    v = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    opt = jax.eval_shape(tx.init, v)
    (st, fr), bt = place(topo, ((v, opt), state), (ids, labels))
    return Built(benchutil.train_step(loss_of, tx), (st, fr, bt))


def full_build(topo: tc.Topology, shape: StepShape) -> Built:
    """Full fine-tuning: AdamW on every parameter."""
    _, state, apply = llama_parts(shape)
    ids, labels = batch_spec(shape)
    tx = _adamw()
    opt = jax.eval_shape(tx.init, state)
    (st, _), bt = place(topo, ((state, opt), None), (ids, labels))
    return Built(benchutil.train_step(lambda p, _, b: lm_loss(apply(p, b[0]), b[1]), tx), (st, None, bt))


def mixed_build(topo: tc.Topology, shape: StepShape, n_adapters: int = 2) -> Built:
    """A mixed batch: ``n_adapters`` named adapters over one base, all trained, each
    example of the batch with its own (``adapter_ids``, example ``e`` uses adapter
    ``e % n_adapters``)."""
    _, state, apply = llama_parts(shape)
    ids, labels = batch_spec(shape)
    example = (jax.ShapeDtypeStruct((1, 8), jnp.int32),)
    config = jlora.LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=LLAMA_TARGETS)
    lp = jlora.wrap(state, config, rng=jax.random.key(0), apply_fn=apply, example_args=example)
    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    for i, name in enumerate(names[1:], 1):
        lp = jlora.add_adapter(lp, name, config, rng=jax.random.key(i), apply_fn=apply, example_args=example)
    lp = jlora.set_adapter(lp, names)
    rows = jlora.adapter_ids(lp, [names[e % n_adapters] for e in range(shape.batch)])
    trainable, frozen = jlora.partition(lp)
    tx = jlora.optimizer(_adamw())
    forward = jlora.lora(apply, on_materialize="error")
    step = benchutil.train_step(lambda t, fr, b: lm_loss(forward(jlora.combine(t, fr), b[0], adapter_ids=b[2]), b[1]), tx)
    opt = jax.eval_shape(tx.init, trainable)
    rows = jax.ShapeDtypeStruct(rows.shape, rows.dtype)
    (st, fr), bt = place(topo, ((trainable, opt), frozen), (ids, labels, rows))
    return Built(step, (st, fr, bt), note=f"{n_adapters} adapters, one per example")


def qwix_build(topo: tc.Topology, shape: StepShape) -> Built:
    """qwix's LoRA (``qwix.LoraProvider`` + ``qwix.apply_lora_to_model``) on the same NNX
    module, its LoRA parameters (``nnx.LoRAParam``, created in the model's dtype) trained
    with ``optax.adamw``."""
    import qwix

    regex = ".*(" + "|".join(LLAMA_TARGETS) + ")"
    provider = qwix.LoraProvider(module_path=regex, rank=shape.rank, alpha=float(2 * shape.rank))
    example = jnp.zeros((1, 8), jnp.int32)
    model = nnx.eval_shape(lambda: qwix.apply_lora_to_model(jm.build(shape.cfg), provider, example, rngs=nnx.Rngs(1)))
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    n_pairs = sum(1 for _ in jax.tree_util.tree_leaves(lora_state)) // 2
    ids, labels = batch_spec(shape)
    tx = _adamw()

    def loss_of(t, rest, b):
        return lm_loss(nnx.merge(graphdef, t, rest)(b[0]), b[1])

    opt = jax.eval_shape(tx.init, lora_state)
    (st, fr), bt = place(topo, ((lora_state, opt), rest), (ids, labels))
    return Built(benchutil.train_step(loss_of, tx), (st, fr, bt), note=f"qwix 0.1.8, LoRA on {n_pairs} kernels, factors bf16")


# ----------------------------------------------------------------------------------
# The scenarios of issue 22
# ----------------------------------------------------------------------------------

NF4 = jlora.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=jnp.bfloat16)
INT8 = jlora.QuantConfig(quant_type="int8", compute_dtype=jnp.bfloat16)


@scenario("floor", "llama-2048", "frozen floor (forward + backward to every layer's input, no kernel gradient)")
def _floor(topo):
    return floor_build(topo, LLAMA_2048)


@scenario("lora", "llama-2048", "jlora LoRA")
def _lora(topo):
    return lora_build(topo, LLAMA_2048)


@scenario("qlora-nf4", "llama-2048", "jlora QLoRA, NF4 + double quantization")
def _qlora_nf4(topo):
    return lora_build(topo, LLAMA_2048, quant=NF4)


@scenario("qlora-int8", "llama-2048", "jlora QLoRA, int8 (LLM.int8 weights)")
def _qlora_int8(topo):
    return lora_build(topo, LLAMA_2048, quant=INT8)


@scenario("dora", "llama-2048", "jlora DoRA")
def _dora(topo):
    return lora_build(topo, LLAMA_2048, use_dora=True)


@scenario("full", "llama-2048", "full fine-tuning (AdamW on every parameter)")
def _full(topo):
    return full_build(topo, LLAMA_2048)


@scenario("lora-mixed", "llama-2048", "jlora LoRA, mixed batch (2 adapters, adapter_ids)")
def _lora_mixed(topo):
    return mixed_build(topo, LLAMA_2048, 2)


@scenario("qwix", "llama-2048", "qwix LoRA on the same module (qwix.apply_lora_to_model)")
def _qwix(topo):
    return qwix_build(topo, LLAMA_2048)


# ----------------------------------------------------------------------------------
# Model scale (issue 23): whole Llama-3-8B / 70B shapes with jlora.models' memory settings
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelStep:
    """A whole decoder as a user fine-tunes it: ``cfg`` with the memory settings
    (``scan_layers``, ``remat``, ``attention``), ``batch x seq`` tokens, the chunked loss
    (``jlora.models.causal_lm_loss``, ``chunk`` positions per chunk of logits), LoRA
    rank ``rank`` (alpha 2r) on every linear layer, AdamW."""

    cfg: jm.DecoderConfig
    batch: int
    seq: int
    rank: int = 16
    chunk: int = 512
    factor_dtype: Any = jnp.float32
    shard_activations: bool = False  # on a mesh: DecoderConfig.activation_sharding = the batch's rows per chip
    fused: bool = True  # jlora.lora(fused=): the fused product rule on TPU


def _memory_settings(cfg: jm.DecoderConfig) -> jm.DecoderConfig:
    return dataclasses.replace(cfg, scan_layers=True, remat="full", attention="blockwise", attention_block_size=512)


#: Llama-3-8B (Meta-Llama-3-8B's config.json): width 4096, 32 layers, 32/8 heads of 128,
#: SwiGLU 14336, vocabulary 128256, untied head.
LLAMA3_8B = _memory_settings(jm.DecoderConfig(
    "llama3", 128256, 4096, 14336, 32, 32, 8, 128, rms_norm_eps=1e-5, rope_theta=500_000.0, param_dtype="bfloat16"))
#: Llama-3-70B: width 8192, 80 layers, 64/8 heads of 128, SwiGLU 28672.
LLAMA3_70B = _memory_settings(jm.DecoderConfig(
    "llama3", 128256, 8192, 28672, 80, 64, 8, 128, rms_norm_eps=1e-5, rope_theta=500_000.0, param_dtype="bfloat16"))

_SETTINGS = ("scan_layers=True, remat=\"full\", attention=\"blockwise\" (blocks of 512), "
             "causal_lm_loss(chunk_size=512), LoRA r=16 alpha=32 on q, k, v, o, gate, up, down (factors float32 unless said), "
             "AdamW")
GROUPS["8b-nf4"] = f"Llama-3-8B shape, NF4 + double-quantized base (bf16 embedding and head), batch 1 x 2048; {_SETTINGS}"
GROUPS["70b-nf4"] = f"Llama-3-70B shape, NF4 + double-quantized base (bf16 embedding and head), batch 1 x 2048; {_SETTINGS}"
GROUPS["8b-bf16"] = f"Llama-3-8B shape, bfloat16 base, batch 1 x 8192; {_SETTINGS}"
GROUPS["70b-fsdp"] = (f"Llama-3-70B shape, bfloat16 base, FSDP over the chips (every array of 2^20 elements or more "
                      f"sharded along its largest divisible axis), global batch 8 x 4096, the residual stream "
                      f"constrained to the batch's rows (DecoderConfig.activation_sharding), jlora.lora(fused=False); {_SETTINGS}")


def model_config(topo: tc.Topology, ms: ModelStep) -> jm.DecoderConfig:
    """``ms.cfg``, with ``shard_activations`` on a mesh the residual stream constrained to
    the batch's placement (:func:`batch_mesh`): what a user writes for FSDP."""
    if not ms.shard_activations or topo.n_chips == 1:
        return ms.cfg
    mesh, spec = batch_mesh(topo, ms.batch)
    return ms.cfg.replace(activation_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec, None)))


def _model_base(topo: tc.Topology, ms: ModelStep, quant: Optional[jlora.QuantConfig]):
    graphdef, state = model_parts(model_config(topo, ms))

    def apply(st, ids):
        return nnx.merge(graphdef, st)(ids)

    example = (jax.ShapeDtypeStruct((1, 8), jnp.int32),)
    base = state if quant is None else jlora.quantize(state, quant, apply_fn=apply, example_args=example)
    return graphdef, base, apply, example


def model_lora_build(topo: tc.Topology, ms: ModelStep, *, quant: Optional[jlora.QuantConfig] = None) -> Built:
    """jlora's LoRA (or QLoRA) train step on a whole ``jlora.models`` decoder, written as a
    user writes it: ``jlora.lora(causal_lm_loss_fn(graphdef, chunk_size=...))``."""
    graphdef, base, apply, example = _model_base(topo, ms, quant)
    config = jlora.LoraConfig(r=ms.rank, lora_alpha=2 * ms.rank, target_modules=LLAMA_TARGETS)
    lp = jlora.wrap(base, config, rng=jax.random.key(0), apply_fn=apply, example_args=example, dtype=ms.factor_dtype)
    trainable, frozen = jlora.partition(lp)
    tx = jlora.optimizer(_adamw())
    loss = jlora.lora(jm.causal_lm_loss_fn(graphdef, chunk_size=ms.chunk), on_materialize="error", fused=ms.fused)
    step = benchutil.train_step(lambda t, fr, b: loss(jlora.combine(t, fr), b[0]), tx)
    opt = jax.eval_shape(tx.init, trainable)
    ids = jax.ShapeDtypeStruct((ms.batch, ms.seq), jnp.int32)
    (st, fr), bt = place(topo, ((trainable, opt), frozen), (ids,))
    return Built(step, (st, fr, bt))


def model_floor_build(topo: tc.Topology, ms: ModelStep, *, quant: Optional[jlora.QuantConfig] = None) -> Built:
    """The frozen floor of :func:`model_lora_build`: the same base (quantized or not), the
    same memory settings and loss, one trainable leaf (the stacked first norm scales of
    every layer), so the backward pass reaches every layer's input, no kernel gradient."""
    graphdef, base, _, _ = _model_base(topo, ms, quant)
    loss = jlora.lora(jm.causal_lm_loss_fn(graphdef, chunk_size=ms.chunk), on_materialize="error")

    def loss_of(v, st, b):
        st = jax.tree_util.tree_map(lambda x: x, st, is_leaf=jlora.quant.is_quantized)  # a copy of the containers
        st["layers"]["input_layernorm"]["w"] = v
        return loss(st, b[0])

    leaf = base["layers"]["input_layernorm"]["w"]
    v = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    tx = _adamw()
    opt = jax.eval_shape(tx.init, v)
    ids = jax.ShapeDtypeStruct((ms.batch, ms.seq), jnp.int32)
    (st, fr), bt = place(topo, ((v, opt), base), (ids,))
    return Built(benchutil.train_step(loss_of, tx), (st, fr, bt))


#: The model-scale groups and what their section is titled (filled by :func:`model_group`).
MODEL_GROUPS: dict[str, str] = {}


def model_group(group: str, title: str, ms: ModelStep, topology: str, names: tuple[str, str], bound: str, *,
                quant: Optional[jlora.QuantConfig] = None, bf16_factors: Optional[str] = None) -> None:
    """Registers a model-scale group: its frozen floor and jlora's step (``names``), on one
    ``topology``, and with ``bf16_factors`` a third scenario of that name whose LoRA factors
    (and so AdamW's moments) are bfloat16."""
    MODEL_GROUPS[group] = title
    topos = (topology,)
    floor, lora = names
    kind = "QLoRA" if quant is not None else "LoRA"
    scenario(floor, group, "frozen floor over the NF4 base" if quant is not None else "frozen floor", topos)(
        functools.partial(model_floor_build, ms=ms, quant=quant))
    scenario(lora, group, f"jlora {kind} (bound: {bound})", topos)(
        functools.partial(model_lora_build, ms=ms, quant=quant))
    if bf16_factors:
        scenario(bf16_factors, group, f"jlora {kind}, LoRA factors (and AdamW's moments) in bfloat16", topos)(
            functools.partial(model_lora_build, ms=dataclasses.replace(ms, factor_dtype=jnp.bfloat16), quant=quant))


model_group("8b-nf4", "a Llama-3-8B over an NF4 base on one v5e chip", ModelStep(LLAMA3_8B, batch=1, seq=2048),
            "v5e:1x1", ("8b-nf4-floor", "8b-qlora-nf4"), "8 GiB", quant=NF4, bf16_factors="8b-qlora-nf4-bf16")
model_group("70b-nf4", "a Llama-3-70B over an NF4 base on one v5p chip", ModelStep(LLAMA3_70B, batch=1, seq=2048),
            "v5p:1", ("70b-nf4-floor", "70b-qlora-nf4"), "46 GiB", quant=NF4, bf16_factors="70b-qlora-nf4-bf16")
model_group("8b-bf16", "a Llama-3-8B over a bfloat16 base, 8192 tokens, on one v6e chip",
            ModelStep(LLAMA3_8B, batch=1, seq=8192), "v6e:1x1", ("8b-bf16-floor", "8b-lora-bf16"), "24 GiB")
model_group("70b-fsdp", "a Llama-3-70B over a bfloat16 base, FSDP on a v5p:2x2x2 slice (8 chips)",
            ModelStep(LLAMA3_70B, batch=8, seq=4096, shard_activations=True, fused=False), "v5p:2x2x2",
            ("70b-fsdp-floor", "70b-lora-fsdp"),
            "32 GiB per chip")


# ----------------------------------------------------------------------------------
# Mixture of experts (issue 26): benchmarks/moe_train_step.py's step, on TPU
# ----------------------------------------------------------------------------------

GROUPS["moe"] = ("Qwen3-30B-A3B layer shapes (width 2048, 128 experts of 768, 8 per token, 32/4 heads of 128, "
                 "vocabulary 151936) cut to 2 layers, float32, batch 1 x 512, LoRA r=8 on q, k, v, o and every "
                 "expert's gate, up, down (jax.lax.ragged_dot), AdamW (benchmarks/moe_train_step.py's step)")


def _moe_build(topo: tc.Topology, kind: str) -> Built:
    import moe_train_step as moe

    step, args = moe.build_step(kind, moe.moe_config(False, 2), 1, 512, rank=8)
    (st, fr), bt = place(topo, (args[0], args[1]), args[2])
    return Built(step, (st, fr, bt))


@scenario("moe-floor", "moe", "frozen floor", topologies=("v5e:1x1",))
def _moe_floor(topo):
    return _moe_build(topo, "floor")


@scenario("moe-lora", "moe", "jlora LoRA on attention and experts (goal: FLOPs <= 1.02x the floor's)",
          topologies=("v5e:1x1",))
def _moe_lora(topo):
    return _moe_build(topo, "lora")


# ----------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------


def _save_json(rows: list[dict], path: str) -> None:
    import json

    keep = lambda v: isinstance(v, (int, float, str, bool)) or v is None  # noqa: E731
    with open(path, "w") as f:
        json.dump([{k: v for k, v in r.items() if keep(v)} for r in rows], f, indent=1)


def run(names: Sequence[str], topologies: Sequence[Optional[str]], hlo: bool = False,
        json_path: Optional[str] = None, source: str = "", by_topology: bool = False) -> list[dict]:
    """Compiles each scenario for each of its topologies (or those given) and returns one
    report dict per (scenario, topology) (:func:`tpu_compile.compile_report`, plus
    ``scenario``, ``group``, ``title``, ``error``)."""
    rows = []
    topo_cache: dict[str, tc.Topology] = {}
    pairs = [(n, t) for n in names for t in (topologies if topologies else SCENARIOS[n].topologies)]
    if by_topology:  # every scenario on the first topology, then on the next, ...
        order = list(dict.fromkeys(t for _, t in pairs))
        pairs.sort(key=lambda p: order.index(p[1]))
    for name, tname in pairs:
        sc = SCENARIOS[name]
        if tname not in topo_cache:
            topo_cache[tname] = tc.topology(tname)
        topo = topo_cache[tname]
        t0 = time.perf_counter()
        try:
            built = sc.build(topo)
            rep = tc.compile_report(built.fn, built.args, topo, donate_argnums=built.donate_argnums)
            rep["note"] = built.note
        except Exception as e:  # a scenario that does not lower is reported, not fatal
            rep = {"topology": tname, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        rep.update(scenario=name, group=sc.group, title=sc.title, wall_s=time.perf_counter() - t0)
        rep["source"] = source
        rows.append(rep)
        if json_path:  # after each compile, so a run stopped early keeps what it compiled
            _save_json(rows, json_path)
        print(f"# {name} on {tname}: {_short(rep)} ({rep['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        if hlo and not rep.get("error"):
            print(tc.describe(rep), file=sys.stderr)
    return rows


def _short(rep: dict) -> str:
    if rep.get("error"):
        return "error: " + rep["error"]
    if rep.get("oom"):
        return f"does not fit ({tc.fmt_bytes(rep['needed'])} needed)"
    return (f"peak {tc.fmt_bytes(rep['peak'])}, {rep['flops'] / 1e12:.3f} TFLOP, "
            f"{rep['bytes_accessed'] / 1e9:.2f} GB, {rep['roofline_s'] * 1e3:.2f} ms")


def report(rows: list[dict]) -> str:
    """One Markdown table per (group, topology), ratios to the group's floor."""
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["group"], r["topology"]), []).append(r)
    for (group, tname), rs in by.items():
        floor = next((r for r in rs if (r["scenario"] == "floor" or r["scenario"].endswith("-floor"))
                      and not r.get("error") and not r.get("oom")), None)
        chip = tc.CHIPS[tname.split(":")[0]]
        lines = []
        for r in rs:
            if r.get("error"):
                lines.append([r["scenario"], "does not lower: " + r["error"][:90]] + ["-"] * 13)
                continue
            if r.get("oom"):
                lines.append([r["scenario"], f"does not fit: {tc.fmt_bytes(r['needed'])} of "
                              f"{tc.fmt_bytes(r['available'])}"] + ["-"] * 13)
                continue

            def rel(key):
                return f"{r[key] / floor[key]:.3f}" if floor and floor[key] else "-"

            lines.append([
                r["scenario"], tc.fmt_bytes(r["peak"]), tc.fmt_bytes(r["temp"]),
                f"{r['flops'] / 1e12:,.3f}", rel("flops"), f"{r['roofline_flops'] / 1e12:,.1f}",
                f"{r['bytes_accessed'] / 1e9:,.2f}", rel("bytes_accessed"),
                f"{r['roofline_hbm_bytes'] / 1e9:,.2f}", rel("roofline_hbm_bytes"),
                f"{r['roofline_s'] * 1e3:,.2f}", rel("roofline_s"), rel("compiler_cycles"),
                f"{r['program_roofline_s'] * 1e3:,.2f}", f"{r['optimal_seconds']:,.1f}",
            ])
        head = ["step", "peak HBM / chip", "temp", "TFLOP / chip", "x floor", "matmul TFLOP (HLO)", "GB accessed", "x floor",
                "HBM GB (HLO)", "x floor", "est. ms", "x floor", "XLA cycles x floor", "program roofline ms",
                "XLA optimal_seconds"]
        out.append(f"**{tname}** ({chip.name}: {chip.hbm_bytes / 2**30:.0f} GiB HBM, "
                   f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:,.0f} GB/s; "
                   f"{rs[0].get('chips', 1)} chip(s)), {GROUPS.get(group, group)}:\n\n" + benchutil.table(lines, head))
    return "\n\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="scenario name (repeatable; default all)")
    ap.add_argument("--group", action="append", default=[], help=f"every scenario of a group (repeatable; {list(GROUPS)})")
    ap.add_argument("--topology", action="append", default=[], help=f"topology (repeatable; one of {list(tc.TOPOLOGIES)})")
    ap.add_argument("--list", action="store_true", help="list the scenarios and topologies")
    ap.add_argument("--hlo", action="store_true", help="also print each program's slowest ops and largest buffers")
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md (all scenarios)")
    ap.add_argument("--json", help="also save the figures (one object per scenario and topology) to this file")
    ap.add_argument("--by-topology", action="store_true",
                    help="compile every scenario on one topology before the next (default: scenario by scenario)")
    ap.add_argument("--from-json", nargs="+", metavar="JSON",
                    help="compile nothing: report (and with --write, write) the rows saved by earlier --json runs "
                         "(e.g. one group's topologies compiled in parallel processes)")
    args = ap.parse_args(argv)
    if args.list:
        for sc in SCENARIOS.values():
            print(f"{sc.name:14s} [{sc.group}] {sc.title}  (topologies: {', '.join(sc.topologies)})")
        print("topologies:", ", ".join(tc.TOPOLOGIES))
        return 0
    unknown = [n for n in args.only if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    bad = [t for t in args.topology if t not in tc.TOPOLOGIES]
    if bad:
        ap.error(f"unknown topology {bad}; known: {list(tc.TOPOLOGIES)}")
    if args.write and (args.only or args.topology) and not args.from_json:
        ap.error("--write records whole groups on their topologies; drop --only / --topology (use --group)")
    bad = [g for g in args.group if g not in GROUPS]
    if bad:
        ap.error(f"unknown group {bad}; known: {list(GROUPS)}")
    names = args.only + [n for n, sc in SCENARIOS.items() if sc.group in args.group] or list(SCENARIOS)
    source = benchutil.provenance()  # the jlora measured (taken before the long run)
    if args.from_json:
        import json

        rows = [r for path in args.from_json for r in json.load(open(path)) if r["scenario"] in names]
        order = {(n, t): i for i, (n, t) in enumerate((n, t) for n in SCENARIOS for t in tc.TOPOLOGIES)}
        rows.sort(key=lambda r: order.get((r["scenario"], r["topology"]), 0))
        source = rows[0].get("source", source) if rows else source
    else:
        rows = run(names, args.topology, hlo=args.hlo, json_path=args.json, source=source,
                   by_topology=args.by_topology)
    text = report(rows)
    print(text)
    if args.json and not args.from_json:
        _save_json(rows, args.json)
    if args.write:
        for group in dict.fromkeys(r["group"] for r in rows):
            group_rows = [r for r in rows if r["group"] == group]
            wall = sum(r["wall_s"] for r in group_rows)
            done = {(r["scenario"], r["topology"]) for r in group_rows}
            missing = [f"{n} on {t}" for n, sc in SCENARIOS.items() if sc.group == group for t in sc.topologies
                       if (n, t) not in done]
            text = report(group_rows) + ("\n\n- not compiled in this run (out of time on this 2-core machine; "
                                         "`--only NAME --topology T` compiles one): " + ", ".join(missing)
                                         if missing else "")
            write(group, text, group_rows, wall, ["--group", group, "--write"], source)
    return 0


def write(group: str, text: str, rows: list[dict], wall: float, argv, source: str) -> None:
    """Writes ``group``'s section of BENCHMARKS.md."""
    command = "python benchmarks/tpu_aot.py " + " ".join(shlex.quote(a) for a in argv)
    scale = group in MODEL_GROUPS
    title = ("## Compiled for TPU: fine-tuning " + MODEL_GROUPS[group] if scale
             else "## Compiled for TPU: jlora's train steps as XLA's TPU compiler sees them")
    intro = [
        title,
        "",
        ("Issue 23" if scale else "Issue 22") + ". **These are the TPU compiler's figures, not a run on a TPU.** Each train step (loss, gradient "
        "of the trained part, AdamW update, state donated) is compiled ahead of time on this CPU machine by XLA's "
        "TPU compiler (libtpu) for a described topology, with abstract arguments; nothing is allocated or run. "
        "One chip: everything on it; a mesh: FSDP (every parameter and optimizer state of at least 2^20 elements "
        "sharded over all chips along its largest divisible axis, smaller ones replicated: norms, and the LoRA "
        "factors of unstacked layers with their optimizer states; a scanned model's stacked factors are large "
        "enough to be sharded), the batch over its "
        "batch and sequence axes. Per chip:",
        "",
        "- *peak HBM* = argument + temp + output - alias, *temp*: `memory_analysis()`;",
        "- *TFLOP*, *GB accessed*: `cost_analysis()` (its bytes count every operand of every op, on-chip VMEM "
        "ones included; it counts a loop body once, so for a scan over layers it is about one layer's share);",
        "- *matmul TFLOP (HLO)*: the FLOPs of the optimised HLO's matmuls and convolutions, loop bodies times their "
        "trip count (what the time estimate uses);",
        "- *HBM GB (HLO)*: bytes each op of the optimised HLO reads and writes in HBM (memory space 0), at their "
        "tiled sizes (a minor axis of 2 counts as the 128 lanes it occupies); an operand a fusion only slices "
        "(also through a nested layout copy, as XLA:TPU retiles a layer's `uint8` codes) at the slices' size; "
        "loop bodies times their trip count;",
        "- *est. ms*, the time estimate: a per-op roofline over that HLO, `max(matmul FLOPs / peak, HBM bytes / "
        "bandwidth, collective bytes / ICI bandwidth)` summed over the ops, one after another (no overlap: "
        "pessimistic for asynchronous copies); chips' peak bf16 FLOP/s and bandwidths in the headers;",
        "- *XLA cycles x floor*: the TPU compiler's own per-op cycle estimates (`estimated_cycles` in the "
        "optimised HLO), summed over the ops that carry one, as a ratio to the floor's: a second, independent "
        "estimate (it leaves data movement out);",
        "- *program roofline*: `max(FLOPs / peak, bytes accessed / bandwidth)` of the whole program, crude;",
        "- *XLA optimal_seconds*: `cost_analysis()`'s own estimate, as it comes: it adds -1 for every op the "
        "compiler cannot cost, so it is negative for these programs and not used.",
        "",
        "Rows: *floor* (the same model with one trainable leaf, the first layer's first norm scale: forward and "
        "backward to every layer's input, no kernel gradient, no LoRA branch), jlora *lora*, *qlora-nf4* (NF4 + "
        "double quantization), *qlora-int8*, *dora*, *lora-mixed* (two adapters, one per example), *full* "
        "fine-tuning, and *qwix* (qwix 0.1.8's `apply_lora_to_model` on the same NNX module; its factors are "
        "created in the model's dtype, bfloat16, jlora's in float32).",
    ]
    if group == "moe":
        intro[0] = "## Compiled for TPU: an MoE LoRA step (ragged_dot experts) against its frozen floor"
        intro[2] = intro[2].replace("Issue 22", "Issue 26")
        intro[-1] = ("Rows: the *floor* (`benchmarks/moe_train_step.py`'s: one trainable norm scale, no kernel "
                     "gradient, no LoRA branch) and jlora's LoRA step. " + GROUPS[group] + ".")
    if scale:
        intro[-1] = ("Rows: the *floor* (the same model, base, memory settings and loss with one trainable leaf, the "
                     "stacked first norm scales: forward and backward to every layer's input, no kernel gradient, "
                     "no LoRA branch) and jlora's step, with the bound the step must meet. " + GROUPS[group] + ".")
    section = "tpu_aot" if group == "llama-2048" else f"tpu_aot {group}"
    benchutil.write_section(section, "benchmarks/tpu_aot.py", intro, command=command, source=source,
                            packages=("jax", "jaxlib", "libtpu", "flax", "optax", "qwix"),
                            report=text + f"\n\n- compile wall time of the whole run: {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
