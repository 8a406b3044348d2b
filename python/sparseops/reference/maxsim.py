"""Pure-PyTorch reference for MaxSim late interaction: the specification and the test oracle.

Every backend (C++ CPU, Triton) must reproduce ``maxsim_ref``: scores within the
``sparseops.testing`` tolerances of the accumulate dtype, argmax exactly where the maximum is
unique (and exactly on inputs whose dot products are exact, such as the tie grids of
``sparseops.testing.maxsim_inputs(ties=True)``).

This is the naive einsum: it materialises the [Nq, Nd, Lq, Ld] similarity tensor, which is
exactly what the kernels avoid. Use it on small inputs only.
"""

from __future__ import annotations

import torch

__all__ = ["maxsim_accumulate_dtype", "maxsim_token_mask_ref", "maxsim_ref"]


def maxsim_accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are scored in fp64 (for gradcheck); fp32, bf16 and fp16 in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def maxsim_token_mask_ref(mask: torch.Tensor | None, n: int, length: int, device) -> torch.Tensor:
    """The [n, length] bool validity of a ``q_mask`` / ``d_mask`` argument (True = real token).

    ``mask`` is None (every token is real), a bool [n, length] mask, or int lengths [n] (the
    first lengths[k] tokens of row k are real). Lengths outside [0, length] are clamped (the
    C++ op rejects them on CPU tensors and clamps them on CUDA tensors, where checking would
    need a host synchronisation).
    """
    if mask is None:
        return torch.ones(n, length, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        return mask
    pos = torch.arange(length, device=device)
    return pos[None, :] < mask.to(torch.int64).clamp(0, length)[:, None]


def maxsim_ref(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    reduce: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Late-interaction scores of every query against every document, with the argmax.

    Args:
        q: [Nq, Lq, dim] query token embeddings (fp32 / bf16 / fp16 / fp64).
        d: [Nd, Ld, dim] document token embeddings, same dtype and device as q.
        q_mask: None, bool [Nq, Lq] (True = real token) or int lengths [Nq].
        d_mask: None, bool [Nd, Ld] or int lengths [Nd].
        reduce: "sum" or "mean" (the sum divided by the number of real query tokens).

    Returns:
        scores: [Nq, Nd] in the accumulate dtype (fp32; fp64 for fp64 inputs).
            scores[n, m] = reduce over the real query tokens i of max over the real document
            tokens j of <q[n, i], d[m, j]>, computed in the accumulate dtype from the inputs
            widened to it (no tf32 / fp16 downcast).
        argmax: [Nq, Nd, Lq] int32: the j of each maximum, the lowest one on ties; -1 where
            query token i is masked or document m has no real token.

    Semantics (every backend): a masked document token never wins the max, even against
    -inf similarities; a document with no real token scores 0 for every query token (so 0
    in all); a masked query token adds nothing; "mean" with no real query token gives 0.
    Empty Nq, Nd, Lq, Ld and dim are allowed (dim = 0: every similarity is 0).
    Inputs are expected to be finite: with a NaN similarity the score and argmax are
    unspecified (not checked, as torch.amax-based code would not check either).
    """
    acc = maxsim_accumulate_dtype(q.dtype)
    Nq, Lq, _ = q.shape
    Nd, Ld, _ = d.shape
    qv = maxsim_token_mask_ref(q_mask, Nq, Lq, q.device)
    dv = maxsim_token_mask_ref(d_mask, Nd, Ld, q.device)
    sim = torch.einsum("nid,mjd->nmij", q.to(acc), d.to(acc))  # [Nq, Nd, Lq, Ld]
    sim = sim.masked_fill(~dv[None, :, None, :], float("-inf"))
    if Ld > 0:
        best, arg = sim.max(dim=-1)  # torch.max returns the lowest index among equal maxima
    else:
        best = sim.new_full((Nq, Nd, Lq), float("-inf"))
        arg = torch.zeros(Nq, Nd, Lq, dtype=torch.int64, device=q.device)
    has_tokens = dv.any(dim=-1)[None, :, None]  # [1, Nd, 1]
    live = has_tokens & qv[:, None, :]  # [Nq, Nd, Lq]
    if Ld > 0:
        # An all -inf row (finite inputs cannot make one, overflow can) still picks a real
        # token: the first real one, as max does over the -inf fill when ties go low.
        first_real = dv.to(torch.int8).argmax(dim=-1)[None, :, None].expand_as(arg)
        arg = torch.where(torch.isneginf(best) & live, first_real, arg)
    contrib = torch.where(live, best, torch.zeros((), dtype=acc, device=q.device))
    scores = contrib.sum(dim=-1)
    if reduce == "mean":
        count = qv.sum(dim=-1).to(acc)[:, None]  # [Nq, 1]
        scores = torch.where(count > 0, scores / count.clamp_min(1), torch.zeros((), dtype=acc, device=q.device))
    elif reduce != "sum":
        raise ValueError(f'reduce must be "sum" or "mean", got {reduce!r}')
    argmax = torch.where(live, arg, -1).to(torch.int32)
    return scores, argmax
