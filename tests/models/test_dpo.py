"""DPO with LoRA (``examples/dpo.py``): the reference model is the base itself.

(a) The compiled DPO step's arguments are one base + the factors + their optimizer state
    + the batch: XLA's ``memory_analysis()`` argument bytes equal the plain LoRA (SFT)
    step's on the same batch bytes, while a step given a reference copy of the base grows
    by the base's bytes (so the measurement can see a copy).
(b) The reference log-probs (``jlora.disable_adapter(lp)`` through ``jlora.lora``) are
    bit-for-bit the base model's (the plain apply on the unwrapped params).
(c) The DPO (and IPO) gradients of A and B match a float64 reference: a hand-written
    decoder evaluated on explicitly merged weights ``W + (alpha / r) A B`` under
    ``jax.enable_x64``, the loss written out again, differentiated with ``jax.grad``:
    no jlora.lora, jlora.merge or example code on that side.
"""

from __future__ import annotations

from support.paths import ROOT as _ROOT
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = str(_ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import jlora  # noqa: E402
import dpo  # noqa: E402
import sft_causal_lm as sft  # noqa: E402


def _pairs(n: int, t: int, vocab: int, seed: int = 0):
    """n preference pairs of length t + 1: a shared prompt, different completions, padded
    with masks 1 on the positions that predict a completion token."""
    rs = np.random.RandomState(seed)
    ids_c = rs.randint(1, vocab, (n, t + 1)).astype(np.int32)
    ids_r = ids_c.copy()
    m_c, m_r = np.zeros((n, t), np.float32), np.zeros((n, t), np.float32)
    for i in range(n):
        p = 3 + i % 3  # prompt length
        lc, lr = t - p - i % 2, t - p - (i + 1) % 2  # completion lengths (with padding)
        ids_r[i, p:] = rs.randint(1, vocab, t + 1 - p)
        ids_c[i, p + lc + 1 :] = 0
        ids_r[i, p + lr + 1 :] = 0
        m_c[i, p - 1 : p + lc] = 1
        m_r[i, p - 1 : p + lr] = 1
    return ids_c, m_c, ids_r, m_r


@functools.lru_cache(maxsize=None)
def _qwen3():
    """The example's model (jlora.models' NNX Qwen3), tiny, random (numpy-filled: no XLA
    compile per parameter shape); wrapped with non-zero A and B."""
    from flax import nnx

    import jlora.models as jm

    cfg = jm.DecoderConfig("qwen3", 64, 32, 64, 1, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4)
    graphdef, abstract = nnx.split(jm.abstract(cfg))
    rs = np.random.RandomState(0)
    fill = lambda s: jnp.asarray((1.0 if len(s.shape) == 1 else 0.0) + 0.2 * rs.randn(*s.shape), s.dtype)  # noqa: E731
    state = jax.tree_util.tree_map(fill, abstract)
    apply = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=dpo.NNX_TARGETS, init_lora_weights=False)
    lp = jax.jit(lambda st: jlora.wrap(st, config, rng=jax.random.key(1), apply_fn=apply,
                                       example_args=(jnp.zeros((1, 4), jnp.int32),)))(state)
    return state, apply, lp


def test_reference_logps_are_the_base_models_exactly():
    """(b) disable_adapter(lp) through jlora.lora == the plain model on the unwrapped params, bitwise."""
    base, apply, lp = _qwen3()
    batch = _pairs(4, 15, 64, seed=1)
    forward = jlora.lora(apply)
    pi, ref = jax.jit(lambda lp, *b: dpo.pair_logps(forward, lp, *b))(lp, *batch)
    ids, m = np.concatenate([batch[0], batch[2]]), np.concatenate([batch[1], batch[3]])
    plain = jax.jit(lambda p: dpo.sequence_logps(apply, p, ids, m))(base)
    np.testing.assert_array_equal(np.asarray(ref).reshape(-1), np.asarray(plain))
    assert np.abs(np.asarray(pi).reshape(-1) - np.asarray(plain)).max() > 1e-3  # the adapter is on for the policy
    # and no second copy outside jit either: the reference tree holds the policy's W buffers
    kern = dpo.base_kernels
    assert all(a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
               for a, b in zip(kern(lp), kern(jlora.disable_adapter(lp))))


# --------------------------------------------------------------------------------------
# (c) gradient vs a float64 reference


H, HEADS, FF, VOCAB, LAYERS = 16, 2, 32, 40, 2


def _decoder(p, ids):
    """A small pre-norm decoder written with jnp only (dtype follows the params)."""
    x = p["embed"]["embedding"][ids]
    t = ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))

    def norm(v, scale):
        return v * jax.lax.rsqrt(jnp.mean(v * v, -1, keepdims=True) + 1e-6) * scale

    for i in range(sum(k.startswith("layer_") for k in p)):
        layer = p[f"layer_{i}"]
        h = norm(x, layer["norm1"]["scale"])
        q, k, v = (jnp.reshape(h @ layer[n]["kernel"], h.shape[:2] + (HEADS, -1)) for n in ("q_proj", "k_proj", "v_proj"))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
        s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(h.shape)
        x = x + a @ layer["o_proj"]["kernel"]
        h = norm(x, layer["norm2"]["scale"])
        x = x + (jax.nn.silu(h @ layer["gate_proj"]["kernel"]) * (h @ layer["up_proj"]["kernel"])) @ layer["down_proj"]["kernel"]
    return norm(x, p["norm"]["scale"]) @ p["lm_head"]["kernel"]


def _decoder_params(seed: int = 0, layers: int = LAYERS):
    rs = np.random.RandomState(seed)
    w = lambda *s: (rs.randn(*s) / math.sqrt(s[0])).astype(np.float32)  # noqa: E731
    p = {"embed": {"embedding": rs.randn(VOCAB, H).astype(np.float32)}, "norm": {"scale": 1 + 0.1 * rs.randn(H).astype(np.float32)},
         "lm_head": {"kernel": w(H, VOCAB)}}
    for i in range(layers):
        p[f"layer_{i}"] = {"norm1": {"scale": 1 + 0.1 * rs.randn(H).astype(np.float32)},
                           "norm2": {"scale": 1 + 0.1 * rs.randn(H).astype(np.float32)},
                           "q_proj": {"kernel": w(H, H)}, "k_proj": {"kernel": w(H, H)}, "v_proj": {"kernel": w(H, H)},
                           "o_proj": {"kernel": w(H, H)}, "gate_proj": {"kernel": w(H, FF)},
                           "up_proj": {"kernel": w(H, FF)}, "down_proj": {"kernel": w(FF, H)}}
    return jax.tree_util.tree_map(jnp.asarray, p)


def _reference_loss(ab, base, batch, beta, loss_type, scale):
    """Float64, written out: merged kernels W + scale * A @ B (``ab``: leaf index of W in
    ``base`` -> (A, B)), log-softmax, gather, masked sums; DPO -log sigmoid(beta h) =
    log(1 + exp(-beta h)); IPO on per-token means."""
    leaves, treedef = jax.tree_util.tree_flatten(base)
    params = jax.tree_util.tree_unflatten(treedef, [w + scale * ab[k][0] @ ab[k][1] if k in ab else w
                                                    for k, w in enumerate(leaves)])
    ids_c, m_c, ids_r, m_r = batch

    def logp(p, ids, m):
        lsm = jax.nn.log_softmax(_decoder(p, ids[:, :-1]), -1)
        return (jnp.take_along_axis(lsm, ids[:, 1:, None], -1)[..., 0] * m).sum(-1)

    pc, pr = logp(params, ids_c, m_c), logp(params, ids_r, m_r)
    rc, rr = logp(base, ids_c, m_c), logp(base, ids_r, m_r)
    if loss_type == "ipo":
        nc, nr = m_c.sum(-1), m_r.sum(-1)
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        return jnp.mean((h - 1 / (2 * beta)) ** 2)
    h = (pc - rc) - (pr - rr)
    return jnp.mean(jnp.log1p(jnp.exp(-beta * h)))


LOSSES = (("sigmoid", 0.5), ("ipo", 0.5))


def test_dpo_gradient_matches_float64_reference():
    """(c) dL/dA, dL/dB of DPO and IPO from the example's loss (float32, jlora.lora) ==
    float64 jax.grad on explicitly merged weights (each side: both losses in one compile)."""
    base = _decoder_params()
    r, alpha = 4, 8
    config = jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=dpo.NNX_TARGETS, init_lora_weights=False)
    lp = jax.jit(lambda p: jlora.wrap(p, config, rng=jax.random.key(2)))(base)
    # B = 0 would leave dL/dA = 0; init_lora_weights=False draws both, scaled so the policy moves
    lp = jax.tree_util.tree_map(lambda x: x.replace(b=x.b * 3.0) if isinstance(x, jlora.LoraWeight) else x, lp,
                                is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    batch = tuple(jnp.asarray(b) for b in _pairs(3, 11, VOCAB, seed=3))
    trainable, frozen = jlora.partition(lp)
    forward = jlora.lora(_decoder)

    @jax.jit
    def ours(trainable, frozen, batch):
        return [jax.value_and_grad(dpo.dpo_loss, has_aux=True)(trainable, frozen, forward, batch, beta, lt)
                for lt, beta in LOSSES]

    got = ours(trainable, frozen, batch)
    is_node = lambda x: isinstance(x, jlora.LoraWeight)  # noqa: E731
    nodes = jax.tree_util.tree_leaves(lp, is_leaf=is_node)
    idx = [k for k, n in enumerate(nodes) if is_node(n)]  # lp's nodes sit where base's leaves are
    assert len(idx) == 7 * LAYERS and len(nodes) == len(jax.tree_util.tree_leaves(base))

    with jax.enable_x64(True):
        f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))  # noqa: E731
        base64 = jax.tree_util.tree_map(f64, base)
        ab = {k: (f64(nodes[k].a), f64(nodes[k].b)) for k in idx}
        batch64 = tuple(jnp.asarray(np.asarray(b, np.float64 if b.dtype == np.float32 else np.int64)) for b in batch)
        ref = jax.jit(lambda ab, base, batch: [jax.value_and_grad(_reference_loss)(ab, base, batch, beta, lt, alpha / r)
                                               for lt, beta in LOSSES])(ab, base64, batch64)
        ref = [(float(l), {k: (np.asarray(a), np.asarray(b)) for k, (a, b) in g.items()}) for l, g in ref]

    for (lt, _), ((loss32, _), g32), (loss64, g64) in zip(LOSSES, got, ref):
        assert abs(float(loss32) - loss64) <= 1e-5 * max(1.0, abs(loss64)), (lt, float(loss32), loss64)
        gnodes = jax.tree_util.tree_leaves(g32, is_leaf=lambda x: x is None or is_node(x))  # None: frozen leaves
        scale = max(np.abs(g).max() for pair in g64.values() for g in pair)
        assert scale > 1e-3, lt  # a gradient worth comparing
        for k in idx:
            for mine, want, name in ((gnodes[k].a, g64[k][0], "A"), (gnodes[k].b, g64[k][1], "B")):
                np.testing.assert_allclose(np.asarray(mine), want, rtol=1e-3, atol=1e-4 * scale,
                                           err_msg=f"{lt}: node {k} {name}")


def test_dpo_step_arguments_hold_one_base():
    """(a) memory_analysis: DPO step == SFT step (same batch bytes); a reference copy adds the base."""
    base, apply = _decoder_params(layers=1), _decoder
    config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=dpo.NNX_TARGETS)
    lp = jax.jit(lambda p: jlora.wrap(p, config, rng=jax.random.key(1)))(base)
    forward = jlora.lora(apply)
    trainable, frozen = jlora.partition(lp)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(trainable)
    ids_c, m_c, ids_r, m_r = _pairs(4, 15, VOCAB)

    dpo_c = jax.jit(dpo.make_dpo_step(forward, tx, 0.1)).lower(
        trainable, frozen, opt_state, ids_c, m_c, ids_r, m_r).compile()
    sft_c = jax.jit(sft.make_sft_step(forward, tx)).lower(
        trainable, frozen, opt_state, np.concatenate([ids_c, ids_r]), np.concatenate([m_c, m_r])).compile()

    def with_copy(trainable, frozen, ref_params, opt_state, ids_c, m_c, ids_r, m_r):
        """The same arguments plus a reference model as a second set of weights."""
        return dpo.sequence_logps(apply, ref_params, ids_c, m_c)

    copy_c = jax.jit(with_copy, keep_unused=True).lower(trainable, frozen, base, opt_state, ids_c, m_c, ids_r, m_r).compile()

    dpo_b, sft_b, copy_b = (int(c.memory_analysis().argument_size_in_bytes) for c in (dpo_c, sft_c, copy_c))
    base_b = sum(x.nbytes for x in jax.tree_util.tree_leaves(base))
    print(f"\nargument bytes: DPO {dpo_b:,}, SFT {sft_b:,}, DPO with a reference copy {copy_b:,}; base {base_b:,}")
    assert base_b > 0.4 * sft_b  # the base dominates the arguments, so "a few percent" can see a copy
    assert abs(dpo_b - sft_b) <= 0.02 * sft_b, (dpo_b, sft_b)
    assert copy_b - sft_b >= 0.95 * base_b, (copy_b, sft_b, base_b)
