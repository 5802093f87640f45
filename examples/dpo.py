"""Preference tuning (DPO) with LoRA, where the reference model is the base itself.

Direct Preference Optimization (Rafailov et al., 2023) trains a policy pi on pairs
(prompt x, chosen y_c, rejected y_r) against a frozen reference model pi_ref:

    h    = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
    loss = -log sigmoid(beta * h)                 (--loss sigmoid, DPO)
    loss = (h' - 1 / (2 beta))^2                  (--loss ipo, IPO; h' from per-token mean log-probs)

with log pi(y|x) summed over the completion's tokens only (prompt and padding masked).
With LoRA the policy is the base plus an adapter and the reference is the same tree with
the adapter switched off, ``jlora.disable_adapter(lp)``: one copy of the base weights
serves both (TRL does the same with PEFT). The implicit reward of a completion is
``beta * (log pi - log pi_ref)``; reward accuracy is the fraction of held-out pairs whose
chosen reward beats the rejected one (a tie counts 1/2: before training every reward is 0).

Data nobody here wrote: Python's own documentation (``pydoc_data.topics``). Its sections
are split once (seeded) into SFT, DPO and held-out sections, so the SFT model has seen
none of the text of a DPO or held-out pair and no held-out text is ever trained on. Each
prose passage is cut into windows: prompt = the section heading and the start of a
window, chosen = the next ``--completion-chars`` characters of the same passage, rejected
= as many characters from a random place in *another* section of the same split. Both
completions have the same length (in bytes: the same number of tokens) and come from the
same documentation, so neither length, style nor an end-of-text gives the answer away:
only whether the text follows from the prompt. With ``--cut char`` (the default) the
prompt ends anywhere, often inside a word, so the seam is where the evidence is; with
``--cut word`` both completions start at a word boundary, which the small model here
cannot learn to judge in minutes (held-out reward accuracy stays at chance).

The model: the project's pretrained model (all-MiniLM) cannot generate, so the script
first trains a small byte-level causal LM briefly with SFT: a random NNX Qwen3 from
``jlora.models`` (4 layers, width 128; ``--family llama3`` for Llama 3), LoRA on its
projections with the embedding and output layer trained in full, on the SFT sections'
text (``examples/sft_causal_lm.py``'s tokenizer, batching and train step). That adapter
is merged, and a fresh LoRA adapter is trained with DPO over the merged SFT model.
``--model DIR`` starts from a local Hugging Face checkpoint instead (Qwen3 / Llama 3 /
Gemma 3 safetensors load as NNX via ``jlora.models``; other architectures, e.g. GPT-2,
as Hugging Face Flax models from transformers 4.x) with its own tokenizer; SFT is then
skipped unless ``--sft-steps`` says otherwise.

    python examples/dpo.py                       # a few minutes on 2 CPU cores
    python examples/dpo.py --loss ipo --beta 0.5
    python examples/dpo.py --model ~/models/Qwen3-0.6B --steps 100 --batch-size 4
    python examples/dpo.py --smoke               # seconds (CI)

Outputs in --output-dir (default runs/dpo-pydoc): sft_base/ (the DPO base as a Hugging Face
checkpoint with PyTorch weights: config.json + model.safetensors), adapter_peft/ (the DPO
adapter in PEFT's format: ``PeftModel.from_pretrained`` on the PyTorch model of sft_base
loads it, as it loads what TRL's ``DPOTrainer`` saves), dpo_curves.png, metrics.json.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jlora  # noqa: E402
import jlora.name_maps  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sft_causal_lm as sft  # noqa: E402  (tokenizers, batching, SFT step, HF Flax loader)
from finetune_minilm_retrieval import _is_prose, sections  # noqa: E402  (pydoc sections)

# --------------------------------------------------------------------------------------
# Data: preference pairs from pydoc_data.topics
# --------------------------------------------------------------------------------------


def prose_sections(min_chars: int = 200) -> list[tuple[str, str]]:
    """(heading, prose) for every documentation section: its prose paragraphs (no code,
    grammar or tables) with whitespace collapsed."""
    out = []
    for title, body in sections():
        paras = [p for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
        text = " ".join(" ".join(p.split()) for p in paras if _is_prose(p))
        if len(text) >= min_chars:
            out.append((title, text))
    return out


def preference_pairs(secs: list[tuple[str, str]], prompt_chars: int, completion_chars: int, seed: int,
                     cut: str = "word", max_per_section: int | None = None, stride: int | None = None) -> list[dict]:
    """Windows of each section: prompt = heading + the window's start, chosen = the next
    ``completion_chars`` characters, rejected = as many characters of another section in
    ``secs``. Windows start at word boundaries ``stride`` characters apart (default: one
    after the other, no overlap). ``cut="word"``: the prompt ends before a space and both
    completions start with one (a new word); ``cut="char"``: the prompt ends anywhere, so
    the chosen text may finish the prompt's last word, and the rejected text starts
    anywhere too."""
    if cut not in ("word", "char"):
        raise ValueError(f"cut must be 'word' or 'char', got {cut!r}")
    rng = random.Random(seed)
    ok = lambda t, q: q + completion_chars <= len(t) and (cut == "char" or t[q] == " ")  # noqa: E731
    starts = [[q for q in range(len(t)) if ok(t, q)] for _, t in secs]
    pairs = []
    for i, (title, text) in enumerate(secs):
        s, n = 0, 0
        while max_per_section is None or n < max_per_section:
            c = text.rfind(" ", s + prompt_chars // 2, s + prompt_chars) if cut == "word" else s + prompt_chars
            if c < 0 or c + completion_chars > len(text):
                break
            j = rng.choice([k for k in range(len(secs)) if k != i and starts[k]])
            q = rng.choice(starts[j])
            pairs.append({"prompt": f"{title[:40]}\n{text[s:c]}", "chosen": text[c : c + completion_chars],
                          "rejected": secs[j][1][q : q + completion_chars], "section": title})
            n += 1
            nxt = text.find(" ", c + completion_chars if stride is None else s + stride)
            if nxt < 0:
                break
            s = nxt + 1
    return pairs


def sft_examples(secs: list[tuple[str, str]], chars: int) -> list[tuple[str, str]]:
    """(heading, text) windows of about ``chars`` characters (cut at spaces): the SFT data,
    loss on the text."""
    out = []
    for title, text in secs:
        s = 0
        while s < len(text) - chars // 4:
            e = text.rfind(" ", s + chars // 2, s + chars)
            e = len(text) if e < 0 or s + chars >= len(text) else e
            out.append((f"{title[:40]}\n", text[s:e]))
            s = e + 1
    return out


def split_sections(eval_fraction: float, sft_fraction: float, seed: int):
    """Sections shuffled once (seeded) into ``(sft, dpo, held_out)`` lists by the given
    fractions (DPO gets the rest). The SFT model never sees the text of a DPO or held-out
    pair, so DPO's training pairs are as new to it as the held-out ones; held-out pairs'
    three texts are never trained on."""
    secs = prose_sections()
    order = list(range(len(secs)))
    random.Random(seed).shuffle(order)
    n_held, n_sft = max(2, round(eval_fraction * len(secs))), round(sft_fraction * len(secs))
    pick = lambda ks: [secs[k] for k in sorted(ks)]  # noqa: E731
    return pick(order[n_held : n_held + n_sft]), pick(order[n_held + n_sft :]), pick(order[:n_held])


def encode_pairs(pairs: list[dict], tok, seq_len: int) -> dict[str, np.ndarray]:
    """ids (N, seq_len + 1) and completion masks (N, seq_len) for chosen and rejected."""
    ids_c, m_c = sft.batchify([(p["prompt"], p["chosen"]) for p in pairs], tok, seq_len)
    ids_r, m_r = sft.batchify([(p["prompt"], p["rejected"]) for p in pairs], tok, seq_len)
    return {"ids_c": ids_c, "m_c": m_c, "ids_r": ids_r, "m_r": m_r}


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def sequence_logps(forward: Callable, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum_t mask_t * log p(ids_{t+1} | ids_{<=t})`` per row: the log-probability of the
    completion (``mask`` is 1 on positions that predict a completion token).

    >>> logps = sequence_logps(jlora.lora(apply), lp, ids, mask)   # doctest: +SKIP
    """
    logits = forward(params, ids[:, :-1])
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 models: log-softmax in f32
    return -(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]) * mask).sum(-1)


def pair_logps(forward: Callable, lp: Any, ids_c, m_c, ids_r, m_r) -> tuple[jax.Array, jax.Array]:
    """Policy and reference log-probs of chosen and rejected, in one batch each: policy
    ``(pi_c, pi_r)`` from ``lp``, reference ``(ref_c, ref_r)`` from
    ``jlora.disable_adapter(lp)`` (the same base W, adapter off). Returns ``(pi, ref)``,
    each of shape ``(2, n)``."""
    ids, m = jnp.concatenate([ids_c, ids_r]), jnp.concatenate([m_c, m_r])
    n = ids_c.shape[0]
    ref = jax.lax.stop_gradient(sequence_logps(forward, jlora.disable_adapter(lp), ids, m))
    pi = sequence_logps(forward, lp, ids, m)
    return pi.reshape(2, n), ref.reshape(2, n)


def preference_loss(pi: jax.Array, ref: jax.Array, n_tokens: jax.Array, beta: float, loss_type: str = "sigmoid"):
    """DPO (``"sigmoid"``): ``mean(-log sigmoid(beta * h))``; IPO (``"ipo"``):
    ``mean((h' - 1/(2 beta))^2)``, where ``h = (pi_c - ref_c) - (pi_r - ref_r)`` from summed
    log-probs and ``h'`` the same from per-token means (``logps / n_tokens``), as TRL does.
    ``pi``, ``ref``, ``n_tokens``: ``(2, n)``, row 0 chosen, row 1 rejected.

    >>> preference_loss(jnp.array([[-1.], [-2.]]), jnp.array([[-1.5], [-1.5]]), jnp.ones((2, 1)), 0.1)  # doctest: +SKIP
    """
    if loss_type == "sigmoid":
        h = (pi[0] - ref[0]) - (pi[1] - ref[1])
        return -jax.nn.log_sigmoid(beta * h).mean()
    if loss_type == "ipo":
        p, r = pi / n_tokens, ref / n_tokens
        h = (p[0] - r[0]) - (p[1] - r[1])
        return ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


def dpo_loss(trainable: Any, frozen: Any, forward: Callable, batch: tuple, beta: float, loss_type: str = "sigmoid"):
    """The preference loss of a batch ``(ids_c, m_c, ids_r, m_r)`` for the LoRA tree
    ``combine(trainable, frozen)``, and the rewards ``beta * (pi - ref)`` (``(2, n)``).
    Differentiate it in ``trainable``: the reference side carries no gradient.

    >>> (loss, rewards), g = jax.value_and_grad(dpo_loss, has_aux=True)(t, f, fwd, batch, 0.1)  # doctest: +SKIP
    """
    ids_c, m_c, ids_r, m_r = batch
    pi, ref = pair_logps(forward, jlora.combine(trainable, frozen), ids_c, m_c, ids_r, m_r)
    n_tokens = jnp.stack([m_c.sum(-1), m_r.sum(-1)])
    return preference_loss(pi, ref, n_tokens, beta, loss_type), beta * (pi - ref)


def make_dpo_step(forward: Callable, tx: optax.GradientTransformation, beta: float, loss_type: str = "sigmoid"):
    """The DPO train step ``(trainable, frozen, opt_state, ids_c, m_c, ids_r, m_r) ->
    (trainable, opt_state, loss, margin, accuracy)``: the same arguments as the SFT step
    (one base, the factors, their optimizer state, a batch), and no reference copy: the
    reference log-probs come from ``jlora.disable_adapter(combine(trainable, frozen))``."""

    def step(trainable, frozen, opt_state, ids_c, m_c, ids_r, m_r):
        (loss, rewards), grads = jax.value_and_grad(dpo_loss, has_aux=True)(
            trainable, frozen, forward, (ids_c, m_c, ids_r, m_r), beta, loss_type)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        margin = rewards[0] - rewards[1]
        acc = jnp.mean((margin > 0) + 0.5 * (margin == 0))
        return optax.apply_updates(trainable, updates), opt_state, loss, margin.mean(), acc

    return step


def score(score_fn, trainable, frozen, data: dict[str, np.ndarray], beta: float, bs: int) -> dict:
    """Held-out metrics: reward accuracy (ties 1/2), mean reward margin, and the model's own
    preference accuracy (log pi(y_c|x) > log pi(y_r|x)) for the policy and the reference."""
    n = len(data["ids_c"])
    pis, refs = [], []
    for s in range(0, n, bs):
        batch = {k: v[s : s + bs] for k, v in data.items()}
        k = len(batch["ids_c"])
        if k < bs:  # pad the last batch (one compiled shape)
            batch = {key: np.concatenate([v, np.repeat(v[-1:], bs - k, 0)]) for key, v in batch.items()}
        pi, ref = score_fn(trainable, frozen, batch["ids_c"], batch["m_c"], batch["ids_r"], batch["m_r"])
        pis.append(np.asarray(pi)[:, :k])
        refs.append(np.asarray(ref)[:, :k])
    pi, ref = np.concatenate(pis, 1), np.concatenate(refs, 1)
    r = beta * (pi - ref)
    margin = r[0] - r[1]
    return {"reward_accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))),
            "reward_margin": float(margin.mean()),
            "policy_preference_accuracy": float(np.mean(pi[0] > pi[1])),
            "reference_preference_accuracy": float(np.mean(ref[0] > ref[1])),
            "pi": pi, "ref": ref}


def arg_bytes(compiled) -> int:
    """XLA's argument bytes of a compiled step (``memory_analysis().argument_size_in_bytes``)."""
    return int(compiled.memory_analysis().argument_size_in_bytes)


def nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def base_kernels(lp: Any) -> list:
    """The base W of every LoRA target (LoraWeight or MultiLoraWeight node)."""
    nodes = jax.tree_util.tree_leaves(lp, is_leaf=lambda x: isinstance(x, (jlora.LoraWeight, jlora.MultiLoraWeight)))
    return [x.w for x in nodes if isinstance(x, (jlora.LoraWeight, jlora.MultiLoraWeight))]


# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Models: an NNX decoder from jlora.models (built in, or a local checkpoint it reads), or a
# Hugging Face Flax causal LM (transformers 4.x) for the checkpoints jlora.models does not read
# --------------------------------------------------------------------------------------

NNX_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class CausalLM:
    """What the script needs of a model: ``apply(params, ids) -> logits``, its parameter
    tree, a tokenizer, LoRA targets (and, for a random base over a new vocabulary, the
    modules SFT trains in full), extra ``jlora.wrap`` arguments, and ``save(params, dir)``
    writing a Hugging Face checkpoint with PyTorch weights (True) or Flax weights only."""

    name: str
    apply: Callable
    params: Any
    tok: Any
    targets: list
    modules_to_save: list
    wrap_kwargs: dict
    save: Callable


def nnx_checkpoint(path: str) -> bool:
    """Whether ``jlora.models`` reads this Hugging Face directory (safetensors + a model
    type it builds)."""
    from jlora.models import config_from_hf

    d = Path(path)
    if not (d / "config.json").is_file() or not list(d.glob("*.safetensors")):
        return False
    try:
        config_from_hf(d / "config.json")
    except (ValueError, KeyError):
        return False
    return True


def random_nnx(cfg, seed: int):
    """``jlora.models.build(cfg)``'s initialisation (weights normal(0, initializer_range),
    norms at one) drawn with numpy over ``jlora.models.abstract(cfg)``: the same model
    without compiling one XLA random-number program per parameter shape."""
    from flax import nnx

    import jlora.models as jm

    graphdef, abstract = nnx.split(jm.abstract(cfg))
    rs = np.random.default_rng(seed)

    def draw(s):
        x = np.ones(s.shape) if len(s.shape) == 1 else rs.normal(0.0, cfg.initializer_range, s.shape)
        return jnp.asarray(x.astype(s.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map(draw, abstract))


def build_nnx(args) -> CausalLM:
    """A ``jlora.models`` NNX decoder: random over bytes (``--family``), or ``--model DIR``."""
    from flax import nnx

    import jlora.models as jm

    if args.model:
        module = jm.from_pretrained(os.path.expanduser(args.model))
        tok, mts = sft.HFTokenizer(os.path.expanduser(args.model)), []
    else:
        d, layers = (32, 1) if args.smoke else (args.width, args.layers)
        cfg = jm.DecoderConfig(args.family, 257, d, 3 * d, layers, num_heads=4, num_kv_heads=2, head_dim=d // 4,
                               tie_embeddings=False, rope_theta=1e4)
        module = random_nnx(cfg, args.seed)
        # a random base over a new (byte) vocabulary: SFT trains its embedding and output
        # layer in full (modules_to_save), as when adding tokens to a pretrained model
        tok, mts = sft.ByteTokenizer(), ["embedder", "lm_head"]
    graphdef, state = nnx.split(module)

    def apply(params, ids):
        return nnx.merge(graphdef, params)(ids)

    def save(params, directory: Path) -> bool:
        nnx.update(module, jax.device_get(params))
        jm.save_pretrained(module, directory)  # config.json + model.safetensors, PyTorch names
        if isinstance(tok, sft.HFTokenizer):
            tok.tok.save_pretrained(directory)
        return True

    wrap_kwargs = {"apply_fn": apply, "example_args": (jnp.zeros((1, 8), jnp.int32),),
                   "layouts": jlora.name_maps.layouts(state)}
    name = f"{type(module).__name__} (jlora.models NNX, {'random, bytes' if not args.model else args.model})"
    return CausalLM(name, apply, state, tok, NNX_TARGETS, mts, wrap_kwargs, save)


def build_flax(args) -> CausalLM:
    """A Hugging Face Flax causal LM (``examples/sft_causal_lm.py``'s loader)."""
    model, tok, targets, mts = sft.build_model(args)

    def save(params, directory: Path) -> bool:
        model.save_pretrained(directory, params=jax.device_get(params))
        if isinstance(tok, sft.HFTokenizer):
            tok.tok.save_pretrained(directory)
        try:  # the PyTorch twin, by transformers' own Flax -> PyTorch conversion
            from transformers import AutoModelForCausalLM
            from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
        except ImportError:
            return False
        pt = load_flax_weights_in_pytorch_model(AutoModelForCausalLM.from_config(model.config), jax.device_get(params))
        pt.save_pretrained(directory)
        return True

    apply = lambda params, ids: model(ids, params=params).logits  # noqa: E731
    return CausalLM(f"{type(model).__name__} (Hugging Face Flax)", apply, model.params, tok, targets, mts, {}, save)


def build(args) -> CausalLM:
    if args.model and not nnx_checkpoint(os.path.expanduser(args.model)):
        return build_flax(args)
    return build_nnx(args)


def plot(path: Path, losses, margins, evals, loss_type: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.arange(1, len(losses) + 1)
    ax1.plot(steps, losses, lw=0.8, alpha=0.5, label="batch")
    w = max(1, len(losses) // 20)
    if len(losses) >= 2 * w:
        ax1.plot(steps[w - 1 :], np.convolve(losses, np.ones(w) / w, "valid"), lw=1.8, label=f"mean of {w}")
    if loss_type == "sigmoid":
        ax1.axhline(np.log(2), color="gray", ls=":", lw=1, label="log 2 (start)")
    ax1.set(xlabel="DPO step", ylabel=f"{loss_type} loss", title="preference loss (train batches)")
    ax1.legend(fontsize=8)
    ax2.plot(steps, margins, lw=0.8, alpha=0.5, label="train batch")
    es = [e["step"] for e in evals]
    ax2.plot(es, [e["reward_margin"] for e in evals], "o-", lw=1.8, label="held out")
    ax2.axhline(0, color="gray", ls=":", lw=1)
    ax2.set(xlabel="DPO step", ylabel="reward margin r(chosen) - r(rejected)", title="reward margin")
    ax3 = ax2.twinx()
    ax3.plot(es, [e["reward_accuracy"] for e in evals], "s--", color="C3", lw=1.2, label="held-out accuracy")
    ax3.set_ylabel("held-out reward accuracy", color="C3")
    ax3.set_ylim(0.4, 1.0)
    h1, l1 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h3, l1 + l3, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local Hugging Face causal-LM directory: safetensors of a model jlora.models "
                    "builds (Qwen3, Llama 3, Gemma 3) load as NNX; others (e.g. GPT-2, Mistral) as HF Flax")
    ap.add_argument("--family", choices=["qwen3", "llama3"], default="qwen3", help="the built-in random NNX model")
    ap.add_argument("--width", type=int, default=128, help="built-in model: hidden size (MLP: 3x)")
    ap.add_argument("--layers", type=int, default=4, help="built-in model: decoder layers")
    ap.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO (sigmoid) or IPO")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=150, help="DPO steps")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per DPO step")
    ap.add_argument("--rank", type=int, default=16, help="DPO adapter rank")
    ap.add_argument("--lr", type=float, default=1e-3, help="DPO learning rate")
    ap.add_argument("--sft-steps", type=int, help="SFT steps before DPO (default 300; 0 with --model)")
    ap.add_argument("--sft-rank", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-chars", type=int, default=144, help="length of the SFT text windows")
    ap.add_argument("--prompt-chars", type=int, default=96)
    ap.add_argument("--completion-chars", type=int, default=16)
    ap.add_argument("--cut", choices=["char", "word"], default="char", help="where prompts end (see preference_pairs)")
    ap.add_argument("--stride", type=int, default=12, help="characters between the starts of training windows")
    ap.add_argument("--eval-fraction", type=float, default=0.2, help="fraction of sections held out")
    ap.add_argument("--sft-fraction", type=float, default=0.4, help="fraction of sections for SFT (the rest: DPO)")
    ap.add_argument("--eval-per-section", type=int, default=16, help="at most this many held-out pairs per section")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/dpo-pydoc")
    ap.add_argument("--smoke", action="store_true", help="a few steps of a tiny model, for CI")
    args = ap.parse_args()
    if args.sft_steps is None:
        args.sft_steps = 0 if args.model else 300
    if args.smoke:
        args.steps, args.sft_steps, args.batch_size, args.eval_every = 3, 3, 4, 2
        args.prompt_chars, args.completion_chars, args.sft_chars, args.rank, args.sft_rank = 32, 16, 48, 4, 4
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data
    sft_secs, dpo_secs, held_secs = split_sections(args.eval_fraction, args.sft_fraction if args.sft_steps else 0.0,
                                                   args.seed)
    train_pairs = preference_pairs(dpo_secs, args.prompt_chars, args.completion_chars, args.seed, cut=args.cut,
                                   stride=args.stride)
    test_pairs = preference_pairs(held_secs, args.prompt_chars, args.completion_chars, args.seed + 1, cut=args.cut,
                                  max_per_section=args.eval_per_section)
    sft_data = sft_examples(sft_secs, args.sft_chars)
    if args.smoke:
        train_pairs, test_pairs, sft_data = train_pairs[:16], test_pairs[:8], sft_data[:16]
    print(f"data: pydoc_data.topics -> {len(sft_data)} SFT windows ({len(sft_secs)} sections), "
          f"{len(train_pairs)} DPO pairs ({len(dpo_secs)} sections), {len(test_pairs)} held-out pairs "
          f"({len({p['section'] for p in test_pairs})} sections)")
    ex = test_pairs[0]
    print(f"  prompt  : {ex['prompt']!r}\n  chosen  : {ex['chosen']!r}\n  rejected: {ex['rejected']!r}")

    lm = build(args)
    tok = lm.tok
    print(f"model: {lm.name}")
    enc = lambda s: len(tok.encode(s))  # noqa: E731
    seq_len = max(enc(p["prompt"]) + max(enc(p["chosen"]), enc(p["rejected"])) + 1 for p in train_pairs + test_pairs)
    seq_len = -(-seq_len // 16) * 16
    train, test = encode_pairs(train_pairs, tok, seq_len), encode_pairs(test_pairs, tok, seq_len)
    forward = jlora.lora(lm.apply)
    rng = np.random.default_rng(args.seed)

    # ---- SFT on text of its own sections (sft_causal_lm's batching and train step)
    base = lm.params
    if args.sft_steps > 0:
        sft_len = -(-max(enc(p) + enc(t) + 1 for p, t in sft_data) // 16) * 16
        sft_ids, sft_mask = sft.batchify(sft_data, tok, sft_len)
        cfg = jlora.LoraConfig(r=args.sft_rank, lora_alpha=2 * args.sft_rank, target_modules=lm.targets,
                               modules_to_save=lm.modules_to_save)
        trainable, frozen = jlora.partition(jlora.wrap(base, cfg, rng=jax.random.key(args.seed), **lm.wrap_kwargs))
        tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.sft_lr, max(args.sft_steps // 20, 1),
                                                            args.sft_steps))
        opt_state = tx.init(trainable)
        sft_step = jax.jit(sft.make_sft_step(forward, tx))
        first = float("nan")
        bar = tqdm(range(args.sft_steps), desc="sft", unit="step", mininterval=0.5)
        for i in bar:
            idx = rng.integers(0, len(sft_data), args.batch_size)
            trainable, opt_state, loss = sft_step(trainable, frozen, opt_state, sft_ids[idx], sft_mask[idx])
            first = float(loss) if i == 0 else first
            if i % 10 == 0 or i == args.sft_steps - 1:
                bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        print(f"SFT: loss {first:.3f} -> {float(loss):.3f} nats/token over {args.sft_steps} steps")
        base = jlora.merge(jlora.combine(trainable, frozen))  # plain params: the DPO base and reference

    # ---- DPO: a fresh adapter over the (SFT-merged) base; the reference is the base itself
    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=lm.targets)
    lp = jlora.wrap(base, config, rng=jax.random.key(args.seed + 1), **lm.wrap_kwargs)
    jlora.print_trainable_parameters(lp)
    ref_tree = jlora.disable_adapter(lp)
    shared = all(a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
                 for a, b in zip(base_kernels(lp), base_kernels(ref_tree)))
    print(f"reference = jlora.disable_adapter(lp): the same W buffers as the policy for all "
          f"{len(base_kernels(lp))} targets (no copy): {shared}")

    trainable, frozen = jlora.partition(lp)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 10, 1), args.steps)
    tx = optax.adamw(sched)
    opt_state = tx.init(trainable)
    batch0 = {k: v[: args.batch_size] for k, v in train.items()}
    dpo_args = (trainable, frozen, opt_state, batch0["ids_c"], batch0["m_c"], batch0["ids_r"], batch0["m_r"])
    dpo_step = jax.jit(make_dpo_step(forward, tx, args.beta, args.loss)).lower(*dpo_args).compile()
    # the plain LoRA (SFT) step on the same base, adapter and batch bytes (chosen + rejected rows)
    sft_args = (trainable, frozen, opt_state, np.concatenate([batch0["ids_c"], batch0["ids_r"]]),
                np.concatenate([batch0["m_c"], batch0["m_r"]]))
    sft_compiled = jax.jit(sft.make_sft_step(forward, tx)).lower(*sft_args).compile()
    mem = {"dpo_step_argument_bytes": arg_bytes(dpo_step), "sft_step_argument_bytes": arg_bytes(sft_compiled),
           "base_bytes": nbytes(frozen), "factor_bytes": nbytes(trainable), "opt_state_bytes": nbytes(opt_state)}
    print(f"compiled step arguments (XLA memory_analysis): DPO {mem['dpo_step_argument_bytes'] / 2**20:.2f} MiB, "
          f"SFT {mem['sft_step_argument_bytes'] / 2**20:.2f} MiB "
          f"(DPO/SFT {mem['dpo_step_argument_bytes'] / mem['sft_step_argument_bytes']:.3f}); a reference copy "
          f"would add the base's {mem['base_bytes'] / 2**20:.2f} MiB")

    score_fn = jax.jit(lambda t, f, *b: pair_logps(forward, jlora.combine(t, f), *b))
    eval_bs = min(32, len(test_pairs))
    before = score(score_fn, trainable, frozen, test, args.beta, eval_bs)
    evals = [{"step": 0, **{k: v for k, v in before.items() if k not in ("pi", "ref")}}]

    losses, margins = [], []
    bar = tqdm(range(args.steps), desc=f"dpo ({args.loss})", unit="step", mininterval=0.5)
    t_dpo = time.perf_counter()
    for i in bar:
        idx = rng.integers(0, len(train_pairs), args.batch_size)
        trainable, opt_state, loss, margin, acc = dpo_step(
            trainable, frozen, opt_state, train["ids_c"][idx], train["m_c"][idx], train["ids_r"][idx], train["m_r"][idx])
        losses.append(float(loss))
        margins.append(float(margin))
        if (i + 1) % args.eval_every == 0 or i == args.steps - 1:
            e = score(score_fn, trainable, frozen, test, args.beta, eval_bs)
            evals.append({"step": i + 1, **{k: v for k, v in e.items() if k not in ("pi", "ref")}})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", held_out_acc=f"{e['reward_accuracy']:.3f}", refresh=False)
        elif i % 5 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", batch_acc=f"{float(acc):.2f}", refresh=False)
    t_dpo = time.perf_counter() - t_dpo
    after = e

    print(f"DPO ({args.loss}, beta {args.beta}): loss {losses[0]:.4f} -> {np.mean(losses[-max(1, args.steps // 10):]):.4f} "
          f"(mean of the last {max(1, args.steps // 10)} steps), {args.steps} steps of {args.batch_size} pairs in {t_dpo:.0f} s")
    print(f"held out: {len(test_pairs)} pairs from {len({p['section'] for p in test_pairs})} sections never trained on")
    print(f"  {'':34s} {'before':>8s} {'after':>8s}")
    rows = [("reward accuracy (ties count 1/2)", "reward_accuracy"), ("mean reward margin", "reward_margin"),
            ("preference accuracy, logp c > r", None)]
    for label, key in rows:
        if key is None:
            b, a = before["reference_preference_accuracy"], after["policy_preference_accuracy"]
        else:
            b, a = before[key], after[key]
        print(f"  {label:34s} {b:8.3f} {a:8.3f}")

    # ---- outputs: the SFT base (Flax HF checkpoint), the adapter in PEFT's format, curves, metrics
    base_dir = out / "sft_base"
    torch_twin = lm.save(base, base_dir)
    lp = jlora.combine(trainable, frozen)
    peft_dir = jlora.save_peft(out / "adapter_peft", lp, config=config, base_model_name_or_path=str(base_dir.resolve()),
                               task_type="CAUSAL_LM")
    reread = jlora.load_peft(peft_dir, base)
    same = all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(reread), jax.tree_util.tree_leaves(lp)))
    print(f"adapter saved in PEFT format: {peft_dir} (read back identical: {same})")
    if torch_twin:
        print(f"  torch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), "
              f"{str(peft_dir)!r})")
    plot(out / "dpo_curves.png", losses, margins, evals, args.loss)
    print(f"curves: {out / 'dpo_curves.png'}")

    k = min(4, len(test_pairs))  # a few held-out pairs with their log-probs, to check elsewhere (e.g. in torch)
    sample = [{"ids_c": test["ids_c"][i].tolist(), "m_c": test["m_c"][i].tolist(), "ids_r": test["ids_r"][i].tolist(),
               "m_r": test["m_r"][i].tolist(), "pi": after["pi"][:, i].tolist(), "ref": after["ref"][:, i].tolist()}
              for i in range(k)]
    metrics = {"args": vars(args), "before": evals[0], "after": evals[-1], "evals": evals, "losses": losses,
               "margins": margins, "memory": mem, "n_train_pairs": len(train_pairs), "n_test_pairs": len(test_pairs),
               "dpo_seconds": t_dpo, "sample": sample}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"done in {time.perf_counter() - T_START:.0f} s; outputs in {out}")


if __name__ == "__main__":
    main()
