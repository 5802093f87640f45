"""`LoraConfig`: PEFT's LoRA configuration, validated and immutable.

The field names and their meaning follow Hugging Face PEFT's ``LoraConfig`` so that a
PEFT config line can be pasted unchanged::

    config = LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                        lora_dropout=0.05, bias="none")

``to_dict()`` / ``from_dict()`` round-trip through JSON with PEFT's keys (the keys of
``adapter_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal, Union

__all__ = ["LoraConfig"]

BiasMode = Literal["none", "all", "lora_only"]
InitMode = Union[bool, str]  # True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora", "mica" (loading)
TokenIndices = Union[None, Sequence[int], Mapping[str, Sequence[int]]]

_BIAS_MODES = ("none", "all", "lora_only")

# PEFT keys that jlora accepts in ``from_dict`` only with their default (inactive) value:
# each switches on a PEFT feature that jlora does not implement.
_INACTIVE_PEFT_KEYS: dict[str, Any] = {
    "loftq_config": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "layer_replication": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "eva_config": None,
    "corda_config": None,
    "target_parameters": None,
    "runtime_config": None,
    "arrow_config": None,
    "alora_invocation_tokens": None,
    "ensure_weight_tying": False,
    "lora_ga_config": None,
}

# PEFT's LoRA variants with their own math (forward, init or structure), refused with their name.
_VARIANT_PEFT_KEYS = {
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
}

# PEFT keys with no effect on the adapter's math; kept out of jlora's fields.
_IGNORED_PEFT_KEYS = (
    "auto_mapping",
    "revision",
    "peft_version",
    "exclude_modules_pattern",
)


def _freeze_mapping(name: str, value: Any, kind: type) -> Mapping[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError(f"LoraConfig.{name} must be a dict of pattern -> {kind.__name__}, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise TypeError(f"LoraConfig.{name}: key {key!r} must be a str (a module name or regex)")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"LoraConfig.{name}[{key!r}] must be a number, got {v!r}")
        if kind is int and (int(v) != v or v < 1):
            raise ValueError(f"LoraConfig.{name}[{key!r}] = {v!r}: a rank must be an integer >= 1")
        if kind is float and not (math.isfinite(v) and v > 0):
            raise ValueError(f"LoraConfig.{name}[{key!r}] = {v!r}: an alpha must be a finite number > 0")
        out[key] = int(v) if kind is int else v
    return MappingProxyType(out)


def _freeze_names(name: str, value: Any, allow_str: bool) -> Union[None, str, tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            return (value,)
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"LoraConfig.{name}={value!r} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if not isinstance(value, Sequence):
        raise TypeError(f"LoraConfig.{name} must be a list of module names or a regex string, got {type(value).__name__}")
    names = tuple(value)
    for n in names:
        if not isinstance(n, str) or not n:
            raise TypeError(f"LoraConfig.{name}: every entry must be a non-empty str, got {n!r}")
    return names


_NITER = re.compile(r"^pissa_niter_([1-9][0-9]*)$")
_OTHER_PEFT_INITS = ("corda", "loftq", "eva", "lora_ga", "orthogonal")


def _check_init(init: Any) -> Union[bool, str]:
    """Validates ``init_lora_weights``; ``"OLoRA"`` is accepted as ``"olora"`` (as PEFT)."""
    if isinstance(init, bool):
        return init
    if isinstance(init, str):
        if init.lower() == "olora":
            return "olora"
        if init.lower() == "mica":
            return "mica"
        if init in ("gaussian", "pissa") or _NITER.match(init):
            return init
        if init.lower() in _OTHER_PEFT_INITS or init.startswith("corda"):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r}: this PEFT initialisation is not implemented in jlora; "
                "valid: True, False, 'gaussian', 'pissa', 'pissa_niter_<N>', 'olora' ('mica' to load MiCA adapters)"
            )
    raise ValueError(
        f"LoraConfig.init_lora_weights={init!r}: valid values are True, False, 'gaussian', 'pissa', "
        "'pissa_niter_<N>' (N >= 1 subspace iterations), 'olora' and 'mica' (loading MiCA adapters only)"
    )


def _freeze_tokens(value: Any) -> Union[None, tuple[int, ...], Mapping[str, tuple[int, ...]]]:
    """Validates ``trainable_token_indices``: a list of token ids (the input embedding) or
    ``{module name: ids}``; ids are distinct integers >= 0."""
    if value is None:
        return None

    def ids(where: str, v: Any) -> tuple[int, ...]:
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v:
            raise TypeError(f"LoraConfig.trainable_token_indices{where} must be a non-empty list of token ids, got {v!r}")
        out = tuple(v)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in out):
            raise ValueError(f"LoraConfig.trainable_token_indices{where}={list(out)}: token ids must be integers >= 0")
        if len(set(out)) != len(out):
            raise ValueError(f"LoraConfig.trainable_token_indices{where}={list(out)}: token ids must be distinct")
        return out

    if isinstance(value, Mapping):
        if not value:
            raise ValueError("LoraConfig.trainable_token_indices is an empty dict: name a module and its token ids")
        for key in value:
            if not isinstance(key, str) or not key:
                raise TypeError(f"LoraConfig.trainable_token_indices: key {key!r} must be a module name")
        return MappingProxyType({k: ids(f"[{k!r}]", v) for k, v in value.items()})
    return ids("", value)


@dataclasses.dataclass(frozen=True, eq=True)
class LoraConfig:
    """Configuration of a LoRA adapter, with PEFT's field names and meanings.

    The adapter adds to each targeted kernel ``W`` a low-rank update::

        W' = W + s · A·B,   A: (d_in, r), B: (r, d_out),   s = lora_alpha / r
                                                       (s = lora_alpha / sqrt(r) with use_rslora)

    Args:
      r: rank of the update (``rank_pattern`` overrides it per module).
      lora_alpha: numerator of the scale ``s`` (``alpha_pattern`` overrides it per module).
      target_modules: which modules get an adapter. A list matches a module path that
        equals an entry or ends in ``.entry``; a string is a regex that must match the whole
        ``.``-joined module path; ``"all-linear"`` means every kernel except the output head.
      exclude_modules: same syntax; matching modules are never targeted.
      lora_dropout: dropout rate on the input of ``A`` (needs a key at call time).
      bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of
        targeted modules train).
      modules_to_save: modules (same matching as ``target_modules`` lists) whose
        parameters train in full, e.g. a classifier head.
      layers_to_transform: layer indices to adapt (with list ``target_modules``).
      layers_pattern: name(s) of the layer container, e.g. ``"layers"`` or ``"h"``.
      rank_pattern / alpha_pattern: ``{regex: rank}`` / ``{regex: alpha}`` overrides; a
        key matches a module path that ends with it (as a regex), as in PEFT.
      use_rslora: use the rank-stabilised scale ``lora_alpha / sqrt(r)``.
      init_lora_weights: ``True``: A kaiming-uniform (a=sqrt(5)), B = 0 (as PEFT);
        ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0; ``False``: both random (for tests);
        ``"pissa"`` / ``"pissa_niter_<N>"`` / ``"olora"``: A and B from the SVD / a
        randomised SVD / the QR of ``W``, and ``W`` replaced by the residual
        ``W − s·A·B`` (:mod:`jlora.inits`); ``"mica"``: accepted for loading PEFT's MiCA
        adapters (a plain LoRA forward and merge); :func:`jlora.wrap` cannot initialise it.
      use_dora: DoRA: a trainable magnitude per output feature rescales ``W + s·A·B``
        (:mod:`jlora.dora`).
      lora_bias: PEFT's ``lora_bias``: ``B`` gets a trainable bias ``b_B`` (zeros at
        init, random with ``init_lora_weights=False``), so a target computes
        ``x·W + b + s·((x·A)·B + b_B)``; merging adds ``s·b_B`` to the base bias.
      trainable_token_indices: train only these rows of an embedding (PEFT's trainable
        tokens, e.g. new special tokens): a list of token ids (the input embedding) or
        ``{module name: ids}``. The rows' new values are trained; the rest of the table
        stays frozen (a tied output layer reads the same rows).
      fan_in_fan_out, task_type, base_model_name_or_path, inference_mode: carried for PEFT
        compatibility (jlora infers kernel layouts itself).

    Example:
      >>> cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"])
      >>> cfg.scale_for(8, 16)
      2.0
      >>> LoraConfig.from_dict(cfg.to_dict()) == cfg
      True
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Union[None, str, Sequence[str]] = None
    exclude_modules: Union[None, str, Sequence[str]] = None
    lora_dropout: float = 0.0
    bias: BiasMode = "none"
    modules_to_save: Union[None, Sequence[str]] = None
    layers_to_transform: Union[None, int, Sequence[int]] = None
    layers_pattern: Union[None, str, Sequence[str]] = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init_lora_weights: InitMode = True
    fan_in_fan_out: bool = False
    task_type: Union[None, str] = None
    base_model_name_or_path: Union[None, str] = None
    inference_mode: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: TokenIndices = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r={self.r!r}: the rank must be an integer >= 1")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"LoraConfig.lora_alpha={self.lora_alpha!r}: must be a number > 0")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"LoraConfig.lora_alpha={self.lora_alpha!r}: must be a finite number > 0")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout={self.lora_dropout!r}: must be in [0, 1)")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"LoraConfig.bias={self.bias!r}: must be one of {_BIAS_MODES}")
        set_("init_lora_weights", _check_init(self.init_lora_weights))
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"LoraConfig.use_dora={self.use_dora!r}: must be True or False")
        if not isinstance(self.lora_bias, bool):
            raise TypeError(f"LoraConfig.lora_bias={self.lora_bias!r}: must be True or False")
        if self.lora_bias and self.use_dora:
            raise ValueError("LoraConfig(lora_bias=True, use_dora=True): PEFT rejects this combination (DoRA has no "
                             "bias on lora_B); use one of them")
        if self.lora_bias and self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig(lora_bias=True) works with init_lora_weights True, False or 'gaussian' "
                             f"(as PEFT), got {self.init_lora_weights!r}")
        set_("trainable_token_indices", _freeze_tokens(self.trainable_token_indices))
        set_("target_modules", _freeze_names("target_modules", self.target_modules, allow_str=True))
        set_("exclude_modules", _freeze_names("exclude_modules", self.exclude_modules, allow_str=True))
        set_("modules_to_save", _freeze_names("modules_to_save", self.modules_to_save, allow_str=False))
        set_("layers_pattern", _freeze_names("layers_pattern", self.layers_pattern, allow_str=False))
        if self.target_modules == ():
            raise ValueError("LoraConfig.target_modules is empty: name at least one module, a regex, or 'all-linear'")
        layers = self.layers_to_transform
        if layers is not None:
            layers = (layers,) if isinstance(layers, int) else tuple(layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(
                    f"LoraConfig.layers_to_transform={self.layers_to_transform!r}: must be layer indices >= 0"
                )
            set_("layers_to_transform", layers)
        if self.layers_pattern is not None and layers is None:
            raise ValueError("LoraConfig.layers_pattern needs layers_to_transform (as in PEFT)")
        if isinstance(self.target_modules, str) and (layers is not None or self.layers_pattern is not None):
            # PEFT refuses this too: a regex already says which layers it matches.
            raise ValueError(
                f"LoraConfig.layers_to_transform/layers_pattern cannot be used when target_modules is a str "
                f"({self.target_modules!r}); use a list of module names, or put the layer indices in the regex"
            )
        set_("rank_pattern", _freeze_mapping("rank_pattern", self.rank_pattern, int))
        set_("alpha_pattern", _freeze_mapping("alpha_pattern", self.alpha_pattern, float))
        set_("lora_dropout", float(self.lora_dropout))

    # Equality/hash on the JSON form, so mapping fields compare by value.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoraConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def scale_for(self, r: int, alpha: float) -> float:
        """The LoRA scale ``s`` for rank ``r`` and ``alpha``: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return float(alpha) / (math.sqrt(r) if self.use_rslora else r)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` keys and JSON-compatible values.

        >>> LoraConfig(r=4, target_modules=["q"]).to_dict()["peft_type"]
        'LORA'
        """
        d: dict[str, Any] = {"peft_type": "LORA"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Mapping):
                v = {k: list(x) if isinstance(x, tuple) else x for k, x in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Builds a config from PEFT's keys (an ``adapter_config.json`` dict).

        Keys of PEFT features that jlora does not implement are accepted only with their
        inactive default value; anything else is a ``ValueError`` naming the key.
        """
        data = dict(data)
        peft_type = data.pop("peft_type", "LORA")
        if data.get("use_dora") and data.get("lora_bias"):
            raise ValueError(
                "adapter config key 'lora_bias'=True with 'use_dora'=True: PEFT rejects this combination "
                "(DoRA has no bias on lora_B); use lora_bias=false"
            )
        if peft_type != "LORA":
            raise ValueError(f"peft_type={peft_type!r}: jlora reads LoRA adapters only (peft_type 'LORA')")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in _VARIANT_PEFT_KEYS:
                if value not in (None, False, {}, []):
                    raise ValueError(
                        f"adapter config key {key!r}: a {_VARIANT_PEFT_KEYS[key]} adapter; jlora implements plain LoRA, "
                        f"DoRA, PiSSA/OLoRA and MiCA (loading) only, not {_VARIANT_PEFT_KEYS[key]}"
                    )
            elif key in _INACTIVE_PEFT_KEYS:
                default = _INACTIVE_PEFT_KEYS[key]
                if value not in (default, None, {}, [], False):
                    raise ValueError(f"adapter config key {key!r}={value!r} needs a PEFT feature jlora lacks")
            elif key in _IGNORED_PEFT_KEYS:
                continue
            else:
                # Unknown keys from newer PEFT versions: accept when inactive.
                if value not in (None, False, {}, [], ""):
                    raise ValueError(
                        f"adapter config key {key!r}={value!r} is unknown to jlora; known keys: {sorted(names)}"
                    )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        return cls.from_dict(json.loads(text))
