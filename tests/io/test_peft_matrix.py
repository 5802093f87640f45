"""PEFT 0.21.2's own LoRA test matrix (``tests/test_custom_models.py``, ``TEST_CASES``,
every ``LoraConfig`` row), each case checked three ways against PEFT on PyTorch CPU:

1. load: PEFT's adapter (``init_lora_weights=False``, every LoRA tensor perturbed so no
   factor, magnitude or token row is at its initial value) loaded by ``jlora.load_peft``
   on the Flax twin gives PEFT's outputs;
2. save: jlora's adapter (``jlora.wrap(..., apply_fn=)`` with the row's config, trained
   values perturbed) saved by ``jlora.save_peft`` loads in ``PeftModel.from_pretrained``
   with jlora's outputs;
3. merge: ``jlora.merge`` of the loaded adapter equals PEFT's ``merge_and_unload``
   (both refuse a grouped convolution: PEFT raises ``NotImplementedError``).

Rows of variants jlora does not implement (KaSA, VeLoRA, MonteCLoRA, BD-LoRA) check that
``load_peft`` refuses them by name; ``target_parameters`` rows belong to the MoE issue and
``nn.MultiheadAttention`` has no Flax twin here: both are skipped with the reason in the id.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402

import jlora  # noqa: E402
from support.peft_matrix import make_twin  # noqa: E402

pytestmark = pytest.mark.torch

from peft import KasaConfig, MontecloraConfig, VeloraConfig  # noqa: E402
from peft.tuners.lora.config import BdLoraConfig  # noqa: E402

TARGET_PARAMETERS = "skip: target_parameters rows belong to the MoE issue (LoRA on nn.Parameter experts)"
MHA = "skip: nn.MultiheadAttention (PEFT adapts its fused in_proj_weight); no Flax twin with the same parameters"

# (PEFT's row name, model, LoraConfig kwargs, what jlora does: "pass", "refuse:<regex>" or "skip: <why>")
ROWS = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}, "pass"),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}, "pass"),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}, "pass"),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}, "pass"),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, "pass"),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}, "pass"),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}, "pass"),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}, "pass"),
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4},
     "refuse:KaSA"),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}, "pass"),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}, "pass"),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP",
     {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="random")}, "refuse:VeLoRA"),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP",
     {"target_modules": ["lin0", "lin1"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average")},
     "refuse:VeLoRA"),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP",
     {"target_modules": ["lin0"], "velora_config": VeloraConfig(num_groups=2, init_type="batch_average_once")},
     "refuse:VeLoRA"),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}, "pass"),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}, "pass"),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}, "pass"),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}, "pass"),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}, "pass"),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True},
     "pass"),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}, "pass"),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}, "pass"),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}, "pass"),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}, "pass"),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}, "pass"),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}, "pass"),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}, "pass"),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}, "pass"),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}, "pass"),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}, "pass"),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}, "pass"),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}, "pass"),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}, "pass"),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}, "pass"),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}, "pass"),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP",
     {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}, "pass"),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
     "pass"),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
     "pass"),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}, MHA),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}, MHA),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]},
     TARGET_PARAMETERS),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
     TARGET_PARAMETERS),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP",
     {"target_modules": ["lin0"], "monteclora_config": MontecloraConfig(num_samples=2)}, "refuse:MonteCLoRA"),
    ("BD-LoRA A only", "MLP", {"target_modules": ["lin0", "lin1"],
                               "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False)},
     "refuse:BD-LoRA"),
    ("BD-LoRA B only", "MLP", {"target_modules": ["lin0", "lin1"],
                               "use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False)},
     "refuse:BD-LoRA"),
    ("BD-LoRA both A and B", "MLP",
     {"target_modules": ["lin0", "lin1"],
      "use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)},
     "refuse:BD-LoRA"),
    # The issue's own case: a square transformers Conv1D (5 -> 5); see test_square_conv1d_* below.
    ("Embedding + square transformers Conv1D LoRA", "EmbConv1DSquare", {"target_modules": ["conv1d"]}, "pass"),
    ("Embedding + square transformers Conv1D DoRA", "EmbConv1DSquare",
     {"target_modules": ["emb", "conv1d"], "use_dora": True}, "pass"),
]


def _param(row):
    name, _, _, how = row
    marks = [pytest.mark.skip(reason=how[6:])] if how.startswith("skip:") else []
    ident = name if not how.startswith("skip:") else f"{name} [{how}]"
    return pytest.param(row, id=ident, marks=marks)


PASS = [_param(r) for r in ROWS if r[3] == "pass" or r[3].startswith("skip:")]
REFUSE = [_param(r) for r in ROWS if r[3].startswith("refuse:")]

_TWINS: dict = {}


def twin(model: str):
    if model not in _TWINS:
        _TWINS[model] = make_twin(model)
    return _TWINS[model]


def close(got, want, rtol: float = 2e-5) -> bool:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return got.shape == want.shape and float(np.abs(got - want).max()) <= rtol * max(1.0, float(np.abs(want).max()))


def perturb_peft(model) -> None:
    """Every LoRA tensor away from its initial value (PEFT's ``init_lora_weights=False``
    leaves DoRA's magnitude at the weight norm, MiCA's A at zero, token rows at the
    originals): factors and token rows get noise, magnitudes are rescaled."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
            elif "lora_" in name or "trainable_tokens_delta" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def perturb_jlora(lp):
    """The same for a jlora tree (A and B are random already with init_lora_weights=False)."""
    key = [jax.random.key(11)]

    def noise(x, scale, mul=False):
        key[0], k = jax.random.split(key[0])
        if mul:
            return x * (1 + scale * jax.random.uniform(k, x.shape, x.dtype))
        return x + scale * jax.random.normal(k, x.shape, x.dtype)

    def visit(x):
        if isinstance(x, jlora.LoraWeight) and x.magnitude is not None:
            return x.replace(magnitude=noise(x.magnitude, 0.2, mul=True))
        if isinstance(x, jlora.TrainableTokens):
            return x.replace(values=noise(x.values, 0.3))
        return x

    return jax.tree_util.tree_map(visit, lp, is_leaf=lambda x: isinstance(x, (jlora.LoraWeight,
                                                                              jlora.TrainableTokens)))


def run_torch(model, x) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def peft_config(kwargs):
    kw = dict(kwargs)
    kw.setdefault("init_lora_weights", False)
    return peft.LoraConfig(**kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """PEFT's adapter of each row, saved once: ``(directory, PEFT model, PEFT's output)``."""
    made: dict = {}

    def get(row):
        name, model, kwargs, _ = row
        if name not in made:
            t = twin(model)
            pm = peft.get_peft_model(t.torch_model(), peft_config(kwargs))
            perturb_peft(pm)
            pm.eval()
            d = tmp_path_factory.mktemp("peft") / "adapter"
            pm.save_pretrained(d)
            made[name] = (d, pm, run_torch(pm, t.torch_input))
        return made[name]

    return get


def _load(row, d):
    t = twin(row[1])
    extra = {"apply_fn": t.apply, "example_args": (t.jax_input,)} if row[1] == "EmbConv1DSquare" else {}
    return jlora.load_peft(d, t.params, **extra)


@pytest.mark.parametrize("row", PASS)
def test_load_gives_peft_outputs(row, files):
    """1. PEFT's file → jlora.load_peft → jlora.lora gives PEFT's outputs, every target factored."""
    d, _, want = files(row)
    t = twin(row[1])
    lp = _load(row, d)
    got = jlora.lora(t.apply, on_materialize="error")(lp, t.jax_input)
    assert close(got, want), (row[0], float(np.abs(np.asarray(got) - want).max()))


@pytest.mark.parametrize("row", PASS)
def test_save_loads_in_peft(row, files, tmp_path):
    """2. jlora's adapter → jlora.save_peft → PeftModel.from_pretrained gives jlora's outputs.
    MiCA: jlora cannot initialise MiCA; the adapter loaded from PEFT's file is saved again."""
    name, model, kwargs, _ = row
    t = twin(model)
    if kwargs.get("init_lora_weights") == "mica":
        lp, config = _load(row, files(row)[0]), None
    else:
        config = jlora.LoraConfig(**{**kwargs, "init_lora_weights": False})
        lp = jlora.wrap(t.params, config, rng=jax.random.key(3), apply_fn=t.apply, example_args=(t.jax_input,))
        lp = perturb_jlora(lp)
    want = np.asarray(jlora.lora(t.apply, on_materialize="error")(lp, t.jax_input))
    jlora.save_peft(tmp_path / "a", lp, config=config)
    pm = peft.PeftModel.from_pretrained(t.torch_model(), tmp_path / "a").eval()
    got = run_torch(pm, t.torch_input)
    assert close(got, want), (name, float(np.abs(got - want).max()))


@pytest.mark.parametrize("row", PASS)
def test_merge_equals_merge_and_unload(row, files):
    """3. jlora.merge of the loaded adapter equals PEFT's merge_and_unload; a grouped
    convolution has no merged kernel and both refuse."""
    d, pm, _ = files(row)
    t = twin(row[1])
    lp = _load(row, d)
    if "Groups" in row[1]:
        with pytest.raises(NotImplementedError):
            peft.PeftModel.from_pretrained(t.torch_model(), d).merge_and_unload()
        with pytest.raises(ValueError, match="grouped convolution"):
            jlora.merge(lp)
        return
    want = run_torch(peft.PeftModel.from_pretrained(t.torch_model(), d).eval().merge_and_unload(), t.torch_input)
    got = t.apply(jlora.merge(lp), t.jax_input)
    assert close(got, want), (row[0], float(np.abs(np.asarray(got) - want).max()))


@pytest.mark.parametrize("row", REFUSE)
def test_variants_refused_by_name(row, files):
    """KaSA, VeLoRA, MonteCLoRA and BD-LoRA adapters: a clear error naming the variant."""
    d, _, _ = files(row)
    with pytest.raises(ValueError, match=row[3][len("refuse:"):]):
        jlora.load_peft(d, twin(row[1]).params)
