"""A small deterministic LoRA training setup shared by test_checkpoint.py and the fresh
process it starts (``python -c "from support import checkpoint_helpers; checkpoint_helpers.resume(...)"``).

Plain numpy parameters, no Flax init: fast to build in a new process.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora


def base_params() -> dict:
    rng = np.random.default_rng(0)
    f = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {
        "embed": {"embedding": f(50, 8)},
        "block": {
            "query": {"kernel": f(8, 2, 4), "bias": f(2, 4)},  # DenseGeneral (in, heads, head_dim)
            "out": {"kernel": f(2, 4, 8), "bias": f(8)},  # DenseGeneral (heads, head_dim, out)
            "norm": {"scale": f(8)},
        },
        "head": {"kernel": f(8, 5), "bias": f(5)},
    }


CONFIG = jlora.LoraConfig(
    r=3, lora_alpha=6, target_modules=["embed", "query", "out", "head"], bias="all",
    rank_pattern={"head": 2}, alpha_pattern={"out": 4},
)


def apply(p: dict, ids: jax.Array) -> jax.Array:
    x = jnp.take(p["embed"]["embedding"], ids, axis=0)
    q = jnp.einsum("bd,dhk->bhk", x, p["block"]["query"]["kernel"]) + p["block"]["query"]["bias"]
    o = jnp.einsum("bhk,hkd->bd", jnp.tanh(q), p["block"]["out"]["kernel"]) + p["block"]["out"]["bias"]
    x = (x + o) * p["block"]["norm"]["scale"]
    return x @ p["head"]["kernel"] + p["head"]["bias"]


TX = jlora.optimizer(optax.adam(1e-2))
_FORWARD = jlora.lora(apply)


def batch(step: int):
    k1, k2 = jax.random.split(jax.random.key(1000 + step))
    return jax.random.randint(k1, (16,), 0, 50), jax.random.normal(k2, (16, 5))


@jax.jit
def train_step(lp, state, ids, y):
    def loss_fn(lp):
        return jnp.mean((_FORWARD(lp, ids) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(lp)
    updates, state = TX.update(grads, state, lp)
    return optax.apply_updates(lp, updates), state, loss


def initial():
    lp = jlora.wrap(base_params(), CONFIG, rng=jax.random.key(0))
    return lp, TX.init(lp)


def numpy_lora(seed: int):
    """A LoRA tree over ``base_params()`` built without running any JAX op (fast in a
    fresh process): wrap traced abstractly, factors filled with numpy."""
    base = base_params()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    alp = jlora.wrap(abstract, CONFIG)
    rng = np.random.default_rng(seed)
    flat_base = jax.tree_util.tree_leaves(base)
    is_node = lambda x: isinstance(x, (jlora.LoraWeight, jlora.Trainable))  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(alp, is_leaf=is_node)
    out = []
    for x, w in zip(leaves, flat_base):
        if isinstance(x, jlora.LoraWeight):
            x = x.replace(w=w, a=rng.standard_normal(x.a.shape).astype(np.float32),
                          b=rng.standard_normal(x.b.shape).astype(np.float32))
        elif isinstance(x, jlora.Trainable):
            x = jlora.Trainable(w + np.float32(1))
        else:
            x = w
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def run(lp, state, start: int, stop: int):
    for step in range(start, stop):
        ids, y = batch(step)
        lp, state, _ = train_step(lp, state, ids, y)
    return lp, state


def trained_arrays(lp, state) -> dict:
    """A, B, Trainable values and every optimizer-state array, by key path."""
    trainable, _ = jlora.partition(lp)
    out = {}
    for name, tree in (("lp", trainable), ("opt", state)):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[name + jax.tree_util.keystr(path)] = np.asarray(x)
    return out


def resume(directory: str, out_file: str) -> None:
    """In a fresh process: restore the latest step, train to step 10, write the arrays."""
    import orbax.checkpoint as ocp

    from jlora.io import AdapterRestore

    params = base_params()
    lp_shape, _ = initial()
    mngr = ocp.CheckpointManager(directory)
    step = mngr.latest_step()
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            adapter=AdapterRestore(params),
            opt_state=ocp.args.StandardRestore(jax.eval_shape(TX.init, lp_shape)),
        ),
    )
    lp, state = run(restored.adapter, restored.opt_state, step, 10)
    arrays = trained_arrays(lp, state)
    arrays["__step__"] = np.asarray(step)
    np.savez(out_file, **arrays)


if __name__ == "__main__":  # pragma: no cover
    resume(sys.argv[1], sys.argv[2])
