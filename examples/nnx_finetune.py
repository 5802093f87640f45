"""LoRA fine-tuning of a Flax NNX decoder (Qwen3, Llama 3 or Gemma 3, laid out as tunix /
bonsai lay them out) on Python's own documentation, saved in both formats.

Steps: build a small random model of the chosen family (byte-level tokens, nothing
downloaded) or load a local Hugging Face checkpoint (``--model DIR``: safetensors +
config.json + tokenizer.json, e.g. a snapshot of Qwen/Qwen3-0.6B; no torch needed),
wrap its attention and MLP projections with LoRA (targets found by how the model uses
its leaves), train with ``jlora.optimizer``, merge the adapter back into the NNX module,
and save the adapter as an Orbax checkpoint and as PEFT files (which
``PeftModel.from_pretrained`` loads on the PyTorch model of the same checkpoint).

    python examples/nnx_finetune.py                      # random Qwen3-shaped model, ~200 steps
    python examples/nnx_finetune.py --family gemma3
    python examples/nnx_finetune.py --model ~/ckpt/Qwen3-0.6B --steps 50 --seq-len 128
    python examples/nnx_finetune.py --smoke              # a few steps (CI)

    # a real checkpoint at real lengths: layers under one scan, each layer checkpointed,
    # blockwise attention; the loss is always computed chunk by chunk (causal_lm_loss)
    python examples/nnx_finetune.py --model ~/ckpt/Llama-3.1-8B --scan-layers --remat full \
        --attention blockwise --param-dtype bfloat16 --seq-len 2048 --batch-size 1

Everything lands in ``--output-dir`` (default ``runs/nnx-finetune``): ``adapter-orbax/``,
``adapter-peft/``, ``merged/`` (the merged model as an HF checkpoint), and for a random
model ``base/`` (the base as an HF checkpoint, so that the PEFT files have a PyTorch base
to load on).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from pydoc_data.topics import topics

import jlora
import jlora.models as jm

# The attention and MLP projections, by their NNX module names (PEFT's q_proj ... down_proj).
TARGETS = {
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3": ["q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"],
}


def random_config(family: str, smoke: bool, **settings) -> jm.DecoderConfig:
    """A small model over bytes (vocabulary 256); ``settings``: the memory settings."""
    D, F, L = (64, 128, 2) if smoke else (128, 384, 4)
    extra = {}
    if family == "gemma3":
        extra = dict(tie_embeddings=True, layer_types=("sliding_attention", "full_attention") * (L // 2),
                     sliding_window=32, query_pre_attn_scalar=32.0, rope_theta=1e6)
    else:
        extra = dict(tie_embeddings=family == "llama3", rope_theta=1e4)
    return jm.DecoderConfig(family, 256, D, F, L, num_heads=4, num_kv_heads=2, head_dim=D // 4, **settings, **extra)


def documents() -> tuple[list[str], list[str]]:
    """Python's pydoc topics, split once (fixed seed) into training and held-out topics."""
    names = sorted(topics)
    rng = np.random.RandomState(0)
    held = set(rng.choice(len(names), size=max(1, len(names) // 10), replace=False).tolist())
    train = [topics[n] for i, n in enumerate(names) if i not in held]
    test = [topics[n] for i, n in enumerate(names) if i in held]
    return train, test


class Tokens:
    """Bytes (ids 0..255) for a random model; the checkpoint's tokenizer.json otherwise."""

    def __init__(self, model_dir: str | None):
        self.tok = None
        if model_dir is not None:
            path = Path(model_dir) / "tokenizer.json"
            if not path.is_file():
                raise SystemExit(f"{model_dir}: no tokenizer.json (needed to tokenize the text)")
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(path))

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.tok is None:
            return np.frombuffer("\n\n".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int32)
        return np.concatenate([np.asarray(e.ids, np.int32) for e in self.tok.encode_batch(texts)])


def batches(stream: np.ndarray, batch: int, length: int, seed: int):
    rng = np.random.RandomState(seed)
    while True:
        starts = rng.randint(0, len(stream) - length - 1, size=batch)
        yield jnp.asarray(np.stack([stream[s : s + length + 1] for s in starts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(TARGETS), default="qwen3", help="for a random model")
    ap.add_argument("--model", help="a local Hugging Face checkpoint directory (Qwen3 / Llama 3 / Gemma 3)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--remat", nargs="?", const="full", default="none", choices=["none", "full", "dots"],
                    help="checkpoint each layer: 'full' keeps only its input (the default of a bare --remat), "
                         "'dots' also the matmul outputs")
    ap.add_argument("--scan-layers", action="store_true", help="stack the layers and run them under one lax.scan")
    ap.add_argument("--attention", default="xla", choices=["xla", "dot_product", "blockwise"],
                    help="'blockwise' (any backend) and 'dot_product' (cuDNN on GPU) never form the (T, T) logits")
    ap.add_argument("--param-dtype", default=None, help="e.g. bfloat16 (parameters and computation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/nnx-finetune")
    ap.add_argument("--smoke", action="store_true", help="a few steps of a tiny model, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.seq_len = 8, 4, 32
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. The base model: an NNX module whose tree is tunix's (attn/q_proj/w (D, N, H), ...).
    settings = dict(remat=args.remat, scan_layers=args.scan_layers, attention=args.attention)
    if args.param_dtype:
        settings.update(param_dtype=args.param_dtype, dtype=args.param_dtype)
    if args.model:
        model = jm.from_pretrained(args.model, **settings)
        where = args.model
    else:
        model = jm.build(random_config(args.family, args.smoke, **settings), seed=args.seed)
        where = "random"
        jm.save_pretrained(model, out / "base")
    family = model.config.family
    graphdef, state = nnx.split(model)
    print(f"model: {type(model).__name__} ({where}), {model.config.num_params():,d} parameters, "
          f"{model.config.num_layers} layers{' (stacked, one scan)' if args.scan_layers else ''}, "
          f"remat {model.config.remat}, attention {model.config.attention}")

    def apply(state, ids):
        return nnx.merge(graphdef, state)(ids)

    tokens = Tokens(args.model)
    train_docs, test_docs = documents()
    train_stream, test_stream = tokens.encode(train_docs), tokens.encode(test_docs)
    train = batches(train_stream, args.batch_size, args.seq_len, args.seed)
    held_out = [b for _, b in zip(range(4), batches(test_stream, args.batch_size, args.seq_len, 123))]

    # 2. Wrap. apply_fn/example_args: the targets and their layouts are found by tracing
    #    how the model uses each leaf (einsum kernels named `w` included). The family's
    #    name map gives the layouts PEFT's files need (Gemma's kv_einsum: k and v apart).
    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS[family])
    lp = jlora.wrap(
        state, config, rng=jax.random.key(args.seed), apply_fn=apply, example_args=(held_out[0][:, :-1],),
        layouts=jlora.name_maps.layouts(state),
    )
    jlora.print_trainable_parameters(lp)
    report = jlora.explain(apply, lp, held_out[0][:, :-1])
    print(f"explain: {len(set(report.factored))} targets factored, {len(set(report.materialized))} materialised")

    # 3. Train: W frozen (no optimizer state), A and B trained. The loss is computed chunk
    #    by chunk over the sequence: the (batch, seq, vocab) float32 logits never exist.
    forward = jlora.lora(apply, on_materialize="error")
    loss_fn = jlora.lora(jm.causal_lm_loss_fn(graphdef, chunk_size=256), on_materialize="error")

    tx = jlora.optimizer(optax.adamw(args.lr))
    opt_state = tx.init(lp)

    @jax.jit
    def step(lp, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(lp, ids)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def held_out_loss(lp) -> float:
        return float(np.mean([eval_loss(lp, b) for b in held_out]))

    before = held_out_loss(lp)
    t0 = time.time()
    for i in range(args.steps):
        lp, opt_state, loss = step(lp, opt_state, next(train))
        if (i + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {i + 1:4d}  train loss {float(loss):.4f}")
    after = held_out_loss(lp)
    print(f"held-out loss: {before:.4f} -> {after:.4f} ({args.steps} steps, {time.time() - t0:.1f} s)")

    # 4. Save the adapter both ways, and read both back.
    jlora.save(out / "adapter-orbax", lp, config=config)
    jlora.save_peft(out / "adapter-peft", lp, config=config,
                    base_model_name_or_path=str(Path(args.model).absolute() if args.model else out / "base"),
                    task_type="CAUSAL_LM")
    same = lambda x, y: all(  # noqa: E731
        bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    orbax_ok = same(jlora.load(out / "adapter-orbax", state), lp)
    peft_ok = same(jlora.load_peft(out / "adapter-peft", state), lp)
    print(f"read back: Orbax identical {orbax_ok}, PEFT identical {peft_ok}")

    # 5. Merge back into the NNX module: a plain model again, computing what the adapter did.
    ids = held_out[0][:, :-1]
    adapted = np.asarray(jax.jit(forward)(lp, ids))
    nnx.update(model, jlora.merge(lp))
    merged = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    err = float(np.abs(merged - adapted).max())
    print(f"merged model == adapter model: {err <= 1e-4 * max(1.0, float(np.abs(adapted).max()))} (max |diff| {err:.2e})")
    jm.save_pretrained(model, out / "merged")
    print(f"saved: {out / 'adapter-orbax'}, {out / 'adapter-peft'}, {out / 'merged'}")


if __name__ == "__main__":
    main()
