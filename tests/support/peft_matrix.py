"""The models of PEFT 0.21.2's own LoRA test matrix (``tests/test_custom_models.py``:
``TEST_CASES``), each as a PyTorch module and a Flax twin holding the same weights.

The PyTorch modules have the layer shapes of PEFT's ``MLP``, ``ModelEmbConv1D``,
``ModelConv1D``, ``ModelConv2D``, ``ModelConv2DGroups``, ``ModelConv2DGroups2`` and
``ModelConv3D`` (written here, not copied; inputs arrive already shaped, and
``Conv2dGroups2`` reads a 4×4 image instead of PEFT's 20×20 arange), plus a square
``Conv1D`` variant (5 → 5). The twins are Flax Linen modules as a JAX user writes them:
``nn.Dense``, ``nn.Embed``, ``nn.Conv`` (``feature_group_count``) and transformers'
own ``FlaxConv1D``, whose kernel is ``(out, in)``.

Only torch tests import this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.models.gpt2.modeling_flax_gpt2 import FlaxConv1D
from transformers.pytorch_utils import Conv1D
from torch import nn as tnn


@dataclasses.dataclass
class Twin:
    """A PyTorch model factory, the Flax twin's ``apply`` and params, and one input each."""

    name: str
    torch_model: Callable[[], tnn.Module]
    apply: Callable[[Any, Any], jax.Array]
    params: Any
    torch_input: torch.Tensor
    jax_input: Any


def _t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().copy()


def dense_params(lin: tnn.Linear) -> dict:
    return {"kernel": _t2n(lin.weight).T, "bias": _t2n(lin.bias)}


def conv_params(conv: tnn.Module) -> dict:
    """PyTorch (out, in/groups, *window) → Flax (*window, in/groups, out)."""
    w = _t2n(conv.weight)
    return {"kernel": np.transpose(w, (*range(2, w.ndim), 1, 0)), "bias": _t2n(conv.bias)}


def _channels_first_flat(x: jax.Array) -> jax.Array:
    """Flatten a channels-last activation in PyTorch's channels-first order."""
    return jnp.moveaxis(x, -1, 1).reshape(x.shape[0], -1)


# --------------------------------------------------------------------------------------
# PyTorch models (PEFT's layer shapes)


class TorchMLP(tnn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = tnn.Linear(10, 20)
        self.lin1 = tnn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


class TorchEmbConv1D(tnn.Module):
    def __init__(self, width: int = 1):
        super().__init__()
        self.emb = tnn.Embedding(100, 5)
        self.conv1d = Conv1D(width, 5)  # transformers' Conv1D(nf, nx): weight (nx, nf) = (in, out)
        self.lin0 = tnn.Linear(10 * width, 2)

    def forward(self, ids):
        h = torch.relu(self.conv1d(self.emb(ids)))
        return torch.log_softmax(self.lin0(h.flatten(1)), dim=-1)


class TorchConv(tnn.Module):
    """``conv`` (named ``conv1d`` / ``conv2d`` / ``conv3d``) then ``lin0`` on the flat output."""

    def __init__(self, name: str, conv: tnn.Module, flat: int, pre: tnn.Module | None = None):
        super().__init__()
        self.conv_name = name
        setattr(self, name, conv)
        if pre is not None:
            self.lin0 = pre
        self.head_name = "lin1" if pre is not None else "lin0"
        setattr(self, self.head_name, tnn.Linear(flat, 2))

    def forward(self, x):
        if hasattr(self, "lin0") and self.head_name == "lin1":
            x = self.lin0(x.flatten()).reshape(2, 16, 3, 3)  # PEFT's Conv2dGroups: lin0 feeds the conv
        h = torch.relu(getattr(self, self.conv_name)(x))
        return torch.log_softmax(getattr(self, self.head_name)(h.flatten(1)), dim=-1)


# --------------------------------------------------------------------------------------
# Flax twins


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(20, name="lin0")(x))
        return jax.nn.log_softmax(nn.Dense(2, name="lin1")(h), axis=-1)


class FlaxEmbConv1D(nn.Module):
    width: int = 1

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(100, 5, name="emb")(ids)
        h = nn.relu(FlaxConv1D(self.width, name="conv1d")(h))
        return jax.nn.log_softmax(nn.Dense(2, name="lin0")(h.reshape(h.shape[0], -1)), axis=-1)


class FlaxConv(nn.Module):
    name_: str
    features: int
    window: tuple
    groups: int = 1
    padding: Any = "VALID"
    pre: bool = False  # Conv2dGroups: lin0 (90 -> 288) feeds the convolution

    @nn.compact
    def __call__(self, x):
        if self.pre:
            x = nn.Dense(288, name="lin0")(x.reshape(-1)).reshape(2, 16, 3, 3).transpose(0, 2, 3, 1)
        h = nn.Conv(self.features, self.window, padding=self.padding, feature_group_count=self.groups,
                    name=self.name_)(x)
        h = _channels_first_flat(nn.relu(h))
        return jax.nn.log_softmax(nn.Dense(2, name="lin1" if self.pre else "lin0")(h), axis=-1)


# --------------------------------------------------------------------------------------
# The models of the matrix


def _seeded(build: Callable[[], tnn.Module]) -> Callable[[], tnn.Module]:
    def make() -> tnn.Module:
        torch.manual_seed(0)  # the same weights every time, as PEFT's MockTransformerWrapper
        return build().eval()

    return make


def _rand(shape: tuple, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_twin(name: str) -> Twin:
    """The PyTorch model and its Flax twin for one model id of the matrix."""
    if name == "MLP":
        make = _seeded(TorchMLP)
        m = make()
        params = {"lin0": dense_params(m.lin0), "lin1": dense_params(m.lin1)}
        x = _rand((3, 10), 1)
        return Twin(name, make, lambda p, x: FlaxMLP().apply({"params": p}, x), params, torch.tensor(x), jnp.asarray(x))
    if name in ("EmbConv1D", "EmbConv1DSquare"):
        width = 5 if name == "EmbConv1DSquare" else 1
        make = _seeded(lambda: TorchEmbConv1D(width))
        m = make()
        params = {
            "emb": {"embedding": _t2n(m.emb.weight)},
            "conv1d": {"kernel": _t2n(m.conv1d.weight).T, "bias": _t2n(m.conv1d.bias)},  # FlaxConv1D: (out, in)
            "lin0": dense_params(m.lin0),
        }
        ids = np.random.default_rng(2).integers(0, 100, (3, 10))
        ids[0, :3] = [0, 10, 10]  # the rows the trainable-tokens row trains
        twin = FlaxEmbConv1D(width)
        return Twin(name, make, lambda p, x: twin.apply({"params": p}, x), params, torch.tensor(ids),
                    jnp.asarray(ids, jnp.int32))
    convs = {
        # name: (torch conv, flax twin, torch input shape (channels first), flat size, lin0 before the conv)
        "Conv1d": (lambda: tnn.Conv1d(1, 1, 2), FlaxConv("conv1d", 1, (2,)), (3, 1, 10), 9, False),
        "Conv2d": (lambda: tnn.Conv2d(5, 10, 3), FlaxConv("conv2d", 10, (3, 3)), (3, 5, 3, 3), 10, False),
        "Conv2dGroups": (lambda: tnn.Conv2d(16, 16, 3, groups=8), FlaxConv("conv2d", 16, (3, 3), groups=8, pre=True),
                         (9, 10), 16, True),
        "Conv2dGroups2": (lambda: tnn.Conv2d(16, 32, 3, padding=1, groups=2),
                          FlaxConv("conv2d", 32, (3, 3), groups=2, padding=((1, 1), (1, 1))), (2, 16, 4, 4), 512,
                          False),
        "Conv3d": (lambda: tnn.Conv3d(5, 10, 3), FlaxConv("conv3d", 10, (3, 3, 3)), (2, 5, 3, 3, 3), 10, False),
    }
    conv, twin, in_shape, flat, pre = convs[name]
    conv_name = twin.name_
    make = _seeded(lambda: TorchConv(conv_name, conv(), flat, tnn.Linear(90, 288) if pre else None))
    m = make()
    params = {conv_name: conv_params(getattr(m, conv_name)), m.head_name: dense_params(getattr(m, m.head_name))}
    if pre:
        params["lin0"] = dense_params(m.lin0)
    x = _rand(in_shape, 3)
    jx = jnp.asarray(x if pre else np.moveaxis(x, 1, -1))  # Flax convolutions are channels-last
    return Twin(name, make, lambda p, x: twin.apply({"params": p}, x), params, torch.tensor(x), jx)
