"""Converters between ``NMWeight`` (NM_FORMAT) and other 2:4 layouts.

- compressed-tensors ``sparse-24-bitmask`` (the checkpoint format of llm-compressor / vLLM):
  per weight ``<prefix>.shape`` (int64 [2, 1]: rows, cols), ``<prefix>.compressed`` (the kept
  values [rows, cols / 2] in row-major order: exactly two per group of four, increasing
  columns, which is NMWeight's ``values`` for 2:4) and ``<prefix>.bitmask`` (uint8
  [rows, ceil(cols / 8)]: bit c % 8 of byte c // 8 set when column c is kept, i.e.
  ``numpy.packbits(mask, axis=-1, bitorder="little")``). Layout as in
  neuralmagic/compressed-tensors src/compressed_tensors/compressors/sparse_compressors/
  sparse_24_bitmask.py (sparse24_bitmask_compress / Sparse24BitMaskTensor.dict) and
  src/compressed_tensors/utils/helpers.py (pack_bitmasks / unpack_bitmasks).
- torch's semi-structured sparse tensors (``torch.sparse.to_sparse_semi_structured``): their
  packed CUTLASS / cuSPARSELt layouts exist on CUDA only, so ``nm_to_semi_structured`` needs a
  CUDA weight; ``nm_from_semi_structured`` takes a SparseSemiStructuredTensor (any device
  torch can densify it on) or a dense 2:4 tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .ops._common import describe as _describe
from .ops.nm_sparse import NMWeight, nm_compress

__all__ = [
    "nm_from_compressed_tensors",
    "nm_from_semi_structured",
    "nm_to_compressed_tensors",
    "nm_to_semi_structured",
]

_BIT = torch.arange(8, dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    return (padded.view(rows, nbytes, 8) << _BIT.to(mask.device)).sum(-1, dtype=torch.uint8)


def _unpack_bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    rows = bitmask.shape[0]
    bits = (bitmask.to(torch.uint8).unsqueeze(-1) >> _BIT.to(bitmask.device)) & 1
    return bits.reshape(rows, -1)[:, :cols].bool()


def _name(prefix: str, leaf: str) -> str:
    if prefix.endswith(".weight"):
        prefix = prefix[: -len(".weight")]
    return f"{prefix}.{leaf}" if prefix else leaf


def nm_to_compressed_tensors(nmw: NMWeight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The compressed-tensors ``sparse-24-bitmask`` tensors of a 2:4 NMWeight.

    Keys ``<prefix>.shape``, ``<prefix>.compressed``, ``<prefix>.bitmask`` (a trailing
    ``.weight`` of prefix is dropped, as compressed-tensors does). Explicit zeros that the
    NMWeight stores for short groups are kept positions in the bitmask too.
    """
    if not isinstance(nmw, NMWeight):
        raise TypeError(f"nmw must be an NMWeight, got {type(nmw).__name__}")
    if (nmw.n, nmw.m) != (2, 4):
        raise ValueError(f"sparse-24-bitmask stores 2:4 weights, got {nmw.n}:{nmw.m}")
    rows, cols = nmw.shape
    return {
        _name(prefix, "shape"): torch.tensor([rows, cols], device=nmw.device).reshape(-1, 1),
        _name(prefix, "compressed"): nmw.values,
        _name(prefix, "bitmask"): _pack_bits(nmw.mask()),
    }


def nm_from_compressed_tensors(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> NMWeight:
    """The 2:4 NMWeight of compressed-tensors ``sparse-24-bitmask`` tensors (see the module)."""
    shape = tensors[_name(prefix, "shape")]
    values = tensors[_name(prefix, "compressed")]
    bitmask = tensors[_name(prefix, "bitmask")]
    rows, cols = (int(v) for v in shape.reshape(-1).tolist())
    if cols % 4 != 0:
        raise ValueError(f"sparse-24-bitmask: the column count ({cols}) must be a multiple of 4")
    if bitmask.dim() != 2 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"bitmask must have shape [{rows}, {(cols + 7) // 8}], got {_describe(bitmask)}")
    if values.dim() != 2 or tuple(values.shape) != (rows, cols // 2):
        raise ValueError(f"compressed must have shape [{rows}, {cols // 2}], got {_describe(values)}")
    mask = _unpack_bits(bitmask, cols)
    per_group = mask.reshape(rows, cols // 4, 4).sum(-1)
    if rows * cols > 0 and not bool((per_group == 2).all()):
        raise ValueError("sparse-24-bitmask: every group of 4 must keep exactly 2 positions in bitmask")
    dense = values.new_zeros((rows, cols))
    dense[mask] = values.reshape(-1)
    return nm_compress(dense, 2, 4, mask)


def nm_to_semi_structured(nmw: NMWeight):
    """A torch SparseSemiStructuredTensor of a 2:4 NMWeight (CUDA only, as torch's layouts)."""
    if not isinstance(nmw, NMWeight):
        raise TypeError(f"nmw must be an NMWeight, got {type(nmw).__name__}")
    if (nmw.n, nmw.m) != (2, 4):
        raise ValueError(f"torch's semi-structured sparsity is 2:4, got {nmw.n}:{nmw.m}")
    if nmw.device.type != "cuda":
        raise RuntimeError(
            "nm_to_semi_structured needs a CUDA NMWeight: torch's semi-structured (CUTLASS / cuSPARSELt) "
            f"layouts exist on CUDA only, got device {nmw.device}"
        )
    return torch.sparse.to_sparse_semi_structured(nmw.dense())


def nm_from_semi_structured(t: torch.Tensor) -> NMWeight:
    """The 2:4 NMWeight of a torch SparseSemiStructuredTensor, or of a dense 2:4 tensor."""
    from torch.sparse import SparseSemiStructuredTensor

    dense = t.to_dense() if isinstance(t, SparseSemiStructuredTensor) else t
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise ValueError(f"t must be a 2-D (semi-structured or dense) tensor, got {_describe(dense)}")
    return nm_compress(dense, 2, 4)
