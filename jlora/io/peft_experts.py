"""PEFT's ``target_parameters`` adapters on fused expert parameters (transformers 5), both ways.

transformers 5 fuses a layer's experts into two 3-D parameters of one module
``model.layers.<i>.mlp.experts``: ``gate_up_proj`` (E, 2F, D) (gate rows first, then up)
and ``down_proj`` (E, D, F), each expert applied as ``F.linear(x, W[e])``. PEFT adapts them
with ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``:
one ``lora.ParamWrapper`` per parameter (nested when a module has two: the parameter
defined first, ``gate_up_proj``, is the inner wrapper, saved under ``experts.base_layer``),
with factors shared by all experts and shaped as in PEFT 0.21.2's ``ParamWrapper``::

    <module>.lora_A.weight   (r·E, in)     row e·r + k      = A_e[k]
    <module>.lora_B.weight   (out, r·E)    column k·E + e   = B_e[:, k]
    ΔW[e] = s · B_e @ A_e    (out, in), s = lora_alpha / r of the parameter

(``in``/``out`` are the parameter's last and middle axes: PEFT reads a 3-D parameter as
(experts, out, in) unless its module says ``is_transposed``).

jlora's experts are one stacked kernel per projection, whose slices are transformers 4.x's
modules ``model.layers.<i>.mlp.experts.<e>.{gate,up,down}_proj`` (the ``qwen3_moe`` name
map). This module converts between the two sets of PEFT tensors, without any tree:

* :func:`unfuse` (reading): each expert's ``A_e``/``B_e`` as the 4.x module's
  ``lora_A``/``lora_B``; ``gate_up_proj`` splits its B rows into ``gate_proj`` (first F) and
  ``up_proj``, both with the shared ``A_e``.
* :func:`fuse` (``save_peft(..., fused_experts=True)``): the other way. Gate and up adapted
  with the same A (an adapter read from PEFT's fused files) keep rank r; with their own A
  (trained in jlora) the fused adapter is ``A_e = [A_g; A_u]`` (2r, D), ``B_e =
  [[B_g, 0], [0, (s_u/s_g)·B_u]]`` (2F, 2r), exactly the same ΔW at rank 2r, its alpha
  chosen so that the scale is ``s_g`` (``rank_pattern``/``alpha_pattern`` entries).

PEFT's ``ParamWrapper`` refuses ``lora_dropout``, DoRA and ``lora_bias``; so does :func:`fuse`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .peft_config import peft_pattern

__all__ = ["FUSED", "peft_pattern", "unfuse", "unfuse_config", "fuse"]

PREFIX = "base_model.model."
# fused parameter -> the transformers 4.x modules whose weights it stacks (in row order)
FUSED: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_UNFUSED = {m: p for p, ms in FUSED.items() for m in ms}
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return float(alpha) / (math.sqrt(r) if rslora else r)


def _alpha(scale: float, r: int, rslora: bool) -> Any:
    x = scale * (math.sqrt(r) if rslora else r)
    return int(round(x)) if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)) else float(x)


def _param_names(cfg: dict) -> list[str]:
    names = [t.rpartition(".")[2] for t in cfg.get("target_parameters") or ()]
    bad = sorted(set(names) - set(FUSED))
    if bad:
        raise ValueError(
            f"adapter config target_parameters={cfg.get('target_parameters')}: jlora reads PEFT's target_parameters "
            f"for fused experts {sorted(FUSED)} (transformers 5's Qwen3-MoE / Mixtral layout); {bad} is not one"
        )
    return names


def unfuse_config(cfg: dict) -> dict:
    """``adapter_config.json`` of a fused-experts adapter as the config of its unfused form:
    ``target_parameters`` folded into ``target_modules`` (the 4.x module names), rank and
    alpha patterns of a fused parameter given to its modules.

    >>> unfuse_config({"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj"],
    ...                "rank_pattern": {"down_proj": 8}})["target_modules"]
    ['down_proj', 'q_proj']
    """
    params = _param_names(cfg)
    out = dict(cfg)
    out["target_parameters"] = None
    if not params:
        return out
    modules = sorted({m for p in params for m in FUSED[p]})
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        out["target_modules"] = rf"(?:{tm})|(?:.*\.experts\.\d+\.(?:{'|'.join(modules)}))"
    else:
        out["target_modules"] = sorted(set(tm or ()) | set(modules))
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = {}
        for pat, v in (cfg.get(key) or {}).items():
            fused = next((p for p in FUSED if pat == p or pat.endswith("." + p)), None)
            if fused is None:
                patterns[pat] = v
                continue
            head = pat[: -len(fused)]
            patterns[head + r"\d+\.(?:" + "|".join(FUSED[fused]) + ")"] = v
        out[key] = patterns
    return out


def unfuse(tensors: dict[str, np.ndarray], cfg: dict) -> tuple[dict[str, np.ndarray], dict]:
    """PEFT's fused-experts tensors (``ParamWrapper`` keys) as transformers 4.x per-expert
    module tensors, and the config that reads them (see the module docstring). Tensors of
    other modules pass unchanged. ``ValueError`` where the factors do not fit."""
    params = _param_names(cfg)
    if not params:
        return tensors, cfg
    out_cfg = unfuse_config(cfg)
    r0, a0 = int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
    rank_p, alpha_p = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    # the wrappers: module name (with ".base_layer" for nested ones) -> {"A", "B"}
    wrappers: dict[str, dict[str, np.ndarray]] = {}
    rest: dict[str, np.ndarray] = {}
    targets = list(cfg.get("target_parameters") or ())
    for key, x in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA.match(name)
        if m is not None:
            unwrapped = m.group("module").replace(".base_layer", "")
            if any(f"{unwrapped}.{p}".endswith(t) for t in targets for p in params):
                wrappers.setdefault(m.group("module"), {})[m.group("which")] = np.asarray(x)
                continue
        rest[key] = x
    by_module: dict[str, list[tuple[str, dict]]] = {}
    for module, ab in wrappers.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{module}: a target_parameters adapter needs lora_A and lora_B, got {sorted(ab)}")
        by_module.setdefault(module.replace(".base_layer", ""), []).append((module, ab))
    extra_r: dict[str, int] = {}
    extra_a: dict[str, Any] = {}
    for module, found in sorted(by_module.items()):
        names = [p for p in params if any(f"{module}.{p}".endswith(t) for t in targets)]
        assigned = _assign(module, found, names)
        for param, (_, ab) in assigned.items():
            key = f"{module}.{param}"
            r = int(peft_pattern(rank_p, key, r0))
            alpha = peft_pattern(alpha_p, key, a0)
            A, B = ab["A"], ab["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] % r:
                raise ValueError(
                    f"{key}: lora_A {A.shape} and lora_B {B.shape} are not PEFT's (r·E, in) and (out, r·E) with r={r}"
                )
            n_exp = A.shape[0] // r
            a = A.reshape(n_exp, r, A.shape[1])            # (E, r, in)
            b = B.reshape(B.shape[0], r, n_exp)            # (out, r, E)
            parts = FUSED[param]
            if B.shape[0] % len(parts):
                raise ValueError(f"{key}: lora_B has {B.shape[0]} rows, not {len(parts)} equal blocks")
            rows = B.shape[0] // len(parts)
            for e in range(n_exp):
                for j, proj in enumerate(parts):
                    name = f"{module}.{e}.{proj}"
                    rest[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a[e])
                    rest[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b[j * rows:(j + 1) * rows, :, e])
                    if peft_pattern(out_cfg["rank_pattern"], name, r0) != r:
                        extra_r[re.escape(name)] = r
                    if not math.isclose(float(peft_pattern(out_cfg["alpha_pattern"], name, a0)), float(alpha)):
                        extra_a[re.escape(name)] = alpha
    out_cfg["rank_pattern"] = {**extra_r, **out_cfg["rank_pattern"]}
    out_cfg["alpha_pattern"] = {**extra_a, **out_cfg["alpha_pattern"]}
    return rest, out_cfg


def _assign(module: str, found: list[tuple[str, dict]], names: list[str]) -> dict[str, tuple[str, dict]]:
    """Which wrapper adapts which fused parameter: by shape (``gate_up_proj``'s B has twice
    as many rows as ``down_proj``'s A has columns, and its A as many columns as down's B rows)."""
    if len(found) != len(names):
        raise ValueError(
            f"{module}: {len(found)} target_parameters adapter(s) for the parameters {names} of target_parameters"
        )
    if len(found) == 1:
        return {names[0]: found[0]}
    (m1, x), (m2, y) = found

    def is_gate_up(p, q):
        return p["B"].shape[0] == 2 * q["A"].shape[1] and p["A"].shape[1] == q["B"].shape[0]

    if is_gate_up(x, y):
        return {"gate_up_proj": (m1, x), "down_proj": (m2, y)}
    if is_gate_up(y, x):
        return {"gate_up_proj": (m2, y), "down_proj": (m1, x)}
    raise ValueError(
        f"{module}: lora factors {[tuple(f['A'].shape) for _, f in found]} / {[tuple(f['B'].shape) for _, f in found]} "
        "are not those of gate_up_proj (E, 2F, D) and down_proj (E, D, F)"
    )


def fuse(tensors: dict[str, np.ndarray], cfg: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Per-expert module tensors (``...experts.<e>.gate_proj.lora_A.weight``) as PEFT's
    ``target_parameters`` adapter of transformers 5's fused experts, and its config (see the
    module docstring). Other tensors pass unchanged; an adapter without experts is returned
    as it is."""
    rslora = bool(cfg.get("use_rslora", False))
    r0, a0 = int(cfg["r"]), cfg["lora_alpha"]
    rank_p, alpha_p = dict(cfg.get("rank_pattern") or {}), dict(cfg.get("alpha_pattern") or {})
    groups: dict[str, dict[str, dict[int, dict[str, np.ndarray]]]] = {}
    rest: dict[str, np.ndarray] = {}
    for key, x in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA.match(name)
        e = _EXPERT.match(m.group("module")) if m is not None else None
        if e is None:
            rest[key] = x
            continue
        groups.setdefault(e.group("experts"), {}).setdefault(e.group("proj"), {}).setdefault(
            int(e.group("e")), {})[m.group("which")] = np.asarray(x)
    if not groups:
        return tensors, cfg
    for what, bad in (("lora_dropout", cfg.get("lora_dropout")), ("use_dora", cfg.get("use_dora")),
                      ("lora_bias", cfg.get("lora_bias"))):
        if bad:
            raise ValueError(
                f"fused_experts=True: PEFT's ParamWrapper (target_parameters) does not work with {what}={bad!r}; "
                "save with that option off, or without fused_experts (transformers 4.x names, one module per expert)"
            )
    if isinstance(cfg.get("init_lora_weights"), str):
        raise ValueError(f"fused_experts=True: init_lora_weights={cfg['init_lora_weights']!r} adapters cannot be fused "
                         "(PEFT would run that initialisation on the fused parameter); save with convert_to_lora=True")

    def scale_of(name: str, r: int) -> tuple[float, Any]:
        alpha = peft_pattern(alpha_p, name, a0)
        return _scale(alpha, r, rslora), alpha

    out_r: dict[str, int] = {}
    out_a: dict[str, Any] = {}
    params_used: set[str] = set()
    for experts, projs in sorted(groups.items()):
        fused: dict[str, tuple[np.ndarray, np.ndarray, int, float]] = {}
        for param, parts in FUSED.items():
            present = [p for p in parts if p in projs]
            if not present:
                continue
            n_exp = _check_experts(experts, projs, present)
            per_expert = []
            for e in range(n_exp):
                items = []
                for p in parts:
                    if p in projs:
                        A, B = projs[p][e]["A"], projs[p][e]["B"]
                        s, _ = scale_of(f"{experts}.{e}.{p}", A.shape[0])
                        items.append((A, B, s))
                    else:
                        items.append(None)
                per_expert.append(items)
            fused[param] = _fuse_param(f"{experts}.{param}", per_expert, rslora)
        # PEFT nests a module's wrappers in the parameters' definition order: gate_up_proj inner
        names = list(fused)
        for depth, param in enumerate(names):
            module = experts + ".base_layer" * (len(names) - 1 - depth)
            A, B, r, s = fused[param]
            rest[f"{PREFIX}{module}.lora_A.weight"] = A
            rest[f"{PREFIX}{module}.lora_B.weight"] = B
            key = f"{experts}.{param}"
            if peft_pattern(rank_p, key, r0) != r:
                out_r[re.escape(key)] = r
            alpha = _alpha(s, r, rslora)
            if not math.isclose(_scale(peft_pattern(alpha_p, key, a0), r, rslora), s, rel_tol=1e-9):
                out_a[re.escape(key)] = alpha
            params_used.add(f"mlp.experts.{param}" if experts.endswith("mlp.experts") else param)
    out = dict(cfg)
    other_modules = {_LORA.match(k[len(PREFIX):]).group("module") for k in rest if _LORA.match(k[len(PREFIX):])}
    tm = cfg.get("target_modules")
    if not isinstance(tm, str):
        kept = [t for t in tm or () if any(m == t or m.endswith("." + t) for m in other_modules)]
        out["target_modules"] = sorted(kept)
    out["target_parameters"] = sorted(params_used)

    def keep_pattern(pat):  # patterns that name expert modules only are gone with them
        return not any(re.match(rf"(.*\.)?({pat})$", m) for m in _expert_modules(groups)) or any(
            re.match(rf"(.*\.)?({pat})$", m) for m in other_modules)

    out["rank_pattern"] = {**out_r, **{k: v for k, v in rank_p.items() if keep_pattern(k)}}
    out["alpha_pattern"] = {**out_a, **{k: v for k, v in alpha_p.items() if keep_pattern(k)}}
    return rest, out


def _expert_modules(groups: dict) -> list[str]:
    return [f"{x}.{e}.{p}" for x, projs in groups.items() for p, by_e in projs.items() for e in by_e]


def _check_experts(experts: str, projs: dict, present: list[str]) -> int:
    counts = {p: sorted(projs[p]) for p in present}
    n = len(counts[present[0]])
    for p, es in counts.items():
        if es != list(range(n)):
            raise ValueError(
                f"fused_experts=True: {experts}.<e>.{p} has adapters for experts {es}; a fused parameter needs "
                f"every expert 0..{n - 1}"
            )
        for e in es:
            if set(projs[p][e]) != {"A", "B"}:
                raise ValueError(f"{experts}.{e}.{p}: missing lora_{'B' if 'A' in projs[p][e] else 'A'}")
    return n


def _fuse_param(key: str, per_expert: list, rslora: bool) -> tuple[np.ndarray, np.ndarray, int, float]:
    """``(lora_A (r·E, in), lora_B (out, r·E), r, s)`` of one fused parameter from each expert's
    blocks ``[(A (r, in), B (rows, r), s) or None per row block]``."""
    first = next(item for item in per_expert[0] if item is not None)
    s = first[2]
    rows = first[1].shape[0]
    shared = all(
        all(item is not None for item in items)
        and all(np.array_equal(item[0], items[0][0]) and math.isclose(item[2], items[0][2], rel_tol=1e-12)
                for item in items)
        for items in per_expert
    )
    a_list, b_list = [], []
    for items in per_expert:
        if shared:  # one A for every row block (PEFT's own fused adapter): rank r
            a_e = items[0][0]
            b_e = np.concatenate([item[1] * (item[2] / s) for item in items], axis=0)
        else:  # a block-diagonal B over the blocks' own A: rank Σ r
            present = [item for item in items if item is not None]
            a_e = np.concatenate([item[0] for item in present], axis=0)
            r_tot = a_e.shape[0]
            b_e = np.zeros((rows * len(items), r_tot), dtype=present[0][1].dtype)
            col = 0
            for j, item in enumerate(items):
                if item is None:
                    continue
                r = item[0].shape[0]
                b_e[j * rows:(j + 1) * rows, col:col + r] = item[1] * (item[2] / s)
                col += r
        a_list.append(a_e)
        b_list.append(b_e)
    ranks = {a.shape[0] for a in a_list}
    if len(ranks) != 1:
        raise ValueError(f"{key}: the experts' adapters have different ranks {sorted(ranks)}")
    r = ranks.pop()
    A = np.concatenate(a_list, axis=0)                              # row e·r + k
    B = np.stack(b_list, axis=-1).reshape(b_list[0].shape[0], -1)    # column k·E + e
    return np.ascontiguousarray(A), np.ascontiguousarray(B), r, s
