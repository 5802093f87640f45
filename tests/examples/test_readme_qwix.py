"""The README's "From and to qwix / tunix" example runs as printed (its own asserts: the
qwix model's logits equal jlora's, and the qwix model rebuilt from the PEFT files equals
the first), and the PEFT files it writes load in PEFT on the torch Qwen3 of the same
weights with the qwix model's logits."""

from __future__ import annotations

from support.paths import ROOT
import re

import numpy as np
import pytest

README = ROOT / "README.md"


def test_readme_qwix_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("qwix")
    blocks = re.findall(r"## From and to qwix / tunix.*?```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python block under '## From and to qwix / tunix'"
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_qwix"}
    exec(compile(blocks[0], "README.md (From and to qwix / tunix)", "exec"), scope)
    adapter = tmp_path / "out" / "qwix-adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import jlora.models

    cfg = scope["cfg"]
    hf = transformers.AutoConfig.for_model(**jlora.models.hf_config_dict(cfg))
    tm = transformers.Qwen3ForCausalLM(hf)
    state = {k: torch.from_numpy(np.array(v)) for k, v in jlora.models.state_dict(scope["model"]).items()}
    missing, unexpected = tm.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    pm = peft.PeftModel.from_pretrained(tm.eval(), str(adapter)).eval()
    ids = np.asarray(scope["ids"])
    with torch.no_grad():
        ref = pm(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(np.asarray(scope["qmodel"](scope["ids"])) - ref).max() <= 1e-4
