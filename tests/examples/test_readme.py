"""The README's quickstart runs as printed (in a fresh process), so it stays true."""

from __future__ import annotations

from support.paths import ROOT
import os
import re
import subprocess
import sys

README = ROOT / "README.md"


def test_readme_quickstart_runs(tmp_path):
    blocks = re.findall(r"## Quickstart\n.*?```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python block under '## Quickstart'"
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0])
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the printed count line, and the merged == factored assertion at the end passed
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", proc.stdout)
