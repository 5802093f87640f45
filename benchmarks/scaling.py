"""Benchmark: how a LoRA train step's cost grows with the work, jlora against PEFT and
qwix: rank, sequence length (tokens per step constant) and number of targets.

Model: a Llama-shaped decoder (Hugging Face ``FlaxLlamaForCausalLM`` / torch
``LlamaForCausalLM`` with the same random weights; 4 layers, d=512, 8 query / 4
key-value heads, SwiGLU 1408, vocab 8192), float32, 2,048 tokens per step, causal-LM
cross-entropy, one step = loss + grad + AdamW update (the step of
``benchmarks/lora_train_step.py``, whose implementations this reuses: ``jlora``,
``qwix``, ``peft (torch)`` and the frozen floors). alpha = 2r throughout.

Axes (the other two held at the base point r=16, batch 4 x 512, all-linear):

* rank r in {4, 16, 64, 256};
* sequence length in {128, 512, 2048} with batch 16, 4, 1;
* targets: q_proj + v_proj (PEFT's Llama default) -> q, k, v, o (attention) -> all-linear
  (+ gate, up, down).

Per point: step time (median of ``--steps`` interleaved steps after one warm-up) and FLOPs
(JAX: XLA's ``cost_analysis()`` of the compiled step, everything XLA counts; PEFT:
``torch.utils.flop_counter.FlopCounterMode`` over one step: matrix products; it does not
count torch's CPU attention kernel). The frozen floors (JAX and torch) are measured once
per sequence length.

Usage::

    python benchmarks/scaling.py --quick     # a tiny model, one step per point (development, ~1 min)
    python benchmarks/scaling.py --write     # the model above; writes BENCHMARKS.md and benchmarks/scaling.png
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")
warnings.filterwarnings("ignore", category=FutureWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jlora  # noqa: E402
import lora_train_step as lts  # noqa: E402
from benchutil import ROOT, provenance, table, write_section, xla_cost  # noqa: E402

TARGET_SETS = {
    "q,v": ["q_proj", "v_proj"],
    "q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}
PNG = ROOT / "benchmarks" / "scaling.png"


def model_config(quick: bool):
    if quick:
        return lts.llama_config(True, max_position_embeddings=128)
    return lts.llama_config(False, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                            max_position_embeddings=2048)


def points(quick: bool):
    """``[(axis, label, rank, batch, length, target set)]``, the base point listed once."""
    tokens = 128 if quick else 2048
    lengths = [32, 64, 128] if quick else [128, 512, 2048]
    base_len = lengths[1]
    base = dict(rank=16, length=base_len, targets="all-linear")
    out = []
    for r in (4, 16, 64, 256):
        out.append(("rank", str(r), dict(base, rank=r)))
    for n in lengths:
        out.append(("sequence length", str(n), dict(base, length=n)))
    for name in TARGET_SETS:
        out.append(("targets", name, dict(base, targets=name)))
    for _, _, p in out:
        p["batch"] = tokens // p["length"]
    return out


def key_of(p):
    return (p["rank"], p["length"], p["targets"])


def make_shape(cfg, p) -> lts.Shape:
    targets = TARGET_SETS[p["targets"]]
    names = lts.LLAMA_LINEAR if targets == "all-linear" else targets
    return lts.Shape(
        "llama", f"r={p['rank']}, {p['batch']} x {p['length']}, {p['targets']}", cfg, "FlaxLlamaForCausalLM",
        targets, r".*/(" + "|".join(names) + ")$", ("model", "layers", "0", "input_layernorm", "weight"),
        "model.layers.0.input_layernorm.weight", False, p["batch"], p["length"], rank=p["rank"], alpha=2 * p["rank"],
    )


def torch_flops(step: lts.TorchStep) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.run()
    return float(counter.get_total_flops())


def measure(args) -> dict:
    import transformers

    cfg = model_config(args.quick)
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0)
    params = model.params
    results: dict = {}
    floors: dict = {}
    for axis, label, p in points(args.quick):
        k = key_of(p)
        if k in results:
            continue
        shape = make_shape(cfg, p)
        ids_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (p["batch"], p["length"]), dtype=np.int32)
        ids = jnp.asarray(ids_np)
        lp = jlora.wrap(params, jlora.LoraConfig(r=p["rank"], lora_alpha=2 * p["rank"], target_modules=shape.targets),
                        rng=jax.random.key(0))
        steps = {s.name: s for s in lts.jax_steps(shape, model, params, lp, ids, issue3=False)}
        need_floor = p["length"] not in floors
        timed = [steps["jlora"], steps["qwix"]] + ([steps["floor (JAX)"]] if need_floor else [])
        for s in timed:
            s.compile(ids)
        torch_steps = []
        if not args.no_torch:
            torch_steps.append(lts.TorchStep("peft", shape, params, lp, ids_np, args.threads))
            if need_floor:
                torch_steps.append(lts.TorchStep("floor", shape, params, lp, ids_np, args.threads))
        row = {"flops": {n: xla_cost(steps[n].compiled)["flops"] for n in ("jlora", "qwix")}}
        if torch_steps:
            row["flops"]["peft (torch)"] = torch_flops(torch_steps[0])
            torch_steps[0].losses.clear()
        lts.interleave(timed + torch_steps, 1, args.steps, f"{axis}={label}")
        row["ms"] = {s.name: 1e3 * statistics.median(s.step_s) for s in timed + torch_steps}
        row["losses"] = {s.name: (s.losses[0], s.losses[-1]) for s in timed + torch_steps}
        if need_floor:
            floors[p["length"]] = {n: row["ms"].pop(n) for n in ("floor (JAX)", "floor (torch)") if n in row["ms"]}
            floors[p["length"]]["flops"] = xla_cost(steps["floor (JAX)"].compiled)["flops"]
        results[k] = row
        print(f"# {axis}={label}: " + ", ".join(f"{n} {v:,.0f} ms" for n, v in row["ms"].items()) + "; GFLOP "
              + ", ".join(f"{n} {v / 1e9:,.1f}" for n, v in row["flops"].items()), flush=True)
        del steps, timed, torch_steps
    return {"results": results, "floors": floors, "cfg": cfg}


IMPLS = ["jlora", "qwix", "peft (torch)"]


def report(data, args) -> str:
    results, floors = data["results"], data["floors"]
    parts = []
    for axis in ("rank", "sequence length", "targets"):
        rows = []
        for ax, label, p in points(args.quick):
            if ax != axis:
                continue
            row = results[key_of(p)]
            fl = floors[p["length"]]
            ms = row["ms"]
            peers = [ms[n] for n in ("qwix", "peft (torch)") if n in ms]
            cells = [label, f"{p['batch']} x {p['length']}"]
            cells += [f"{ms[n]:,.0f}" if n in ms else "-" for n in IMPLS]
            cells += [f"{fl.get('floor (JAX)', float('nan')):,.0f}", f"{fl['floor (torch)']:,.0f}" if "floor (torch)" in fl else "-"]
            cells += [f"{row['flops'][n] / 1e9:,.1f}" if n in row["flops"] else "-" for n in IMPLS]
            cells += [f"{fl['flops'] / 1e9:,.1f}", f"{ms['jlora'] / min(peers):.3f}" if peers else "-"]
            rows.append(cells)
        header = [axis, "batch x length", *[f"{n} ms" for n in IMPLS], "floor (JAX) ms", "floor (torch) ms",
                  *[f"{n} GFLOP" for n in IMPLS], "floor (JAX) GFLOP", "jlora / faster peer"]
        parts.append(table(rows, header))
    return "\n\n".join(parts)


def plot(data, args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, floors = data["results"], data["floors"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    style = {"jlora": dict(marker="o", color="C0"), "qwix": dict(marker="s", color="C1"),
             "peft (torch)": dict(marker="^", color="C2")}
    for col, axis in enumerate(("rank", "sequence length", "targets")):
        pts = [(label, p) for ax, label, p in points(args.quick) if ax == axis]
        xs = list(range(len(pts)))
        labels = [label if axis != "sequence length" else f"{label}\n({p['batch']}x{p['length']})" for label, p in pts]
        for n in IMPLS:
            ys = [results[key_of(p)]["ms"].get(n, np.nan) for _, p in pts]
            axes[0, col].plot(xs, ys, label=n, **style[n])
            fs = [results[key_of(p)]["flops"].get(n, np.nan) / 1e9 for _, p in pts]
            axes[1, col].plot(xs, fs, label=n + (" (FlopCounterMode: matmuls)" if "torch" in n else " (XLA)"), **style[n])
        for n, ls in (("floor (JAX)", "--"), ("floor (torch)", ":")):
            ys = [floors[p["length"]].get(n, np.nan) for _, p in pts]
            axes[0, col].plot(xs, ys, ls, color="gray", label=n)
        axes[1, col].plot(xs, [floors[p["length"]]["flops"] / 1e9 for _, p in pts], "--", color="gray",
                          label="floor (JAX)")
        for row in (0, 1):
            axes[row, col].set_xticks(xs, labels)
            axes[row, col].grid(alpha=0.3)
        axes[0, col].set_title(f"step time vs {axis}")
        axes[1, col].set_xlabel(axis)
        axes[0, col].set_ylim(bottom=0)
        axes[1, col].set_ylim(bottom=0)
    axes[0, 0].set_ylabel("ms per step (median)")
    axes[1, 0].set_ylabel("GFLOP per step")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    cfg = data["cfg"]
    fig.suptitle(f"LoRA train step cost, Llama shape ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}), "
                 f"{points(args.quick)[0][2]['batch'] * points(args.quick)[0][2]['length']:,} tokens per step, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"# wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model and 128 tokens per step (development)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per point (default 3; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: CPU count)")
    ap.add_argument("--no-torch", action="store_true", help="skip PEFT and the torch floor")
    ap.add_argument("--png", default=None, help="where to write the plot (default: benchmarks/scaling.png, or "
                    "/tmp/jlora_scaling_quick.png with --quick)")
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md and the PNG")
    args = ap.parse_args(argv)
    if args.write and (args.quick or args.no_torch):
        ap.error("--write records the full run only; drop --quick / --no-torch")
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    command = "python benchmarks/scaling.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    source = provenance()
    load0 = os.getloadavg()[0]
    data = measure(args)
    text = report(data, args)
    png = args.png or (str(PNG) if args.write else "/tmp/jlora_scaling_quick.png" if args.quick else str(PNG))
    plot(data, args, png)
    cfg = data["cfg"]
    elapsed = time.perf_counter() - t0
    out = "\n".join([
        f"Setting: Llama shape ({cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads, SwiGLU {cfg.intermediate_size}, vocab {cfg.vocab_size}), random init, "
        f"float32, {points(args.quick)[0][2]['batch'] * points(args.quick)[0][2]['length']:,} tokens per step, "
        f"alpha = 2r, AdamW; base point r=16, length {points(args.quick)[0][2]['length']}, all-linear; "
        f"{args.steps} timed steps per point after 1 warm-up, implementations interleaved.",
        "",
        f"![cost against rank, sequence length and targets]({os.path.relpath(png, ROOT)})",
        "",
        text,
        "",
        "- GFLOP: XLA's `cost_analysis()` for the JAX steps (all operations); for PEFT, torch's "
        "`FlopCounterMode` (matrix products only: it does not count torch's CPU attention kernel, so it is "
        "lower for the same work and does not grow with the sequence length).",
        f"- benchmark wall time: {elapsed:.0f} s; 1-minute load average {load0:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end, on {os.cpu_count()} cores",
    ])
    print()
    print(out)
    if args.write:
        intro = [
            "## Cost as the work grows: rank, sequence length, targets (jlora vs PEFT vs qwix)",
            "",
            "Issue 14. The train step of `benchmarks/lora_train_step.py` (same implementations, same frozen floors) "
            "on a small Llama shape, one axis varied at a time. Plot: top, median step time (floors dashed/dotted); "
            "bottom, FLOPs per step.",
        ]
        write_section("scaling", "benchmarks/scaling.py", intro, command=command, source=source,
                      packages=("jax", "jaxlib", "flax", "qwix", "torch", "peft", "transformers"), report=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
