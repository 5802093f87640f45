"""Small randomly initialised models shared by the tests.

Each builder returns a ``ModelCase``: ``apply(params, inputs) -> array``, the base
``params`` tree, example ``inputs`` and the ``target_modules`` a user would pick.
Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass
class ModelCase:
    name: str
    apply: Callable[[Any, Any], jax.Array]
    params: Any
    inputs: Any
    targets: list[str]
    model: Any = None


def _ids(batch: int = 2, length: int = 8, vocab: int = 99, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, vocab)


@functools.lru_cache(maxsize=None)
def gpt2(dtype: str = "float32") -> ModelCase:
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
    model = FlaxGPT2LMHeadModel(cfg, seed=0, dtype=getattr(jnp, dtype))
    apply = lambda params, ids: model(ids, params=params).logits  # noqa: E731
    return ModelCase("gpt2", apply, model.params, _ids(), ["c_attn", "c_proj"], model)


@functools.lru_cache(maxsize=None)
def llama() -> ModelCase:
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32,
    )
    model = FlaxLlamaForCausalLM(cfg, seed=0)
    apply = lambda params, ids: model(ids, params=params).logits  # noqa: E731
    return ModelCase("llama", apply, model.params, _ids(), ["q_proj", "v_proj"], model)


@functools.lru_cache(maxsize=None)
def bert() -> ModelCase:
    from transformers import BertConfig, FlaxBertModel

    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32,
    )
    model = FlaxBertModel(cfg, seed=0)
    apply = lambda params, ids: model(ids, params=params).last_hidden_state  # noqa: E731
    return ModelCase("bert", apply, model.params, _ids(), ["query", "value"], model)


class _JnpClipCompat:
    """transformers 4.57's Flax T5 calls ``jnp.clip(x, a_max=...)``, which JAX 0.10 removed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)

    @staticmethod
    def clip(x, a_min=None, a_max=None, **kw):
        return jnp.clip(x, kw.pop("min", a_min), kw.pop("max", a_max), **kw)


@functools.lru_cache(maxsize=None)
def t5() -> ModelCase:
    import transformers.models.t5.modeling_flax_t5 as t5_module
    from transformers import FlaxT5ForConditionalGeneration, T5Config

    t5_module.jnp = _JnpClipCompat()

    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=100)
    model = FlaxT5ForConditionalGeneration(cfg, seed=0)
    apply = lambda params, ids: model(input_ids=ids, decoder_input_ids=ids, params=params).logits  # noqa: E731
    return ModelCase("t5", apply, model.params, _ids(), ["q", "v"], model)


class _ScanBlock(nn.Module):
    heads: int = 4
    head_dim: int = 8

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(h)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(h)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, q) / jnp.sqrt(self.head_dim), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        o = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(mixed)
        x = x + o
        x = x + nn.Dense(x.shape[-1], name="mlp")(nn.gelu(nn.Dense(64, name="fc")(nn.LayerNorm()(x))))
        return x, None


class ScanLM(nn.Module):
    """Embed → nn.scan(nn.remat(block)) over 3 layers → LayerNorm → Dense head."""

    vocab: int = 100
    width: int = 32
    layers: int = 3

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed")(ids)
        stack = nn.scan(
            nn.remat(_ScanBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


@functools.lru_cache(maxsize=None)
def linen_scan() -> ModelCase:
    model = ScanLM()
    ids = _ids()
    params = model.init(jax.random.key(0), ids)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return ModelCase("linen_scan", apply, params, ids, ["query", "value", "out"], model)


class ConvEmbedNet(nn.Module):
    """Embed → 1-D Conv → Dense; targets include the Embed and the Conv."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(100, 16, name="embed")(ids)
        x = nn.relu(nn.Conv(24, (3,), name="conv")(x))
        return nn.Dense(10, name="head")(x)


@functools.lru_cache(maxsize=None)
def conv_embed() -> ModelCase:
    model = ConvEmbedNet()
    ids = _ids()
    params = model.init(jax.random.key(0), ids)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return ModelCase("conv_embed", apply, params, ids, ["embed", "conv"], model)


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


@functools.lru_cache(maxsize=None)
def nnx_mlp() -> ModelCase:
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 16))
    apply = lambda st, inp: nnx.merge(graphdef, st)(inp)  # noqa: E731
    return ModelCase("nnx_mlp", apply, state, x, ["up", "down"], graphdef)


ALL = {
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "t5": t5,
    "linen_scan": linen_scan,
    "conv_embed": conv_embed,
    "nnx_mlp": nnx_mlp,
}
