"""Pure-PyTorch reference for MaxSim late interaction: the specification and the test oracle.

Every backend (C++ CPU, Triton) must reproduce ``maxsim_ref``: scores within the
``sparseops.testing`` tolerances of the accumulate dtype, argmax exactly where the maximum is
unique (and exactly on inputs whose dot products are exact, such as the tie grids of
``sparseops.testing.maxsim_inputs(ties=True)``).

This is the naive einsum: it materialises the [Nq, Nd, Lq, Ld] similarity tensor, which is
exactly what the kernels avoid. Use it on small inputs only.

int8 documents (every function takes ``d_scale``): d is int8 and ``d_scale`` fp32 holds one
scale per document token (``d.shape[:-1]``); the similarity is <q_i, d_j> * d_scale[j],
computed in the accumulate dtype from q widened and the integers of d (exact float query x
int8 document; kernels that quantise the query state their error against this).
"""

from __future__ import annotations

import torch

__all__ = [
    "maxsim_accumulate_dtype",
    "maxsim_dequantize_ref",
    "maxsim_backward_ref",
    "maxsim_normalize_ref",
    "maxsim_pairs_ref",
    "maxsim_ref",
    "maxsim_token_mask_ref",
    "maxsim_topk_ref",
    "maxsim_varlen_ref",
]


def maxsim_accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs are scored in fp64 (for gradcheck); fp32, bf16 and fp16 in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def maxsim_dequantize_ref(d: torch.Tensor, d_scale: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """d in the accumulate dtype: float d widened, or int8 d times its per-token d_scale."""
    if d_scale is None:
        return d.to(acc)
    return d.to(acc) * d_scale.to(acc)[..., None]


def _similarities(q: torch.Tensor, d: torch.Tensor, d_scale: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """[Nq, Nd, Lq, Ld]: <q_i, d_j> in acc (times d_scale[j] for int8 d, after the dot)."""
    sim = torch.einsum("nid,mjd->nmij", q.to(acc), d.to(acc))
    if d_scale is not None:
        sim = sim * d_scale.to(acc)[None, :, None, :]
    return sim


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
    similarity: str = "dot",
    pylate_mask: bool = False,
    d_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Late-interaction scores of every query against every document, with the argmax.

    Args:
        q: [Nq, Lq, dim] query token embeddings (fp32 / bf16 / fp16 / fp64).
        d: [Nd, Ld, dim] document token embeddings, same dtype and device as q, or int8 with
            ``d_scale`` fp32 [Nd, Ld] (similarity <q_i, d_j> * d_scale[m, j]).
        q_mask: None, bool [Nq, Lq] (True = real token) or int lengths [Nq].
        d_mask: None, bool [Nd, Ld] or int lengths [Nd].
        reduce: "sum" or "mean" (the sum divided by the number of real query tokens).
        similarity: "dot", or "cosine" (the dot product of tokens L2-normalised by
            ``maxsim_normalize_ref``: in the accumulate dtype, rounded back to the input dtype).
        pylate_mask: PyLate's multiplicative masking (``pylate.scores.colbert_scores``): a
            masked document token's similarity becomes 0 and takes part in the max (so a max
            is never below 0 when the document has a masked token); a masked query token adds
            0. Where a masked document token wins (lowest index among equal maxima) the
            argmax is -1: it takes no gradient, as 0 * s has none in PyLate's autograd.

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
    if similarity == "cosine":
        if d_scale is not None:
            raise ValueError('similarity="cosine" needs float documents (quantise normalised documents instead)')
        q, d = maxsim_normalize_ref(q), maxsim_normalize_ref(d)
    elif similarity != "dot":
        raise ValueError(f'similarity must be "dot" or "cosine", got {similarity!r}')
    Nq, Lq, _ = q.shape
    Nd, Ld, _ = d.shape
    qv = maxsim_token_mask_ref(q_mask, Nq, Lq, q.device)
    dv = maxsim_token_mask_ref(d_mask, Nd, Ld, q.device)
    sim = _similarities(q, d, d_scale, acc)  # [Nq, Nd, Lq, Ld]
    if pylate_mask:
        # Masked tokens become 0 and take part; the winner is the lowest index of the max.
        sim = torch.where(dv[None, :, None, :], sim, torch.zeros((), dtype=acc, device=q.device))
        if Ld > 0:
            best, arg = sim.max(dim=-1)
        else:
            best = sim.new_zeros((Nq, Nd, Lq))
            arg = torch.zeros(Nq, Nd, Lq, dtype=torch.int64, device=q.device)
        live = qv[:, None, :].expand(Nq, Nd, Lq) & (Ld > 0)
        contrib = torch.where(live, best, torch.zeros((), dtype=acc, device=q.device))
        scores = _reduce_ref(contrib.sum(dim=-1), qv, reduce, acc)
        won_real = dv[torch.arange(Nd, device=q.device)[None, :, None], arg] if Ld > 0 else live
        argmax = torch.where(live & won_real, arg, -1).to(torch.int32)
        return scores, argmax
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


def _reduce_ref(scores: torch.Tensor, qv: torch.Tensor, reduce: str, acc: torch.dtype) -> torch.Tensor:
    if reduce == "mean":
        count = qv.sum(dim=-1).to(acc)[:, None]
        return torch.where(count > 0, scores / count.clamp_min(1), torch.zeros((), dtype=acc, device=scores.device))
    if reduce != "sum":
        raise ValueError(f'reduce must be "sum" or "mean", got {reduce!r}')
    return scores


def maxsim_normalize_ref(x: torch.Tensor) -> torch.Tensor:
    """What similarity="cosine" scores: each token L2-normalised in the accumulate dtype
    (``torch.nn.functional.normalize``, eps 1e-12: a zero token stays zero), rounded back to
    x's dtype."""
    acc = maxsim_accumulate_dtype(x.dtype)
    return torch.nn.functional.normalize(x.to(acc), dim=-1).to(x.dtype)


def _unpack(x: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [total, ...] + cu_seqlens [N + 1] -> padded [N, Lmax, ...] and lengths [N]."""
    lens = (cu[1:] - cu[:-1]).to(torch.int64)
    n = lens.numel()
    lmax = int(lens.max()) if n else 0
    out = x.new_zeros(n, lmax, *x.shape[1:])
    for i in range(n):
        out[i, : int(lens[i])] = x[int(cu[i]) : int(cu[i + 1])]
    return out, lens


def maxsim_varlen_ref(
    q: torch.Tensor,
    cu_q: torch.Tensor,
    d: torch.Tensor,
    cu_d: torch.Tensor,
    *,
    pairs: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    d_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaxSim of packed ragged tokens (FlashAttention cu_seqlens), the padded reference's
    semantics with every token real.

    Args:
        q: [total_q, dim] query tokens, query n = rows cu_q[n]:cu_q[n + 1]; d: [total_d, dim]
            (int8 with d_scale fp32 [total_d]: see the module docstring).
        cu_q, cu_d: int [N + 1] cumulative lengths (0 first, non-decreasing, last = rows).
        pairs: None (every query x every document) or int [P, 2] (query, document).

    Returns:
        scores [Nq, Nd] (or [P]) in the accumulate dtype, and the argmax (document-local
        token index, -1 when the document is empty): all pairs: [Nd, total_q] (query n
        against document m at [m, cu_q[n]:cu_q[n + 1]]); pairs: flat, pair p's query tokens
        one after another in pair order.
    """
    if similarity == "cosine":
        q, d = maxsim_normalize_ref(q), maxsim_normalize_ref(d)
    qp, ql = _unpack(q, cu_q)
    dp, dl = _unpack(d, cu_d)
    sp = None if d_scale is None else _unpack(d_scale, cu_d)[0]
    scores, arg = maxsim_ref(qp, dp, q_mask=ql, d_mask=dl, reduce=reduce, d_scale=sp)  # [Nq, Nd], [Nq, Nd, Lq]
    Nq, Nd = ql.numel(), dl.numel()
    if pairs is None:
        argmax = torch.empty(Nd, q.shape[0], dtype=torch.int32, device=q.device)
        for n in range(Nq):
            argmax[:, int(cu_q[n]) : int(cu_q[n + 1])] = arg[n, :, : int(ql[n])]
        return scores, argmax
    pairs = pairs.to(torch.int64)
    parts = [arg[int(a), int(b), : int(ql[int(a)])] for a, b in pairs.tolist()]
    argmax = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32, device=q.device)
    return scores[pairs[:, 0], pairs[:, 1]], argmax.to(torch.int32)


def maxsim_pairs_ref(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    pylate_mask: bool = False,
    d_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned pairs: q [B, Lq, dim] with d [B, K, Ld, dim] -> scores [B, K], argmax
    [B, K, Lq] (query b against each of its K documents); masks bool [B, Lq] / [B, K, Ld] or
    lengths [B] / [B, K]; int8 d with d_scale [B, K, Ld]. maxsim_ref's semantics pair by pair."""
    B, K, Ld, dim = d.shape
    Lq = q.shape[1]
    acc = maxsim_accumulate_dtype(q.dtype)
    scores = torch.zeros(B, K, dtype=acc, device=q.device)
    argmax = torch.full((B, K, Lq), -1, dtype=torch.int32, device=q.device)
    for b in range(B):
        qm = None if q_mask is None else q_mask[b : b + 1]
        dm = None if d_mask is None else d_mask[b]
        s, a = maxsim_ref(
            q[b : b + 1], d[b], q_mask=qm, d_mask=dm, reduce=reduce, similarity=similarity, pylate_mask=pylate_mask,
            d_scale=None if d_scale is None else d_scale[b],
        )  # fmt: skip
        scores[b], argmax[b] = s[0], a[0]
    return scores, argmax


def maxsim_topk_ref(
    q: torch.Tensor,
    d: torch.Tensor,
    cu_d: torch.Tensor,
    k: int,
    *,
    q_mask: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    reduce: str = "sum",
    similarity: str = "dot",
    d_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best documents of a packed corpus for each query: the scores of maxsim over the
    corpus (or over each query's candidate ids; -1 = no candidate) sorted best first, ties to
    the lower document id; fewer than k scored documents pad with -inf / -1.

    q [Nq, Lq, dim] (+ q_mask as in maxsim_ref), d [total_d, dim], cu_d int [Nd + 1],
    candidates None, int [C] (shared) or [Nq, C]; int8 d with d_scale fp32 [total_d]. Returns
    (scores [Nq, k], ids [Nq, k] int64).
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    acc = maxsim_accumulate_dtype(q.dtype)
    Nq = q.shape[0]
    dp, dl = _unpack(d, cu_d)
    sp = None if d_scale is None else _unpack(d_scale, cu_d)[0]
    Nd = dl.numel()
    if similarity == "cosine":
        q, dp = maxsim_normalize_ref(q), maxsim_normalize_ref(dp)
    full = maxsim_ref(q, dp, q_mask=q_mask, d_mask=dl, reduce=reduce, d_scale=sp)[0]  # [Nq, Nd]
    out_s = torch.full((Nq, k), float("-inf"), dtype=acc, device=q.device)
    out_i = torch.full((Nq, k), -1, dtype=torch.int64, device=q.device)
    for n in range(Nq):
        if candidates is None:
            ids = torch.arange(Nd, device=q.device)
        else:
            c = candidates if candidates.dim() == 1 else candidates[n]
            ids = c.to(torch.int64)
            ids = ids[ids >= 0]
        vals = full[n, ids] if ids.numel() else full.new_zeros(0)
        keep = ~torch.isnan(vals)
        ids, vals = ids[keep], vals[keep]
        # Lower id first, then a stable sort by score: ties keep the lower id.
        order = torch.argsort(ids, stable=True)
        ids, vals = ids[order], vals[order]
        order = torch.argsort(vals, descending=True, stable=True)
        take = min(k, ids.numel())
        out_s[n, :take] = vals[order[:take]]
        out_i[n, :take] = ids[order[:take]]
    return out_s, out_i


def maxsim_backward_ref(
    grad: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    argmax: torch.Tensor,
    meta: torch.Tensor,
    need_dq: bool = True,
    need_dd: bool = True,
    d_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward every MaxSim op shares, from the saved argmax (index_add over the taken
    token pairs; it never forms Lq x Ld, but holds one [sum of query lengths, dim] temporary).

    grad [P] (accumulate dtype) per pair, q [Rq, dim] and d [Rd, dim] token rows, argmax
    int32 flat, meta int64 [P, 6] = (query group, first query row, query rows, document
    group, first document row, argmax offset). Returns dq [Rq, dim], dd [Rd, dim] in the
    accumulate dtype: dq[qs + t] += g * d[ds + a] and dd[ds + a] += g * q[qs + t] for every
    pair and query token t with a = argmax[off + t] >= 0. int8 d with d_scale [Rd]: d[ds + a]
    is read as d * d_scale (dq only: quantised documents are not differentiable).
    """
    if d_scale is not None and need_dd:
        raise RuntimeError("int8 documents are not differentiable: need_dd must be False with d_scale")
    acc = maxsim_accumulate_dtype(q.dtype)
    qs, ql, ds, off = meta[:, 1], meta[:, 2], meta[:, 4], meta[:, 5]
    P = meta.shape[0]
    pair = torch.repeat_interleave(torch.arange(P, device=q.device), ql)
    start = torch.cumsum(ql, 0) - ql
    t = torch.arange(pair.numel(), device=q.device) - start[pair]
    a = argmax.to(torch.int64)[off[pair] + t] if pair.numel() else pair
    live = a >= 0
    pair, t, a = pair[live], t[live], a[live]
    qrow, drow = qs[pair] + t, ds[pair] + a
    g = grad[pair].to(acc)[:, None]
    dq = dd = None
    if need_dq:
        rows = maxsim_dequantize_ref(d[drow], None if d_scale is None else d_scale[drow], acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device).index_add_(0, qrow, g * rows)
    if need_dd:
        dd = torch.zeros(d.shape, dtype=acc, device=q.device).index_add_(0, drow, g * q.to(acc)[qrow])
    return dq, dd
