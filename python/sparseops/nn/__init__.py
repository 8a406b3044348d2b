"""Drop-in modules built on the public sparseops functions."""

from .maxsim import MaxSimContrastiveLoss, MaxSimScorer, maxsim_contrastive_loss
from .moe import GatedMLP, MoE, MoEAux
from .nm_linear import NMLinear, apply_nm_layout_, nm_from_pretrained, nm_layout, sparsify_, wanda_scores
from .router import RouterOutput, TopKRouter

__all__ = [
    "GatedMLP",
    "MaxSimContrastiveLoss",
    "MaxSimScorer",
    "MoE",
    "MoEAux",
    "NMLinear",
    "RouterOutput",
    "TopKRouter",
    "maxsim_contrastive_loss",
    "apply_nm_layout_",
    "nm_from_pretrained",
    "nm_layout",
    "sparsify_",
    "wanda_scores",
]
