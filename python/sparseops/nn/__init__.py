"""Drop-in modules built on the public sparseops functions."""

from .moe import GatedMLP, MoE, MoEAux
from .nm_linear import NMLinear, sparsify_, wanda_scores
from .router import RouterOutput, TopKRouter

__all__ = ["GatedMLP", "MoE", "MoEAux", "NMLinear", "RouterOutput", "TopKRouter", "sparsify_", "wanda_scores"]
