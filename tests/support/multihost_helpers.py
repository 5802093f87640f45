"""The worker that tests/test_multiprocess.py starts twice (one process per "host"):
FSDP × TP training of examples/multihost.py's small Llama-shaped model (plain JAX, no
transformers import: a process starts in about a second; Hugging Face Flax Llama's
parameter paths, so PEFT files get Llama's PyTorch names) on a ('data', 'model') mesh,
then every save and load API from both processes.

    python tests/support/multihost_helpers.py PROCESS_ID PORT WORKDIR   # what the test runs
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

def _example():
    """examples/multihost.py as a module (by file: examples/ stays off sys.path)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "multihost.py")
    if "jlora_example_multihost" not in sys.modules:
        spec = importlib.util.spec_from_file_location("jlora_example_multihost", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["jlora_example_multihost"]


EX = _example()  # the example's model

DIMS = EX.SMOKE
TARGETS = EX.TARGETS
STEPS = 4


def config():
    import jlora

    return jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def base_params(seed: int = 0) -> dict:
    """The same numpy parameters in every process."""
    return EX.base_params(DIMS, seed)


apply = EX.make_apply(DIMS)
make_mesh = EX.make_mesh
place = EX.place_on


def batch(step: int) -> np.ndarray:
    """Training tokens (the same batch every step: the loss must fall)."""
    return np.random.default_rng(100).integers(0, DIMS.vocab, (DIMS.batch, DIMS.seq + 1)).astype(np.int32)


def make_train_step(tx, shardings=None):
    """The jitted step; ``shardings`` (of ``(lp, state)``) keeps its outputs where its
    inputs are, so later steps reuse the first compilation."""
    import optax

    import jlora

    forward = jlora.lora(apply)

    def loss_fn(lp, tokens):
        logits = forward(lp, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(lp, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(lp, tokens)
        updates, state = tx.update(grads, state, lp)
        return optax.apply_updates(lp, updates), state, loss

    out = None if shardings is None else (*shardings, None)
    return jax.jit(step, out_shardings=out)


def optimizer():
    import optax

    import jlora

    return jlora.optimizer(optax.adam(1e-2))


def numpy_lora(seed: int) -> Any:
    """A LoRA tree over ``base_params()`` with random numpy factors (no mesh)."""
    import jlora

    lp = jlora.wrap(base_params(), config(), rng=jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: x.replace(a=rng.standard_normal(x.a.shape).astype(np.float32),
                            b=rng.standard_normal(x.b.shape).astype(np.float32))
        if isinstance(x, jlora.LoraWeight) else x,
        lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight),
    )


def factors(lp) -> dict[str, np.ndarray]:
    """Every A and B by path (gathered whole on this process)."""
    import jlora
    from jlora.io.distributed import to_host

    out = {}
    for path, x in jlora.lora_leaves(lp):
        out[path + "/a"], out[path + "/b"] = to_host(x.a), to_host(x.b)
    return out


# --------------------------------------------------------------------------------------
# The worker


def _same_global(x, y, what: str) -> None:
    """Same sharding and bit-identical shards on this process."""
    assert x.shape == y.shape and x.dtype == y.dtype, (what, x.shape, y.shape, x.dtype, y.dtype)
    assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (what, x.sharding, y.sharding)
    for sx, sy in zip(x.addressable_shards, y.addressable_shards):
        assert sx.index == sy.index and np.array_equal(np.asarray(sx.data), np.asarray(sy.data)), what


def _same_lora(lp1, lp2, what: str) -> None:
    import jlora

    l1, l2 = jlora.lora_leaves(lp1), jlora.lora_leaves(lp2)
    assert [p for p, _ in l1] == [p for p, _ in l2], what
    for (path, x), (_, y) in zip(l1, l2):
        assert x.scale == y.scale and x.layout == y.layout, (what, path)
        _same_global(x.a, y.a, f"{what}: {path} A")
        _same_global(x.b, y.b, f"{what}: {path} B")


def _matches_numpy(lp, ref, what: str) -> None:
    """Each addressable shard of lp's factors equals that slice of the numpy tree ``ref``."""
    import jlora

    for (path, x), (_, y) in zip(jlora.lora_leaves(lp), jlora.lora_leaves(ref)):
        for arr, want in ((x.a, y.a), (x.b, y.b)):
            assert not arr.is_fully_addressable, (what, path, "not on the global mesh")
            for s in arr.addressable_shards:
                assert np.array_equal(np.asarray(s.data), np.asarray(want)[s.index]), (what, path)


def worker(pid: int, port: int, work: str) -> None:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    import orbax.checkpoint as ocp

    import jlora
    from jlora import cli
    from jlora.io import AdapterRestore, AdapterSave

    t: dict[str, float] = {}
    mesh = make_mesh()
    cfg, tx = config(), optimizer()
    params = place(base_params(), mesh)
    lp = jlora.wrap(params, cfg, rng=jax.random.key(0))
    state = jax.jit(tx.init)(lp)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # optax's step counter is a constant: put it on the mesh with everything else
    state = jax.tree_util.tree_map(
        lambda x: x if not x.is_fully_addressable else jlora.io.distributed.place(np.asarray(x), replicated), state)
    step = make_train_step(tx, jax.tree_util.tree_map(lambda x: x.sharding, (lp, state)))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    losses, step_times = [], []
    for i in range(STEPS):
        tokens = jlora.io.distributed.place(batch(i), data)
        t0 = time.perf_counter()
        lp, state, loss = step(lp, state, tokens)
        losses.append(float(np.asarray(loss.addressable_data(0))))
        step_times.append(time.perf_counter() - t0)
    t["first_step_with_compile_s"] = step_times[0]
    t["train_step_s"] = float(np.median(step_times[1:]))

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        t[name] = time.perf_counter() - t0
        return out

    # every API, called by every process
    timed("save_s", lambda: jlora.save(f"{work}/orbax", lp, config=cfg))
    back = timed("load_s", lambda: jlora.load(f"{work}/orbax", params))
    _same_lora(back, lp, "jlora.load")
    timed("save_again_s", lambda: jlora.save(f"{work}/orbax", lp, config=cfg))  # replaces the first
    timed("load_again_s", lambda: jlora.load(f"{work}/orbax", params))

    mngr = ocp.CheckpointManager(f"{work}/mngr")
    timed("manager_save_s", lambda: (mngr.save(STEPS, args=ocp.args.Composite(
        adapter=AdapterSave(lp, cfg), opt_state=ocp.args.StandardSave(state))), mngr.wait_until_finished()))
    abstract_state = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    restored = timed("manager_restore_s", lambda: mngr.restore(STEPS, args=ocp.args.Composite(
        adapter=AdapterRestore(params), opt_state=ocp.args.StandardRestore(abstract_state))))
    _same_lora(restored.adapter, lp, "CheckpointManager restore")
    for x, y in zip(jax.tree_util.tree_leaves(restored.opt_state), jax.tree_util.tree_leaves(state)):
        _same_global(x, y, "opt_state")
    mngr.close()

    timed("save_peft_s", lambda: jlora.save_peft(f"{work}/peft", lp, config=cfg))
    back = timed("load_peft_s", lambda: jlora.load_peft(f"{work}/peft", params))
    _same_lora(back, lp, "jlora.load_peft")
    two = jlora.load_adapter(back, f"{work}/orbax", "second")
    assert jlora.adapter_names(two) == ["default", "second"]
    second = jlora.get_adapter(two, "second")
    _same_lora(second, lp, "jlora.load_adapter")

    # the CLI's functions on every process: Orbax -> PEFT -> Orbax
    cli.convert(f"{work}/orbax", f"{work}/cli_peft")
    cli.convert(f"{work}/cli_peft", f"{work}/cli_orbax")
    _same_lora(jlora.load(f"{work}/cli_orbax", params), lp, "CLI round trip")

    # a checkpoint written by one process (the test, before starting us) onto the mesh
    _matches_numpy(jlora.load(f"{work}/single", params), numpy_lora(5), "single-process checkpoint")
    _matches_numpy(jlora.load_peft(f"{work}/single_peft", params), numpy_lora(5), "single-process PEFT")

    placement = {}
    q = dict(jlora.lora_leaves(lp))["model/layers/0/self_attn/q_proj/kernel"]
    for name, arr in (("W", q.w), ("A", q.a), ("B", q.b)):
        spec = list(arr.sharding.spec) + [None] * (arr.ndim - len(arr.sharding.spec))
        placement[name] = {"spec": spec, "shape": list(arr.shape),
                           "local": [[str(s.device), str(s.index)] for s in arr.addressable_shards]}
    if pid == 0:
        np.savez(f"{work}/trained.npz", **factors(lp))
    else:
        factors(lp)  # the gather is a collective
    with open(f"{work}/result_{pid}.json", "w") as f:
        json.dump({"losses": losses, "timings": t, "placement": placement}, f)
    jlora.io.distributed.barrier("results_written")

    # a save killed in the middle: process 1 dies once its shards are written, before the
    # primary may commit; the previous checkpoint must stay in place
    if pid == 1:
        real = ocp.StandardCheckpointHandler.save

        def save_then_die(self, *args, **kwargs):
            real(self, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        ocp.StandardCheckpointHandler.save = save_then_die
    changed = jax.tree_util.tree_map(
        lambda x: x.replace(a=x.a + 1.0) if isinstance(x, jlora.LoraWeight) else x,
        lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight),
    )
    with open(f"{work}/kill_started_{pid}", "w"):
        pass
    jlora.save(f"{work}/orbax", changed, config=cfg)
    with open(f"{work}/kill_phase_survived_{pid}", "w"):  # must not happen
        pass


if __name__ == "__main__":  # pragma: no cover
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
