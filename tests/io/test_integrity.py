"""Issue 16: no silently wrong adapter from a damaged file.

The corruption sweep: for an Orbax checkpoint, a ``CheckpointManager`` directory (adapter
and optimizer state) and a PEFT directory written by jlora, and a PEFT directory
written by PEFT itself (``save_pretrained`` on torch), every file in
turn is (a) deleted, (b) truncated to half, (c) has 16 bytes in its middle overwritten;
each load (``jlora.load`` / ``jlora.load_peft``, and the base-free readers the CLI uses)
must raise ``ValueError``/``FileNotFoundError`` naming the directory (and the file, for
the files jlora parses itself) or return a tree equal to the original. References: the
LoRA tree that was saved (A, B, ``Trainable`` values, scales) and, for PEFT's own file,
the tensors of PEFT's ``state_dict``.

Then the corruptions that still parse: tensor bytes changed inside the data section,
array data of another checkpoint, metadata and config edited into other valid JSON;
jlora's checksums must catch each, naming the tensor.
"""

from __future__ import annotations

import json
import gc
import shutil
import sys
import struct

import jax
import numpy as np
import pytest

from support import checkpoint_helpers as H
import jlora
from jlora import cli
from jlora.io import orbax as orbax_io
from jlora.io import peft as peft_io

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

HOWS = ("delete", "truncate", "overwrite")
PATTERN = np.random.default_rng(16).integers(0, 256, 16, dtype=np.uint8).tobytes()
# files jlora parses itself: errors must name them
PARSED = {"_METADATA", "adapter_config.json", "adapter_model.safetensors"}


def _corrupt(f, how: str) -> None:
    if how == "delete":
        f.unlink()
        return
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
        return
    off = max(0, len(data) // 2 - 8)
    data[off:off + 16] = PATTERN[: max(0, min(16, len(data) - off))]
    f.write_bytes(bytes(data))


def _leaves(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [np.asarray(x) for x in leaves]


def _same(a, b) -> bool:
    """Same structure (incl. scales, layouts: static data) and bit-identical arrays."""
    ta, la = _leaves(a)
    tb, lb = _leaves(b)
    return ta == tb and all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb))


def _same_records(a, b) -> bool:
    def arrays(ad):
        out = [(t.torch, t.scale, t.r, np.asarray(t.a), np.asarray(t.b)) for t in ad.targets]
        return out + [(p.torch, 0, 0, np.asarray(p.value), np.asarray(p.value)) for p in ad.params]

    return all(x[:3] == y[:3] and np.array_equal(x[3], y[3]) and np.array_equal(x[4], y[4])
               for x, y in zip(arrays(a), arrays(b))) and len(arrays(a)) == len(arrays(b))


class _TinyTorch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(4, 6)
        self.v = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    lp = H.numpy_lora(1)
    jlora.save(root / "orbax", lp, config=H.CONFIG)
    jlora.save(root / "orbax_other", H.numpy_lora(2), config=H.CONFIG)  # same shapes, other values
    jlora.save_peft(root / "peft", lp, config=H.CONFIG)
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(root / "manager")
    mngr.save(3, args=ocp.args.Composite(adapter=orbax_io.AdapterSave(lp, H.CONFIG),
                                         opt_state=ocp.args.StandardSave({"mu": np.arange(4.0)})))
    mngr.wait_until_finished()
    mngr.close()

    torch.manual_seed(0)
    model = _TinyTorch()
    base_t = {n: {"kernel": getattr(model, n).weight.detach().numpy().T.copy(),
                  "bias": getattr(model, n).bias.detach().numpy().copy()} for n in ("q", "v")}
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"],
                                                    init_lora_weights=False))
    pm.save_pretrained(root / "peft_by_peft")
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items() if "lora_" in k}
    return dict(root=root, lp=lp, base=H.base_params(), base_t=base_t, peft_sd=sd)


def _sources(w):
    """(name, directory, load with the base, read without it, what a correct load returns)."""
    base, base_t = w["base"], w["base_t"]
    ref_orbax = jlora.load(w["root"] / "orbax", base)
    ref_peft = jlora.load_peft(w["root"] / "peft", base)
    ref_torch = jlora.load_peft(w["root"] / "peft_by_peft", base_t)
    return [
        ("orbax", w["root"] / "orbax", lambda d: jlora.load(d, base), orbax_io.read_adapter, ref_orbax,
         orbax_io.read_adapter(w["root"] / "orbax")),
        ("manager", w["root"] / "manager", lambda d: jlora.load(d, base), orbax_io.read_adapter, ref_orbax,
         orbax_io.read_adapter(w["root"] / "orbax")),
        ("peft", w["root"] / "peft", lambda d: jlora.load_peft(d, base), peft_io.read_peft, ref_peft,
         peft_io.read_peft(w["root"] / "peft")),
        ("peft_by_peft", w["root"] / "peft_by_peft", lambda d: jlora.load_peft(d, base_t), peft_io.read_peft,
         ref_torch, peft_io.read_peft(w["root"] / "peft_by_peft")),
    ]


def test_references_are_right(written):
    """The undamaged loads equal what was saved (jlora) and PEFT's own tensors."""
    lp = written["lp"]
    got = jlora.load(written["root"] / "orbax", written["base"])
    assert _same(jlora.partition(got)[0], jlora.partition(lp)[0])
    for d in (written["root"] / "manager", written["root"] / "manager" / "3", written["root"] / "manager" / "3" / "adapter"):
        assert _same(jlora.load(d, written["base"]), got), d  # root, step and item directories
    got = jlora.load_peft(written["root"] / "peft", written["base"])
    for (path, x), (_, y) in zip(jlora.lora_leaves(got), jlora.lora_leaves(lp)):
        np.testing.assert_allclose(np.asarray(x.a), y.a, rtol=0, atol=0, err_msg=path)
        np.testing.assert_allclose(np.asarray(x.b), y.b, rtol=0, atol=0, err_msg=path)
        assert x.scale == pytest.approx(y.scale)
    got = jlora.load_peft(written["root"] / "peft_by_peft", written["base_t"])
    sd = written["peft_sd"]
    for n in ("q", "v"):
        x = got[n]["kernel"]
        np.testing.assert_array_equal(np.asarray(x.a), sd[f"base_model.model.{n}.lora_A.default.weight"].T)
        np.testing.assert_array_equal(np.asarray(x.b), sd[f"base_model.model.{n}.lora_B.default.weight"].T)
        assert x.scale == 2.0


def test_corruption_sweep(written, tmp_path, capfd):
    """Every file of each format, truncated / emptied / flipped / removed: a clear error
    naming the directory (and the file, where jlora parses it), or the same adapter; and
    nothing else on stderr (no echoes of Orbax's failed parallel reads)."""
    cases = outcomes_error = outcomes_equal = 0
    echoes = []
    previous = sys.unraisablehook
    sys.unraisablehook = echoes.append  # whatever would have been printed as "Exception ignored ..."
    try:
        _sweep = _corruption_cases(written, tmp_path)
        for where, fn, d, expect, same, rel in _sweep:
            cases += 1
            try:
                out = fn(d)
            except (ValueError, FileNotFoundError) as err:
                assert type(err) in (ValueError, FileNotFoundError), f"{where}: bare {type(err).__name__}: {err}"
                assert str(d) in str(err), f"{where}: the error does not name the directory: {err}"
                if rel.name in PARSED:
                    assert rel.name in str(err), f"{where}: the error does not name the file: {err}"
                outcomes_error += 1
                continue
            assert same(out, expect), f"{where}: loaded a different adapter without an error"
            outcomes_equal += 1
        gc.collect()
    finally:
        sys.unraisablehook = previous
    stderr = capfd.readouterr().err
    print(f"\ncorruption sweep: {cases} cases ({outcomes_error} clear errors, {outcomes_equal} equal loads)")
    assert cases == outcomes_error + outcomes_equal and outcomes_error > 0
    assert not echoes, [f"{type(u.exc_value).__name__}: {u.exc_value} in {u.object!r:.80}" for u in echoes[:5]]
    assert "Event loop is closed" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]


def _corruption_cases(written, tmp_path):
    for name, src, load, read, ref, ref_records in _sources(written):
        files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
        assert files
        for rel in files:
            for how in HOWS:
                d = tmp_path / f"{name}-{how}-{str(rel).replace('/', '_')}"
                shutil.copytree(src, d)
                _corrupt(d / rel, how)
                for fn, expect, same in ((load, ref, _same), (read, ref_records, _same_records)):
                    yield f"{name}: {rel} {how}d, {getattr(fn, '__name__', 'load')}", fn, d, expect, same, rel


def _data_offset(path) -> int:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


def test_changed_tensor_bytes_are_caught_by_the_checksum(written, tmp_path):
    d = tmp_path / "peft"
    shutil.copytree(written["root"] / "peft", d)
    f = d / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    start = _data_offset(f)
    mid = start + (len(data) - start) // 2
    data[mid:mid + 16] = PATTERN
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: checksum mismatch for tensor 'base_model\.model\."):
        jlora.load_peft(d, written["base"])
    # verify=False is the way round it, and then the values are indeed different
    lp = jlora.load_peft(d, written["base"], verify=False)
    ref = jlora.load_peft(written["root"] / "peft", written["base"])
    assert not _same(lp, ref)


def test_peft_files_without_checksums_load_unchecked(written, tmp_path):
    """PEFT's own files carry no checksum: changed tensor bytes cannot be detected (the
    reason jlora writes one); they still load."""
    d = tmp_path / "p"
    shutil.copytree(written["root"] / "peft_by_peft", d)
    f = d / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    start = _data_offset(f)
    data[start + 4:start + 8] = np.float32(123.0).tobytes()
    f.write_bytes(bytes(data))
    lp = jlora.load_peft(d, written["base_t"])
    assert not _same(lp, jlora.load_peft(written["root"] / "peft_by_peft", written["base_t"]))


def test_array_data_of_another_checkpoint_is_caught(written, tmp_path):
    """_METADATA of one checkpoint over the array store of another (same shapes): every
    file parses, only the checksums tell."""
    d = tmp_path / "mixed"
    shutil.copytree(written["root"] / "orbax_other", d)
    shutil.copy(written["root"] / "orbax" / "_METADATA", d / "_METADATA")
    with pytest.raises(ValueError, match=r"checksum mismatch for factor [AB] of target .* \(Orbax key lora/t\d+/[ab]\)"):
        jlora.load(d, written["base"])
    with pytest.raises(ValueError, match="checksum mismatch"):
        orbax_io.read_adapter(d)
    assert "checksum mismatch" in _cli_error(d)


def _cli_error(d) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["inspect", str(d)]) == 1
    return err.getvalue()


def test_metadata_edited_into_other_valid_json_is_caught(written, tmp_path):
    d = tmp_path / "edited"
    shutil.copytree(written["root"] / "orbax", d)
    meta = json.loads((d / "_METADATA").read_text())
    meta["custom_metadata"]["targets"][0]["scale"] *= 2
    (d / "_METADATA").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="_METADATA does not match the digest"):
        jlora.load(d, written["base"])
    assert _same(jlora.load(d, written["base"], verify=False)["embed"]["embedding"].a,
                 written["lp"]["embed"]["embedding"].a)


def test_config_edited_into_other_valid_json_is_caught(written, tmp_path):
    d = tmp_path / "edited"
    shutil.copytree(written["root"] / "peft", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] + 1
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"adapter_config.json: the keys that set ranks, scales and dropout"):
        jlora.load_peft(d, written["base"])
    lp = jlora.load_peft(d, written["base"], verify=False)  # as edited: another scale
    assert lp["head"]["kernel"].scale != written["lp"]["head"]["kernel"].scale


def test_checkpoints_without_checksums_still_load(written, tmp_path):
    """Written before checksums existed: the same checkpoint minus the checksum keys."""
    d = tmp_path / "old"
    shutil.copytree(written["root"] / "orbax", d)
    meta = json.loads((d / "_METADATA").read_text())
    cm = meta["custom_metadata"]
    for key in ("digest", "checksum_algorithm"):
        cm.pop(key)
    for m in cm["targets"]:
        m.pop("a_checksum"), m.pop("b_checksum")
    for m in cm["params"]:
        m.pop("checksum")
    (d / "_METADATA").write_text(json.dumps(meta))
    got = jlora.load(d, written["base"])
    assert _same(jlora.partition(got)[0], jlora.partition(written["lp"])[0])


def test_not_a_checkpoint_and_empty_files(tmp_path, written):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a jlora Orbax adapter checkpoint"):
        jlora.load(tmp_path / "empty", written["base"])
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        jlora.load(tmp_path / "missing", written["base"])
    d = tmp_path / "zeroed"
    shutil.copytree(written["root"] / "peft", d)
    (d / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        jlora.load_peft(d, written["base"])
    (d / "adapter_config.json").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        jlora.load_peft(d, written["base"])
