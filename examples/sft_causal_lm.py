"""Supervised fine-tuning (SFT) of a causal language model with LoRA.

Question/answer pairs are made from Python's own documentation (``pydoc_data.topics``):
"Question: What is <section heading>?" -> "Answer: <the section's first sentence>". The
loss is taken on the answer tokens only (the prompt is masked out), as in SFT. Text is
generated from the same prompts before and after training.

By default the model is a small randomly initialised Llama-architecture model over
bytes (nothing to download); ``--arch gpt2`` picks GPT-2 instead. ``--model PATH``
fine-tunes a local Hugging Face checkpoint (Flax or PyTorch weights, e.g. a GPT-2,
Llama, Mistral or Qwen2 directory) with its own tokenizer.

    python examples/sft_causal_lm.py                       # random Llama, ~2 min on CPU
    python examples/sft_causal_lm.py --arch gpt2
    python examples/sft_causal_lm.py --model ~/models/gpt2 --steps 200 --lr 3e-4
    python examples/sft_causal_lm.py --smoke               # seconds (CI)
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydoc_data.topics import topics
from tqdm.auto import tqdm

import jlora

EOS = 256  # byte-level vocabulary: 0..255 are bytes, 256 is end-of-text


class ByteTokenizer:
    eos_token_id = EOS
    pad_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_token_id = self.tok.eos_token_id
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def qa_pairs(n: int) -> list[tuple[str, str]]:
    """(prompt, answer) from the first heading and first sentence of each pydoc topic."""
    out, seen = [], set()
    for key in sorted(topics):
        text = topics[key]
        m = re.match(r"(?P<title>[^\n]+)\n[*=\-~^]{3,}\n+(?P<body>.*)", text, re.S)
        if not m:
            continue
        title = m.group("title").strip()
        body = " ".join(m.group("body").split())
        first = re.split(r"(?<=[.:])\s", body, maxsplit=1)[0]
        if title in seen or not (20 <= len(first) <= 160):
            continue
        seen.add(title)
        out.append((f"Topic: {title}\nSummary:", " " + first))
    return out[:n]


def build_model(args):
    if args.model:
        from transformers import AutoConfig, FlaxAutoModelForCausalLM

        path = os.path.expanduser(args.model)
        has_flax = os.path.exists(os.path.join(path, "flax_model.msgpack"))
        model = FlaxAutoModelForCausalLM.from_pretrained(path, from_pt=not has_flax)
        name = AutoConfig.from_pretrained(path).model_type
        return model, HFTokenizer(path), jlora.default_target_modules(name), []
    d = 64 if args.smoke else 128
    if args.arch == "llama":
        from transformers import FlaxLlamaForCausalLM, LlamaConfig

        cfg = LlamaConfig(vocab_size=257, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
        model = FlaxLlamaForCausalLM(cfg, seed=args.seed)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        embeddings = ["embed_tokens", "lm_head"]
    else:
        from transformers import FlaxGPT2LMHeadModel, GPT2Config

        cfg = GPT2Config(vocab_size=257, n_positions=256, n_embd=d, n_layer=2, n_head=4,
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
        model = FlaxGPT2LMHeadModel(cfg, seed=args.seed)
        targets = ["c_attn", "c_proj", "c_fc"]
        embeddings = ["wte"]  # tied to the output layer
    # A random base over a new (byte) vocabulary: its token embeddings and output layer are
    # trained in full (modules_to_save), as when adding tokens to a pretrained model.
    return model, ByteTokenizer(), targets, embeddings


def batchify(pairs, tok, seq_len):
    """ids (N, seq_len + 1) and a mask that is 1 on answer tokens (and the final EOS)."""
    ids = np.full((len(pairs), seq_len + 1), tok.pad_token_id, np.int32)
    mask = np.zeros((len(pairs), seq_len), np.float32)
    for i, (prompt, answer) in enumerate(pairs):
        p, a = tok.encode(prompt), tok.encode(answer) + [tok.eos_token_id]
        seq = (p + a)[: seq_len + 1]
        ids[i, : len(seq)] = seq
        mask[i, max(len(p) - 1, 0) : len(seq) - 1] = 1.0  # position t predicts token t+1
    return ids, mask


def answer_loss(forward, lp, ids, mask):
    """Mean next-token cross-entropy over the positions where ``mask`` is 1 (the answer):
    ``sum_t mask_t * -log p(ids_{t+1} | ids_{<=t}) / sum_t mask_t``."""
    logits = forward(lp, ids[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:])
    return (nll * mask).sum() / mask.sum()


def make_sft_step(forward, tx):
    """The SFT train step ``(trainable, frozen, opt_state, ids, mask) -> (trainable,
    opt_state, loss)``: gradients of :func:`answer_loss` for the trainable part only. The
    frozen base is an argument (not a closed-over constant), so one compiled step serves
    any base of the same shapes."""

    def step(trainable, frozen, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(lambda t: answer_loss(forward, jlora.combine(t, frozen), ids, mask))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def generate(model, params, tok, prompt: str, max_new_tokens: int) -> str:
    ids = jnp.asarray([tok.encode(prompt)], jnp.int32)
    out = model.generate(ids, params=params, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(np.asarray(out.sequences)[0, ids.shape[1]:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="random-init architecture")
    ap.add_argument("--model", help="path to a local Hugging Face causal-LM checkpoint")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=24, help="number of question/answer pairs")
    ap.add_argument("--seq-len", type=int, default=160)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps of a tiny model, for CI")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.pairs, args.seq_len = 8, 4, 4, 96

    model, tok, targets, modules_to_save = build_model(args)
    pairs = qa_pairs(args.pairs)
    ids, mask = batchify(pairs, tok, args.seq_len)
    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0,
                              modules_to_save=modules_to_save)
    lp = jlora.wrap(model.params, config, rng=jax.random.key(args.seed))
    jlora.print_trainable_parameters(lp)

    forward = jlora.lora(lambda params, x: model(x, params=params).logits)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 20, 1), args.steps))
    trainable, frozen = jlora.partition(lp)  # differentiate the factors only
    opt_state = tx.init(trainable)
    step = jax.jit(make_sft_step(forward, tx))

    n_new = 32 if args.smoke else 120
    shown = pairs[:2]
    before = [generate(model, model.params, tok, p, n_new) for p, _ in shown]

    rng = np.random.default_rng(args.seed)
    bar = tqdm(range(args.steps), desc="sft", unit="step", mininterval=0.5)
    t0, n_tok = time.perf_counter(), 0
    for i in bar:
        idx = rng.integers(0, len(pairs), args.batch_size)
        trainable, opt_state, loss = step(trainable, frozen, opt_state, ids[idx], mask[idx])
        if i == 0:
            first, t0 = float(loss), time.perf_counter()
        else:
            n_tok += ids[idx].size
        if i % 10 == 0 or i == args.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
    print(f"answer loss: {first:.3f} -> {float(loss):.3f}")

    lp = jlora.combine(trainable, frozen)
    merged = jlora.merge(lp)  # generate() takes plain params
    after = [generate(model, merged, tok, p, n_new) for p, _ in shown]
    for (prompt, answer), b, a in zip(shown, before, after):
        print("-" * 72)
        print(prompt.replace("\n", " | "))
        print(f"  reference: {answer.strip()!r}")
        print(f"  before   : {b.strip()!r}")
        print(f"  after    : {a.strip()!r}")
    print("-" * 72)


if __name__ == "__main__":
    main()
