"""examples/multihost.py --local-processes 2 --smoke: two processes on this machine train,
save and reload; this process then reads what they wrote.

References: the loss printed after the last step is below the first; the printed
placement of A and B follows W's; the Orbax and PEFT adapters the two processes wrote
(independent files, two formats) hold the same factors when loaded here, in one process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np

import jlora

from support.paths import ROOT


def test_multihost_example_smoke(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multihost.py"), "--local-processes", "2", "--smoke",
         "--out", str(tmp_path), "--timeout", "170"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[process 0] 2 processes x 2 devices; mesh {'data': 2, 'model': 2}" in out
    for pid in (0, 1):
        losses = [float(x) for x in re.findall(rf"\[process {pid}\] step\s+\d+\s+loss ([\d.]+)", out)]
        assert len(losses) == 2 and losses[1] < losses[0], out[-3000:]
        assert f"[process {pid}] reloaded: every shard of A and B bit-identical" in out
        assert re.search(rf"\[process {pid}\] q_proj of layer 0: W \(32, 32\) P\('data', 'model'\), "
                         r"A \(32, 8\) P\('data', None\), B \(8, 32\) P\(None, 'model'\)", out), out[-3000:]
    # each process prints its own shards: process 1 holds rows 16:32 of A
    assert re.search(r"\[process 1\]   A on cpu:\d+\[16:32, 0:8\]", out), out[-3000:]
    assert f"Orbax adapter:      {tmp_path}/adapter" in out and f"CheckpointManager:  {tmp_path}/ckpt/3" in out

    from support.multihost_helpers import EX as ex  # the example's module

    base = ex.base_params(ex.SMOKE)
    orbax = dict(jlora.lora_leaves(jlora.load(tmp_path / "adapter", base)))
    peft = dict(jlora.lora_leaves(jlora.load_peft(tmp_path / "peft", base)))
    assert orbax.keys() == peft.keys() and len(orbax) == 7 * ex.SMOKE.layers
    for path in orbax:
        np.testing.assert_array_equal(np.asarray(orbax[path].a), np.asarray(peft[path].a), err_msg=path)
        np.testing.assert_array_equal(np.asarray(orbax[path].b), np.asarray(peft[path].b), err_msg=path)
        assert np.abs(np.asarray(orbax[path].b)).max() > 0  # trained: B moved from zero
