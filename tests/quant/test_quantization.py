"""``jlora.quantize`` against bitsandbytes 0.50.2 on CPU (the ``test`` extra).

References: ``bitsandbytes.functional.quantize_4bit`` / ``int8_vectorwise_quant`` for
bytes and scales (bit for bit), ``dequantize_4bit`` for widths that are multiples of 64
and bitsandbytes' pure-torch ``_dequantize_4bit_compute`` for the others (its native CPU
dequantize is wrong for widths ≡ 32 mod 64 on AVX-512 machines). A Flax kernel ``K`` is
compared with bitsandbytes on the PyTorch weight ``W = Kᵀ`` (or its ``(out, in)``
flattening for DenseGeneral / stacked kernels).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.quant import codec as Q

torch = pytest.importorskip("torch")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb_F = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as bnb_default  # noqa: E402

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the eager pure-torch reference (bitsandbytes wraps it in torch.compile)
_DEQ_COMPUTE = getattr(bnb_default._dequantize_4bit_compute, "__wrapped__", bnb_default._dequantize_4bit_compute)


def _weight(shape, dtype, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02
    return torch.tensor(w).to(_TORCH[dtype])


def _jax(t):
    """A torch tensor as a JAX array of the same dtype (bit for bit)."""
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.view(torch.int16).numpy().view(jnp.bfloat16))
    return jnp.asarray(t.numpy())


def _np(x):
    return np.asarray(x)


def _flat(x):
    """A packed array as bitsandbytes holds it: flat."""
    return _np(x).reshape(-1)


def _bnb_dequant(packed, state, shape, dtype):
    """bitsandbytes' dequantization of (packed, state): the native kernel where it is
    correct (last dim a multiple of 64), the pure-torch one otherwise."""
    if shape[-1] % 64 == 0:
        return bnb_F.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _DEQ_COMPUTE(packed.reshape(-1), absmax.float(), state.code, state.blocksize, state.shape, _TORCH[dtype])


def _bnb_blockwise_reference(x):
    """bitsandbytes' pure-torch ``quantize_blockwise`` (its "default" kernel: reciprocal
    multiply, bucketize at midpoints), blocks of 256, with the dynamic map. On CPU the
    dispatcher picks a native kernel instead, whose binary search now and then returns the
    second-nearest code (0.3812526, between 0.37421876 and 0.38828123, gives the former) and
    which gives code 0 for an all-zero block (0/0); the pure-torch kernel follows the CUDA
    kernel's rule (reciprocal multiply, nearest code, ties low), as jlora does."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(keys, x.contiguous(), bnb_F.create_dynamic_map(), 256)


def test_code_tables_are_bitsandbytes():
    cpu = torch.device("cpu")
    from bitsandbytes.backends.utils import _get_4bit_code

    for name, ours in [("nf4", Q.NF4_CODE), ("fp4", Q.FP4_CODE)]:
        theirs = _get_4bit_code(name, cpu).numpy()
        assert ours.view(np.uint32).tolist() == theirs.view(np.uint32).tolist(), name
        mids, order = Q._sorted_bounds(ours)
        bm, bo = bnb_default._get_4bit_quantize_bounds(name, cpu)
        assert mids.view(np.uint32).tolist() == bm.numpy().view(np.uint32).tolist()
        assert order.tolist() == bo.tolist()
    assert Q.DYNAMIC_CODE.view(np.uint32).tolist() == bnb_F.create_dynamic_map().numpy().view(np.uint32).tolist()


# (out, in) torch shapes: in a multiple of 64; blocks straddling rows (40); a partial last
# block (3 x 70 = 210); an odd element count (15, padded with a zero code)
SHAPES = [(64, 128), (96, 40), (3, 70), (5, 3)]
CASES = {
    "nf4": [(s, "float32") for s in SHAPES] + [((96, 40), "bfloat16"), ((64, 128), "float16")],
    "fp4": [((64, 128), "float32"), ((96, 40), "float32"), ((96, 40), "bfloat16")],
}


@jax.jit
def _second_level(absmax, offset):
    return Q.double_quantize(absmax, offset=offset)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_bytes_absmax_and_values_equal_bitsandbytes(quant_type):
    for shape, dtype in CASES[quant_type]:
        w = _weight(shape, dtype, seed=shape[0])
        k = _jax(w).T  # the Flax kernel (in, out)
        plain_absmax = None
        for dq in (False, True):
            packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
            q = jlora.quantize_array(k, jlora.QuantConfig(quant_type=quant_type, double_quant=dq))
            where = f"{shape} {dtype} {quant_type} dq={dq}"
            # held by row of the (out, in) weight where rows are whole blocks: the same bytes
            rows = shape[1] % 64 == 0
            n_blocks = state.absmax.numel()
            assert q.codes.dtype == jnp.uint8
            assert q.codes.shape == ((shape[0], shape[1] // 2) if rows else (packed.numel(),)), where
            assert q.absmax.shape == ((shape[0], shape[1] // 64) if rows else (n_blocks,)), where
            assert _flat(q.codes).tolist() == packed.reshape(-1).tolist(), where
            if not dq:
                plain_absmax = q.absmax.reshape(-1)
                assert _flat(q.absmax).view(np.uint32).tolist() == state.absmax.numpy().view(np.uint32).tolist(), where
            else:
                bnb_absmax = torch.tensor(_np(plain_absmax))  # first level: bnb's, checked above
                # with bnb's offset, the second level is bit for bit bnb's (reference kernel)
                qa, nested, _ = _second_level(plain_absmax, jnp.asarray(state.offset.numpy()))
                ref_q, ref_nested = _bnb_blockwise_reference(bnb_absmax - state.offset)
                assert _np(qa).tolist() == ref_q.tolist(), where
                assert _np(nested).view(np.uint32).tolist() == ref_nested.numpy().view(np.uint32).tolist()
                # its own offset is XLA's float32 mean (an ulp or so from torch's), and its
                # codes are bnb's (reference kernel) for that offset
                np.testing.assert_allclose(_np(q.offset), state.offset.numpy(), rtol=1e-6)
                own_q, own_nested = _bnb_blockwise_reference(bnb_absmax - torch.tensor(_np(q.offset)))
                assert _flat(q.absmax).tolist() == own_q.tolist(), where
                assert _np(q.nested_absmax).view(np.uint32).tolist() == own_nested.numpy().view(np.uint32).tolist()
                # bnb dequantizes jlora's state (codes, nested absmax, offset) to jlora's values
                state.absmax = torch.tensor(_flat(q.absmax))
                state.state2.absmax = torch.tensor(_np(q.nested_absmax))
                state.offset = torch.tensor(_np(q.offset))
            ref = _bnb_dequant(packed, state, shape, dtype)
            got = q.dequantize()
            assert got.dtype == k.dtype and got.shape == k.shape
            np.testing.assert_array_equal(_np(got.astype(jnp.float32)).T, ref.float().numpy(), err_msg=where)


def test_midpoint_goes_to_the_lower_code_and_odd_numel_pads_code_7():
    mid = (Q.NF4_CODE[7] + Q.NF4_CODE[8]) / np.float32(2)  # between 0 and 0.0796
    up = np.nextafter(mid, np.float32(1))
    row = np.array([1.0, mid, up, 0.0, -1.0], np.float32)  # absmax 1: scaled values exact
    w = torch.tensor(row[None])  # (1, 5): odd numel
    packed, _ = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = jlora.quantize_array(jnp.asarray(row[:, None]), jlora.QuantConfig(double_quant=False))
    codes = _flat(q.codes).tolist()
    assert codes == packed.reshape(-1).tolist()
    nibbles = [c >> s & 15 for c in codes for s in (4, 0)]
    assert nibbles == [15, 7, 8, 7, 0, 7]  # the tie gives 7, the next float up 8; pad nibble 7


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_int8_equals_llm_int8_vectorwise_quant(dtype):
    w = _weight((48, 96), dtype, seed=3)
    w[5] = 0  # a zero row: codes 0 (bitsandbytes divides 0 by 0 there)
    cb, scb, _ = bnb_F.int8_vectorwise_quant(w.clone())
    q = jlora.quantize_array(_jax(w).T, jlora.QuantConfig(quant_type="int8"))
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (48, 96)
    live = [i for i in range(48) if i != 5]
    np.testing.assert_array_equal(_np(q.codes)[live], cb.numpy()[live])
    assert not _np(q.codes)[5].any()
    assert _np(q.absmax).view(np.uint32).tolist() == scb.numpy().view(np.uint32).tolist()
    ref = bnb_F.int8_vectorwise_dequant(torch.tensor(_np(q.codes)), scb)
    np.testing.assert_array_equal(_np(Q.int8_vectorwise_dequant(q.codes, q.absmax)), ref.numpy())
    ref_cast = ref.to(_TORCH[dtype]).float().numpy()
    np.testing.assert_array_equal(_np(q.dequantize().astype(jnp.float32)).T, ref_cast)


def _tree():
    r = np.random.default_rng(7)
    f = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32) * 0.02)  # noqa: E731
    return {
        "embed": {"embedding": f(50, 64)},
        "attn": {"qkv": {"kernel": f(64, 2, 64), "bias": f(2, 64)},  # DenseGeneral (in, heads, hd)
                 "out": {"kernel": f(2, 64, 64)}},  # DenseGeneral (heads, hd, embed)
        "layers": {"mlp": {"kernel": f(3, 64, 128)}, "norm": {"scale": f(3, 64)}},  # nn.scan stack
        "conv1": {"kernel": f(3, 64, 64)},
        "lm_head": {"kernel": f(64, 50)},
        "ln": {"scale": f(64)},
    }


def _torch_2d(kernel, outs, ins):
    """The (out, in) PyTorch weight of a kernel (output axes ``outs``, input axes ``ins``)."""
    k = np.asarray(kernel)
    t = np.transpose(k, list(outs) + list(ins))
    n_out = int(np.prod([k.shape[i] for i in outs]))
    return torch.tensor(np.ascontiguousarray(t.reshape(n_out, -1)))


def test_quantize_tree_defaults_layouts_and_stacks():
    params = _tree()
    q = jlora.quantize(params, jlora.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=jnp.float32))
    quantized = sorted(p for p, _ in jlora.quant.quantized_leaves(q))
    # embeddings, convolutions, the head and non-kernels stay as they are
    assert quantized == ["attn/out/kernel", "attn/qkv/kernel", "layers/mlp/kernel"]
    assert q["lm_head"]["kernel"] is params["lm_head"]["kernel"]
    qkv, out, mlp = q["attn"]["qkv"]["kernel"], q["attn"]["out"]["kernel"], q["layers"]["mlp"]["kernel"]
    assert qkv.layout == ("in", "out", "out") and out.layout == ("in", "in", "out")
    assert mlp.layout == ("stack", "in", "out") and mlp.codes.shape == (3, 128, 64 // 2)
    cases = [(qkv, params["attn"]["qkv"]["kernel"], (1, 2), (0,)), (out, params["attn"]["out"]["kernel"], (2,), (0, 1))]
    cases += [(jax.tree_util.tree_map(lambda x: x[i], mlp), params["layers"]["mlp"]["kernel"][i], (1,), (0,))
              for i in range(3)]  # each layer is its own Linear (own absmax, offset, nested absmax)
    for qa, kernel, outs, ins in cases:
        w = _torch_2d(kernel, outs, ins)
        packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert _flat(qa.codes).tolist() == packed.reshape(-1).tolist()
        state.absmax, state.offset = torch.tensor(_flat(qa.absmax)), torch.tensor(_np(qa.offset))
        state.state2.absmax = torch.tensor(_np(qa.nested_absmax))
        ref = bnb_F.dequantize_4bit(packed, state)  # (out, in), in a multiple of 64
        np.testing.assert_array_equal(_torch_2d(qa.dequantize(), outs, ins).numpy(), ref.numpy())
    # dequantize: the same tree back, original dtypes, values of each kernel's dequantize
    plain = jlora.dequantize(q)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(params)
    np.testing.assert_array_equal(_np(plain["layers"]["mlp"]["kernel"]), _np(mlp.dequantize()))
    err = np.abs(_np(plain["attn"]["qkv"]["kernel"]) - _np(params["attn"]["qkv"]["kernel"])).max()
    assert 0 < err < 0.2 * np.abs(_np(params["attn"]["qkv"]["kernel"])).max()


def test_quantize_is_pure_under_jit_and_eval_shape():
    params = _tree()
    config = jlora.QuantConfig(quant_type="nf4")
    eager = jlora.quantize(params, config)
    jitted = jax.jit(lambda p: jlora.quantize(p, config))(params)
    abstract = jax.eval_shape(lambda p: jlora.quantize(p, config), params)
    sds = jlora.quantize(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), config)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(jitted)
    for a, b, c, d in zip(*(jax.tree_util.tree_leaves(t) for t in (eager, jitted, abstract, sds))):
        np.testing.assert_array_equal(_np(a), _np(b))
        assert (a.shape, a.dtype) == (c.shape, c.dtype) == (d.shape, d.dtype)
    qs = jlora.quant.quantized_leaves(abstract)
    assert all(q.shape == params_shape for (_, q), params_shape in
               zip(qs, [(2, 64, 64), (64, 2, 64), (3, 64, 128)]))


def test_selection_and_errors():
    params = _tree()
    only = jlora.quantize(params, jlora.QuantConfig(target_modules=["mlp", "lm_head"]))
    assert sorted(p for p, _ in jlora.quant.quantized_leaves(only)) == ["layers/mlp/kernel", "lm_head/kernel"]
    skip = jlora.quantize(params, jlora.QuantConfig(skip_modules=["attn"]))
    assert [p for p, _ in jlora.quant.quantized_leaves(skip)] == ["layers/mlp/kernel"]
    with pytest.raises(ValueError, match="matched no kernel.*attn.qkv"):
        jlora.quantize(params, jlora.QuantConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="quant_type='nf8'.*nf4"):
        jlora.QuantConfig(quant_type="nf8")
    with pytest.raises(ValueError, match="block_size=48"):
        jlora.QuantConfig(block_size=48)
    with pytest.raises(TypeError, match="only float kernels"):
        jlora.quantize_array(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(4, 4\) does not fit layout"):
        jlora.quantize_array(jnp.ones((4, 4)), layout=("in", "out", "out"))
    lp = jlora.wrap(params, jlora.LoraConfig(r=2, target_modules=["mlp"]))
    with pytest.raises(ValueError, match="quantize the base before jlora.wrap"):
        jlora.quantize(lp)


def test_storage_bits_per_parameter():
    """NF4 + double quantization of a 4096 x 4096 kernel: 4 + 8/64 + 32/(64·256) bits per
    parameter (bitsandbytes stores the same arrays, plus its code tables and a JSON state)."""
    k = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    for config, bits in [(jlora.QuantConfig(), 4.127), (jlora.QuantConfig(double_quant=False), 4.5),
                         (jlora.QuantConfig(quant_type="int8"), 8.0078)]:
        q = jlora.quantize_array(k, config)
        assert abs(8 * q.nbytes / q.size - bits) < 1e-3, (config, 8 * q.nbytes / q.size)
        assert abs(8 * q.nbytes / q.size - config.bits_per_parameter(4096)) < 1e-5  # + the offset
    w = torch.zeros(4096, 4096, dtype=torch.bfloat16)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_bytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 4
    assert jlora.quantize_array(k).nbytes == bnb_bytes == 8_654_852
