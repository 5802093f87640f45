"""`jlora.lora(fn)` on a 4-device CPU mesh with batch-sharded inputs.

``--xla_force_host_platform_device_count`` must be set before JAX is imported, so the
body runs in a fresh Python process. Reference: the same jitted computation on one
device with unsharded inputs, and the merged model.
"""

from __future__ import annotations

from support.paths import subprocess_pythonpath
import os
import subprocess
import sys
import textwrap

_BODY = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jlora
    from support import models

    assert jax.device_count() == 4, jax.devices()
    results = {}

    def rel(x, ref):
        x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
        return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))

    for name in ["linen_scan"]:
        case = getattr(models, name)()
        cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False,
                               lora_dropout=0.1)
        lp = jlora.wrap(case.params, cfg, rng=jax.random.key(1))
        ids = jax.random.randint(jax.random.key(5), (8, 8), 1, 99)   # batch 8, split over 4 devices
        tr, fr = jlora.partition(lp)
        f = jlora.lora(case.apply, on_materialize="error")

        def step(t, fr, ids, key):
            def loss(t):
                out = f(jlora.combine(t, fr), ids, lora_rng=key)
                return jnp.mean(jnp.sin(out)), out
            (l, out), g = jax.value_and_grad(loss, has_aux=True)(t)
            return l, out, g

        key = jax.random.key(3)
        single = jax.jit(step)(tr, fr, ids, key)

        mesh = Mesh(np.array(jax.devices()), ("data",))
        batch = NamedSharding(mesh, P("data"))
        repl = NamedSharding(mesh, P())
        ids_s = jax.device_put(ids, batch)
        tr_s, fr_s = jax.device_put(tr, repl), jax.device_put(fr, repl)
        sharded = jax.jit(step, out_shardings=(repl, batch, repl))(tr_s, fr_s, ids_s, key)

        assert len(sharded[1].sharding.device_set) == 4
        errs = {
            "loss": rel(sharded[0], single[0]),
            "out": rel(sharded[1], single[1]),
            "grads": max(rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(sharded[2]),
                                                     jax.tree_util.tree_leaves(single[2]))),
        }
        # no-dropout forward against the merged model, on the mesh
        merged_out = jax.jit(case.apply)(jlora.merge(lp), ids_s)
        errs["vs_merged"] = rel(jax.jit(f)(jax.device_put(lp, repl), ids_s), merged_out)
        results[name] = errs
    print("RESULTS " + json.dumps(results))
    """
)


def test_four_device_mesh_batch_sharded_equals_single_device(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = subprocess_pythonpath()
    script = tmp_path / "mesh_body.py"
    script.write_text(_BODY)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    import json

    print(line)
    results = json.loads(line[len("RESULTS "):])
    assert set(results) == {"linen_scan"}
    for name, errs in results.items():
        assert errs["loss"] <= 1e-5, (name, errs)
        assert errs["out"] <= 1e-5, (name, errs)
        assert errs["grads"] <= 1e-4, (name, errs)
        assert errs["vs_merged"] <= 1e-5, (name, errs)
