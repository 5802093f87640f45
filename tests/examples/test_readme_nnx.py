"""The README's NNX quickstart runs as printed (fresh process), and its PEFT files load in
PEFT on the PyTorch Qwen3 of the same weights with jlora's logits."""

from __future__ import annotations

from support.paths import ROOT
import os
import re
import subprocess
import sys

import pytest

README = ROOT / "README.md"


def test_readme_nnx_quickstart_runs(tmp_path):
    blocks = re.findall(r"### Quickstart with NNX.*?```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python block under '### Quickstart with NNX'"
    # the printed block, then: save the base and the merged logits, for the PyTorch check below
    extra = ("\nimport numpy as np\nfrom safetensors.numpy import save_file\n"
             "save_file(jlora.models.state_dict(model), 'base.safetensors')\n"
             "np.save('ids.npy', np.asarray(ids)); np.save('logits.npy', np.asarray(forward(lp, ids)))\n")
    script = tmp_path / "quickstart_nnx.py"
    script.write_text(blocks[0] + extra)
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", proc.stdout)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import numpy as np
    from safetensors.torch import load_file

    cfg = transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6)
    tm = transformers.Qwen3ForCausalLM(cfg)
    missing, unexpected = tm.load_state_dict(load_file(str(tmp_path / "base.safetensors")), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    pm = peft.PeftModel.from_pretrained(tm.eval(), tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        ref = pm(torch.from_numpy(np.load(tmp_path / "ids.npy").astype(np.int64))).logits.numpy()
    assert np.abs(np.load(tmp_path / "logits.npy") - ref).max() <= 1e-4
