"""The TPU's tiled 4-bit dequantization (``jlora.quant.codec.dequantize_4bit_transposed``,
chosen by ``QuantizedArray.dequantize`` on TPU) against the flat codec, whose values are
bitsandbytes' (tests/quant/test_quantization.py), bit for bit, run here on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.quant import array as qarray
from jlora.quant import codec


def test_tiled_dequantization_is_the_flat_codec():
    """The TPU's tiled 4-bit dequantization against the flat codec (bitsandbytes' values,
    tests/quant/test_quantization.py), bit for bit, for every kernel layout the codec knows."""
    rng = np.random.default_rng(0)
    cases = [
        ((128, 192), ("in", "out")),
        ((64, 4, 16), ("in", "out", "out")),  # einsum D, N, H
        ((4, 16, 64), ("in", "in", "out")),  # einsum N, H, D
        ((192, 128), ("out", "in")),
        ((3, 64, 128), ("stack", "in", "out")),
    ]
    for shape, layout in cases:
        w = jnp.asarray(rng.standard_normal(shape) * 0.05, jnp.bfloat16)
        for qt, dq in (("nf4", True), ("nf4", False), ("fp4", True)):
            q = jlora.quantize_array(w, jlora.QuantConfig(quant_type=qt, double_quant=dq), layout)
            flat = np.asarray(q.dequantize(jnp.bfloat16))

            def tiled(codes, absmax, nested, offset):
                if q.double_quant:
                    absmax = codec.undo_double_quant(absmax, nested, offset)
                outs, ins = qarray._torch_perm(q.roles)
                n_out = int(np.prod([q.item_shape[i] for i in outs]))
                n_in = int(np.prod([q.item_shape[i] for i in ins]))
                w_t = codec.dequantize_4bit_transposed(codes, absmax, n_out, n_in, q.block_size, q.quant_type, q.dtype,
                                           jnp.bfloat16)
                return qarray._from_torch_2d_t(w_t, q.item_shape, q.roles)

            f = tiled
            for _ in q.stack_shape:
                f = jax.vmap(f)
            got = np.asarray(jax.jit(f)(q.codes, q.absmax, q.nested_absmax, q.offset))
            assert got.shape == flat.shape
            np.testing.assert_array_equal(got.view(np.uint16), flat.view(np.uint16), err_msg=f"{shape} {qt} dq={dq}")
