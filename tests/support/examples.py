"""Running an example script the way a user does: a subprocess from the repository root,
offline, in its ``--smoke`` mode where the test asks for it."""

from __future__ import annotations

import os
import subprocess
import sys

from support.paths import EXAMPLES, ROOT


def example_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", JLORA_SMOKE="1", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # each example sets what it needs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    """Runs ``examples/<name> *args``; its stdout + stderr, or an assertion error with the tail."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=example_env(), capture_output=True, text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited with {proc.returncode}:\n{out[-6000:]}"
    return out
