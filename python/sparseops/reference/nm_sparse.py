"""N:M structured sparsity in pure torch: the specification of every nm_* backend.

Format (fixed, see docs in ``sparseops.ops.nm_sparse``): a dense weight W [out, in] is cut
into groups of m consecutive values along ``in``; each group keeps n of them. ``values``
[out, G*n] holds the kept values of group g at [g*n, g*n+n) in increasing position order;
``meta`` uint8 [out, ceil(G*n*b/8)] packs each kept value's position p in [0, m) in b bits
(b = 1, 2, 4, 4 for m = 2, 4, 8, 16), value j at byte (j*b)//8, bit (j*b)%8. A group that
keeps fewer than n non-zeros stores explicit zeros at the lowest positions not kept.

Ranking (nm_mask, the fused prune+compress): the n largest scores (|w| by default) per group,
ties to the lower index, a NaN score ranks above every number (as torch.topk).
"""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "meta_bits",
    "nm_columns_ref",
    "nm_compress_ref",
    "nm_decompress_ref",
    "nm_linear_ref",
    "nm_mask_ref",
    "nm_transposable_mask_ref",
]

_BITS = {2: 1, 4: 2, 8: 4, 16: 4}


def meta_bits(m: int) -> int:
    """Bits per stored position for group size m."""
    return _BITS[m]


def meta_bytes(kept: int, m: int) -> int:
    return (kept * _BITS[m] + 7) // 8


def _rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last dim, best first: NaN highest, then larger, ties to lower index."""
    s = scores.to(torch.float64)
    nan = torch.isnan(s)
    key = torch.where(nan, torch.zeros_like(s), s)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    nan_sorted = nan.gather(-1, order).to(torch.int8)
    order2 = torch.sort(nan_sorted, dim=-1, descending=True, stable=True).indices
    return order.gather(-1, order2)


def nm_mask_ref(w: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [out, in]: the n best-scored positions of every group of m along the last dim."""
    out, k = w.shape
    s = (w.abs() if scores is None else scores).reshape(out, k // m, m)
    order = _rank_order(s)[..., :n]
    mask = torch.zeros(out, k // m, m, dtype=torch.bool, device=w.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(out, k)


def _regular_patterns(n: int, m: int) -> torch.Tensor:
    """Every m x m 0/1 matrix with n ones in each row and column, [P, m, m] bool (m <= 4)."""
    rows = [r for r in itertools.combinations(range(m), n)]
    pats = []
    for choice in itertools.product(rows, repeat=m):
        mat = torch.zeros(m, m, dtype=torch.bool)
        for i, cols in enumerate(choice):
            mat[i, list(cols)] = True
        if bool((mat.sum(0) == n).all()):
            pats.append(mat)
    return torch.stack(pats)


def nm_transposable_mask_ref(w: torch.Tensor, n: int, m: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """A mask N:M along both dims: each m x m block keeps n per row and n per column.

    m <= 4: exact (the block pattern with the largest kept score among every n-regular
    m x m pattern, at most 90 of them; the first such pattern in enumeration order on ties).
    m >= 8: greedy (entries taken best first while their row and column have room) with an
    augmenting-path repair that completes rows and columns left short; not optimal.
    NaN scores count as +inf.
    """
    out, k = w.shape
    s = (w.abs() if scores is None else scores).to(torch.float64)
    s = torch.nan_to_num(s, nan=float("inf"), posinf=float("inf"))
    blocks = s.reshape(out // m, m, k // m, m).permute(0, 2, 1, 3)  # [Bo, Bi, m, m]
    if m <= 4:
        pats = _regular_patterns(n, m).to(w.device)  # [P, m, m]
        finite = torch.where(torch.isinf(blocks), torch.full_like(blocks, 1e300), blocks)
        tot = torch.einsum("abij,pij->abp", finite, pats.to(torch.float64))
        best = tot.argmax(-1)
        mb = pats[best]  # [Bo, Bi, m, m]
    else:
        mb = torch.zeros(blocks.shape, dtype=torch.bool)
        flat = blocks.reshape(-1, m, m).cpu()
        res = mb.view(-1, m, m)
        for b in range(flat.shape[0]):
            res[b] = _greedy_block(flat[b], n, m)
        mb = mb.to(w.device)
    return mb.permute(0, 2, 1, 3).reshape(out, k)


def _greedy_block(s: torch.Tensor, n: int, m: int) -> torch.Tensor:
    order = torch.sort(s.reshape(-1), descending=True, stable=True).indices.tolist()
    sel = [[False] * m for _ in range(m)]
    rc, cc = [0] * m, [0] * m
    for f in order:
        i, j = divmod(f, m)
        if rc[i] < n and cc[j] < n:
            sel[i][j] = True
            rc[i] += 1
            cc[j] += 1
    # Repair: augmenting paths from a short row to a short column (bipartite b-matching).
    while True:
        r0 = next((i for i in range(m) if rc[i] < n), None)
        if r0 is None:
            break
        parent: dict = {}
        frontier = [("r", r0)]
        seen = {("r", r0)}
        end = None
        while frontier and end is None:
            nxt = []
            for kind, v in frontier:
                if kind == "r":
                    for j in range(m):
                        if not sel[v][j] and ("c", j) not in seen:
                            seen.add(("c", j))
                            parent[("c", j)] = (kind, v)
                            if cc[j] < n:
                                end = ("c", j)
                                break
                            nxt.append(("c", j))
                else:
                    for i in range(m):
                        if sel[i][v] and ("r", i) not in seen:
                            seen.add(("r", i))
                            parent[("r", i)] = (kind, v)
                            nxt.append(("r", i))
                if end is not None:
                    break
            frontier = nxt
        assert end is not None, "no augmenting path (cannot happen for an n-regular target)"
        node = end
        while node in parent:
            p = parent[node]
            if node[0] == "c":  # edge row p -> col node: add
                sel[p[1]][node[1]] = True
            else:  # edge col p -> row node: remove
                sel[node[1]][p[1]] = False
            node = p
        rc[r0] += 1
        cc[end[1]] += 1
    return torch.tensor(sel, dtype=torch.bool)


def _pad_mask(keep: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Adds the lowest unkept positions to groups that keep fewer than n (keep [out, G, m])."""
    short = n - keep.sum(-1, keepdim=True)
    unkept_rank = torch.cumsum((~keep).to(torch.int64), -1)
    return keep | ((~keep) & (unkept_rank <= short))


def nm_columns_ref(meta: torch.Tensor, n: int, m: int, kept: int) -> torch.Tensor:
    """Dense column (int64 [out, kept]) of every kept value, decoded from meta."""
    b = _BITS[m]
    j = torch.arange(kept, device=meta.device)
    byte = meta.to(torch.int64)[:, (j * b) // 8]
    pos = (byte >> ((j * b) % 8)) & ((1 << b) - 1)
    return (j // n) * m + pos


def nm_compress_ref(w: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None):
    """(values, meta, mask) of w kept at ``mask`` (default: its non-zeros), padded to n per group.

    The caller checks that every group keeps at most n and that w is zero outside the mask.
    """
    out, k = w.shape
    G = k // m
    keep = (w != 0) if mask is None else mask.to(torch.bool)
    keep = _pad_mask(keep.reshape(out, G, m), n, m)
    pos = torch.arange(m, device=w.device).expand(out, G, m)
    # Kept positions in increasing order: sort (not kept -> m) and take the first n.
    key = torch.where(keep, pos, torch.full_like(pos, m))
    p = torch.sort(key, dim=-1).values[..., :n]  # [out, G, n]
    values = w.reshape(out, G, m).gather(-1, p).reshape(out, G * n).contiguous()
    b = _BITS[m]
    kept = G * n
    nbytes = meta_bytes(kept, m)
    pf = p.reshape(out, kept).to(torch.int64)
    j = torch.arange(kept, device=w.device)
    shifted = pf << ((j * b) % 8)
    meta = torch.zeros(out, nbytes, dtype=torch.int64, device=w.device)
    meta.index_add_(1, (j * b) // 8, shifted)
    return values, meta.to(torch.uint8), keep.reshape(out, k)


def nm_decompress_ref(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    out, kept = values.shape
    cols = nm_columns_ref(meta, n, m, kept)
    dense = torch.zeros(out, in_features, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, cols, values)


def nm_linear_ref(x, values, meta, n: int, m: int, in_features: int, bias=None) -> torch.Tensor:
    """x [..., in] @ decompress(values, meta)^T + bias, accumulated in fp32 (fp64 for fp64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = nm_decompress_ref(values, meta, n, m, in_features).to(acc)
    y = x.to(acc) @ w.T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
