"""PEFT's ``adapter_config.json`` for an adapter jlora writes: PEFT's target matching
(``check_target_module_exists``, ``get_pattern_key``) on PyTorch module names, so that the
config selects exactly the adapted modules with the ranks and scales jlora used, and the
keys of the variants (``use_dora``, ``lora_bias``, ``trainable_token_indices``,
``fan_in_fan_out``).

>>> peft_matches({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj")
True
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Optional, Union

from ..core.config import LoraConfig
from .records import Adapter, alpha_from_scale

__all__ = ["peft_config_dict", "peft_matches", "peft_pattern"]


def _layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def peft_matches(cfg: dict, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` on a PyTorch module name (LoRA keys only)."""
    excl = cfg.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith("." + x) for x in excl):
            return False
    mts = cfg.get("modules_to_save")
    if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
        return False
    tm = cfg.get("target_modules")
    if tm is None:
        return False
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    found = any(key.endswith("." + t) for t in tm)
    layers = cfg.get("layers_to_transform")
    if found and layers is not None and layers != []:
        idx = _layer_index(key, cfg.get("layers_pattern"))
        layers = [layers] if isinstance(layers, int) else list(layers)
        found = idx is not None and idx in layers
    return found


def peft_pattern(patterns: dict, key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` lookup."""
    for pat in patterns:
        if re.match(rf"(.*\.)?({pat})$", key):
            return patterns[pat]
    return default


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def peft_config_dict(
    adapter: Adapter,
    *,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> dict:
    """``adapter_config.json`` for ``adapter``: its config, checked against the targets.

    ``target_modules`` is kept when PEFT would select exactly the adapted modules with
    it; otherwise it becomes the list of module-name suffixes (``["c_attn", "c_proj"]``)
    or, if that selects more, the full module names. ``rank_pattern``/``alpha_pattern``
    get exact entries for modules whose rank or alpha the config would not give.
    ``fan_in_fan_out`` is true where a linear target's kernel is ``(out, in)`` (PyTorch's
    ``Conv1D``, transformers' ``FlaxConv1D``); ``lora_bias`` and ``trainable_token_indices``
    follow the records.
    """
    cfg = dict(adapter.config) if adapter.config is not None else LoraConfig().to_dict()
    rslora = bool(cfg.get("use_rslora", False))
    per: dict[str, tuple[int, Union[int, float]]] = {}
    for t in adapter.targets:
        alpha = t.alpha if t.alpha is not None else alpha_from_scale(t.scale, t.r, rslora)
        # the scale is what counts; alpha is re-derived so PEFT computes the same scale
        alpha = alpha_from_scale(t.scale, t.r, rslora) if not math.isclose(
            float(alpha) / (math.sqrt(t.r) if rslora else t.r), t.scale, rel_tol=1e-9) else alpha
        for m in t.torch or ():
            per[m] = (t.r, alpha)
    targets = set(per)
    candidates = set(adapter.torch_modules) if adapter.torch_modules is not None else None
    if adapter.config is None:
        cfg["r"] = int(_most_common([r for r, _ in per.values()])) if per else cfg["r"]
        cfg["lora_alpha"] = _most_common([a for _, a in per.values()]) if per else cfg["lora_alpha"]
        cfg["lora_dropout"] = float(adapter.targets[0].dropout) if adapter.targets else 0.0
        biases = [p for p in adapter.params if (p.torch or ("",))[0].endswith(".bias")]
        bias_ids = {id(p) for p in biases}
        others = [p for p in adapter.params if id(p) not in bias_ids]
        bias_modules = {n.rsplit(".", 1)[0] for p in biases for n in p.torch or ()}
        cfg["bias"] = "none" if not biases else ("lora_only" if bias_modules <= targets else "all")
        mts = sorted({n.rsplit(".", 1)[0] for p in others for n in p.torch or ()})
        cfg["modules_to_save"] = mts or None
        cfg["use_dora"] = any(t.magnitude is not None for t in adapter.targets)
        inits = sorted({t.init for t in adapter.targets if t.init is not None})
        if len(inits) > 1:
            raise ValueError(f"the targets use different initialisations {inits}; pass config=")
        cfg["init_lora_weights"] = inits[0] if inits else True

    def selects_exactly(c: dict) -> bool:
        if not all(peft_matches(c, t) for t in targets):
            return False
        return candidates is None or not any(peft_matches(c, m) for m in candidates - targets)

    if adapter.config is not None and cfg.get("modules_to_save"):
        # The config names JAX modules; PEFT matches PyTorch ones (an NNX "embedder" is
        # "embed_tokens"): name the trained modules by their PyTorch names where they differ.
        trained = {n.rsplit(".", 1)[0] for p in adapter.params for n in p.torch or () if not n.endswith(".bias")}
        pattern = lambda m, t: re.match(rf"(^|.*\.){m}($|\..*)", t) is not None  # noqa: E731
        if trained and not all(any(pattern(m, t) for t in trained) for m in cfg["modules_to_save"]):
            cfg["modules_to_save"] = sorted({t.rsplit(".", 1)[-1] for t in trained})

    keep = adapter.config is not None and cfg.get("target_modules") not in ("all-linear", None)
    if not (keep and selects_exactly(cfg)) and targets:
        trial = dict(cfg, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
        trial["target_modules"] = sorted({t.rsplit(".", 1)[-1] for t in targets})
        if not selects_exactly(trial):
            trial["target_modules"] = sorted(targets)
        cfg = trial

    r0, a0 = cfg["r"], cfg["lora_alpha"]
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    extra_r, extra_a = {}, {}
    for m in sorted(targets):
        r, alpha = per[m]
        if peft_pattern(rank_pattern, m, r0) != r:
            extra_r[m] = r
        if not math.isclose(float(peft_pattern(alpha_pattern, m, a0)), float(alpha), rel_tol=1e-9):
            extra_a[m] = alpha
    cfg["rank_pattern"] = {**extra_r, **rank_pattern}
    cfg["alpha_pattern"] = {**extra_a, **alpha_pattern}
    # fan_in_fan_out: the PyTorch weight is (in, out), i.e. GPT-2's Conv1D, whose Flax kernel
    # is (out, in). Targets of unknown layout (converted from PEFT) keep the config's value.
    cfg["fan_in_fan_out"] = any(
        t.kind == "linear" and t.layout is not None and tuple(x for x in t.layout if x != "stack") == ("out", "in")
        for t in adapter.targets
    ) or (any(t.layout is None for t in adapter.targets) and bool(cfg.get("fan_in_fan_out", False)))
    # lora_bias: PEFT gives every target a lora_B bias when it is on (jlora writes zeros where none)
    cfg["lora_bias"] = any(t.b_bias is not None for t in adapter.targets)
    # trainable tokens: by the PyTorch module name of each table (PEFT matches names that end with a key)
    cfg["trainable_token_indices"] = {k.torch[0]: [int(i) for i in k.indices] for k in adapter.tokens} or None
    cfg["peft_type"] = "LORA"
    if base_model_name_or_path is not None:
        cfg["base_model_name_or_path"] = base_model_name_or_path
    if task_type is not None:
        cfg["task_type"] = task_type
    return cfg
