"""Orbax checkpoints: round trips, validation, CheckpointManager resume in a fresh
process, shardings, and saves killed mid-write."""

from __future__ import annotations

from support.paths import subprocess_pythonpath
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest


from support import checkpoint_helpers as H  # noqa: E402
import jlora  # noqa: E402
from jlora.io import AdapterSave, read_adapter, read_metadata  # noqa: E402



def _is_node(x):
    return isinstance(x, (jlora.LoraWeight, jlora.Trainable))


def _assert_trees_identical(x, y):
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)


def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained():
    lp, state = H.initial()
    lp, state = H.run(lp, state, 0, 3)  # non-zero B, changed biases
    return lp, state


def test_save_load_round_trip_is_bit_identical(trained, tmp_path):
    lp, _ = trained
    jlora.save(tmp_path / "ck", lp, config=H.CONFIG)
    back = jlora.load(tmp_path / "ck", H.base_params())
    _assert_trees_identical(back, lp)
    # static data too: scale (rank/alpha patterns), layout, dropout
    for (p1, x), (p2, y) in zip(jlora.lora_leaves(back), jlora.lora_leaves(lp)):
        assert p1 == p2 and x.scale == y.scale and x.layout == y.layout and x.dropout == y.dropout
    assert dict(jlora.lora_leaves(back))["block/out/kernel"].layout == ("in", "in", "out")
    assert dict(jlora.lora_leaves(back))["head/kernel"].scale == 3.0  # alpha 6 / rank 2


def test_checkpoint_holds_only_trained_leaves(trained, tmp_path):
    lp, _ = trained
    jlora.save(tmp_path / "ck", lp, config=H.CONFIG)
    meta = read_metadata(tmp_path / "ck")
    assert meta["format"] == "jlora.adapter" and meta["config"]["r"] == 3
    assert {t["path"] for t in meta["targets"]} == {p for p, _ in jlora.lora_leaves(lp)}
    adapter = read_adapter(tmp_path / "ck")
    assert adapter.n_params == jlora.count_parameters(lp)[0]
    base_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(H.base_params()))
    stored = adapter.n_params * 4
    assert stored < base_bytes  # not the base
    # the base kernels are not in the file: a base of ShapeDtypeStructs saves the same thing
    abstract = jax.tree_util.tree_map(
        lambda x: x.replace(w=jax.ShapeDtypeStruct(x.w.shape, x.w.dtype)) if isinstance(x, jlora.LoraWeight) else x,
        lp, is_leaf=_is_node,
    )
    jlora.save(tmp_path / "ck2", abstract, config=H.CONFIG)
    _assert_trees_identical(jlora.load(tmp_path / "ck2", H.base_params()), lp)


def test_load_validates_shape_dtype_and_paths(trained, tmp_path):
    lp, _ = trained
    jlora.save(tmp_path / "ck", lp, config=H.CONFIG)
    before = _digest(tmp_path / "ck")

    other = H.base_params()
    other["head"]["kernel"] = np.zeros((8, 7), np.float32)
    with pytest.raises(ValueError) as err:
        jlora.load(tmp_path / "ck", other)
    assert "head/kernel" in str(err.value) and "(8, 5)" in str(err.value) and "(8, 7)" in str(err.value)

    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), H.base_params())
    with pytest.raises(ValueError, match="dtype mismatch.*float32.*bfloat16"):
        jlora.load(tmp_path / "ck", bf16)
    cast = jlora.load(tmp_path / "ck", bf16, strict=False)
    assert dict(jlora.lora_leaves(cast))["head/kernel"].w.dtype == jnp.bfloat16

    missing = H.base_params()
    del missing["head"]
    with pytest.raises(ValueError) as err:
        jlora.load(tmp_path / "ck", missing)
    assert "head/kernel" in str(err.value) and "not in the base params" in str(err.value)
    assert _digest(tmp_path / "ck") == before


def test_bad_saves_write_nothing(trained, tmp_path):
    lp, _ = trained
    jlora.save(tmp_path / "ck", lp)
    before = _digest(tmp_path / "ck")
    with pytest.raises(ValueError, match="no LoraWeight"):
        jlora.save(tmp_path / "ck", H.base_params())
    with pytest.raises(FileExistsError):
        jlora.save(tmp_path / "ck", lp, overwrite=False)
    assert _digest(tmp_path / "ck") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a jlora adapter checkpoint"):
        jlora.save(tmp_path / "mine", lp)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_load_onto_given_shardings(trained, tmp_path):
    lp, _ = trained
    jlora.save(tmp_path / "ck", lp)
    dev = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array([dev]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    back = jlora.load(tmp_path / "ck", H.base_params(), shardings=rep)
    for _, x in jlora.lora_leaves(back):
        assert x.a.sharding == rep and x.b.sharding == rep
    # default: factors follow W's NamedSharding (rank axis replicated)
    w_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    params = H.base_params()
    params["head"]["kernel"] = jax.device_put(params["head"]["kernel"], w_sh)
    back = jlora.load(tmp_path / "ck", params)
    head = dict(jlora.lora_leaves(back))["head/kernel"]
    assert head.a.sharding.spec == jax.sharding.PartitionSpec(None, None)
    assert head.b.sharding.spec == jax.sharding.PartitionSpec(None, "x")
    _assert_trees_identical(back, jlora.load(tmp_path / "ck", params, shardings=lambda path, name: None))


def test_checkpoint_manager_resume_in_fresh_process(tmp_path):
    """10 steps straight == 5 steps, CheckpointManager save, restore in a new process,
    5 more steps: A, B, biases and optimizer state bit-identical. The new process also
    restores onto a 2-device mesh."""
    lp0, st0 = H.initial()
    lp10, st10 = H.run(lp0, st0, 0, 10)

    options = ocp.CheckpointManagerOptions(save_interval_steps=2, max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as mngr:
        lp, st = lp0, st0
        for step in range(1, 6):
            lp, st = H.run(lp, st, step - 1, step)
            mngr.save(
                step,
                args=ocp.args.Composite(adapter=AdapterSave(lp, H.CONFIG), opt_state=ocp.args.StandardSave(st)),
                force=step == 5,
            )
        mngr.wait_until_finished()
        assert mngr.all_steps() == [4, 5]  # saved at 2, 4 and (forced) 5; keeps the last 2
    # jlora.load finds the latest step's adapter item in a CheckpointManager directory
    _assert_trees_identical(jlora.partition(jlora.load(tmp_path / "run", H.base_params()))[0], jlora.partition(lp)[0])

    out = tmp_path / "resumed.npz"
    env = dict(os.environ, PYTHONPATH=subprocess_pythonpath())
    proc = subprocess.run(
        [sys.executable, "-c", f"from support import checkpoint_helpers as H; H.resume({str(tmp_path / 'run')!r}, {str(out)!r})"],
        capture_output=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    with np.load(out, allow_pickle=False) as got:
        got = dict(got)
    assert int(got.pop("__step__")) == 5
    want = H.trained_arrays(lp10, st10)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_restore_on_two_devices(tmp_path):
    """A fresh process with two (host) devices: A and B land on the kernel's mesh."""
    lp, _ = H.initial()
    jlora.save(tmp_path / "ck", lp)
    script = textwrap.dedent(
        f"""
        import jax, numpy as np, jlora
        from support import checkpoint_helpers as H
        assert len(jax.devices()) == 2
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("model",))
        P = jax.sharding.PartitionSpec
        params = H.base_params()
        params["head"]["kernel"] = jax.device_put(params["head"]["kernel"], jax.sharding.NamedSharding(mesh, P("model", None)))
        back = jlora.load({str(tmp_path / 'ck')!r}, params)
        head = dict(jlora.lora_leaves(back))["head/kernel"]
        assert head.a.sharding.spec == P("model", None), head.a.sharding
        assert len(head.a.sharding.device_set) == 2 and head.b.sharding.spec == P(None, None)
        rep = jax.sharding.NamedSharding(mesh, P())
        back = jlora.load({str(tmp_path / 'ck')!r}, H.base_params(), shardings=rep)
        assert all(x.a.sharding == rep for _, x in jlora.lora_leaves(back))
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=subprocess_pythonpath(),
               XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0 and b"ok" in proc.stdout, proc.stderr.decode()[-3000:]


@pytest.mark.parametrize("when", ["orbax-write", "between-renames"])
def test_killed_save_leaves_previous_checkpoint(tmp_path, when):
    """SIGKILL during a save over an existing checkpoint: the previous one still loads."""
    lp = H.numpy_lora(0)
    path = tmp_path / "ck"
    jlora.save(path, lp)
    # orbax-write: the first rename of the save is Orbax committing into the temporary
    # directory; between-renames: the old checkpoint is aside, the new one not yet in.
    cond = "True" if when == "orbax-write" else f"str(dst) == {str(path)!r}"
    script = textwrap.dedent(
        f"""
        import os, signal, jax, jlora
        from support import checkpoint_helpers as H
        lp = H.numpy_lora(1)
        real = os.rename
        def dying(src, dst):
            if {cond}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.rename = dying
        jlora.save({str(path)!r}, lp)
        """
    )
    env = dict(os.environ, PYTHONPATH=subprocess_pythonpath())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    _assert_trees_identical(jlora.load(path, H.base_params()), lp)
    if when == "between-renames":
        assert not path.exists()  # only the recovered copy is there
    jlora.save(path, lp)  # a later save succeeds and cleans up leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
