"""The bottom layer: :class:`~jlora.LoraConfig` (:mod:`.config`), tree-path helpers
(:mod:`.paths`), NNX modules as trees (:mod:`.nnx_modules`) and what the two jaxpr walkers
share (:mod:`.jaxprs`). Nothing here imports another part of jlora."""

from .config import LoraConfig

__all__ = ["LoraConfig"]
