"""The 4-bit dequantization from codes held in the kernel's orientation
(``jlora.quant.codec.dequantize_4bit_transposed``, what ``QuantizedArray.dequantize`` runs
on every backend) against the flat codec on bitsandbytes' byte order, whose values are
bitsandbytes' (tests/quant/test_quantization.py), bit for bit, for every kernel layout."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jlora
from jlora.quant import array as qarray
from jlora.quant import codec


def test_transposed_dequantization_is_the_flat_codec():
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
            where = f"{shape} {layout} {qt} dq={dq}"
            n_out, n_in = qarray._n_out_in(q)
            assert q.codes.shape[-2:] == (n_in // 2, n_out), where
            got = np.asarray(q.dequantize(jnp.bfloat16))
            for i in np.ndindex(*q.stack_shape):
                qi = q.replace(**{n: (None if getattr(q, n) is None else getattr(q, n)[i])
                                  for n in ("codes", "absmax", "nested_absmax", "offset")})
                codes, absmax = qarray.bnb_order(qi)
                absmax = jnp.asarray(absmax)
                if dq:
                    absmax = codec.undo_double_quant(absmax, qi.nested_absmax, qi.offset)
                flat = codec.dequantize_4bit(jnp.asarray(codes), absmax, n_out * n_in, 64, qt, jnp.float32)
                ref = qarray._from_torch_2d(flat.astype(jnp.bfloat16).reshape(n_out, n_in), q.item_shape, q.roles)
                np.testing.assert_array_equal(got[i].view(np.uint16), np.asarray(ref).view(np.uint16), err_msg=where)
