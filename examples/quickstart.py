"""jlora quickstart: LoRA on a small GPT-2, trained on Python's own documentation.

A randomly initialised GPT-2 (byte-level tokens, so no tokenizer download) is wrapped
with LoRA on its attention and projection kernels (its byte embeddings trained in full),
trained for a few hundred steps on text from ``pydoc_data.topics`` (shipped with every
Python), then merged back into plain parameters; the merged model is checked against
the adapter model.

    python examples/quickstart.py            # ~300 steps, about a minute on a laptop CPU
    python examples/quickstart.py --smoke    # a few steps (CI)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydoc_data.topics import topics
from tqdm.auto import tqdm
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import jlora


def byte_corpus() -> np.ndarray:
    """All of Python's pydoc topics as one array of bytes (token ids 0..255)."""
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.seq_len = 10, 4, 32

    # 1. A base model. Here a small random GPT-2 over bytes; with a real checkpoint this
    #    would be FlaxGPT2LMHeadModel.from_pretrained(path).
    cfg = GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=128, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    model = FlaxGPT2LMHeadModel(cfg, seed=args.seed)

    # 2. Wrap: every c_attn / c_proj kernel gets LoRA factors A (random) and B (zero).
    #    The base here is random and its vocabulary (bytes) new, so the token embeddings
    #    (tied to the output layer) are trained in full, as when adding tokens to a
    #    pretrained model: modules_to_save. With a pretrained GPT-2 you would drop it.
    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["c_attn", "c_proj"],
                              lora_dropout=0.05, modules_to_save=["wte"])
    lp = jlora.wrap(model.params, config, rng=jax.random.key(args.seed))
    jlora.print_trainable_parameters(lp)

    # 3. The model's own forward, with LoRA applied (x·W + s·(x·A)·B, never W + BA).
    forward = jlora.lora(lambda params, ids: model(ids, params=params).logits)

    def loss_fn(lp, ids, key):
        logits = forward(lp, ids[:, :-1], lora_rng=key)  # a key turns LoRA dropout on
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    tx = jlora.optimizer(optax.adamw(args.lr))  # W frozen (no optimizer state), A and B trained
    opt_state = tx.init(lp)

    @jax.jit
    def step(lp, opt_state, ids, key):
        loss, grads = jax.value_and_grad(loss_fn)(lp, ids, key)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    data = byte_corpus()
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    tokens_per_step = args.batch_size * args.seq_len
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=0.5)
    first = None
    t0 = time.perf_counter()
    for i in bar:
        starts = rng.integers(0, len(data) - args.seq_len - 1, args.batch_size)
        ids = np.stack([data[s : s + args.seq_len + 1] for s in starts])
        lp, opt_state, loss = step(lp, opt_state, ids, jax.random.fold_in(key, i))
        if i == 0:
            first = float(loss)
            t0 = time.perf_counter()  # throughput after compilation
        elif i % 10 == 0 or i == args.steps - 1:
            rate = i * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{rate:,.0f}", refresh=False)
    print(f"loss: {first:.3f} -> {float(loss):.3f} (nats per byte)")

    # 4. Merge: plain parameters with the same structure as model.params.
    merged = jlora.merge(lp)
    ids = jnp.asarray(data[None, : args.seq_len])
    with_adapter = forward(lp, ids)
    with_merged = model(ids, params=merged).logits
    err = float(jnp.max(jnp.abs(with_adapter - with_merged)))
    ok = bool(jnp.allclose(with_adapter, with_merged, atol=1e-4, rtol=1e-4))
    same_tree = jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(model.params)
    print(f"merged model == adapter model: {ok} (max |difference| {err:.2e}); same tree as the base: {same_tree}")
    if not (ok and same_tree):
        raise SystemExit("merge check FAILED")


if __name__ == "__main__":
    main()
