"""Tolerances and input builders shared by the tests and the benchmarks."""

from __future__ import annotations

import torch

# (rtol, atol) for outputs computed in the accumulate dtype from inputs of each dtype. The
# routing weights are computed in fp32 whatever the logits' dtype, so they get fp32 tolerances:
# the backends differ only in exp() rounding and summation order (a few ulp).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, msg: str = "") -> None:
    """assert_close with the table above, keyed by the dtype of ``expected``."""
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=(lambda m: f"{msg}\n{m}") if msg else None)


def router_logits(
    T: int,
    E: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    ties: bool = False,
    noncontiguous: bool = False,
) -> torch.Tensor:
    """Unit-scale random logits [T, E]; ``ties`` rounds them to a grid of 1/4 so rows repeat values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, E, generator=g, dtype=torch.float64)
    if ties:
        x = (x * 4).round() / 4
    x = x.to(dtype).to(device)
    if noncontiguous:
        # Same values, strided view: every other column of a [T, 2E] buffer.
        wide = torch.empty(T, 2 * E, dtype=dtype, device=device)
        wide[:, ::2] = x
        x = wide[:, ::2]
    return x


def random_ids(T: int, k: int, E: int, *, device="cpu", seed: int = 0, drop: float = 0.0, skew: float = 0.0):
    """[T, k] int32 distinct-per-row expert ids; ``drop`` is the fraction set to -1; ``skew`` > 0 favours low ids."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g) - skew * torch.arange(E, dtype=torch.float32) / max(E, 1)
    ids = scores.topk(k, dim=-1).indices.to(torch.int32)
    if drop > 0:
        ids[torch.rand(T, k, generator=g) < drop] = -1
    return ids.to(device)
