"""`jlora.wrap`: target matching (against PEFT), layouts, initialisation, jit/eval_shape.

References: PEFT on the same architecture (which modules it targets, their rank, scale,
in/out features and its initial factors), the LoRA definition ΔW = A·B written out with
``numpy.einsum`` in the kernel's known axis order, and the eager ``wrap`` for the
jit/eval_shape versions.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

import jlora
from support.models import conv_embed, linen_scan, nnx_mlp

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------
# PEFT reference: small HF architectures, Flax params as ShapeDtypeStructs (no allocation)


def _arch(name):
    t = transformers
    if name == "gpt2":
        cfg = t.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=100, n_positions=32)
        return cfg, t.FlaxGPT2LMHeadModel, t.GPT2LMHeadModel
    if name == "llama":
        cfg = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
        return cfg, t.FlaxLlamaForCausalLM, t.LlamaForCausalLM
    if name == "bert":
        cfg = t.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=32)
        return cfg, t.FlaxBertModel, t.BertModel
    raise KeyError(name)


_SHAPES: dict = {}


def flax_shapes(name):
    """The Flax model's params as a tree of ShapeDtypeStruct (``_do_init=False`` + eval_shape)."""
    if name not in _SHAPES:
        cfg, flax_cls, _ = _arch(name)
        model = flax_cls(cfg, _do_init=False)
        _SHAPES[name] = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
    return _SHAPES[name]


def peft_targets(name, **kw):
    """{torch module name: (r, scaling, in_features, out_features)} of PEFT's LoRA layers."""
    cfg, _, torch_cls = _arch(name)
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch_cls(cfg), peft.LoraConfig(**kw))
    out = {}
    for mname, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            out[mname] = (m.r["default"], m.scaling["default"], m.in_features, m.out_features)
    assert set(out) == set(pm.base_model.targeted_module_names)
    return out


def jlora_targets(lp):
    """Same as :func:`peft_targets` for a jlora tree (module path '.'-joined)."""
    out = {}
    for path, lw in jlora.lora_leaves(lp):
        module = path.rsplit("/", 1)[0].replace("/", ".")
        ins = [lw.shape[i] for i in lw.kernel_layout.in_axes]
        outs = [lw.shape[i] for i in lw.kernel_layout.out_axes]
        out[module] = (lw.rank, lw.scale, int(np.prod(ins)), int(np.prod(outs)))
    return out


MATCH_CASES = [
    ("gpt2", dict(target_modules=["c_attn", "c_proj"])),
    ("gpt2", dict(target_modules=["attn.c_proj"])),
    ("gpt2", dict(target_modules=r".*\.h\.[02]\.(attn\.c_attn|mlp\.c_fc)")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], exclude_modules=["mlp.c_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], exclude_modules=r".*\.h\.1\..*")),
    ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[0, 2], layers_pattern="h")),
    ("gpt2", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1)),
    ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16,
                   rank_pattern={"v_proj": 2, r"model\.layers\.0\.self_attn\.q_proj": 16},
                   alpha_pattern={"q_proj": 3, "o_proj": 64})),
    ("llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True,
                   rank_pattern={"layers.1.self_attn.v_proj": 16})),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj"])),
    ("bert", dict(target_modules=["query", "value"])),
    ("bert", dict(target_modules=["dense"], exclude_modules=["pooler.dense"])),
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=[1], layers_pattern="layer")),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=r"encoder\.layer\.\d\.attention\.self\.(query|key)")),
    ("bert", dict(target_modules=["query", "value", "dense"], modules_to_save=["pooler"])),
]


@pytest.mark.parametrize("arch, kw", MATCH_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(MATCH_CASES)])
def test_targets_match_peft(arch, kw):
    """Targeted module names, per-module rank and scale, and in/out features equal PEFT's
    for the same config on the same architecture."""
    expected = peft_targets(arch, **kw)
    lp = jlora.wrap(flax_shapes(arch), jlora.LoraConfig(**kw))
    got = jlora_targets(lp)
    assert sorted(got) == sorted(expected)
    for name in expected:
        r, s, fin, fout = expected[name]
        assert got[name][0] == r and got[name][2:] == (fin, fout), name
        np.testing.assert_allclose(got[name][1], s, rtol=1e-12, err_msg=name)


def _synthetic_tree(prefix):
    """A dict tree with layer containers at the top or under a prefix, nested expert
    indices, biases and a norm: the module paths PEFT's matcher is checked on."""
    lin = lambda i, o: {"kernel": jnp.zeros((i, o)), "bias": jnp.zeros((o,))}  # noqa: E731
    layers = {
        str(i): {
            "attn": {"q": lin(8, 8), "v": lin(8, 4), "norm": {"scale": jnp.ones((8,))}},
            "experts": {str(j): {"up": lin(8, 16)} for j in range(3)},
        }
        for i in range(3)
    }
    tree = {"layers": layers, "blocks": {str(i): {"q": lin(8, 8)} for i in range(2)}, "head": lin(8, 5)}
    return {prefix: tree} if prefix else tree


SYNTHETIC_CASES = [
    dict(target_modules=["q", "up"], layers_to_transform=[1]),
    dict(target_modules=["q", "up"], layers_to_transform=[1, 2], layers_pattern="layers"),
    dict(target_modules=["q", "up"], layers_to_transform=[0], layers_pattern=["blocks", "layers"]),
    dict(target_modules=["attn.q", "up"], exclude_modules=["experts.1.up"]),
    dict(target_modules=r".*\.(q|v)", exclude_modules=r"(.*\.)?blocks\..*"),
    dict(target_modules=r"(model\.)?layers\.\d\.experts\.[02]\.up"),
    dict(target_modules=["q", "v", "head"], modules_to_save=["head", "layers.2"]),
]


@pytest.mark.parametrize("prefix", ["", "model"])
@pytest.mark.parametrize("kw", SYNTHETIC_CASES)
def test_matching_matches_peft_matcher(kw, prefix):
    """On a dict tree whose module paths start with the layer container or sit under a
    prefix, with nested indices (experts), the targeted set equals the module paths that
    PEFT's own matcher (``check_target_module_exists``) accepts. Where a list entry gets
    no module at all, jlora (stricter than PEFT, by design) raises naming that entry."""
    from peft.tuners.tuners_utils import check_target_module_exists

    tree = _synthetic_tree(prefix)
    modules = {"/".join(jlora.core.paths.path_names(p)[:-1]).replace("/", ".")
               for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    pcfg = peft.LoraConfig(**kw)
    hit = lambda res: res is True or isinstance(res, re.Match)  # noqa: E731  (not _ExcludedModule/None)
    expected = {m for m in modules if hit(check_target_module_exists(pcfg, m))}
    expected = {m for m in expected if not m.endswith("norm")}  # PEFT would refuse a norm; no kernel here
    assert expected, "the case should target something"
    tm = kw["target_modules"]
    empty = [] if isinstance(tm, str) else [t for t in tm if not any(m == t or m.endswith("." + t) for m in expected)]
    if empty:
        with pytest.raises(ValueError, match=repr(empty[0])):
            jlora.wrap(tree, jlora.LoraConfig(**kw))
        return
    lp = jlora.wrap(tree, jlora.LoraConfig(**kw))
    got = {p.rsplit("/", 1)[0].replace("/", ".") for p, _ in jlora.lora_leaves(lp)}
    assert got == expected


def test_all_linear_is_every_kernel_but_the_head():
    """'all-linear' on a Linen model: every Dense/DenseGeneral/Conv kernel, not the ``head``,
    not the Embed table (the expected list is written out from the model's definition)."""
    lp = jlora.wrap(linen_scan().params, jlora.LoraConfig(r=4, target_modules="all-linear"))
    got = sorted(p for p, _ in jlora.lora_leaves(lp))
    assert got == sorted(f"layers/{m}/kernel" for m in ("query", "value", "out", "fc", "mlp"))
    # stacked plain Dense kernels: (layers, in, out) with factors (L, in, r) / (L, r, out)
    fc = lp["layers"]["fc"]["kernel"]
    assert fc.layout == ("stack", "in", "out") and fc.a.shape == (3, 32, 4) and fc.b.shape == (3, 4, 64)


# ---------------------------------------------------------------------------------------
# Layouts: ΔW from merge equals the einsum of A and B in the kernel's known axis order


class _Attention(nn.Module):
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q = nn.DenseGeneral((4, 8), use_bias=self.bias, name="query")(h)  # (embed, heads, head_dim)
        o = nn.DenseGeneral(24, axis=(-2, -1), use_bias=self.bias, name="out")(q)  # (heads, head_dim, embed)
        return nn.Dense(12, use_bias=self.bias, name="fc")(o)  # (in, out)


# the same config as test_merge's random adapters, so compiled merges are shared
_RAND = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["x"], init_lora_weights=False)


def _delta(lp, path):
    """ΔW = merge(lp) − W at ``path`` (a tuple of keys)."""
    merged, base = jlora.merge(lp), jlora.unload(lp)
    for k in path:
        merged, base = merged[k], base[k]
    return np.asarray(merged, np.float64) - np.asarray(base, np.float64)


def _factors(lp, path):
    x = lp
    for k in path:
        x = x[k]
    return np.asarray(x.a, np.float64), np.asarray(x.b, np.float64), x.scale, x.layout


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_and_dense_general_layouts(use_bias):
    """Dense (in, out); DenseGeneral (embed, heads, head_dim) and (heads, head_dim, embed);
    with and without biases (then the LayerNorm width tells the model width). ΔW from
    ``merge`` equals the einsum over the known contraction axes."""
    x = jnp.ones((2, 5, 24))
    params = _Attention(use_bias).init(jax.random.key(0), x)["params"]
    cfg = jlora.LoraConfig(r=3, lora_alpha=6, target_modules=["query", "out", "fc"], init_lora_weights=False)
    lp = jlora.wrap(params, cfg, rng=jax.random.key(1))
    a, b, s, layout = _factors(lp, ("query", "kernel"))
    assert layout == ("in", "out", "out") and a.shape == (24, 3) and b.shape == (3, 4, 8)
    np.testing.assert_allclose(_delta(lp, ("query", "kernel")), s * np.einsum("ek,khd->ehd", a, b), atol=1e-6)
    a, b, s, layout = _factors(lp, ("out", "kernel"))
    assert layout == ("in", "in", "out") and a.shape == (4, 8, 3) and b.shape == (3, 24)
    np.testing.assert_allclose(_delta(lp, ("out", "kernel")), s * np.einsum("hdk,ke->hde", a, b), atol=1e-6)
    a, b, s, layout = _factors(lp, ("fc", "kernel"))
    assert layout == ("in", "out") and a.shape == (24, 3) and b.shape == (3, 12)
    np.testing.assert_allclose(_delta(lp, ("fc", "kernel")), s * a @ b, atol=1e-6)


def test_layouts_override():
    """``layouts=`` overrides the inferred layout; a wrong override for the shape is a ValueError."""
    params = _Attention().init(jax.random.key(0), jnp.ones((1, 2, 24)))["params"]
    cfg = jlora.LoraConfig(r=2, target_modules=["out"])
    lp = jlora.wrap(params, cfg, layouts={"out": ("in", "out", "out")})
    assert lp["out"]["kernel"].layout == ("in", "out", "out")
    lp = jlora.wrap(params, cfg, layouts=lambda module, shape: ("in", "in", "out") if module == "out" else None)
    assert lp["out"]["kernel"].layout == ("in", "in", "out")
    with pytest.raises(ValueError, match="layout"):
        jlora.wrap(params, cfg, layouts={"out": ("in", "out")})


def test_gpt2_conv1d_layout_is_out_in():
    """HF GPT-2's FlaxConv1D kernel is stored (out, in): c_attn of width 32 is (96, 32) and
    its ΔW is (A·B)ᵀ; PEFT (torch Conv1D, fan_in_fan_out) has in_features 32, out 96."""
    from support.models import gpt2

    case = gpt2()
    lp = jlora.wrap(case.params, _RAND.replace(target_modules=case.targets), rng=jax.random.key(3))
    path = ("transformer", "h", "0", "attn", "c_attn", "kernel")
    a, b, s, layout = _factors(lp, path)
    assert layout == ("out", "in") and a.shape == (32, 4) and b.shape == (4, 96)
    np.testing.assert_allclose(_delta(lp, path), s * (a @ b).T, atol=1e-6)
    assert peft_targets("gpt2", r=2, target_modules=["c_attn"])["transformer.h.0.attn.c_attn"][2:] == (32, 96)


def test_scan_stacked_layout_gets_stacked_factors():
    """nn.scan params carry a leading layer axis: A (L, in, r), B (L, r, out); layer l's ΔW is
    A[l]·B[l] (einsum over the known DenseGeneral axes), and layers get different factors."""
    case = linen_scan()
    lp = jlora.wrap(case.params, _RAND.replace(target_modules=case.targets), rng=jax.random.key(0))
    a, b, s, layout = _factors(lp, ("layers", "query", "kernel"))
    assert layout == ("stack", "in", "out", "out") and a.shape == (3, 32, 4) and b.shape == (3, 4, 4, 8)
    np.testing.assert_allclose(_delta(lp, ("layers", "query", "kernel")),
                               s * np.einsum("lek,lkhd->lehd", a, b), atol=1e-6)
    assert not np.allclose(a[0], a[1])
    a, b, s, layout = _factors(lp, ("layers", "out", "kernel"))
    assert layout == ("stack", "in", "in", "out") and a.shape == (3, 4, 8, 4) and b.shape == (3, 4, 32)
    np.testing.assert_allclose(_delta(lp, ("layers", "out", "kernel")),
                               s * np.einsum("lhdk,lke->lhde", a, b), atol=1e-6)


def test_conv_and_embed_layouts_and_init():
    """Conv kernel (width, in, out): A (width, in, r), B (r, out); Embed (vocab, features):
    A (vocab, r), B (r, features), with PEFT's embedding init (A = 0, B ~ N(0, 1))."""
    case = conv_embed()
    cfg = jlora.LoraConfig(r=4, target_modules=["conv", "embed"])
    lp = jlora.wrap(case.params, cfg, rng=jax.random.key(0))
    conv, emb = lp["conv"]["kernel"], lp["embed"]["embedding"]
    assert conv.layout == ("in", "in", "out") and conv.a.shape == (3, 16, 4) and conv.b.shape == (4, 24)
    assert emb.layout == ("in", "out") and emb.a.shape == (100, 4) and emb.b.shape == (4, 16)
    assert not np.any(np.asarray(emb.a)) and 0.8 < float(np.std(np.asarray(emb.b))) < 1.2
    assert not np.any(np.asarray(conv.b))
    bound = 1 / np.sqrt(3 * 16)  # PEFT's Conv fan_in = in_channels · kernel width
    assert np.abs(np.asarray(conv.a)).max() <= bound


# ---------------------------------------------------------------------------------------
# Initialisation vs PEFT


def _peft_linear_factors(fan_in, fan_out, r, init):
    """PEFT's initial lora_A / lora_B (torch layout (r, in) / (out, r)) for a Linear."""
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(fan_in, fan_out))
    pm = peft.get_peft_model(base, peft.LoraConfig(r=r, target_modules=["lin"], init_lora_weights=init))
    layer = pm.base_model.model.lin
    return layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()


def _wrap_linear(fan_in, fan_out, r, init, dtype=jnp.float32):
    params = {"lin": {"kernel": jnp.zeros((fan_in, fan_out)), "bias": jnp.zeros((fan_out,))}}
    lp = jlora.wrap(params, jlora.LoraConfig(r=r, target_modules=["lin"], init_lora_weights=init),
                    rng=jax.random.key(0), dtype=dtype)
    lw = lp["lin"]["kernel"]
    return np.asarray(lw.a, np.float32), np.asarray(lw.b, np.float32)


def test_init_true_matches_peft_distribution():
    """True: B = 0 and A ~ U(±1/sqrt(fan_in)) (kaiming-uniform a=√5) — same range and std as
    PEFT's lora_A for the same Linear."""
    a, b = _wrap_linear(256, 64, 8, True)
    pa, pb = _peft_linear_factors(256, 64, 8, True)
    assert not np.any(b) and not np.any(pb)
    np.testing.assert_allclose(np.abs(a).max(), np.abs(pa).max(), rtol=0.03)
    np.testing.assert_allclose(a.std(), pa.std(), rtol=0.1)
    assert np.abs(a).max() <= 1 / 16


def test_init_gaussian_matches_peft_distribution():
    """'gaussian': A ~ N(0, (1/r)²), B = 0, as PEFT's lora_A std = 1/r."""
    a, b = _wrap_linear(512, 64, 4, "gaussian")
    pa, _ = _peft_linear_factors(512, 64, 4, "gaussian")
    assert not np.any(b)
    np.testing.assert_allclose(a.std(), 1 / 4, rtol=0.06)
    np.testing.assert_allclose(a.std(), pa.std(), rtol=0.1)
    assert abs(a.mean()) < 0.02


def test_init_false_both_random_like_peft():
    """False: both factors random (torch's default Linear init for lora_A and lora_B)."""
    a, b = _wrap_linear(256, 64, 8, False)
    pa, pb = _peft_linear_factors(256, 64, 8, False)
    assert np.all(a != 0).mean() > 0.99 and np.all(b != 0).mean() > 0.99
    np.testing.assert_allclose(np.abs(b).max(), np.abs(pb).max(), rtol=0.1)
    np.testing.assert_allclose(np.abs(a).max(), np.abs(pa).max(), rtol=0.03)


def test_factor_dtype_default_float32_and_configurable():
    """A/B are float32 whatever the base dtype; ``dtype=`` changes them; W keeps its dtype."""
    params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), nnx_mlp().params)
    lp = jlora.wrap(params, jlora.LoraConfig(target_modules=["up"]))
    lw = jlora.lora_leaves(lp)[0][1]
    assert (lw.w.dtype, lw.a.dtype, lw.b.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    lp = jlora.wrap(params, jlora.LoraConfig(target_modules=["up"]), dtype=jnp.bfloat16)
    lw = jlora.lora_leaves(lp)[0][1]
    assert (lw.a.dtype, lw.b.dtype) == (jnp.bfloat16, jnp.bfloat16)


def test_rng_determinism_and_independent_factors():
    """The same key gives the same factors, another key others; each target gets its own A."""
    params = linen_scan().params
    cfg = jlora.LoraConfig(r=4, target_modules=["query", "value"])
    one = jlora.wrap(params, cfg, rng=jax.random.key(7))
    jax.tree_util.tree_map(np.testing.assert_array_equal, one, jlora.wrap(params, cfg, rng=jax.random.key(7)))
    other = jlora.wrap(params, cfg, rng=jax.random.key(8))
    q, v = one["layers"]["query"]["kernel"].a, one["layers"]["value"]["kernel"].a
    assert not np.allclose(q, v)
    assert not np.allclose(q, other["layers"]["query"]["kernel"].a)


# ---------------------------------------------------------------------------------------
# Structure, purity, jit and eval_shape


def test_wrap_is_pure_and_keeps_containers():
    """The input tree is unchanged; FrozenDict and nnx.State containers are kept; the
    static data (scale, layout, dropout) comes from the config."""
    params = FrozenDict(linen_scan().params)
    before = jax.tree_util.tree_leaves(params)
    cfg = jlora.LoraConfig(r=4, lora_alpha=16, target_modules=["query"], lora_dropout=0.25)
    lp = jlora.wrap(params, cfg)
    assert isinstance(lp, FrozenDict) and isinstance(lp["layers"], FrozenDict)
    assert all(x is y for x, y in zip(before, jax.tree_util.tree_leaves(params)))
    lw = lp["layers"]["query"]["kernel"]
    assert (lw.scale, lw.dropout, lw.merged) == (4.0, 0.25, False)
    assert lw.w is params["layers"]["query"]["kernel"]

    state = nnx_mlp().params
    lp = jlora.wrap(state, jlora.LoraConfig(target_modules=["up"]))
    assert isinstance(lp, nnx.State)
    assert isinstance(jlora.lora_leaves(lp)[0][1], jlora.LoraWeight)


def test_wrap_under_jit_equals_eager():
    """``jax.jit`` of wrap gives the same tree (structure, static data, values) as eager wrap."""
    params = linen_scan().params
    cfg = jlora.LoraConfig(r=4, target_modules=["query", "out"], init_lora_weights=False)
    eager = jlora.wrap(params, cfg, rng=jax.random.key(2))
    jitted = jax.jit(lambda p, k: jlora.wrap(p, cfg, rng=k))(params, jax.random.key(2))
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=0), jitted, eager)


def test_wrap_eval_shape_and_abstract_input():
    """``jax.eval_shape(wrap)`` and wrap on a ShapeDtypeStruct tree both give ShapeDtypeStruct
    leaves with the shapes, dtypes and structure of the eager wrap."""
    params = linen_scan().params
    cfg = jlora.LoraConfig(r=4, target_modules=["query", "out"])
    eager = jlora.wrap(params, cfg)
    shaped = jax.eval_shape(lambda p: jlora.wrap(p, cfg), params)
    abstract = jlora.wrap(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), cfg)
    for tree in (shaped, abstract):
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(eager)
        for got, want in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(eager)):
            assert isinstance(got, jax.ShapeDtypeStruct)
            assert (got.shape, got.dtype) == (want.shape, want.dtype)


def test_wrapping_abstract_gpt2_small_allocates_nothing():
    """A 124M-parameter GPT-2 tree of ShapeDtypeStruct wraps without allocating its arrays:
    the result is ShapeDtypeStruct throughout and live device memory does not grow."""
    cfg_t = transformers.GPT2Config()
    model = transformers.FlaxGPT2LMHeadModel(cfg_t, _do_init=False)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), (1, 1)))
    before = sum(x.nbytes for x in jax.live_arrays())
    lp = jlora.wrap(shapes, jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]))
    after = sum(x.nbytes for x in jax.live_arrays())
    assert after - before < 1 << 20
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(lp))
    lw = lp["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert lw.a.shape == (768, 8) and lw.b.shape == (8, 2304)
