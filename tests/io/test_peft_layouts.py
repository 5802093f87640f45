"""No silently wrong adapter: what decides the orientation of a 2-D kernel when PEFT's
``(r, in)`` / ``(out, r)`` factors are placed on it, and what jlora refuses.

The model is PEFT's embedding + transformers ``Conv1D`` with a *square* ``Conv1D`` (5 →
5); its Flax twin uses transformers' own ``FlaxConv1D``, whose kernel is ``(out, in)``,
while the tree's convention (Flax's ``Dense``) says ``(in, out)``. Each source of
evidence (``apply_fn=``, a name map, ``layouts=``) must give PEFT's outputs; none, from
a file that says ``fan_in_fan_out: true``, is an error naming ``layouts=`` and
``apply_fn=``; a guess the model contradicts is an error at the first forward pass;
factor shapes that fit one orientation decide it (and evidence they contradict is an
error naming the orientation that would fit). The reference is PEFT on PyTorch CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402

import jlora  # noqa: E402
from jlora.name_maps import FamilyMap, Rule  # noqa: E402
from support.peft_matrix import make_twin  # noqa: E402

pytestmark = pytest.mark.torch

OUT_IN = {"conv1d": ("out", "in")}


def close(got, want, rtol: float = 2e-5) -> bool:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return got.shape == want.shape and float(np.abs(got - want).max()) <= rtol * max(1.0, float(np.abs(want).max()))


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """The square twin, PEFT's adapter on ``conv1d`` (random factors) and PEFT's output."""
    t = make_twin("EmbConv1DSquare")
    pm = peft.get_peft_model(t.torch_model(), peft.LoraConfig(target_modules=["conv1d"], init_lora_weights=False))
    pm.eval()
    d = tmp_path_factory.mktemp("square") / "adapter"
    pm.save_pretrained(d)
    with torch.no_grad():
        want = pm(t.torch_input).numpy()
    assert json.loads((d / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # PEFT's Conv1D flag
    return t, d, want


# A name map that knows the twin's Conv1D kernel: (o i) in JAX, a PyTorch Conv1D weight.
TWIN_MAP = FamilyMap("emb-conv1d-twin", [Rule(r"conv1d/kernel", "conv1d.weight", "o i", "o i")],
                     requires=[r"conv1d/kernel"])


@pytest.mark.parametrize("evidence", ["apply_fn", "name_map", "layouts"])
def test_square_kernel_each_source_of_evidence(square, evidence):
    """apply_fn= (the use), a name map, layouts=: each orients the square kernel as the
    model reads it, and the loaded adapter gives PEFT's outputs, factored."""
    t, d, want = square
    kwargs = {
        "apply_fn": dict(apply_fn=t.apply, example_args=(t.jax_input,)),
        "name_map": dict(name_map=TWIN_MAP),
        "layouts": dict(layouts=OUT_IN),
    }[evidence]
    lp = jlora.load_peft(d, t.params, **kwargs)
    lw = lp["conv1d"]["kernel"]
    assert lw.layout == ("out", "in") and not lw.guessed
    assert close(jlora.lora(t.apply, on_materialize="error")(lp, t.jax_input), want)
    assert close(t.apply(jlora.merge(lp), t.jax_input), want)


def test_square_kernel_without_evidence_is_refused(square):
    """No evidence, and adapter_config.json says fan_in_fan_out: true: an error that names
    the kernel, both orientations, layouts= and apply_fn= (it used to load silently and be
    off by half the output's scale). jlora.load_adapter refuses the same way, and loads it
    with apply_fn=."""
    t, d, _ = square
    with pytest.raises(ValueError) as info:
        jlora.load_peft(d, t.params)
    msg = str(info.value)
    for words in ("conv1d", "square", "fan_in_fan_out: true", "apply_fn=", "layouts={'conv1d': ('out', 'in')}"):
        assert words in msg, (words, msg)
    other = jlora.wrap(t.params, jlora.LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="apply_fn="):  # jlora.load_adapter goes the same way
        jlora.load_adapter(other, d, "peft")
    lp = jlora.set_adapter(jlora.load_adapter(other, d, "peft", apply_fn=t.apply, example_args=(t.jax_input,)), "peft")
    assert close(jlora.lora(t.apply)(lp, t.jax_input), square[2])


def test_guess_read_transposed_raises_at_the_forward(square, tmp_path):
    """A file whose fan_in_fan_out is false (PEFT's flag follows the last module it saw) loads
    the square kernel on the (in, out) guess, marked as a guess; the model reads it
    transposed, so jlora.lora raises naming layouts= and apply_fn= instead of computing a
    wrong model. With apply_fn= the same file gives PEFT's outputs."""
    t, d, want = square
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in d.iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((edited / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (edited / "adapter_config.json").write_text(json.dumps(cfg))
    lp = jlora.load_peft(edited, t.params)
    assert lp["conv1d"]["kernel"].guessed and lp["conv1d"]["kernel"].layout == ("in", "out")
    with pytest.raises(ValueError, match=r"guessed from the tree.*layouts=\{'conv1d': \('out', 'in'\)\}"):
        jlora.lora(t.apply)(lp, t.jax_input)
    lp = jlora.load_peft(edited, t.params, apply_fn=t.apply, example_args=(t.jax_input,))
    assert close(jlora.lora(t.apply)(lp, t.jax_input), want)


def test_wrap_guess_is_refused_and_evidence_saves_what_peft_loads(square, tmp_path):
    """jlora.wrap without evidence guesses (in, out) for the square Conv1D twin: the first
    forward raises (so no adapter is trained, or written, on a wrong orientation). With
    layouts= or apply_fn= the adapter trains factored and save_peft writes a file that
    PEFT loads with jlora's outputs, fan_in_fan_out: true."""
    t, _, _ = square
    config = jlora.LoraConfig(target_modules=["conv1d"], init_lora_weights=False)
    lp = jlora.wrap(t.params, config, rng=jax.random.key(1))
    assert lp["conv1d"]["kernel"].guessed
    with pytest.raises(ValueError, match="apply_fn="):
        jlora.lora(t.apply)(lp, t.jax_input)
    for i, kwargs in enumerate([dict(layouts=OUT_IN), dict(apply_fn=t.apply, example_args=(t.jax_input,))]):
        lp = jlora.wrap(t.params, config, rng=jax.random.key(1), **kwargs)
        want = np.asarray(jlora.lora(t.apply, on_materialize="error")(lp, t.jax_input))
        jlora.save_peft(tmp_path / f"a{i}", lp, config=config)
        assert json.loads((tmp_path / f"a{i}" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        pm = peft.PeftModel.from_pretrained(t.torch_model(), tmp_path / f"a{i}").eval()
        with torch.no_grad():
            assert close(pm(t.torch_input).numpy(), want)


def test_factor_shapes_decide_a_non_square_kernel(tmp_path):
    """The non-square Conv1D (5 -> 1) twin stores (out, in) = (1, 5): PEFT's factors fit only
    that orientation, so they decide it without any argument (PEFT's outputs); evidence
    that contradicts them is an error naming the orientation that would fit."""
    t = make_twin("EmbConv1D")
    pm = peft.get_peft_model(t.torch_model(), peft.LoraConfig(target_modules=["conv1d"], init_lora_weights=False))
    pm.eval().save_pretrained(tmp_path / "a")
    with torch.no_grad():
        want = pm(t.torch_input).numpy()
    lp = jlora.load_peft(tmp_path / "a", t.params)
    assert lp["conv1d"]["kernel"].layout == ("out", "in") and not lp["conv1d"]["kernel"].guessed
    assert close(jlora.lora(t.apply, on_materialize="error")(lp, t.jax_input), want)
    with pytest.raises(ValueError, match=r"fit the kernel of shape \(1, 5\) as \('out', 'in'\), but layouts= gives"):
        jlora.load_peft(tmp_path / "a", t.params, layouts={"conv1d": ("in", "out")})
    # Orbax keeps the layout and the guess flag; apply_fn= checks the stored layout against the use
    jlora.save(tmp_path / "orbax", lp)
    back = jlora.load(tmp_path / "orbax", t.params, apply_fn=t.apply, example_args=(t.jax_input,))
    assert close(jlora.lora(t.apply)(back, t.jax_input), want)
    wrong = jlora.wrap(t.params, jlora.LoraConfig(target_modules=["conv1d"]), layouts={"conv1d": ("in", "out")})
    jlora.save(tmp_path / "wrong", wrong)
    with pytest.raises(ValueError, match="conv1d/kernel"):
        jlora.load(tmp_path / "wrong", t.params, apply_fn=t.apply, example_args=(t.jax_input,))
