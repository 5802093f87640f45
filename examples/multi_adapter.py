"""Several LoRA adapters served from one base model, in one mixed batch.

1. A small GPT-2 over bytes is first trained in full on all of Python's documentation
   (``pydoc_data.topics``): a stand-in for a pretrained base.
2. Two adapters are trained on it independently, each on one part of the docs -- "strings"
   (the ``str`` methods) and "debugger" (``pdb``) -- and saved with ``jlora.save``.
3. Both are loaded over the one base (``jlora.load_adapter``: the base is stored once,
   each adapter adds only its factors), and a single forward pass serves a mixed batch
   in which every example names its adapter (``jlora.adapter_ids``; ``"__base__"`` means
   no adapter). Each example's factors are gathered inside the factored forward: no
   merged copy of the weights exists for any adapter.

The script prints the held-out loss of each kind of text under each adapter, all from the
one mixed batch, and checks that every row equals the same example run with its adapter
alone (``jlora.set_adapter``) or on the base.

    python examples/multi_adapter.py
    python examples/multi_adapter.py --smoke    # CI
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydoc_data.topics import topics
from tqdm.auto import tqdm
from transformers import FlaxGPT2LMHeadModel, GPT2Config

import jlora

DOMAINS = {"strings": ["string-methods"], "debugger": ["debugger"]}


def as_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def split(data: np.ndarray, held_out: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    n = int(len(data) * (1 - held_out))
    return data[:n], data[n:]


def windows(data: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(data) - length - 1, n)
    return np.stack([data[s : s + length + 1] for s in starts])


def train(loss_fn, params, steps: int, lr: float, batches, desc: str):
    """A plain optax loop over whatever ``params`` is (a full tree or a LoRA ``trainable`` part)."""
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps))
    state = tx.init(params)

    @jax.jit
    def step(params, state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    bar = tqdm(range(steps), desc=desc, unit="step", mininterval=0.5)
    for i in bar:
        params, state, loss = step(params, state, next(batches))
        bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--adapter-steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.base_steps, args.adapter_steps, args.batch_size, args.seq_len = 5, 5, 4, 32

    rng = np.random.default_rng(args.seed)
    model = FlaxGPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=args.seq_len, n_embd=128, n_layer=2,
                                           n_head=4), seed=args.seed)

    def logits_of(params, ids):
        return model(ids, params=params).logits

    def per_example_loss(logits, ids):
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(axis=1)

    # 1. the base: all of the docs, every parameter trained
    everything = as_bytes("\n\n".join(topics[k] for k in sorted(topics)))

    def batches(data):
        while True:
            yield windows(data, args.batch_size, args.seq_len, rng)

    base = train(lambda p, ids: per_example_loss(logits_of(p, ids[:, :-1]), ids).mean(), model.params,
                 args.base_steps, 3e-3, batches(everything), "base (full)")

    # 2. two adapters, trained independently on the same frozen base, then saved
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    forward = jlora.lora(logits_of)
    held_out, paths = {}, {}
    out = tempfile.mkdtemp(prefix="jlora_adapters_")
    for k, (name, keys) in enumerate(DOMAINS.items()):
        train_data, held_out[name] = split(as_bytes("\n\n".join(topics[t] for t in keys)))
        trainable, frozen = jlora.partition(jlora.wrap(base, config, rng=jax.random.key(k)))

        def loss_fn(trainable, ids, frozen=frozen):
            lp = jlora.combine(trainable, frozen)
            return per_example_loss(forward(lp, ids[:, :-1]), ids).mean()

        trainable = train(loss_fn, trainable, args.adapter_steps, 3e-3, batches(train_data), f"adapter {name!r}")
        paths[name] = os.path.join(out, name)
        jlora.save(paths[name], jlora.combine(trainable, frozen), config=config)

    # 3. serve: one base, both adapters loaded by name
    served = base
    for name, path in paths.items():
        served = jlora.load_adapter(served, path, name, active=True)
    print(f"\nadapters over one base: {jlora.adapter_names(served)}")
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(base))
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(served))
    print(f"parameters held: {n_all:,} = base {n_base:,} + {n_all - n_base:,} for the two adapters")

    # one mixed batch: every kind of held-out text under every choice of adapter
    choices = ["__base__", *DOMAINS]
    per_cell = 4 if args.smoke else 16
    rows, labels = [], []
    for text_name in DOMAINS:
        ids = windows(held_out[text_name], per_cell, args.seq_len, np.random.default_rng(123))
        for choice in choices:
            rows.append(ids)
            labels += [(text_name, choice)] * per_cell
    ids = jnp.asarray(np.concatenate(rows))
    names = [choice for _, choice in labels]
    mixed = jax.jit(lambda lp, x, a: forward(lp, x, adapter_ids=a))(served, ids[:, :-1], jlora.adapter_ids(served, names))
    losses = np.asarray(per_example_loss(mixed, ids))
    print(f"\none forward pass, {len(names)} examples, each with its own adapter; held-out loss (nats per byte):")
    print("  " + "text / adapter".ljust(16) + "".join(f"{c:>12}" for c in choices))
    for text_name in DOMAINS:
        cells = [losses[[i for i, lab in enumerate(labels) if lab == (text_name, c)]].mean() for c in choices]
        print(f"  {text_name:<16}" + "".join(f"{v:>12.3f}" for v in cells))

    # check every row against the same example run alone with its adapter (or on the base)
    worst = 0.0
    for choice in choices:
        sel = np.array([n == choice for n in names])
        if choice == "__base__":
            alone = logits_of(base, ids[sel, :-1])
        else:
            alone = forward(jlora.set_adapter(served, choice), ids[sel, :-1])
        worst = max(worst, float(jnp.abs(mixed[sel] - alone).max()))
    ok = worst < 1e-4
    print(f"mixed batch == one adapter at a time: {ok} (max |difference| {worst:.1e})")
    if not ok:
        raise SystemExit("mixed-batch check FAILED")


if __name__ == "__main__":
    main()
