"""Drop-in modules built on the public sparseops functions."""

from .moe import GatedMLP, MoE, MoEAux
from .router import RouterOutput, TopKRouter

__all__ = ["GatedMLP", "MoE", "MoEAux", "RouterOutput", "TopKRouter"]
