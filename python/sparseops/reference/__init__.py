"""Pure-PyTorch references: the test oracle and the benchmark baseline of every op."""

from .maxsim import maxsim_ref
from .routing import (
    expert_choice_route_ref,
    load_balancing_loss_ref,
    route_metadata_ref,
    route_weights_ref,
    router_z_loss_ref,
    selection_scores_ref,
    topk_route_ref,
)

__all__ = [
    "expert_choice_route_ref",
    "load_balancing_loss_ref",
    "maxsim_ref",
    "route_metadata_ref",
    "route_weights_ref",
    "router_z_loss_ref",
    "selection_scores_ref",
    "topk_route_ref",
]
