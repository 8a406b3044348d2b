"""sparseops: sparse compute kernels for PyTorch.

Families: MoE routing (``topk_route``, ``route_metadata``, ``expert_choice_route``, router
losses), grouped GEMM (``grouped_mm``, ``gather_rows``, ``scatter_rows``, ``row_scale``),
MaxSim late interaction (``maxsim``, ``maxsim_varlen``, ``maxsim_pairs``,
``maxsim_topk``, the ``MaxSimIndex`` corpus), the fused MoE expert MLP (``moe_mlp``) and N:M structured sparsity
(``nm_mask``, ``nm_compress``, ``nm_linear``). Every op is a ``torch.library`` op with
C++ CPU, CUDA and Triton backends and a pure-PyTorch reference (``sparseops.reference``);
see ``build_info()`` for what this installation can run.
"""

from . import _backend, nn
from ._backend import available_backends, build_info, resolve_backend, set_default_backend
from .maxsim_index import MaxSimIndex
from .nm_convert import (
    nm_from_compressed_tensors,
    nm_from_semi_structured,
    nm_to_compressed_tensors,
    nm_to_semi_structured,
)
from .nn.nm_linear import sparsify_
from .ops.grouped_mm import gather_rows, grouped_mm, row_scale, scatter_rows
from .ops.maxsim import maxsim, maxsim_pairs, maxsim_quantize, maxsim_topk, maxsim_varlen
from .ops.moe import MOE_ACTIVATIONS, moe_mlp, moe_pack_stats, prepack_moe_weights, release_moe_weights
from .ops.nm_sparse import NMWeight, nm_compress, nm_decompress, nm_linear, nm_mask
from .ops.routing import (
    RouteMeta,
    TopkRouteOptions,
    expert_choice_route,
    load_balancing_loss,
    route,
    route_metadata,
    router_z_loss,
    topk_route,
)

__version__ = "0.1.0"

__all__ = [
    "MOE_ACTIVATIONS",
    "MaxSimIndex",
    "NMWeight",
    "RouteMeta",
    "TopkRouteOptions",
    "available_backends",
    "build_info",
    "expert_choice_route",
    "gather_rows",
    "grouped_mm",
    "load_balancing_loss",
    "maxsim",
    "maxsim_pairs",
    "maxsim_quantize",
    "maxsim_topk",
    "maxsim_varlen",
    "moe_mlp",
    "moe_pack_stats",
    "prepack_moe_weights",
    "release_moe_weights",
    "nm_compress",
    "nm_decompress",
    "nm_from_compressed_tensors",
    "nm_from_semi_structured",
    "nm_linear",
    "nm_mask",
    "nm_to_compressed_tensors",
    "nm_to_semi_structured",
    "resolve_backend",
    "route",
    "route_metadata",
    "router_z_loss",
    "row_scale",
    "scatter_rows",
    "set_default_backend",
    "sparsify_",
    "topk_route",
    "nn",
]

del _backend
