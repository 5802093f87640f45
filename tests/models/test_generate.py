"""jlora.models.generate against transformers + PEFT on the torch models of the same random
weights (Qwen3, Llama 3, Gemma 3, Qwen3-MoE): every greedy token is the torch model's argmax
on the generated prefix (left-padded prompts of different lengths, positions from the mask,
the PEFT adapter applied factored), for list and scanned layers; mixed batches equal each
adapter alone; EOS as transformers' generate ends rows; sampling filters against
transformers' warpers; reproducible samples; a quantized base; one compile per bucket."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
import jlora.models as jm
from support.family_models import FAMILIES, VOCAB, case, peft_adapter

NEW = 6
# three prompts of different lengths, left-padded (transformers' convention)
LENGTHS = (7, 4, 6)


def _prompts(seed: int = 3, vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    T = max(LENGTHS)
    ids = np.zeros((len(LENGTHS), T), np.int64)
    mask = np.zeros((len(LENGTHS), T), np.int64)
    for row, n in enumerate(LENGTHS):
        ids[row, T - n:] = rs.randint(1, vocab, n)
        mask[row, T - n:] = 1
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    """transformers' position ids of a left-padded batch: cumsum(mask) - 1 (1 on padding)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos)


def _torch_logits(model, seq: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(seq), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(_positions(mask)))
    return out.logits.float().numpy()


def _check_greedy(logits: np.ndarray, out: np.ndarray, T: int, n_new: int, tol: float = 1e-4) -> None:
    """Each new token is the argmax of the reference logits at the position before it (a
    token whose logit is within ``tol`` of the maximum also counts: a float tie)."""
    for step in range(n_new):
        z = logits[:, T - 1 + step]
        tok = out[:, T + step]
        picked = np.take_along_axis(z, tok[:, None], axis=1)[:, 0]
        gap = z.max(axis=1) - picked
        assert np.all(gap <= tol), (step, tok.tolist(), z.argmax(axis=1).tolist(), gap.tolist())
    assert not np.all(out[:, T:] == out[0, T]), "degenerate generation (one token everywhere)"


@functools.lru_cache(maxsize=None)
def peft_torch(family: str):
    import peft

    d, _ = peft_adapter(family)
    return peft.PeftModel.from_pretrained(case(family).fresh_torch(), d).eval()


@functools.lru_cache(maxsize=None)
def stacked_state(family: str):
    model = jm.from_torch(case(family).torch_model, scan_layers=True)
    return nnx.split(model)


@pytest.mark.torch
@pytest.mark.parametrize("scan", [False, True], ids=["list", "scan"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_torch_peft_argmax(family, scan):
    d, _ = peft_adapter(family)
    graphdef, state = stacked_state(family) if scan else (case(family).graphdef, case(family).state)
    lp = jlora.load_peft(d, state)
    ids, mask = _prompts()
    out = np.asarray(jm.generate(graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW))
    assert out.shape == (ids.shape[0], ids.shape[1] + NEW)
    np.testing.assert_array_equal(out[:, :ids.shape[1]], ids)
    full_mask = np.concatenate([mask, np.ones((ids.shape[0], NEW), np.int64)], axis=1)
    _check_greedy(_torch_logits(peft_torch(family), out, full_mask), out, ids.shape[1], NEW)


@pytest.mark.torch
def test_plain_and_merged_params_equal_torch():
    family = "qwen3"
    c = case(family)
    ids, mask = _prompts()
    full_mask = np.concatenate([mask, np.ones((ids.shape[0], NEW), np.int64)], axis=1)
    out = np.asarray(jm.generate(c.graphdef, c.state, ids, attention_mask=mask, max_new_tokens=NEW))
    _check_greedy(_torch_logits(c.torch_model, out, full_mask), out, ids.shape[1], NEW)
    d, _ = peft_adapter(family)
    merged = jlora.merge(jlora.load_peft(d, c.state))
    out_m = np.asarray(jm.generate(c.graphdef, merged, ids, attention_mask=mask, max_new_tokens=NEW))
    _check_greedy(_torch_logits(peft_torch(family), out_m, full_mask), out_m, ids.shape[1], NEW)


@functools.lru_cache(maxsize=None)
def two_adapters(family: str):
    """The PEFT adapter as "default" and a second random adapter "b" on the same state."""
    c = case(family)
    d, _ = peft_adapter(family)
    lp = jlora.load_peft(d, c.state)
    q = "q_einsum" if family == "gemma3" else "q_proj"
    cfg = jlora.LoraConfig(r=2, lora_alpha=6, target_modules=[q, "down_proj"], init_lora_weights=False)
    return jlora.add_adapter(lp, "b", cfg, rng=jax.random.key(7), layouts=jlora.name_maps.layouts(c.state))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.torch
def test_mixed_batch_equals_each_adapter_alone(family):
    c = case(family)
    lp = two_adapters(family)
    ids, mask = _prompts()
    names = ["default", "b", jlora.adapters.BASE_ADAPTER]
    mixed = np.asarray(jm.generate(c.graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW,
                                   adapter_ids=jlora.adapter_ids(lp, names)))
    for row, name in enumerate(names):
        alone = jlora.disable_adapter(lp) if name == jlora.adapters.BASE_ADAPTER else jlora.set_adapter(lp, name)
        ref = np.asarray(jm.generate(c.graphdef, alone, ids[row:row + 1], attention_mask=mask[row:row + 1],
                                     max_new_tokens=NEW))
        np.testing.assert_array_equal(mixed[row], ref[0], err_msg=f"row {row} ({name})")
    assert len({tuple(r) for r in mixed[:, ids.shape[1]:].tolist()}) == 3


@pytest.mark.torch
@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_eos_rows_end_as_transformers_generate(family):
    import torch

    c = case(family)
    d, _ = peft_adapter(family)
    lp = jlora.load_peft(d, c.state)
    ids, mask = _prompts()
    free = np.asarray(jm.generate(c.graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW))
    T = ids.shape[1]
    new0 = free[0, T:].tolist()
    eos = next(t for i, t in enumerate(new0) if i >= 1 and t not in new0[:i])  # row 0 ends after >= 1 token
    pad = VOCAB - 1 if eos != VOCAB - 1 else VOCAB - 2
    out = np.asarray(jm.generate(c.graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                                 pad_token_id=pad))
    for row in range(ids.shape[0]):  # each row: the free generation up to its first eos, then pad
        gen = free[row, T:].tolist()
        end = gen.index(eos) + 1 if eos in gen else NEW
        assert out[row, T:T + end].tolist() == gen[:end] and np.all(out[row, T + end:] == pad), row
    with torch.no_grad():
        ref = peft_torch(family).generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        ).numpy()
    width = ref.shape[1]  # transformers stops when every row has ended: compare what it produced
    np.testing.assert_array_equal(out[:, :width], ref)
    assert np.all(out[:, width:] == pad) or width == out.shape[1]


@pytest.mark.torch
def test_top_k_top_p_filters_match_transformers_warpers():
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from jlora.models.sampling import top_k_filter, top_p_filter

    rs = np.random.RandomState(0)
    logits = (rs.randn(6, 50) * 2).astype(np.float32)
    logits[0, :5] = logits[0, 5]  # ties at the k-th value
    for k in (1, 3, 10, 50, 80):
        ref = TopKLogitsWarper(top_k=k)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(logits), k)), ref)
    for p in (0.05, 0.3, 0.8, 0.95, 1.0):
        ref = TopPLogitsWarper(top_p=p)(None, torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(top_p_filter(jnp.asarray(logits), p)), ref)


def _small_model(family: str = "qwen3", **kw):
    cfg = jm.DecoderConfig(family, vocab_size=48, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, initializer_range=0.3, **kw)
    return nnx.split(jm.build(cfg))


def test_sampling_is_reproducible_from_rng():
    graphdef, state = _small_model()
    ids, mask = _prompts(vocab=48)
    kw = dict(attention_mask=mask, max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9)
    a = np.asarray(jm.generate(graphdef, state, ids, rng=jax.random.key(1), **kw))
    b = np.asarray(jm.generate(graphdef, state, ids, rng=jax.random.key(1), **kw))
    c = np.asarray(jm.generate(graphdef, state, ids, rng=jax.random.key(2), **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k=1 sampling is greedy, whatever the key and temperature
    greedy = np.asarray(jm.generate(graphdef, state, ids, attention_mask=mask, max_new_tokens=8))
    k1 = np.asarray(jm.generate(graphdef, state, ids, attention_mask=mask, max_new_tokens=8, temperature=2.0,
                                top_k=1, rng=jax.random.key(5)))
    np.testing.assert_array_equal(greedy, k1)
    with pytest.raises(ValueError, match="rng"):
        jm.generate(graphdef, state, ids, attention_mask=mask, max_new_tokens=2, temperature=0.5)


def test_sampled_tokens_follow_the_filtered_distribution():
    """Many rows with the same prompt, top-k = 3: every sampled first token is among the 3
    most probable ones, and their frequencies follow softmax(z / T) over those three."""
    graphdef, state = _small_model()
    prompt = np.array([[5, 7, 9, 11]] * 512)
    logits = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(prompt[:1])))[0, -1]
    out = np.asarray(jm.generate(graphdef, state, prompt, max_new_tokens=1, temperature=0.7, top_k=3,
                                 rng=jax.random.key(0)))[:, -1]
    top = np.argsort(-logits)[:3]
    assert set(out.tolist()) <= set(top.tolist())
    p = np.exp((logits[top] - logits[top].max()) / 0.7)
    p /= p.sum()
    freq = np.array([(out == t).mean() for t in top])
    assert np.all(np.abs(freq - p) < 0.08), (freq, p)


def _jax_reference_check(graphdef, params, out, mask, T, n, adapter_ids=None):
    """Greedy check against jlora's own full forward (no cache) of the same tree."""
    full_mask = np.concatenate([mask, np.ones((mask.shape[0], n), np.int64)], axis=1)
    pos = np.maximum(np.cumsum(full_mask, 1) - 1, 0)

    def fwd(p, x):
        return nnx.merge(graphdef, p)(x, positions=jnp.asarray(pos), attention_mask=jnp.asarray(full_mask))

    logits = jlora.lora(fwd)(params, jnp.asarray(out), adapter_ids=adapter_ids)
    _check_greedy(np.asarray(logits), out, T, n, tol=1e-3)


def test_quantized_base_under_lora_generates():
    graphdef, state = _small_model("llama3")
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    ids, mask = _prompts(vocab=48)
    q = jlora.quantize(state, jlora.QuantConfig(quant_type="nf4", block_size=32), apply_fn=apply,
                       example_args=(jnp.asarray(ids),))
    assert jlora.quant.quantized_leaves(q)
    lp = jlora.wrap(q, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                        init_lora_weights=False), rng=jax.random.key(0), apply_fn=apply,
                    example_args=(jnp.asarray(ids),))
    out = np.asarray(jm.generate(graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW))
    _jax_reference_check(graphdef, lp, out, mask, ids.shape[1], NEW)
    # the quantization changes what is generated: the base differs from the dense one
    dense = np.asarray(jm.generate(graphdef, state, ids, attention_mask=mask, max_new_tokens=NEW))
    assert not np.array_equal(out, dense)


@pytest.mark.torch
def test_qwen3_moe_generates_with_lora_on_experts():
    """The list model from the torch twin: base tokens against torch, then two adapters on
    attention and experts, one per row (ragged_dot's rows traced to their examples)."""
    from support import moe_models

    c = moe_models.case()
    ids, mask = _prompts(vocab=moe_models.VOCAB)
    full_mask = np.concatenate([mask, np.ones((ids.shape[0], NEW), np.int64)], axis=1)
    out = np.asarray(jm.generate(c.graphdef, c.state, ids, attention_mask=mask, max_new_tokens=NEW))
    _check_greedy(_torch_logits(c.torch_model, out, full_mask), out, ids.shape[1], NEW)
    cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=moe_models.ATTN_AND_EXPERTS, init_lora_weights=False)
    kw = dict(apply_fn=c.apply, example_args=(jnp.asarray(ids),))
    lp = jlora.wrap(c.state, cfg, rng=jax.random.key(0), **kw)
    lp = jlora.add_adapter(lp, "b", cfg, rng=jax.random.key(1), **kw)
    rows = jlora.adapter_ids(lp, ["default", "b", jlora.adapters.BASE_ADAPTER])
    out = np.asarray(jm.generate(c.graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW, adapter_ids=rows))
    _jax_reference_check(c.graphdef, lp, out, mask, ids.shape[1], NEW, adapter_ids=rows)


def test_qwen3_moe_scanned_generates():
    cfg = jm.DecoderConfig("qwen3_moe", vocab_size=48, embed_dim=32, hidden_dim=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                           norm_topk_prob=True, initializer_range=0.3, scan_layers=True)
    graphdef, state = nnx.split(jm.build(cfg))
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    ids, mask = _prompts(vocab=48)
    lp = jlora.wrap(state, jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj", "down_proj"],
                                            init_lora_weights=False),
                    rng=jax.random.key(0), apply_fn=apply, example_args=(jnp.asarray(ids),))
    out = np.asarray(jm.generate(graphdef, lp, ids, attention_mask=mask, max_new_tokens=NEW))
    _jax_reference_check(graphdef, lp, out, mask, ids.shape[1], NEW)


def test_one_compile_per_bucket():
    graphdef, state = _small_model("gemma3", tie_embeddings=True, sliding_window=3,
                                   layer_types=("sliding_attention", "full_attention"))
    fns = jm.generate_functions(graphdef, state, max_new_tokens=5)
    rs = np.random.RandomState(0)
    for T in (5, 9, 16, 12):  # all in the bucket of 16
        jm.generate(graphdef, state, rs.randint(1, 48, (2, T)), max_new_tokens=5)
    assert fns.prefill._cache_size() == 1 and fns.decode._cache_size() == 1
    jm.generate(graphdef, state, rs.randint(1, 48, (2, 17)), max_new_tokens=5)  # the bucket of 32
    assert fns.prefill._cache_size() == 2 and fns.decode._cache_size() == 2
    assert jm.generate_functions(graphdef, state, max_new_tokens=5) is fns


def test_bad_prompts_are_refused():
    graphdef, state = _small_model()
    with pytest.raises(ValueError, match="left-padded"):
        jm.generate(graphdef, state, np.ones((1, 4), int), attention_mask=np.array([[1, 1, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        jm.generate(graphdef, state, np.ones((1, 4), int), max_new_tokens=0)
    with pytest.raises(ValueError, match="adapter_ids"):
        jm.generate(graphdef, state, np.ones((2, 4), int), max_new_tokens=2, adapter_ids=[0, 1])


def test_slots_do_not_recompile_across_five_swaps():
    """Five adapters of different ranks and alphas swapped into one pool of adapter slots:
    each generation equals that adapter's own (as a plain LoRA tree), and the prefill and
    decode functions hold one compiled program throughout."""
    graphdef, state = _small_model()
    apply = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    ids, mask = _prompts(vocab=48)
    kw = dict(apply_fn=apply, example_args=(jnp.asarray(ids),))
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    first = jlora.wrap(state, jlora.LoraConfig(r=2, target_modules=targets, init_lora_weights=False),
                       rng=jax.random.key(0), **kw)
    pool = jlora.adapter_slots(first, num_slots=4, max_rank=8, fill=False)
    fns = jm.generate_functions(graphdef, pool, max_new_tokens=NEW)
    outs = []
    for i, (r, alpha) in enumerate([(1, 2.0), (8, 16.0), (3, 1.0), (5, 7.0), (2, 32.0)]):
        cfg = jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets[i % 3:], init_lora_weights=False)
        adapter = jlora.wrap(state, cfg, rng=jax.random.key(10 + i), **kw)
        slot = i % 4
        pool = jlora.load_slot(pool, slot, adapter)
        rows = jnp.asarray([slot, -1, slot])
        out = np.asarray(jm.generate(graphdef, pool, ids, attention_mask=mask, max_new_tokens=NEW, adapter_ids=rows))
        # the reference: the adapter alone (max_new_tokens + 1: its own functions, not the pool's)
        ref = np.asarray(jm.generate(graphdef, adapter, ids, attention_mask=mask, max_new_tokens=NEW + 1))
        base = np.asarray(jm.generate(graphdef, state, ids[1:2], attention_mask=mask[1:2], max_new_tokens=NEW + 1))
        np.testing.assert_array_equal(out[[0, 2]], ref[[0, 2], :-1], err_msg=f"swap {i}")
        np.testing.assert_array_equal(out[1], base[0, :-1], err_msg=f"swap {i} (base row)")
        outs.append(out)
    assert len({o.tobytes() for o in outs}) == 5  # every swap changed what is generated
    assert fns.prefill._cache_size() == 1 and fns.decode._cache_size() == 1


@pytest.mark.torch
@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_peft_directory_loads_into_a_slot(family):
    """PEFT's files straight into slot 2 of a pool whose slot 0 holds another adapter: the
    rows on slot 2 are greedy under torch + PEFT, as the adapter loaded alone."""
    c = case(family)
    d, _ = peft_adapter(family)
    other = two_adapters(family)
    targets = jlora.load_peft(d, c.state)
    pool = jlora.adapter_slots(targets, num_slots=3, max_rank=8, fill=False)
    pool = jlora.load_slot(pool, 0, jlora.get_adapter(other, "b"))
    pool = jlora.load_slot(pool, 2, d)
    ids, mask = _prompts()
    out = np.asarray(jm.generate(c.graphdef, pool, ids, attention_mask=mask, max_new_tokens=NEW,
                                 adapter_ids=jnp.asarray([2, 0, 2])))
    full_mask = np.concatenate([mask, np.ones((ids.shape[0], NEW), np.int64)], axis=1)
    logits = _torch_logits(peft_torch(family), out, full_mask)
    _check_greedy(logits[[0, 2]], out[[0, 2]], ids.shape[1], NEW)
    alone = np.asarray(jm.generate(c.graphdef, jlora.get_adapter(other, "b"), ids[1:2], attention_mask=mask[1:2],
                                   max_new_tokens=NEW))
    np.testing.assert_array_equal(out[1], alone[0])
