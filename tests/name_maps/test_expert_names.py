"""Name maps for stacked experts: a ``Rule`` whose PyTorch name holds ``{i}`` (one module
per slice of the first axis, however many), and the ``qwen3_moe`` family recognised from
the paths. References: transformers 4.x's module names and ``nn.Linear``'s (out, in) layout,
written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from jlora import name_maps
from jlora.name_maps import Rule

E, D, F = 4, 8, 6
LEAVES = [
    (("layers", "0", "attn", "q_proj", "w"), (D, 2, 4), 0),
    (("layers", "0", "attn", "q_norm", "w"), (4,), 0),
    (("layers", "0", "mlp", "gate", "w"), (D, E), 0),
    (("layers", "0", "mlp", "experts", "gate_proj", "w"), (E, D, F), 1),
    (("layers", "0", "mlp", "experts", "down_proj", "w"), (E, F, D), 1),
]


def test_qwen3_moe_is_recognised_and_qwen3_is_not_taken_for_it():
    assert name_maps.recognise("/".join(n) for n, _, _ in LEAVES).name == "qwen3_moe"
    dense = [x for x in LEAVES if "experts" not in x[0] and "gate" not in x[0]]
    assert name_maps.recognise("/".join(n) for n, _, _ in dense).name == "qwen3"


def test_expert_slices_are_transformers_modules_both_ways():
    tn = name_maps.for_tree(LEAVES)
    names = ("layers", "0", "mlp", "experts", "gate_proj", "w")
    assert tn.split(names)
    assert tn.modules(names) == [f"model.layers.0.mlp.experts.{e}.gate_proj" for e in range(E)]
    assert tn.layout(names, (E, D, F)) == ("stack", "in", "out")
    assert tn.modules(("layers", "0", "mlp", "gate", "w")) == ["model.layers.0.mlp.gate"]
    w = np.random.default_rng(0).normal(size=(E, D, F)).astype(np.float32)
    torch_side = tn.param_to_torch(names, w)
    assert len(torch_side) == E
    for e in range(E):
        np.testing.assert_array_equal(torch_side[e], w[e].T)  # nn.Linear weight (out, in)
    np.testing.assert_array_equal(tn.param_from_torch(names, torch_side, (E, D, F)), w)
    down = ("layers", "0", "mlp", "experts", "down_proj", "w")
    assert tn.torch_shapes(down, (E, F, D)) == [(D, F)] * E


def test_rule_with_slice_names_needs_the_shape():
    rule = Rule(r"experts/(\w+)/w", r"experts.{i}.\1.weight", "e d f", "f d")
    assert rule.is_split and rule.layout() == ("stack", "in", "out")
    m = rule.match("layers/0/experts/up_proj/w")
    assert rule.torch_names(m, (3, D, F)) == ["experts.0.up_proj.weight", "experts.1.up_proj.weight",
                                              "experts.2.up_proj.weight"]
    with pytest.raises(ValueError, match="shape"):
        rule.torch_names(m)
