"""Benchmark for one NVIDIA GPU (H100/H200), one invocation of at most ~4 minutes:
LoRA train-step throughput of jlora against JAX full fine-tuning and PEFT on torch CUDA,
model FLOP utilisation, peak device memory, and ``jlora.merge`` bandwidth.

What runs (bfloat16 weights and activations, LoRA factors float32 as PEFT keeps them):

* **model**: a Llama-3.2-1B-shaped decoder (16 layers, d=2048, 32/8 heads of 64, SwiGLU
  8192, vocab 128256, tied embeddings, Llama-3 RoPE scaling), random init. The JAX model
  is ``jlora.models.Llama3`` (Flax NNX, the project's own decoder; einsum attention);
  the torch twin is ``transformers.LlamaForCausalLM`` (SDPA attention) with the same
  weights (``jlora.models.state_dict``), so the three steps start from the same loss.
* **steps** (batch 4 x 2048 tokens, causal-LM cross-entropy, AdamW, one jitted/eager step
  = forward + backward + update):
  ``jlora`` -- LoRA r=16, alpha=32, all-linear, ``jlora.lora(apply)``, trainable part only;
  ``full (JAX)`` -- full fine-tuning of the same NNX model, ``optax.adamw``;
  ``peft (torch)`` -- PEFT LoRA with the same config on the torch twin, ``torch.optim.AdamW``
  (eager, no ``torch.compile``).
* **reported**: tokens/s (median step time), MFU = model FLOPs / step time / 790 TFLOP/s
  (model FLOPs counted from the shapes: 2·params·tokens for the forward products, the same
  again for the backward to the activations, again for weight gradients where there are
  any, plus attention and the LoRA products; XLA's own ``cost_analysis`` count is also
  recorded for the JAX steps), peak device memory (JAX: ``memory_stats()`` peak and the
  compiled step's ``memory_analysis``; torch: ``max_memory_allocated``).
* **merge**: ``jax.jit(jlora.merge)`` of a Llama-2-7B-shaped layer stack (32 stacked layers
  of q, k, v, o 4096x4096 and gate, up 4096x11008, down 11008x4096, bfloat16, r=16), as
  GB/s of kernel bytes read + written, against the device's copy bandwidth (a jitted
  ``x + 1`` over 4 GiB).

Writes a JSON file (``--json``, default ``benchmarks/gpu.json``) and, with ``--write``, its
section of ``BENCHMARKS.md``. ``--tiny`` runs the same code on tiny shapes on any backend
(CPU: seconds) -- that is what CI runs (``tests/benchmarks/test_benchmark_gpu_tiny.py``).

Usage::

    python benchmarks/gpu.py --tiny --json /tmp/gpu_tiny.json   # CPU, seconds
    python benchmarks/gpu.py --write                            # on the GPU machine
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the device
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jlora  # noqa: E402
import jlora.models as jm  # noqa: E402

PEAK_TFLOPS = 790.0  # bf16 dense, the figure of the issue
LR, WEIGHT_DECAY = 1e-4, 0.01
RANK, ALPHA = 16, 32
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(tiny: bool) -> jm.DecoderConfig:
    common = dict(tie_embeddings=True, rms_norm_eps=1e-5, dtype="bfloat16", param_dtype="bfloat16")
    if tiny:
        return jm.DecoderConfig("llama3", 512, 64, 128, 2, 4, 2, 16, rope_theta=500_000.0, **common)
    rope = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
    return jm.DecoderConfig("llama3", 128256, 2048, 8192, 16, 32, 8, 64, rope_theta=500_000.0, rope_scaling=rope,
                            **common)


def merge_shape(tiny: bool) -> dict:
    if tiny:
        return dict(layers=2, d=64, ff=160)
    return dict(layers=32, d=4096, ff=11008)


def model_flops(cfg: jm.DecoderConfig, batch: int, seq: int, kind: str) -> float:
    """FLOPs of one train step counted from the shapes (products and attention)."""
    d, ff, L = cfg.embed_dim, cfg.hidden_dim, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]
    per_layer = sum(i * o for i, o in shapes)
    n_mm = L * per_layer + d * cfg.vocab_size  # + the (tied) output head
    tokens = batch * seq
    attn_fwd = L * 4 * seq * q  # per token: QKᵀ and PV over the full (unmasked) window
    fwd = 2 * n_mm + attn_fwd
    if kind == "full":
        return float(tokens * (3 * fwd))
    lora = L * sum(2 * RANK * (i + o) for i, o in shapes)  # per token, forward
    # forward, backward to the activations (no weight gradients), LoRA products x3
    return float(tokens * (2 * (2 * n_mm) + 3 * attn_fwd + 3 * lora))


def lm_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def time_steps(run, steps: int, warmup: int, deadline: Deadline) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for i in range(warmup + steps):
        if i >= warmup + 2 and deadline.left() < 5:
            break
        t0 = time.perf_counter()
        losses.append(run())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return losses, times


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``reps`` calls of ``fn`` (each waited for with ``block_until_ready``)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use") if k in stats}


def compiled_memory(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def run_jax(cfg, model, ids_np, args, deadline: Deadline) -> dict:
    from flax import nnx

    graphdef, state = nnx.split(model)
    ids = jnp.asarray(ids_np)

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEAR)
    lp = jlora.wrap(state, config, rng=jax.random.key(0), apply_fn=apply, example_args=(ids[:1, :8],))
    trainable, frozen = jlora.partition(lp)
    ltx = jlora.optimizer(optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    forward = jlora.lora(apply, on_materialize="error")

    def lora_step(st, frozen, x):
        t, opt = st
        loss, g = jax.value_and_grad(lambda t: lm_loss(forward(jlora.combine(t, frozen), x), x))(t)
        upd, opt = ltx.update(g, opt, t)
        return (optax.apply_updates(t, upd), opt), loss

    adamw = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def full_step(st, const, x):
        p, opt = st
        loss, g = jax.value_and_grad(lambda p: lm_loss(apply(p, x), x))(p)
        upd, opt = adamw.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), loss

    out = {}
    batch, seq = ids_np.shape
    plans = [
        ("jlora", lora_step, lambda: (trainable, ltx.init(trainable)), frozen, "lora"),
        ("full (JAX)", full_step, lambda: (jax.tree_util.tree_map(jnp.copy, state), adamw.init(state)), None, "full"),
    ]
    for name, fn, init, const, kind in plans:
        if deadline.left() < 30:
            out[name] = {"skipped": "time budget"}
            continue
        t0 = time.perf_counter()
        st = init()
        compiled = jax.jit(fn, donate_argnums=0).lower(st, const, ids).compile()
        compile_s = time.perf_counter() - t0
        holder = {"st": st}

        def run():
            holder["st"], loss = compiled(holder["st"], const, ids)
            return float(jax.block_until_ready(loss))

        losses, times = time_steps(run, args.steps, args.warmup, deadline)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
        med = statistics.median(times)
        flops = model_flops(cfg, batch, seq, kind)
        out[name] = {
            "step_ms": 1e3 * med, "step_ms_all": [1e3 * t for t in times], "tokens_per_s": batch * seq / med,
            "model_tflop": flops / 1e12, "xla_tflop": float(cost.get("flops", float("nan"))) / 1e12,
            "mfu": flops / med / (PEAK_TFLOPS * 1e12), "compile_s": compile_s, "losses": losses,
            "compiled_peak_bytes": compiled_memory(compiled), **jax_memory(),
        }
        holder.clear()
        gc.collect()
        print(f"# {name}: {1e3 * med:,.1f} ms/step, {batch * seq / med:,.0f} tokens/s, MFU "
              f"{out[name]['mfu']:.3f}, loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    n_train, n_total = jlora.count_parameters(lp)
    out.setdefault("jlora", {}).update(trainable_params=int(n_train), total_params=int(n_total))
    return out


def run_peft(cfg, model, ids_np, args, deadline: Deadline) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() and not args.tiny_cpu_torch else "cpu"
    if deadline.left() < 30:
        return {"skipped": "time budget"}
    hf = transformers.AutoConfig.for_model(**jm.hf_config_dict(cfg))
    torch.manual_seed(0)
    with torch.device(device):
        tm = transformers.LlamaForCausalLM(hf).to(torch.bfloat16)
    sd = {k: torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16) for k, v in jm.state_dict(model).items()}
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    del sd
    pm = get_peft_model(tm, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LINEAR, lora_dropout=0.0))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=WEIGHT_DECAY)
    ids = torch.from_numpy(np.asarray(ids_np, np.int64)).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        opt.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    losses, times = time_steps(run, args.steps, args.warmup, deadline)
    batch, seq = ids_np.shape
    med = statistics.median(times)
    flops = model_flops(cfg, batch, seq, "lora")
    n_train, n_total = pm.get_nb_trainable_parameters()
    out = {
        "step_ms": 1e3 * med, "step_ms_all": [1e3 * t for t in times], "tokens_per_s": batch * seq / med,
        "model_tflop": flops / 1e12, "mfu": flops / med / (PEAK_TFLOPS * 1e12), "losses": losses,
        "device": device, "trainable_params": int(n_train), "total_params": int(n_total),
        "missing_keys": [k for k in missing if "lm_head" not in k], "unexpected_keys": list(unexpected),
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if device == "cuda" else -1,
    }
    print(f"# peft (torch, {device}): {1e3 * med:,.1f} ms/step, {batch * seq / med:,.0f} tokens/s, MFU {out['mfu']:.3f}, "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
    pm = tm = opt = None  # noqa: F841  (free the device memory before the JAX steps)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def run_merge(args, deadline: Deadline) -> dict:
    if deadline.left() < 20:
        return {"skipped": "time budget"}
    s = merge_shape(args.tiny)
    L, d, ff = s["layers"], s["d"], s["ff"]
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    keys = jax.random.split(jax.random.key(3), len(shapes))
    make = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, (L, *shape), jnp.float32)).astype(jnp.bfloat16),
                   static_argnums=1)
    tree = {"layers": {n: {"kernel": make(k, sh)} for k, (n, sh) in zip(keys, shapes.items())}}
    config = jlora.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(shapes), init_lora_weights=False)
    lp = jlora.wrap(tree, config, rng=jax.random.key(4), layouts={".*": ("stack", "in", "out")})
    kernel_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
    merge = jax.jit(jlora.merge)
    merged = jax.block_until_ready(merge(lp))
    # correctness of one kernel against W + s·A·B formed here
    lw = lp["layers"]["down_proj"]["kernel"]
    ref = (lw.w[0].astype(jnp.float32) + lw.scale * (lw.a[0].astype(jnp.float32) @ lw.b[0].astype(jnp.float32)))
    err = float(jnp.max(jnp.abs(merged["layers"]["down_proj"]["kernel"][0].astype(jnp.float32) - ref)))
    del merged
    med = median_seconds(lambda: merge(lp), args.merge_reps)
    # the device's copy bandwidth: x + 1 over a large bf16 array (read + write)
    n = (2**31 if not args.tiny else 2**20)
    x = jnp.zeros((n,), jnp.bfloat16)
    bump = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))
    jax.block_until_ready(bump(x))
    cmed = median_seconds(lambda: bump(x), args.merge_reps)
    copy_gbs = 2 * n * 2 / cmed / 1e9
    merge_gbs = 2 * kernel_bytes / med / 1e9
    out = {
        "shape": s, "kernel_gb": kernel_bytes / 1e9, "merge_ms": 1e3 * med, "merge_gb_per_s": merge_gbs,
        "copy_gb_per_s": copy_gbs, "merge_over_copy": merge_gbs / copy_gbs, "max_abs_error_vs_reference": err,
        "reference_max_abs": float(jnp.max(jnp.abs(ref))),
    }
    print(f"# merge: {kernel_bytes / 1e9:.2f} GB of kernels in {1e3 * med:,.2f} ms = {merge_gbs:,.0f} GB/s; "
          f"copy {copy_gbs:,.0f} GB/s ({out['merge_over_copy']:.2f} of it); error {err:.2e}", flush=True)
    return out


def section(res: dict) -> str:
    from benchutil import table

    rows = []
    steps = res["steps"]
    for name in ("jlora", "full (JAX)", "peft (torch)"):
        r = steps.get(name, {})
        if "step_ms" not in r:
            rows.append([name] + ["skipped"] * 6)
            continue
        peak = r.get("peak_bytes", r.get("peak_bytes_in_use", -1))
        rows.append([name, f"{r['step_ms']:,.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['model_tflop']:,.1f}",
                     f"{100 * r['mfu']:.1f}%", f"{peak / 2**30:,.1f} GiB" if peak and peak > 0 else "-",
                     f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"])
    main = table(rows, ["step", "ms (median)", "tokens/s", "model TFLOP/step", f"MFU (of {PEAK_TFLOPS:.0f} TFLOP/s)",
                        "peak device memory", "loss"])
    m = res["merge"]
    merge_line = ("- merge: skipped" if "merge_ms" not in m else
                  f"- `jlora.merge` of a {m['shape']['layers']}-layer 7B-shaped stack ({m['kernel_gb']:.1f} GB of "
                  f"bfloat16 kernels, r={RANK}): {m['merge_ms']:,.1f} ms = {m['merge_gb_per_s']:,.0f} GB/s read + "
                  f"written, {m['merge_over_copy']:.2f}x the device's copy bandwidth ({m['copy_gb_per_s']:,.0f} GB/s, "
                  f"jitted x + 1); max error vs W + s·A·B {m['max_abs_error_vs_reference']:.1e}")
    j = steps.get("jlora", {})
    extra = []
    if "step_ms" in j and "step_ms" in steps.get("peft (torch)", {}):
        extra.append(f"- jlora / PEFT step time: {j['step_ms'] / steps['peft (torch)']['step_ms']:.3f}")
    if "step_ms" in j and "step_ms" in steps.get("full (JAX)", {}):
        extra.append(f"- jlora / full fine-tuning (JAX) step time: {j['step_ms'] / steps['full (JAX)']['step_ms']:.3f}")
    return "\n".join([
        f"Setting: {res['setting']}",
        "",
        main,
        "",
        *extra,
        merge_line,
        f"- device: {res['device']}; jax {res['versions'].get('jax')}, torch {res['versions'].get('torch')}; "
        f"wall time {res['wall_s']:.0f} s",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on whatever backend (CI, CPU: seconds)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per implementation (default 10; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    ap.add_argument("--merge-reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds (default 225; none with --tiny); later phases are skipped past it")
    ap.add_argument("--json", default=os.path.join(HERE, "gpu.json"), help="where to write the results")
    ap.add_argument("--no-torch", action="store_true", help="skip PEFT")
    ap.add_argument("--write", action="store_true", help="also write the section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    args.tiny_cpu_torch = args.tiny
    if args.steps is None:
        args.steps = 2 if args.tiny else 10
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.write and args.tiny:
        ap.error("--write records the GPU run only; drop --tiny")
    t_start = time.perf_counter()
    deadline = Deadline(args.budget if args.budget is not None else 1e9 if args.tiny else 225.0)
    device = jax.devices()[0]
    if not args.tiny and device.platform != "gpu":
        print(f"# warning: running the full shapes on {device.platform}", file=sys.stderr)
    cfg = model_config(args.tiny)
    batch, seq = (2, 32) if args.tiny else (4, 2048)
    ids_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    model = jm.build(cfg, seed=0)
    # torch first: it returns its cache to the driver afterwards, while JAX's allocator keeps what it grew to
    peft = {"skipped": "--no-torch"} if args.no_torch else run_peft(cfg, model, ids_np, args, deadline)
    steps = run_jax(cfg, model, ids_np, args, deadline)
    steps["peft (torch)"] = peft
    del model
    gc.collect()
    merge = run_merge(args, deadline)
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    res = {
        "setting": (f"Llama-3.2-1B shape ({cfg.num_layers} layers, d={cfg.embed_dim}, {cfg.num_heads}/"
                    f"{cfg.num_kv_heads} heads, SwiGLU {cfg.hidden_dim}, vocab {cfg.vocab_size}, tied), bfloat16, "
                    f"batch {batch} x {seq}, LoRA r={RANK}, alpha={ALPHA}, all-linear, AdamW" + (" [tiny]" if args.tiny else "")),
        "device": f"{device.platform}: {getattr(device, 'device_kind', '?')}",
        "tiny": args.tiny, "steps": steps, "merge": merge, "versions": versions,
        "peak_tflops": PEAK_TFLOPS, "wall_s": time.perf_counter() - t_start,
    }
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"# wrote {args.json}")
    text = section(res)
    print()
    print(text)
    if args.write:
        from benchutil import provenance, write_section

        command = "python benchmarks/gpu.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        intro = [
            "## GPU: LoRA train step throughput, MFU, memory and merge bandwidth (one NVIDIA GPU)",
            "",
            "Issue 14, `benchmarks/gpu.py` (one invocation, at most ~4 minutes). jlora on the project's NNX "
            "Llama 3 (`jlora.models`) against JAX full fine-tuning of the same model and PEFT on the torch twin with "
            "the same weights; MFU against 790 TFLOP/s bf16.",
        ]
        write_section("gpu", "benchmarks/gpu.py", intro, command=command, source=provenance(),
                      packages=("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers"), report=text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
