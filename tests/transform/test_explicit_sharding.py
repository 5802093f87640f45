"""jlora under a mesh with ``Explicit`` axes (``jax.sharding.AxisType.Explicit``), where
shardings are part of the types and a model names its ``out_sharding``.

A tensor-parallel MLP (up-projection column-parallel, down-projection row-parallel with
``out_sharding``), then the same behind an embedding looked up with
``.at[ids].get(out_sharding=)`` (an ``auto_axes`` region in the jaxpr), a mixed batch of
two adapters and the base, and LoRA dropout, on a 2 x 2 CPU mesh, in a fresh process (the device count must be set
before JAX is imported). References: the merged model (forward, and gradients through
``W + s·A·B``) on the same mesh, and the plain model's output sharding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_BODY = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jlora

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def model(p, x):
        h = jax.nn.gelu(jnp.einsum("bi,io->bo", x, p["up"]["kernel"]) + p["up"]["bias"])
        return jnp.einsum("bi,io->bo", h, p["down"]["kernel"], out_sharding=P("data", None))

    def rel(x, ref):
        x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
        return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))

    out = {}
    with jax.set_mesh(mesh):
        k = jax.random.split(jax.random.key(0), 4)
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        params = {
            "up": {"kernel": put(jax.random.normal(k[0], (8, 16)) / 3, P(None, "model")),
                   "bias": put(jnp.zeros(16), P("model"))},
            "down": {"kernel": put(jax.random.normal(k[1], (16, 8)) / 4, P("model", None))},
        }
        x = put(jax.random.normal(k[2], (8, 8)), P("data", None))
        plain = jax.jit(model)(params, x)

        config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
        lp = jlora.wrap(params, config, rng=k[3])
        forward = jlora.lora(model, on_materialize="error")
        y = jax.jit(forward)(lp, x)
        y_merged = jax.jit(model)(jax.jit(jlora.merge)(lp), x)
        out["forward_rel"] = rel(y, y_merged)
        out["out_spec"] = str(y.sharding.spec)
        out["plain_spec"] = str(plain.sharding.spec)

        def with_factors(ab):
            return {
                "up": {"kernel": lp["up"]["kernel"].replace(a=ab[0][0], b=ab[0][1]), "bias": lp["up"]["bias"]},
                "down": {"kernel": lp["down"]["kernel"].replace(a=ab[1][0], b=ab[1][1])},
            }

        ab = [(lp["up"]["kernel"].a, lp["up"]["kernel"].b), (lp["down"]["kernel"].a, lp["down"]["kernel"].b)]
        g = jax.jit(jax.grad(lambda ab: jnp.sum(jnp.sin(forward(with_factors(ab), x)))))(ab)
        g_ref = jax.jit(jax.grad(lambda ab: jnp.sum(jnp.sin(model(jlora.merge(with_factors(ab)), x)))))(ab)
        out["grad_rel"] = max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)))
        out["grad_specs_match_factors"] = all(
            jax.typeof(a).sharding.spec == jax.typeof(b).sharding.spec
            for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ab))
        )

        # a jitted train step with jlora.optimizer: the frozen kernels do not move
        tx = jlora.optimizer(optax.adamw(1e-2))
        state = jax.jit(tx.init)(lp)

        @jax.jit
        def step(lp, state):
            loss, grads = jax.value_and_grad(lambda lp: jnp.mean(forward(lp, x) ** 2))(lp)
            updates, state = tx.update(grads, state, lp)
            return optax.apply_updates(lp, updates), state, loss

        lp2, state, loss0 = step(lp, state)
        for _ in range(4):
            lp2, state, loss = step(lp2, state)
        out["loss_fell"] = bool(float(loss) < float(loss0))
        out["frozen_unchanged"] = all(
            np.array_equal(np.asarray(a.w), np.asarray(b.w))
            for (_, a), (_, b) in zip(jlora.lora_leaves(lp), jlora.lora_leaves(lp2))
        )

        # an embedding looked up with `.at[ids].get(out_sharding=)` (an auto_axes region inside
        # the jaxpr), then the MLP; a mixed batch of two adapters and the base; dropout
        def lm(p, ids):
            e = p["embed"]["embedding"].at[ids].get(out_sharding=P("data", None, None))
            h = jax.nn.gelu(jnp.einsum("bti,io->bto", e, p["up"]["kernel"]) + p["up"]["bias"])
            return jnp.einsum("bti,io->bto", h, p["down"]["kernel"], out_sharding=P("data", None, None))

        params_lm = dict(params, embed={"embedding": put(jax.random.normal(k[3], (50, 8)), P(None, None))})
        ids = put(jax.random.randint(k[2], (4, 6), 0, 50), P("data", None))
        cfg_lm = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "up", "down"], init_lora_weights=False)
        lp_lm = jlora.wrap(params_lm, cfg_lm, rng=k[0])
        forward_lm = jlora.lora(lm, on_materialize="error")
        y = jax.jit(forward_lm)(lp_lm, ids)
        out["embed_rel"] = rel(y, jax.jit(lm)(jax.jit(jlora.merge)(lp_lm), ids))

        two = jlora.add_adapter(lp_lm, "two", cfg_lm, rng=k[1])
        names = ["default", "two", "__base__", "two"]
        aid = put(jlora.adapter_ids(two, names), P("data"))
        y = jax.jit(lambda lp, ids, aid: forward_lm(lp, ids, adapter_ids=aid))(two, ids, aid)
        alone = {n: np.asarray(jax.jit(lm)(jlora.merge(jlora.set_adapter(two, n)), ids)) for n in ("default", "two")}
        alone["__base__"] = np.asarray(jax.jit(lm)(params_lm, ids))
        out["mixed_rel"] = rel(y, np.stack([alone[n][i] for i, n in enumerate(names)]))

        drop = jlora.wrap(params_lm, cfg_lm.replace(lora_dropout=0.5), rng=k[0])
        run = jax.jit(lambda lp, ids, key: forward_lm(lp, ids, lora_rng=key))
        y1, y2 = run(drop, ids, jax.random.key(7)), run(drop, ids, jax.random.key(7))
        y_eval = jax.jit(forward_lm)(drop, ids)
        out["dropout_deterministic"] = bool(np.array_equal(np.asarray(y1), np.asarray(y2)))
        out["dropout_changes_output"] = rel(y1, y_eval) > 1e-3
    print("RESULT " + json.dumps(out))
    """
)


def test_tensor_parallel_mlp_on_explicit_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _BODY], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    assert res["forward_rel"] <= 1e-5, res
    assert res["grad_rel"] <= 1e-4, res
    assert res["out_spec"] == res["plain_spec"] == "P('data', None)", res
    assert res["grad_specs_match_factors"], res
    assert res["loss_fell"] and res["frozen_unchanged"], res
    assert res["embed_rel"] <= 1e-5, res
    assert res["mixed_rel"] <= 1e-5, res
    assert res["dropout_deterministic"] and res["dropout_changes_output"], res
