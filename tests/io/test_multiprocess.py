"""Issue 11: jlora on JAX's multi-controller runtime, two processes on localhost.

Two Python processes (``jax.distributed.initialize(coordinator_address="localhost:PORT",
num_processes=2, process_id=i)``, two CPU devices each, gloo collectives) train a small
Llama-shaped model FSDP × TP on a ('data', 'model') 2 × 2 mesh and save and load with
every API from both processes (tests/support/multihost_helpers.py). References: the same
training on one device in this process (losses), the arrays the workers trained
(gathered), files this single process writes for the same factors (byte-identical PEFT
files), and checkpoints this process wrote before the workers started (which they load
onto their mesh). Last, process 1 is killed in the middle of a save over an existing
checkpoint, which must still load.
"""

from __future__ import annotations

from support.paths import TESTS, subprocess_pythonpath
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jlora
from support import multihost_helpers as M

TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("multiprocess")
    # checkpoints written by this single process, for the workers to load onto their mesh
    single = M.numpy_lora(5)
    jlora.save(work / "single", single, config=M.config())
    jlora.save_peft(work / "single_peft", single, config=M.config())
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=subprocess_pythonpath())
    port = _free_port()
    logs = [work / f"log_{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(TESTS / "support" / "multihost_helpers.py"), str(i), str(port), str(work)],
                              stdout=open(logs[i], "w"), stderr=subprocess.STDOUT, env=env) for i in range(2)]
    t0 = time.monotonic()
    try:
        # process 1 ends by killing itself in the middle of the last save
        procs[1].wait(timeout=TIMEOUT_S)
        wall = time.monotonic() - t0
        time.sleep(0.5)
    except subprocess.TimeoutExpired:
        wall = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    info = "\n".join(f"--- process {i} ---\n{_tail(log)}" for i, log in enumerate(logs))
    assert wall is not None, f"the two processes did not finish within {TIMEOUT_S} s\n{info}"
    assert all((work / f"result_{i}.json").exists() for i in range(2)), f"a worker failed\n{info}"
    results = [json.loads((work / f"result_{i}.json").read_text()) for i in range(2)]
    return dict(work=work, results=results, returncodes=[p.returncode for p in procs], wall=wall, info=info)


def test_two_processes(run):
    work, results = run["work"], run["results"]

    # training: both processes saw the same losses, and they are the single-device ones
    assert results[0]["losses"] == results[1]["losses"]
    lp = jlora.wrap(M.base_params(), M.config(), rng=jax.random.key(0))
    tx = M.optimizer()
    state, step = tx.init(lp), M.make_train_step(tx)
    ref = []
    for i in range(M.STEPS):
        lp, state, loss = step(lp, state, M.batch(i))
        ref.append(float(loss))
    np.testing.assert_allclose(results[0]["losses"], ref, rtol=2e-5)
    assert ref[-1] < ref[0]

    # the checkpoint the two processes wrote loads here, in one process, bit-exact
    trained = dict(np.load(work / "trained.npz"))
    back = jlora.load(work / "orbax", M.base_params())
    assert M.factors(back).keys() == trained.keys()
    for k, v in M.factors(back).items():
        np.testing.assert_array_equal(v, trained[k], err_msg=k)
    for k, v in M.factors(lp).items():  # and is what one device trains, to float32 rounding
        np.testing.assert_allclose(trained[k], v, rtol=1e-4, atol=1e-6, err_msg=k)

    # PEFT files written by the primary process are byte-identical to one process's
    jlora.save_peft(work / "peft_single", back, config=M.config())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (work / "peft" / name).read_bytes() == (work / "peft_single" / name).read_bytes(), name
    # the CLI on every process wrote the same PEFT tensors too
    assert (work / "cli_peft" / "adapter_model.safetensors").read_bytes() == \
        (work / "peft" / "adapter_model.safetensors").read_bytes()

    # process 1 was killed in the middle of the last save; the previous checkpoint is in place
    assert (work / "kill_started_1").exists() and not (work / "kill_phase_survived_0").exists()
    assert run["returncodes"][1] == -9, run["info"]
    after = jlora.load(work / "orbax", M.base_params())
    for k, v in M.factors(after).items():
        np.testing.assert_array_equal(v, trained[k], err_msg=k)
    # and a later save over it, in one process, works and clears the leftovers
    jlora.save(work / "orbax", after, config=M.config())
    assert not list(work.glob(".orbax.jlora-*"))

    # where one kernel's A and B live: A follows W's input axis, B its output axis
    pl = results[0]["placement"]
    assert pl["W"]["spec"] == ["data", "model"]
    assert pl["A"]["spec"] == ["data", None] and pl["B"]["spec"] == [None, "model"]
    t0, t1 = results[0]["timings"], results[1]["timings"]
    print(f"\ntwo processes x two CPU devices, wall {run['wall']:.1f} s (start to the killed save)")
    for k in t0:
        print(f"  {k:<28} process 0: {t0[k]:7.3f} s   process 1: {t1[k]:7.3f} s")
