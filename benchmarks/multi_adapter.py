"""Benchmark: a mixed batch over 8 adapters in one call vs one adapter vs 8 separate calls.

The setting of issue 5 (several adapters on one base): random-init GPT-2 small
(``GPT2Config()`` defaults: 12 layers, d=768, vocab 50257), forward only (logits, no
loss), a batch of 32 x 128 random tokens. Eight adapters ``a0`` ... ``a7`` are added
with ``jlora.add_adapter`` (r=8, alpha=16, targets ``c_attn`` and ``c_proj``, i.e.
``attn.c_attn``, ``attn.c_proj`` and ``mlp.c_proj``; ``init_lora_weights=False`` so B is
random and non-zero). Each is one ``jax.jit`` function:

* ``mixed``     -- the 8-adapter tree, one call over the 32 examples with
                   ``adapter_ids`` (example i uses adapter ``a{i % 8}``, 4 examples each).
* ``single``    -- the same 32 examples through a tree with one adapter
                   (``jlora.get_adapter(lp, "a0")``), no ``adapter_ids``.
* ``separate``  -- 8 calls, one per adapter on its own 4 examples (the single-adapter
                   function compiled once for batch 4, called with each adapter's tree);
                   its time is the sum of the 8 calls.
* ``base``      -- the plain model, no LoRA (FLOPs only, to split off the LoRA branch).

Measured:

* FLOPs: ``compiled.cost_analysis()['flops']``; bound: mixed / single <= 1.05.
* CPU time: median over ``--steps`` calls after ``--warmup``, the variants interleaved
  (mixed, single, separate, mixed, ...); bound: mixed / single <= 1.25; mixed / separate
  is reported.
* Where the extra FLOPs go: the LoRA branch's FLOPs counted from the factor shapes
  (per token and adapter ``2·(d_in·r + r·d_out)`` per target), against the measured
  differences mixed - base and single - base; and a one-layer experiment (a ``c_attn``-
  shaped kernel, 8 adapters, 32 x 128 tokens) comparing what ``jlora`` computes for a
  mixed batch with a per-example gather of the factors.

Usage::

    python benchmarks/multi_adapter.py --tiny            # seconds: a small GPT-2, for development
    python benchmarks/multi_adapter.py --write           # GPT-2 small; updates BENCHMARKS.md

``--write`` replaces this benchmark's section of ``BENCHMARKS.md`` (between its marker
comments) with the tables printed, the exact command, date, versions and CPU.
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
from benchutil import provenance, table, write_section, xla_cost  # noqa: E402


TARGETS = ["c_attn", "c_proj"]
N_ADAPTERS = 8
RANK, ALPHA = 8, 16

# Bounds of issue 5 (mixed / single).
BOUNDS = {"flops": 1.05, "time": 1.25}


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------


def gpt2_config(tiny: bool):
    from transformers import GPT2Config

    if tiny:
        return GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=2000, n_positions=128)
    return GPT2Config()


def lora_flops_per_token(single_tree) -> int:
    """FLOPs of one adapter's LoRA branch per token: Σ_targets 2·(d_in·r + r·d_out)."""
    total = 0
    for _, lw in jlora.lora_leaves(single_tree):
        total += 2 * (int(np.prod(lw.a.shape)) + int(np.prod(lw.b.shape)))
    return total


# ----------------------------------------------------------------------------------
# One layer: jlora's mixed batch vs a per-example gather of the factors
# ----------------------------------------------------------------------------------


def layer_experiment(batch: int, length: int, d_in: int, d_out: int, steps: int, warmup: int):
    """A ``c_attn``-shaped kernel with 8 adapters: what does the mixed batch cost, and what
    would gathering each example's factors cost? Returns table rows."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, length, d_in))
    w = jax.random.normal(kw, (d_in, d_out)) / np.sqrt(d_in)
    ids = jnp.asarray(np.arange(batch) % N_ADAPTERS, jnp.int32)
    s = ALPHA / RANK

    # the jlora forward on a one-kernel "model": x @ W with W a MultiLoraWeight of 8 adapters
    params = {"w": {"kernel": w}}
    lp = params
    for i in range(N_ADAPTERS):
        config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["w"], init_lora_weights=False)
        lp = jlora.add_adapter(lp, f"a{i}", config, rng=jax.random.key(100 + i))
    node = lp["w"]["kernel"]
    a = jnp.stack([node.adapters[f"a{i}"].a for i in range(N_ADAPTERS)])  # (8, d_in, r)
    b = jnp.stack([node.adapters[f"a{i}"].b for i in range(N_ADAPTERS)])  # (8, r, d_out)
    one = jlora.get_adapter(lp, "a0")
    f = jlora.lora(lambda p, x: x @ p["w"]["kernel"], on_materialize="error")

    def jlora_mixed(lp, x, ids):
        return f(lp, x, adapter_ids=ids)

    def jlora_single(one, x):
        return f(one, x)

    def base(w, x):
        return x @ w

    def masked(w, a, b, x, ids):
        # every adapter's branch on every example, each times a 0/1 mask of its examples
        y = x @ w
        for i in range(N_ADAPTERS):
            mask = (ids == i).astype(x.dtype)[:, None, None]
            y = y + mask * (s * ((x @ a[i]) @ b[i]))
        return y

    def gathered(w, a, b, x, ids):
        # each example's own factors: (batch, d_in, r), (batch, r, d_out)
        ag, bg = a[ids], b[ids]
        t = jnp.einsum("btd,bdr->btr", x, ag)
        return x @ w + s * jnp.einsum("btr,bro->bto", t, bg)

    variants = [
        ("base x·W (no LoRA)", jax.jit(base), (w, x)),
        ("one adapter, all examples (jlora, no adapter_ids)", jax.jit(jlora_single), (one, x)),
        ("8 adapters, mixed (jlora, adapter_ids)", jax.jit(jlora_mixed), (lp, x, ids)),
        ("8 adapters, masked branches (reference, not jlora)", jax.jit(masked), (w, a, b, x, ids)),
        ("8 adapters, gathered factors (reference, not jlora)", jax.jit(gathered), (w, a, b, x, ids)),
    ]
    ref = np.asarray(variants[2][1](*variants[2][2]))
    err = max(
        float(np.abs(np.asarray(fn(*args)) - ref).max() / np.abs(ref).max()) for _, fn, args in variants[3:]
    )
    compiled = [(n, fn.lower(*args).compile(), args) for n, fn, args in variants]
    times: dict[str, list[float]] = {n: [] for n, _, _ in compiled}
    for i in range(warmup + steps):
        for n, c, args in compiled:
            t0 = time.perf_counter()
            jax.block_until_ready(c(*args))
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    flops = {n: xla_cost(c)["flops"] for n, c, _ in compiled}
    med = {n: statistics.median(v) for n, v in times.items()}
    f_base, f_one = flops[compiled[0][0]], flops[compiled[1][0]]
    t_one = med[compiled[1][0]]
    rows = []
    for n, _, _ in compiled:
        lora_part = flops[n] - f_base
        rows.append([
            n, f"{flops[n] / 1e9:,.3f}", f"{lora_part / 1e9:,.3f}",
            "-" if n.startswith("base") else f"{lora_part / (f_one - f_base):.2f}",
            f"{flops[n] / f_one:.3f}", f"{med[n] * 1e3:,.2f}", f"{med[n] / t_one:.3f}",
        ])
    header = ["one c_attn-shaped layer", "GFLOP", "LoRA-branch GFLOP (- base)", "x one adapter's branch",
              "FLOPs x one adapter", "CPU ms (median)", "time x one adapter"]
    return table(rows, header), err


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d=128 GPT-2 and batch 32 x 16 (development)")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.write and args.tiny:
        ap.error("--write records GPT-2 small results only; drop --tiny")
    if args.steps < 10 and args.write:
        ap.error("--write needs --steps >= 10")
    command = "python benchmarks/multi_adapter.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    source = provenance()

    from transformers import FlaxGPT2LMHeadModel

    cfg = gpt2_config(args.tiny)
    batch, length = (32, 16) if args.tiny else (32, 128)
    per = batch // N_ADAPTERS
    model = FlaxGPT2LMHeadModel(cfg, seed=0)
    params = model.params
    apply = lambda p, x: model(x, params=p).logits  # noqa: E731

    names = [f"a{i}" for i in range(N_ADAPTERS)]
    lp = params
    for i, n in enumerate(names):
        config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
        lp = jlora.add_adapter(lp, n, config, rng=jax.random.key(i + 1))
    # jlora.adapter_ids numbers adapters as jlora.adapter_names does; the order must survive
    # the flattening that jit does (it does since MultiLoraWeight keeps it in static data)
    assert jlora.adapter_names(lp) == jlora.adapter_names(jax.tree_util.tree_map(lambda v: v, lp)) == names
    per_example = [names[i % N_ADAPTERS] for i in range(batch)]
    ids_adapter = jlora.adapter_ids(lp, per_example)
    singles = [jlora.get_adapter(lp, n) for n in names]

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32))
    groups = [np.flatnonzero(np.asarray(ids_adapter) == i) for i in range(N_ADAPTERS)]
    sub_tokens = [tokens[g] for g in groups]

    f = jlora.lora(apply, on_materialize="error")
    mixed_fn = jax.jit(lambda lp, x, ids: f(lp, x, adapter_ids=ids))
    single_fn = jax.jit(lambda lp, x: f(lp, x))
    base_fn = jax.jit(apply)

    setting = (
        f"GPT-2 {'tiny' if args.tiny else 'small'} (random init, {cfg.n_layer} layers, d={cfg.n_embd}, "
        f"vocab {cfg.vocab_size}), forward (logits) over a batch of {batch} x {length} tokens; "
        f"{N_ADAPTERS} adapters, LoRA r={RANK}, alpha={ALPHA} on {', '.join(TARGETS)} (random non-zero B), "
        f"{per} examples per adapter"
    )
    print(f"# {setting}", flush=True)

    # ---- compile -------------------------------------------------------------------
    compile_s = {}
    t0 = time.perf_counter()
    mixed_c = mixed_fn.lower(lp, tokens, ids_adapter).compile()
    compile_s["mixed"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    single_c = single_fn.lower(singles[0], tokens).compile()
    compile_s["single"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sep_c = single_fn.lower(singles[0], sub_tokens[0]).compile()
    compile_s["separate"] = time.perf_counter() - t0
    base_c = base_fn.lower(params, tokens).compile()
    for k, v in compile_s.items():
        print(f"# compile {k}: {v:.2f} s", flush=True)

    # ---- correctness: the mixed call equals each adapter alone on its examples -------
    out_mixed = np.asarray(mixed_c(lp, tokens, ids_adapter))
    out_sep = np.zeros_like(out_mixed)
    for i, g in enumerate(groups):
        out_sep[g] = np.asarray(sep_c(singles[i], sub_tokens[i]))
    max_err = float(np.abs(out_mixed - out_sep).max() / np.abs(out_sep).max())
    print(f"# mixed vs separate: max relative difference {max_err:.2e}", flush=True)
    if max_err > 1e-4:
        raise SystemExit(f"mixed batch output differs from the separate calls ({max_err:.2e})")
    del out_mixed, out_sep

    # ---- time (interleaved) --------------------------------------------------------
    def run_mixed():
        jax.block_until_ready(mixed_c(lp, tokens, ids_adapter))

    def run_single():
        jax.block_until_ready(single_c(singles[0], tokens))

    def run_separate():
        for i in range(N_ADAPTERS):
            jax.block_until_ready(sep_c(singles[i], sub_tokens[i]))

    runners = {"mixed": run_mixed, "single": run_single, "separate": run_separate}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(args.warmup + args.steps):
        line = []
        for k, run in runners.items():
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[k].append(dt)
            line.append(f"{k} {dt * 1e3:,.0f} ms")
        print(f"# call {i}{' (warm-up)' if i < args.warmup else ''}: " + "  ".join(line), flush=True)

    # ---- FLOPs -----------------------------------------------------------------------
    fl = {
        "mixed": xla_cost(mixed_c)["flops"],
        "single": xla_cost(single_c)["flops"],
        "separate": N_ADAPTERS * xla_cost(sep_c)["flops"],
        "base": xla_cost(base_c)["flops"],
    }
    med = {k: statistics.median(v) for k, v in times.items()}

    rows = []
    desc = {
        "mixed": f"mixed: {N_ADAPTERS} adapters, one call, adapter_ids",
        "single": "single: one adapter, one call, no adapter_ids",
        "separate": f"separate: {N_ADAPTERS} calls x {per} examples (sum)",
        "base": "base model, no LoRA (FLOPs only)",
    }
    for k in ("mixed", "single", "separate", "base"):
        t = med.get(k)
        rows.append([
            desc[k], f"{fl[k] / 1e9:,.1f}", f"{fl[k] / fl['single']:.4f}",
            f"{t * 1e3:,.0f}" if t else "-", f"{t / med['single']:.3f}" if t else "-",
            f"{compile_s[k]:.1f}" if k in compile_s else "-",
        ])
    main_table = table(rows, ["variant", "GFLOP", "x single", "CPU ms (median)", "x single", "compile s"])

    ratios = {"flops": fl["mixed"] / fl["single"], "time": med["mixed"] / med["single"]}
    brows = [
        ["FLOPs, mixed / single (XLA cost_analysis)", f"{ratios['flops']:.4f}", f"<= {BOUNDS['flops']}",
         "met" if ratios["flops"] <= BOUNDS["flops"] else "NOT MET"],
        ["CPU time, mixed / single (median, interleaved)", f"{ratios['time']:.3f}", f"<= {BOUNDS['time']}",
         "met" if ratios["time"] <= BOUNDS["time"] else "NOT MET"],
        ["CPU time, mixed / single, median of the per-round ratios (same calls)",
         f"{statistics.median(m / t for m, t in zip(times['mixed'], times['single'])):.3f}", "(reported)", "-"],
        ["CPU time, mixed / 8 separate calls (sum)", f"{med['mixed'] / med['separate']:.3f}", "(reported)", "-"],
        ["FLOPs, mixed / 8 separate calls", f"{fl['mixed'] / fl['separate']:.4f}", "(reported)", "-"],
    ]
    bound_table = table(brows, ["bound (issue 5)", "measured", "bound", ""])

    # ---- where the FLOPs go ------------------------------------------------------------
    tokens_n = batch * length
    per_tok = lora_flops_per_token(singles[0])
    one_branch = per_tok * tokens_n
    lora_single, lora_mixed = fl["single"] - fl["base"], fl["mixed"] - fl["base"]
    frows = [
        ["one adapter's LoRA matmuls over all tokens, counted: Σ_targets 2·(d_in·r + r·d_out) x tokens",
         f"{one_branch / 1e9:,.3f}"],
        ["LoRA part of single, measured: single - base (matmuls + scale and add)", f"{lora_single / 1e9:,.3f}"],
        ["LoRA part of mixed, measured: mixed - base", f"{lora_mixed / 1e9:,.3f}"],
        ["(mixed - base) / (single - base)", f"{lora_mixed / lora_single:.2f} x"],
    ]
    flops_table = table(frows, ["FLOPs accounting", "GFLOP"])
    explanation = (
        f"Where the FLOPs go: the mixed call's LoRA part is {lora_mixed / lora_single:.2f}x a single adapter's, "
        "i.e. each example's factors are gathered and only its own adapter's branch is computed; what "
        "differs is elementwise work around the two matmuls (where the scale s is applied, the gather, "
        "zero-padding where ranks differ):"
    )

    d = cfg.n_embd
    layer_table, layer_err = layer_experiment(batch, length, d, 3 * d, args.steps, args.warmup)

    spread = "; ".join(
        f"{k}: min {min(v) * 1e3:,.0f} / median {statistics.median(v) * 1e3:,.0f} / max {max(v) * 1e3:,.0f} ms"
        for k, v in times.items()
    )
    elapsed = time.perf_counter() - t_start
    load_end = os.getloadavg()
    time_ok, flops_ok = ratios["time"] <= BOUNDS["time"], ratios["flops"] <= BOUNDS["flops"]

    lines = [
        f"Setting: {setting}. Example i uses adapter a{{i mod {N_ADAPTERS}}}.",
        "",
        main_table,
        "",
        bound_table,
        "",
        explanation,
        "",
        flops_table,
        "",
        f"The same on one `c_attn`-shaped kernel ({d} x {3 * d}, {batch} x {length} tokens, {N_ADAPTERS} "
        "adapters, r=8): jlora's mixed call against two plain-JAX references, every adapter's branch "
        "masked per example, and each example's factors gathered (`A[ids]`, `B[ids]`, two batched "
        f"einsums); max relative difference of the references to jlora's output {layer_err:.1e}:",
        "",
        layer_table,
        "",
        f"- correctness: the mixed call's logits equal the 8 separate calls' (max relative difference {max_err:.1e})",
        f"- CPU times ({args.steps} timed calls after {args.warmup} warm-up, interleaved mixed / single / "
        f"separate): {spread}",
        f"- benchmark wall time: {elapsed:.0f} s; load average (1/5/15 min) {load_start[0]:.2f}/{load_start[1]:.2f}/"
        f"{load_start[2]:.2f} at start, {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f} at end, on "
        f"{os.cpu_count()} cores (the CPU may be shared: absolute times are comparable only within one run, "
        "ratios are taken from interleaved calls)",
    ]
    end_source = provenance()
    if end_source != source:
        lines.append(f"- WARNING: jlora/ changed during the run (start: {source}; end: {end_source})")
    report = "\n".join(lines)
    print()
    print(report)
    if args.write:
        write_benchmarks(report, command, source)
    return 0 if (time_ok and flops_ok) else 1


def write_benchmarks(report: str, command: str, source: str) -> None:
    intro = [
        "## Several adapters: one mixed batch vs one adapter vs separate calls (GPT-2 small)",
        "",
        "The setting of issue 5 (`jlora.adapter_ids`, mixed batches). Each variant is one `jax.jit` forward "
        "(logits) of the same 32 x 128 tokens:",
        "",
        "- **mixed**: a tree with 8 adapters (`jlora.add_adapter`), one call, "
        "`jlora.lora(apply)(lp, x, adapter_ids=jlora.adapter_ids(lp, names))`, 4 examples per adapter.",
        "- **single**: the same batch through a tree holding one adapter (`jlora.get_adapter(lp, \"a0\")`), "
        "no `adapter_ids`.",
        "- **separate**: 8 calls, each adapter's tree on its own 4 examples (one compiled function, batch 4); "
        "time = sum of the 8 calls.",
    ]
    write_section('multi_adapter', 'benchmarks/multi_adapter.py', intro, command=command, source=source,
                  packages=("jax", "jaxlib", "flax", "transformers", "numpy"), report=report)


if __name__ == "__main__":
    sys.exit(main())
