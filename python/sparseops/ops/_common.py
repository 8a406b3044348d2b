"""Small helpers every op module shares: the accumulate dtype and the argument description
that error messages use (the Python twin of csrc/include/sparseops/checks.h's describe)."""

from __future__ import annotations

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are computed in fp64 (for gradcheck); every other dtype in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def describe(t) -> str:
    """'shape [4, 8], dtype torch.float32, device cpu', or 'a list' for a non-tensor."""
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"
