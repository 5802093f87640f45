"""Data-parallel LoRA training over a device mesh, and where the LoRA factors live.

Runs on 8 CPU "devices" (``--xla_force_host_platform_device_count=8``, set below before
JAX is imported), so it works on a laptop; on a TPU or multi-GPU host drop that flag
and the same code uses the real devices.

The mesh is ``("data", "model")`` = (4, 2): each batch is split four ways along
``data``, and, to show that ``jlora.wrap`` follows the base weights' placement, the
MLP kernels of the base model are split along ``model`` (the rest are replicated).
Each LoRA factor is created where its kernel lives: ``A`` takes the sharding of the
kernel's input axes, ``B`` that of its output axes, the rank axis is replicated.
The train step is an ordinary ``jax.jit``: XLA inserts the gradient all-reduce.

    python examples/data_parallel.py            # a few hundred steps
    python examples/data_parallel.py --smoke    # CI
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import FlaxGPT2LMHeadModel, GPT2Config  # noqa: E402

import jlora  # noqa: E402


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def spec_of(x) -> str:
    """A PartitionSpec as text, trailing Nones dropped ("replicated" when nothing is split)."""
    s = getattr(x, "sharding", None)
    if not isinstance(s, NamedSharding):
        return "-"
    spec = list(s.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return "P(" + ", ".join(repr(a) for a in spec) + ")" if spec else "replicated"


def place(params, mesh):
    """Base placement: MLP kernels split along "model" (c_fc by output, mlp c_proj by
    input; HF GPT-2 stores Conv1D kernels as (out, in)), everything else replicated."""

    def spec(path, x):
        p = path_str(path)
        if p.endswith("mlp/c_fc/kernel"):
            return P("model", None)
        if p.endswith("mlp/c_proj/kernel"):
            return P(None, "model")
        return P()

    return jax.tree_util.tree_map_with_path(lambda path, x: jax.device_put(x, NamedSharding(mesh, spec(path, x))), params)


def show_placement(lp, title: str, limit: int = 4) -> None:
    print(f"\n{title}")
    print(f"{'target (layer 0)':<28} {'W shape':<12} {'W spec':<18} {'A shape':<10} {'A spec':<18} {'B shape':<10} {'B spec'}")
    rows = 0
    for path, leaf in jlora.lora_leaves(lp):
        if "/0/" not in f"/{path}/":
            continue
        short = path.split("/h/0/")[-1]
        print(f"{short:<28} {str(leaf.w.shape):<12} {spec_of(leaf.w):<18} {str(leaf.a.shape):<10} "
              f"{spec_of(leaf.a):<18} {str(leaf.b.shape):<10} {spec_of(leaf.b)}")
        rows += 1
        if rows >= limit:
            break
    b = next(leaf.b for path, leaf in jlora.lora_leaves(lp) if path.endswith("mlp/c_fc/kernel"))
    print(f"e.g. B of h/0/mlp/c_fc {tuple(b.shape)}: one {tuple(b.addressable_shards[0].data.shape)} shard per device "
          f"on {len(b.sharding.device_set)} devices")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch, split over the data axis")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.seq_len = 6, 8, 32

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
    # Auto axes: XLA's partitioner propagates shardings through the unchanged model code.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    print(f"mesh: {dict(mesh.shape)}")

    cfg = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=128, n_layer=2, n_head=4)
    model = FlaxGPT2LMHeadModel(cfg, seed=args.seed)
    params = place(model.params, mesh)

    # modules_to_save: the random base's byte embeddings are trained in full (replicated, like wte)
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["wte"])
    lp = jlora.wrap(params, config, rng=jax.random.key(args.seed))
    jlora.print_trainable_parameters(lp)
    show_placement(lp, "where the LoRA factors live after jlora.wrap (PartitionSpec per array):")

    forward = jlora.lora(lambda p, ids: model(ids, params=p).logits)

    def loss_fn(trainable, frozen, ids):
        logits = forward(jlora.combine(trainable, frozen), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = optax.adamw(2e-3)
    trainable, frozen = jlora.partition(lp)
    opt_state = jax.jit(tx.init)(trainable)  # optimizer state is placed like the factors

    @jax.jit
    def step(trainable, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    batch_sharding = NamedSharding(mesh, P("data"))  # each data-parallel group gets 1/4 of the batch
    rng = np.random.default_rng(args.seed)

    def batch():
        starts = rng.integers(0, len(data) - args.seq_len - 1, args.batch_size)
        return jax.device_put(np.stack([data[s : s + args.seq_len + 1] for s in starts]), batch_sharding)

    ids0 = batch()
    print(f"\nbatch {ids0.shape}: spec {spec_of(ids0)}, per-device shard {ids0.addressable_shards[0].data.shape}")

    # The same loss on one device, for comparison with the sharded computation.
    single = jax.device_put((jlora.combine(trainable, frozen), ids0), jax.devices()[0])
    loss_one_device = float(jax.jit(lambda lp, ids: loss_fn(*jlora.partition(lp), ids))(*single))

    bar = tqdm(range(args.steps), desc="data-parallel", unit="step", mininterval=0.5)
    for i in bar:
        ids = ids0 if i == 0 else batch()
        trainable, opt_state, loss = step(trainable, opt_state, ids)
        if i == 0:
            first = float(loss)
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    print(f"loss: {first:.3f} -> {float(loss):.3f}")
    print(f"first-step loss on the mesh {first:.6f} vs on one device {loss_one_device:.6f}: "
          f"equal {bool(np.isclose(first, loss_one_device, rtol=1e-5))}")

    lp = jlora.combine(trainable, frozen)
    show_placement(lp, "after training: the factors stayed where they were")
    merged = jax.jit(jlora.merge)(lp)
    w = merged["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"]
    print(f"\nmerged c_fc kernel: spec {spec_of(w)} (merge keeps the base placement)")


if __name__ == "__main__":
    main()
