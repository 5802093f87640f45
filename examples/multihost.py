"""LoRA on JAX's multi-process runtime: one process per host, one global mesh, FSDP × TP,
and checkpoints written by every process together.

Every process runs this same script. Each one calls ``jax.distributed.initialize``, builds
the same global ``('data', 'model')`` mesh (``'model'`` over the devices of one host,
``'data'`` across hosts), places the base weights on it (column-parallel kernels split
``(in: 'data', out: 'model')``, row-parallel ones the other way round), and then calls
``jlora.wrap``, the jitted train step, ``jlora.save`` / ``jlora.save_peft`` /
``CheckpointManager.save`` and ``jlora.load`` exactly as on one machine: every process
calls every function. ``jlora.wrap`` creates each factor where its kernel lives, Orbax
writes each process's shards, and the primary process writes the metadata and the PEFT
files.

On this machine (starts N processes with two CPU devices each, on localhost)::

    python examples/multihost.py --local-processes 2
    python examples/multihost.py --local-processes 2 --smoke      # CI

On a cluster, on every host (the output directory must be on storage all hosts share)::

    python examples/multihost.py --coordinator HOST0:1234 --num-processes 4 --process-id I --out /shared/run
    # or: JAX_COORDINATOR_ADDRESS=HOST0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=I python examples/multihost.py ...
    # on Cloud TPU pods and SLURM, give neither: jax.distributed.initialize() finds them

The model is a small Llama-shaped decoder in plain JAX (embedding, RMSNorm, grouped-query
attention q/k/v/o_proj, SwiGLU gate/up/down_proj, lm_head) with Hugging Face Flax Llama's
parameter paths, so the PEFT adapter it writes has Llama's PyTorch names.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dims:
    vocab: int = 64
    d: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    ffn: int = 64
    layers: int = 2
    seq: int = 8
    batch: int = 4


SMOKE = Dims()
FULL = Dims(vocab=256, d=128, heads=8, kv_heads=4, head_dim=16, ffn=256, layers=4, seq=32, batch=16)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------
# The model (plain JAX, Hugging Face Flax Llama's parameter paths)


def base_params(dims: Dims, seed: int = 0) -> dict:
    """Random base weights, the same numpy arrays on every process (same seed)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    ones = lambda: np.ones(dims.d, np.float32)  # noqa: E731
    layers = {}
    for i in range(dims.layers):
        layers[str(i)] = {
            "self_attn": {
                "q_proj": {"kernel": f(dims.d, dims.heads * dims.head_dim)},
                "k_proj": {"kernel": f(dims.d, dims.kv_heads * dims.head_dim)},
                "v_proj": {"kernel": f(dims.d, dims.kv_heads * dims.head_dim)},
                "o_proj": {"kernel": f(dims.heads * dims.head_dim, dims.d)},
            },
            "mlp": {"gate_proj": {"kernel": f(dims.d, dims.ffn)}, "up_proj": {"kernel": f(dims.d, dims.ffn)},
                    "down_proj": {"kernel": f(dims.ffn, dims.d)}},
            "input_layernorm": {"weight": ones()},
            "post_attention_layernorm": {"weight": ones()},
        }
    return {"model": {"embed_tokens": {"embedding": f(dims.vocab, dims.d)}, "layers": layers,
                      "norm": {"weight": ones()}},
            "lm_head": {"kernel": f(dims.d, dims.vocab)}}


def _rms(x, w):
    import jax
    import jax.numpy as jnp

    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def make_apply(dims: Dims):
    import jax
    import jax.numpy as jnp

    def apply(p: dict, ids):
        x = p["model"]["embed_tokens"]["embedding"][ids]
        b, t = ids.shape
        mask = jnp.tril(jnp.ones((t, t), bool))
        for i in range(dims.layers):
            lay = p["model"]["layers"][str(i)]
            at, mlp = lay["self_attn"], lay["mlp"]
            h = _rms(x, lay["input_layernorm"]["weight"])
            q = (h @ at["q_proj"]["kernel"]).reshape(b, t, dims.heads, dims.head_dim)
            k = (h @ at["k_proj"]["kernel"]).reshape(b, t, dims.kv_heads, dims.head_dim)
            v = (h @ at["v_proj"]["kernel"]).reshape(b, t, dims.kv_heads, dims.head_dim)
            rep = dims.heads // dims.kv_heads
            k, v = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dims.head_dim)
            a = jax.nn.softmax(jnp.where(mask, s, -1e9), -1)
            o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, dims.heads * dims.head_dim)
            x = x + o @ at["o_proj"]["kernel"]
            h = _rms(x, lay["post_attention_layernorm"]["weight"])
            x = x + (jax.nn.silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
        return _rms(x, p["model"]["norm"]["weight"]) @ p["lm_head"]["kernel"]

    return apply


def partition_spec(path: str, ndim: int):
    """FSDP × TP: column-parallel kernels (in, out) are split (in: 'data', out: 'model'),
    row-parallel ones (o_proj, down_proj) ('model', 'data'); norms are replicated."""
    from jax.sharding import PartitionSpec as P

    if ndim < 2:
        return P()
    if "o_proj" in path or "down_proj" in path:
        return P("model", "data")
    if "embed_tokens" in path:
        return P(None, "model")
    return P("data", "model")


def make_mesh(model_axis: int | None = None):
    """('data', 'model'): 'model' over one host's devices, 'data' across hosts."""
    import jax

    model_axis = model_axis or jax.local_device_count()
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((jax.device_count() // model_axis, model_axis), ("data", "model"), axis_types=(auto, auto))


def place_on(params: dict, mesh) -> dict:
    """Every process holds the whole numpy value; each builds only its own shards."""
    import jax

    from jlora.io.distributed import place

    def one(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return place(x, jax.sharding.NamedSharding(mesh, partition_spec(name, np.ndim(x))))

    return jax.tree_util.tree_map_with_path(one, params)


def tokens(dims: Dims, n_batches: int = 4) -> np.ndarray:
    """A small fixed "corpus" (each row a shifted arithmetic sequence): the loss falls."""
    rng = np.random.default_rng(1)
    start = rng.integers(0, dims.vocab, (n_batches, dims.batch, 1))
    stride = rng.integers(1, 4, (n_batches, dims.batch, 1))
    return ((start + stride * np.arange(dims.seq + 1)) % dims.vocab).astype(np.int32)


# --------------------------------------------------------------------------------------
# One process


def _where(arr) -> str:
    """This process's shards of ``arr``: device and index."""
    def idx(s):
        return "[" + ", ".join(f"{sl.start or 0}:{sl.stop if sl.stop is not None else n}"
                               for sl, n in zip(s.index, arr.shape)) + "]"

    return "  ".join(f"{s.device}{idx(s)}" for s in arr.addressable_shards)


def run(args) -> None:
    import jax

    if args.coordinator or args.num_processes is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()  # Cloud TPU, SLURM, ...: found from the environment

    import optax
    import orbax.checkpoint as ocp

    import jlora
    from jlora.io import AdapterRestore, AdapterSave
    from jlora.io.distributed import place

    pid = jax.process_index()

    def say(text: str) -> None:  # one write per line: the processes share the terminal
        sys.stdout.write(f"[process {pid}] {text}\n")
        sys.stdout.flush()

    dims = SMOKE if args.smoke else FULL
    steps = args.steps or (3 if args.smoke else 200)
    mesh = make_mesh()
    P = jax.sharding.PartitionSpec
    if pid == 0:
        say(f"{jax.process_count()} processes x {jax.local_device_count()} devices; mesh {dict(mesh.shape)}:")
        for i, row in enumerate(mesh.devices):
            say(f"  data={i}: " + "  ".join(f"model={j}: {d} (process {d.process_index})" for j, d in enumerate(row)))

    params = place_on(base_params(dims), mesh)
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    lp = jlora.wrap(params, config, rng=jax.random.key(0))
    tx = jlora.optimizer(optax.adam(3e-3))
    replicated = jax.sharding.NamedSharding(mesh, P())
    state = jax.tree_util.tree_map(  # optax's step counter onto the mesh too
        lambda x: x if not x.is_fully_addressable else place(np.asarray(x), replicated), jax.jit(tx.init)(lp))
    q = dict(jlora.lora_leaves(lp))["model/layers/0/self_attn/q_proj/kernel"]
    say(f"q_proj of layer 0: W {q.w.shape} {q.w.sharding.spec}, A {q.a.shape} {q.a.sharding.spec}, "
        f"B {q.b.shape} {q.b.sharding.spec}")
    say(f"  W on {_where(q.w)}")
    say(f"  A on {_where(q.a)}")
    say(f"  B on {_where(q.b)}")

    forward = jlora.lora(make_apply(dims))

    def loss_fn(lp, batch):
        logits = forward(lp, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def step(lp, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lp, batch)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, loss

    shardings = jax.tree_util.tree_map(lambda x: x.sharding, (lp, state))
    train_step = jax.jit(step, out_shardings=(*shardings, replicated))
    data = tokens(dims)
    batch_sharding = jax.sharding.NamedSharding(mesh, P("data", None))
    t0 = time.perf_counter()
    for i in range(steps):
        lp, state, loss = train_step(lp, state, place(data[i % len(data)], batch_sharding))
        if i in (0, steps - 1) or (i + 1) % 50 == 0:
            say(f"step {i + 1:4d}  loss {float(np.asarray(loss.addressable_data(0))):.4f}")
    say(f"{steps} steps in {time.perf_counter() - t0:.1f} s")

    # Checkpoints: every process calls every function.
    out = os.path.abspath(args.out)
    jlora.save(f"{out}/adapter", lp, config=config)                       # Orbax, each process its shards
    jlora.save_peft(f"{out}/peft", lp, config=config)                     # gathered; the primary writes
    mngr = ocp.CheckpointManager(f"{out}/ckpt")
    mngr.save(steps, args=ocp.args.Composite(adapter=AdapterSave(lp, config), opt_state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    back = jlora.load(f"{out}/adapter", params)                           # onto the mesh: each process its shards
    restored = mngr.restore(steps, args=ocp.args.Composite(
        adapter=AdapterRestore(params),
        opt_state=ocp.args.StandardRestore(jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state))))
    mngr.close()
    for tree in (back, restored.adapter):
        for (path, x), (_, y) in zip(jlora.lora_leaves(tree), jlora.lora_leaves(lp)):
            for u, v in ((x.a, y.a), (x.b, y.b)):
                assert u.sharding.is_equivalent_to(v.sharding, u.ndim), path
                assert all(np.array_equal(np.asarray(s.data), np.asarray(t.data))
                           for s, t in zip(u.addressable_shards, v.addressable_shards)), path
    say("reloaded: every shard of A and B bit-identical, on the same devices")
    if pid == 0:
        say(f"Orbax adapter:      {out}/adapter   (jlora.load(path, params))")
        say(f"PEFT adapter:       {out}/peft      (PeftModel.from_pretrained(model, path))")
        say(f"CheckpointManager:  {out}/ckpt/{steps}")


# --------------------------------------------------------------------------------------
# --local-processes: start the processes on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_local(args) -> int:
    """Starts ``args.local_processes`` copies of this script on localhost (two CPU devices
    each) and waits for all; if one fails or the time runs out, stops the others."""
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="jlora-multihost-"))
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip())
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(here), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, os.path.abspath(__file__), "--coordinator", f"localhost:{port}",
           "--num-processes", str(args.local_processes), "--out", out]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--steps", str(args.steps)] if args.steps else []
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env) for i in range(args.local_processes)]
    deadline = time.monotonic() + args.timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        print(f"processes exited with {codes}" + (" (timed out)" if time.monotonic() > deadline else ""),
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local-processes", type=int, help="start this many processes on this machine")
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        help="HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)")
    parser.add_argument("--num-processes", type=int,
                        default=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
                        help="number of processes (env JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int,
                        default=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
                        help="this process's index, 0 .. N-1 (env JAX_PROCESS_ID)")
    parser.add_argument("--out", help="checkpoint directory, shared by all hosts (default: a temporary one)")
    parser.add_argument("--steps", type=int, help="training steps (default 200, --smoke 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps (CI)")
    parser.add_argument("--timeout", type=float, default=600, help="--local-processes: seconds before giving up")
    args = parser.parse_args(argv)
    if args.local_processes:
        return launch_local(args)
    if args.out is None:
        parser.error("--out is required (a directory every process can reach)")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
