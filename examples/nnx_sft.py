"""Supervised fine-tuning (SFT) of a Flax NNX decoder with LoRA, generating text with
``jlora.models.generate`` from the same prompts before and after training.

The NNX version of ``sft_causal_lm.py``: question/answer pairs from Python's own
documentation ("Topic: <heading>\\nSummary:" -> "<the section's first sentence>"), the
loss on the answer tokens only. The model is a small random ``jlora.models`` decoder
(Qwen3, Llama 3 or Gemma 3) over bytes, nothing downloaded; a random base over a new
vocabulary trains its token embeddings in full (``modules_to_save``), the attention and
MLP projections with LoRA.

Generation runs on the LoRA tree itself (the adapter applied factored through
``jlora.lora``, no merge): the prompts are left-padded into one batch, prefilled, then
decoded greedily over a KV cache until each row's end-of-text.

    python examples/nnx_sft.py                    # random Qwen3, ~2 min on CPU
    python examples/nnx_sft.py --family gemma3
    python examples/nnx_sft.py --smoke            # seconds (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sft_causal_lm import EOS, ByteTokenizer, answer_loss, batchify, qa_pairs  # noqa: E402

import jlora  # noqa: E402
import jlora.models as jm  # noqa: E402

TARGETS = {
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3": ["q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"],
}


def build(family: str, smoke: bool, seed: int) -> nnx.Module:
    D, F = (64, 128) if smoke else (128, 256)
    extra = dict(tie_embeddings=True)
    if family == "gemma3":
        extra.update(layer_types=("sliding_attention", "full_attention"), sliding_window=64,
                     query_pre_attn_scalar=32.0)
    return jm.build(jm.DecoderConfig(family, EOS + 1, D, F, 2, num_heads=4, num_kv_heads=2, head_dim=D // 4,
                                     **extra), seed=seed)


def left_padded(tok: ByteTokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The prompts as one left-padded batch (transformers' convention for generation)."""
    enc = [tok.encode(p) for p in prompts]
    T = max(len(e) for e in enc)
    ids = np.full((len(enc), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(enc), T), np.int32)
    for i, e in enumerate(enc):
        ids[i, T - len(e):] = e
        mask[i, T - len(e):] = 1
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(TARGETS), default="qwen3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=160)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps of a tiny model, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.pairs, args.seq_len = 8, 4, 4, 96

    tok = ByteTokenizer()
    model = build(args.family, args.smoke, args.seed)
    graphdef, state = nnx.split(model)
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    pairs = qa_pairs(args.pairs)
    ids, mask = batchify(pairs, tok, args.seq_len)

    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS[args.family],
                              modules_to_save=["embedder"])
    lp = jlora.wrap(state, config, rng=jax.random.key(args.seed), apply_fn=apply,
                    example_args=(jnp.asarray(ids[:1, :-1]),))
    jlora.print_trainable_parameters(lp)

    forward = jlora.lora(apply)
    tx = jlora.optimizer(optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 20, 1),
                                                                         args.steps)))
    opt_state = tx.init(lp)

    @jax.jit
    def step(lp, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(lambda p: answer_loss(forward, p, ids, mask))(lp)
        updates, opt_state = tx.update(grads, opt_state, lp)
        return optax.apply_updates(lp, updates), opt_state, loss

    shown = pairs[:2]
    prompt_ids, prompt_mask = left_padded(tok, [p for p, _ in shown])
    n_new = 32 if args.smoke else 120
    gen = dict(attention_mask=prompt_mask, max_new_tokens=n_new, eos_token_id=EOS, pad_token_id=EOS)

    def texts(params) -> list[str]:
        out = np.asarray(jm.generate(graphdef, params, prompt_ids, **gen))
        return [tok.decode(row[prompt_ids.shape[1]:]) for row in out]

    before = texts(lp)  # the adapter starts at B = 0: the base model's text

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    first = None
    for i in range(args.steps):
        idx = rng.integers(0, len(pairs), args.batch_size)
        lp, opt_state, loss = step(lp, opt_state, ids[idx], mask[idx])
        if first is None:
            first = float(loss)
        if (i + 1) % max(1, args.steps // 5) == 0:
            print(f"  step {i + 1:4d}  answer loss {float(loss):.4f}")
    print(f"answer loss: {first:.3f} -> {float(loss):.3f} ({args.steps} steps, {time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    after = texts(lp)  # the LoRA tree, factored: no merge needed
    print(f"generated {len(shown)} x {n_new} tokens in {time.perf_counter() - t0:.2f} s (the program compiled for the "
          "first generation serves: same shapes)")
    merged_same = texts(jlora.merge(lp)) == after
    print(f"merged params generate the same text: {merged_same}")
    for (prompt, answer), b, a in zip(shown, before, after):
        print("-" * 72)
        print(prompt.replace("\n", " | "))
        print(f"  reference: {answer.strip()!r}")
        print(f"  before   : {b.strip()!r}")
        print(f"  after    : {a.strip()!r}")
    print("-" * 72)


if __name__ == "__main__":
    main()
