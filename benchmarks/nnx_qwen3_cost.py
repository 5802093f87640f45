"""Cost of the factored LoRA train step on an NNX Qwen3 (tunix layout) at Qwen3-0.6B's
shape, against full fine-tuning: XLA's FLOPs and peak compiled bytes.

Nothing is allocated: the model is ``jlora.models.abstract`` (``nnx.eval_shape``), the
LoRA tree ``jax.eval_shape(jlora.wrap ...)``, and each train step is lowered and
compiled from ``jax.ShapeDtypeStruct`` arguments; ``cost_analysis()`` and
``memory_analysis()`` of the compiled steps are deterministic (the numbers do not
depend on the machine's load).

    python benchmarks/nnx_qwen3_cost.py            # print
    python benchmarks/nnx_qwen3_cost.py --write    # and write its section of BENCHMARKS.md
    python benchmarks/nnx_qwen3_cost.py --tiny     # a small shape, seconds (a check of the script)

Default: batch 8 x 256, and the FLOPs ratio at 128, 512 and 1024 tokens per sequence
(the same 2,048 tokens per step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchutil  # noqa: E402

import jlora  # noqa: E402
import jlora.models as jm  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, WEIGHT_DECAY = 1e-4, 0.01
FLOPS_BOUND = 0.70


def qwen3_config(tiny: bool) -> jm.DecoderConfig:
    if tiny:
        return jm.DecoderConfig("qwen3", 1000, 128, 384, 2, 4, 2, 32, tie_embeddings=True, rope_theta=1e6)
    # Qwen/Qwen3-0.6B's config.json
    return jm.DecoderConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, tie_embeddings=True, rope_theta=1e6)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids[:, 1:]).mean()


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def measure(cfg: jm.DecoderConfig, batch: int, seq: int, rank: int) -> dict:
    model = jm.abstract(cfg)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    # Full fine-tuning: AdamW on every parameter.
    adamw = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def full_step(st, x):
        p, opt = st
        loss, g = jax.value_and_grad(lambda p: lm_loss(apply(p, x[:, :-1]), x))(p)
        upd, opt = adamw.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    # LoRA, factored: the trainable part (A, B) and its optimizer state are the step's state.
    config = jlora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    example = jnp.zeros((1, 8), jnp.int32)
    lp = jax.eval_shape(lambda s: jlora.wrap(s, config, rng=jax.random.key(0), apply_fn=apply, example_args=(example,)), state)
    trainable, frozen = jlora.partition(lp)
    ltx = jlora.optimizer(optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    forward = jlora.lora(apply, on_materialize="error")

    def lora_step(st, frozen, x):
        t, opt = st
        loss, g = jax.value_and_grad(lambda t: lm_loss(forward(jlora.combine(t, frozen), x[:, :-1]), x))(t)
        upd, opt = ltx.update(g, opt, t)
        return (optax.apply_updates(t, upd), opt), loss

    results = {}
    t0 = time.perf_counter()
    full_state = (state, jax.eval_shape(adamw.init, state))
    compiled = jax.jit(full_step, donate_argnums=0).lower(full_state, ids).compile()
    results["full"] = {"cost": benchutil.xla_cost(compiled), "memory": _memory(compiled),
                       "compile_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    lora_state = (trainable, jax.eval_shape(ltx.init, trainable))
    compiled = jax.jit(lora_step, donate_argnums=0).lower(lora_state, frozen, ids).compile()
    results["factored"] = {"cost": benchutil.xla_cost(compiled), "memory": _memory(compiled),
                           "compile_s": time.perf_counter() - t0}
    report = jlora.explain(apply, lp, jnp.zeros((1, 8), jnp.int32))
    n_trainable, n_total = jlora.count_parameters(lp)
    return {"results": results, "factored_targets": len(set(report.factored)),
            "materialized_targets": len(set(report.materialized)), "trainable": n_trainable, "total": n_total}


def _row(name: str, r: dict, full: dict) -> list[str]:
    return [
        name, f"{r['cost']['flops'] / 1e9:,.1f}", f"{r['cost']['flops'] / full['cost']['flops']:.3f}",
        fmt_bytes(r["memory"]["peak"]), f"{r['memory']['peak'] / full['memory']['peak']:.3f}",
        fmt_bytes(r["memory"]["argument"]), fmt_bytes(r["memory"]["output"]), fmt_bytes(r["memory"]["temp"]),
        fmt_bytes(r["memory"]["alias"]), f"{r['compile_s']:.1f}",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small shape (checks the script in seconds)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--sweep", default="128,512,1024",
                    help="other sequence lengths, at the same tokens per step (batch x seq), for the ratio table")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.sweep = 2, 64, ""
    cfg = qwen3_config(args.tiny)
    t0 = time.perf_counter()
    m = measure(cfg, args.batch, args.seq, args.rank)
    res = m["results"]
    tokens = args.batch * args.seq
    sweep = {args.seq: res}
    for seq in [int(x) for x in args.sweep.split(",") if x.strip()]:
        if tokens % seq:
            raise SystemExit(f"--sweep {seq}: batch x seq = {tokens} tokens is not a multiple of {seq}")
        sweep[seq] = measure(cfg, tokens // seq, seq, args.rank)["results"]
    wall = time.perf_counter() - t0
    full = res["full"]
    ratio = res["factored"]["cost"]["flops"] / full["cost"]["flops"]
    sweep_rows = []
    for seq in sorted(sweep):
        r = sweep[seq]
        sweep_rows.append([
            f"{tokens // seq} x {seq}", f"{r['full']['cost']['flops'] / 1e9:,.1f}",
            f"{r['factored']['cost']['flops'] / 1e9:,.1f}",
            f"{r['factored']['cost']['flops'] / r['full']['cost']['flops']:.3f}",
            f"{r['factored']['memory']['peak'] / r['full']['memory']['peak']:.3f}",
        ])
    lines = [
        f"Setting: NNX Qwen3 (`jlora.models.Qwen3`, tunix layout: einsum kernels `attn/q_proj/w` (D, N, H) ..., "
        f"`nnx.Linear` MLP), {cfg.num_layers} layers, D={cfg.embed_dim}, F={cfg.hidden_dim}, "
        f"{cfg.num_heads} query / {cfg.num_kv_heads} key-value heads of {cfg.head_dim}, vocabulary {cfg.vocab_size:,d}, "
        f"tied embeddings: {cfg.num_params():,d} parameters (Qwen3-0.6B's shape{'; here tiny' if args.tiny else ''}), "
        f"float32, under `nnx.eval_shape`. Batch {args.batch} x {args.seq}, causal-LM cross-entropy; one jitted step "
        f"= loss + grad + AdamW (lr {LR}, weight decay {WEIGHT_DECAY}), the step's state donated. LoRA r={args.rank}, "
        f"alpha={2 * args.rank} on {', '.join(TARGETS)} (found by `jlora.wrap(..., apply_fn=, example_args=)`); "
        f"`explain`: {m['factored_targets']} targets factored, {m['materialized_targets']} materialised; "
        f"trainable {m['trainable']:,d} of {m['total']:,d}.",
        "",
        benchutil.table([_row("full", full, full), _row("factored", res["factored"], full)],
                        ["step", "GFLOP", "x full", "peak bytes", "x full", "argument", "output", "temp", "alias",
                         "compile s"]),
        "",
        benchutil.table(
            [["FLOPs, factored / full", f"{ratio:.3f}", f"<= {FLOPS_BOUND}", "met" if ratio <= FLOPS_BOUND else "NOT met"],
             ["peak compiled bytes, factored / full", f"{res['factored']['memory']['peak'] / full['memory']['peak']:.3f}",
              "(reported)", "-"]],
            ["bound (issue 10)", "measured", "bound", ""],
        ),
    ]
    if len(sweep) > 1:
        lines += [
            "",
            f"The same step at other sequence lengths, {tokens:,d} tokens per step each:",
            "",
            benchutil.table(sweep_rows, ["batch x seq", "full GFLOP", "factored GFLOP", "FLOPs x full",
                                         "peak bytes x full"]),
            "",
            "LoRA removes the weight gradients (a third of every weight matmul's cost: 2/3 is the ideal ratio), "
            "but not the attention products q·kᵀ and p·v, which multiply activations by activations and cost the "
            "same in both steps; their share grows with the sequence length, and so does the ratio. The factored "
            "step adds the rank-r branch products (under 1 % here) and nothing else.",
        ]
    lines += [
        "",
        "- peak compiled bytes = argument + output + temp - alias (`compiled.memory_analysis()`); most of the "
        "temp bytes are activations kept for the backward pass (both steps keep them; the logits alone are "
        f"{tokens:,d} x {cfg.vocab_size:,d} floats), the saving is in the arguments: gradients and AdamW state "
        "exist for A and B only.",
        f"- benchmark wall time: {wall:.0f} s (compiling the steps; no step is run).",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        intro = [
            "## NNX Qwen3 at 0.6B shape: factored LoRA train step vs full fine-tuning (issue 10)",
            "",
            "Deterministic costs from XLA (`cost_analysis()['flops']`, `memory_analysis()`), compiled from "
            "abstract arguments: nothing is allocated, so the shape of a real checkpoint costs no memory and the "
            "numbers do not depend on the machine's load.",
        ]
        command = "python benchmarks/nnx_qwen3_cost.py --write" + (" --tiny" if args.tiny else "")
        benchutil.write_section("nnx_qwen3_cost", "benchmarks/nnx_qwen3_cost.py", intro, command=command,
                                source=benchutil.provenance(), packages=("jax", "jaxlib", "flax", "optax"),
                                report=report)
    return 0 if ratio <= FLOPS_BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
