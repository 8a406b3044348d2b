"""``sparseops.MaxSimIndex``: an in-memory packed corpus for brute-force late-interaction search.

The documents' token embeddings live one after another in a single [tokens, dim] buffer,
delimited by FlashAttention-style cumulative lengths, with one external id per document
(int64 >= 0, or str). ``search`` runs ``sparseops.maxsim_topk`` over the packed corpus for a
batch of queries: memory bounded by k per query, nothing padded, ties to the earlier
document. It is the embedded default a user starts with before reaching for a PLAID-style
compressed index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .ops._common import describe as _describe
from .ops.maxsim import maxsim_topk

__all__ = ["MaxSimIndex"]

_FORMAT = "sparseops.MaxSimIndex"
_VERSION = 1
# maxsim_topk takes fewer than 2^24 document tokens per call (its argmax and heaps index
# tokens with 24 bits): a larger corpus is searched shard by shard and the k best merged.
_SHARD_TOKENS = (1 << 24) - 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_GROWTH = 1.5


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class MaxSimIndex:
    """A packed corpus of multi-vector documents with batched exact MaxSim top-k search.

    Args:
        dim: the embedding size (None: taken from the first ``add``).
        dtype: the storage and scoring dtype, fp32 / bf16 / fp16 / fp64 (None: the first
            ``add``'s). Added documents and queries are converted to it.
        device: where the tokens live and search runs (None: the first ``add``'s).
        normalize: L2-normalise every document token on ``add`` and every query token on
            ``search`` (cosine MaxSim, as ColBERT / ColPali models emit).

    Storage: tokens [capacity, dim] and host int64 cumulative lengths grow by 1.5x when full
    (amortised O(1) copies per added token; an ``add`` copies only the new documents), ids
    in a host list with a dict for lookups. Ids are int (>= 0; -1 is "no document" in
    results; None to ``add`` assigns the next integers) or str, one kind per index, unique.
    Document order is insertion order; ``search`` breaks score ties toward the earlier-added
    document (the lower id when ids were assigned by ``add``).
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        normalize: bool = False,
    ) -> None:
        if dim is not None and (not isinstance(dim, int) or dim <= 0):
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, float64, got {dtype}")
        self._dim = dim
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else None
        self.normalize = bool(normalize)
        self._tokens: torch.Tensor | None = None  # [capacity, dim]
        self._cu = torch.zeros(1, dtype=torch.int64)  # host [capacity + 1]; _cu[0] = 0
        self._n_docs = 0
        self._n_tokens = 0
        self._id_kind: str | None = None  # "int" or "str"
        self._ids: list = []
        self._id_buf = torch.zeros(0, dtype=torch.int64)  # int ids, host, grown like _cu
        self._pos: dict = {}
        self._next_id = 0
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return self._n_docs

    def __contains__(self, doc_id: Any) -> bool:
        return doc_id in self._pos

    def __repr__(self) -> str:
        dt = _dtype_name(self._dtype) if self._dtype is not None else None
        return (
            f"MaxSimIndex({self._n_docs} documents, {self._n_tokens} tokens, dim={self._dim}, dtype={dt}, "
            f"device={self._device}, normalize={self.normalize}, ids={self._id_kind})"
        )

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def dtype(self) -> torch.dtype | None:
        return self._dtype

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def num_tokens(self) -> int:
        return self._n_tokens

    @property
    def ids(self) -> list:
        """The documents' ids in index order (a copy)."""
        return list(self._ids)

    def lengths(self) -> torch.Tensor:
        """Tokens per document, int64 [len(self)] on the CPU."""
        cu = self._cu[: self._n_docs + 1]
        return cu[1:] - cu[:-1]

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [num_tokens, dim], int32 cu_seqlens [len + 1] on the index device): views of
        the corpus for ``sparseops.maxsim_varlen`` / ``maxsim_topk`` (no copy of the tokens)."""
        return self._corpus(), self._cu_device(0, self._n_docs, 0)

    def _corpus(self) -> torch.Tensor:
        if self._tokens is None:
            return torch.zeros(0, self._dim or 0, dtype=self._dtype or torch.float32, device=self._device)
        return self._tokens[: self._n_tokens]

    # ------------------------------------------------------------------ add
    def add(
        self,
        docs: torch.Tensor | Sequence[torch.Tensor],
        ids: Sequence | torch.Tensor | None = None,
        *,
        lengths: torch.Tensor | Sequence[int] | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> list:
        """Append documents; returns their ids.

        Args:
            docs: a list of [L_i, dim] tensors; a padded [N, L, dim] tensor (with ``lengths``
                [N] or a bool ``mask`` [N, L], True = real token, any pattern; neither: every
                token is real); or packed tokens [T, dim] with ``cu_seqlens`` int [N + 1].
            ids: N unique ids not in the index: ints >= 0 (a list or an integer tensor) or
                strs; None assigns the next integers (int-id indexes only).

        The tokens are converted to the index dtype and device (and L2-normalised when
        ``normalize``) and copied once into the packed buffer.
        """
        tokens, lens = self._as_packed(docs, lengths, mask, cu_seqlens)
        n = lens.numel()
        new_ids = self._check_ids(ids, n)
        if n == 0:
            return []
        if self._n_tokens + tokens.shape[0] >= 2**31:
            raise ValueError(f"a MaxSimIndex holds fewer than 2^31 tokens (int32 cu_seqlens); adding "
                             f"{tokens.shape[0]} to {self._n_tokens} would pass it")  # fmt: skip
        if self._dim is None:
            self._dim = tokens.shape[1]
        if self._dtype is None:
            self._dtype = tokens.dtype if tokens.dtype in _DTYPES.values() else torch.float32
        if self._device is None:
            self._device = tokens.device
        tokens = tokens.to(device=self._device, dtype=self._dtype)
        if self.normalize:
            tokens = self._normalized(tokens)
        self._reserve(self._n_tokens + tokens.shape[0], self._n_docs + n)
        t0, d0 = self._n_tokens, self._n_docs
        self._tokens[t0 : t0 + tokens.shape[0]].copy_(tokens)
        self._cu[d0 + 1 : d0 + n + 1] = t0 + torch.cumsum(lens, 0)
        self._n_tokens += tokens.shape[0]
        self._n_docs += n
        if self._id_kind is None:
            self._id_kind = "str" if isinstance(new_ids[0], str) else "int"
        self._pos.update(zip(new_ids, range(d0, d0 + n)))
        self._ids.extend(new_ids)
        if self._id_kind == "int":
            self._next_id = max(self._next_id, max(new_ids) + 1)
            if self._id_buf.numel() < self._n_docs:
                buf = torch.zeros(self._cu.numel(), dtype=torch.int64)
                buf[:d0] = self._id_buf[:d0]
                self._id_buf = buf
            self._id_buf[d0 : self._n_docs] = torch.tensor(new_ids, dtype=torch.int64)
        self._cache.clear()
        return list(new_ids)

    def _as_packed(self, docs, lengths, mask, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [T, dim], int64 host lengths [N]) of any accepted ``docs`` form, checked."""
        if isinstance(docs, torch.Tensor):
            if not docs.is_floating_point():
                raise ValueError(f"docs must hold floating-point embeddings, got {_describe(docs)}")
            if cu_seqlens is not None:
                if docs.dim() != 2 or lengths is not None or mask is not None:
                    raise ValueError(f"with cu_seqlens, docs must be packed tokens [T, dim] and take no lengths / "
                                     f"mask, got docs {_describe(docs)}")  # fmt: skip
                cu = torch.as_tensor(cu_seqlens).to("cpu", torch.int64)
                if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != docs.shape[0]:
                    raise ValueError(f"cu_seqlens must be [N + 1] from 0 to docs.shape[0] = {docs.shape[0]}, got "
                                     f"{_describe(cu_seqlens)}")  # fmt: skip
                lens = cu[1:] - cu[:-1]
                if (lens < 0).any():
                    raise ValueError("cu_seqlens must be non-decreasing")
                self._check_dim(docs.shape[1], docs)
                return docs, lens
            if docs.dim() == 2:
                raise ValueError(f"docs [T, dim] needs cu_seqlens (packed tokens); for one document pass [docs], "
                                 f"got {_describe(docs)}")  # fmt: skip
            if docs.dim() != 3:
                raise ValueError(f"docs must be [N, L, dim], packed [T, dim] with cu_seqlens, or a list of [L_i, dim] "
                                 f"tensors, got {_describe(docs)}")  # fmt: skip
            N, L, dim = docs.shape
            self._check_dim(dim, docs)
            if mask is not None and lengths is not None:
                raise ValueError("give lengths or mask, not both")
            if mask is not None:
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (N, L):
                    raise ValueError(f"mask must be a bool tensor [N, L] = [{N}, {L}], got {_describe(mask)}")
                mask = mask.to(docs.device)
                return docs[mask], mask.sum(dim=1).to("cpu", torch.int64)
            if lengths is not None:
                lens = torch.as_tensor(lengths).to("cpu", torch.int64)
                if lens.shape != (N,) or (lens < 0).any() or (lens > L).any():
                    raise ValueError(f"lengths must be [N] = [{N}] ints in [0, {L}], got {_describe(lengths)}")
                keep = torch.arange(L)[None, :] < lens[:, None]
                return docs[keep.to(docs.device)], lens
            return docs.reshape(N * L, dim), torch.full((N,), L, dtype=torch.int64)
        if lengths is not None or mask is not None or cu_seqlens is not None:
            raise ValueError("lengths / mask / cu_seqlens go with a tensor docs, not a list")
        docs = list(docs)
        for i, x in enumerate(docs):
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
                raise ValueError(f"docs[{i}] must be a floating-point [L, dim] tensor, got {_describe(x)}")
            self._check_dim(x.shape[1], x)
        if not docs:
            return torch.zeros(0, self._dim or 0), torch.zeros(0, dtype=torch.int64)
        lens = torch.tensor([x.shape[0] for x in docs], dtype=torch.int64)
        dev = self._device or docs[0].device
        dt = self._dtype or docs[0].dtype
        return torch.cat([x.to(device=dev, dtype=dt) for x in docs], 0), lens

    def _check_dim(self, dim: int, x: torch.Tensor) -> None:
        if self._dim is not None and dim != self._dim:
            raise ValueError(f"documents must have dim {self._dim} (the index's), got {_describe(x)}")

    def _check_ids(self, ids, n: int) -> list:
        if ids is None:
            if self._id_kind == "str":
                raise ValueError("this index has str ids: add needs ids")
            return list(range(self._next_id, self._next_id + n))
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
                raise ValueError(f"ids must be a 1-D integer tensor or a list, got {_describe(ids)}")
            ids = ids.tolist()
        elif isinstance(ids, (str, bytes)):
            raise ValueError("ids must be a sequence of ids, not one str")
        ids = list(ids)
        if len(ids) != n:
            raise ValueError(f"ids must name the {n} documents added, got {len(ids)} ids")
        if not ids:
            return ids
        kind = "str" if isinstance(ids[0], str) else "int"
        for x in ids:
            ok = isinstance(x, str) if kind == "str" else (isinstance(x, int) and not isinstance(x, bool) and x >= 0)
            if not ok:
                raise ValueError(f"ids must be all str or all int >= 0, got {x!r} among {kind} ids")
        if self._id_kind is not None and kind != self._id_kind:
            raise ValueError(f"this index has {self._id_kind} ids, got {kind} ids")
        if kind == "int":
            ids = [int(x) for x in ids]
        seen: set = set()
        for x in ids:
            if x in self._pos or x in seen:
                raise ValueError(f"id {x!r} is already in the index (ids must be unique)")
            seen.add(x)
        return ids

    def _reserve(self, n_tokens: int, n_docs: int) -> None:
        cap_t = 0 if self._tokens is None else self._tokens.shape[0]
        if n_tokens > cap_t:
            new = max(n_tokens, int(cap_t * _GROWTH), 1024)
            buf = torch.empty(new, self._dim, dtype=self._dtype, device=self._device)
            if self._n_tokens:
                buf[: self._n_tokens].copy_(self._tokens[: self._n_tokens])
            self._tokens = buf
        if n_docs + 1 > self._cu.numel():
            new = max(n_docs + 1, int(self._cu.numel() * _GROWTH), 256)
            cu = torch.zeros(new, dtype=torch.int64)
            cu[: self._n_docs + 1] = self._cu[: self._n_docs + 1]
            self._cu = cu

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        # As similarity="cosine" does: in the accumulate dtype, rounded back; a zero token stays 0.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return F.normalize(x.to(acc), dim=-1).to(x.dtype)

    # ------------------------------------------------------------------ remove
    def remove(self, ids: Sequence | torch.Tensor) -> int:
        """Remove documents by id (unknown ids raise KeyError); returns how many went. The
        corpus is compacted at once (one copy of the kept tokens; order kept)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        elif isinstance(ids, (str, int)):
            ids = [ids]
        gone = set()
        for x in ids:
            if x not in self._pos:
                raise KeyError(f"id {x!r} is not in the index")
            gone.add(self._pos[x])
        if not gone:
            return 0
        keep = torch.ones(self._n_docs, dtype=torch.bool)
        keep[list(gone)] = False
        lens = self.lengths()
        tok_keep = torch.repeat_interleave(keep, lens)
        kept = self._corpus()[tok_keep.to(self._device)]
        new_lens = lens[keep]
        self._ids = [x for x, k in zip(self._ids, keep.tolist()) if k]
        self._pos = {x: i for i, x in enumerate(self._ids)}
        if self._id_kind == "int":
            self._id_buf = torch.tensor(self._ids, dtype=torch.int64)
        self._n_docs = len(self._ids)
        self._n_tokens = kept.shape[0]
        self._tokens = kept.contiguous() if kept.shape[0] else None
        self._cu = torch.zeros(self._n_docs + 1, dtype=torch.int64)
        self._cu[1:] = torch.cumsum(new_lens, 0)
        self._cache.clear()
        return len(gone)

    # ------------------------------------------------------------------ search
    def search(
        self,
        q: torch.Tensor | Sequence[torch.Tensor],
        k: int,
        *,
        q_mask: torch.Tensor | None = None,
        candidates: Sequence | torch.Tensor | None = None,
        reduce: str = "sum",
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | list]:
        """The k best documents for each query, exact MaxSim (``sparseops.maxsim_topk``).

        Args:
            q: [Nq, Lq, dim] queries, [Lq, dim] for one (then the outputs lose the first
                dimension), or a list of [L_i, dim] tensors (padded here, with lengths).
            k: results per query (> 0). Past the number of (candidate) documents the rows are
                padded with score -inf and id -1 (None for str ids).
            q_mask: None, bool [Nq, Lq] or lengths [Nq] (a tensor q only).
            candidates: None (the whole corpus), ids [C] shared by every query, or [Nq, C] per
                query (a tensor, or lists; -1 / None pad a row). Unknown ids raise KeyError.
            reduce: "sum" or "mean" (over the real query tokens).
            backend: ``maxsim_topk``'s backend (None: auto).

        Returns:
            (scores [Nq, k] fp32 (fp64 for an fp64 index) on the index device, ids): an
            int64 tensor [Nq, k] for int ids, a list of lists of str (None past the
            results) for str ids. Best first; equal scores go to the earlier-added document.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        q, q_mask, single = self._queries(q, q_mask)
        if self._tokens is None and self._dim is None:
            self._dim = q.shape[-1]
        Nq = q.shape[0]
        dev = self._device or q.device
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        cand = None if candidates is None else self._candidate_positions(candidates, Nq)
        if self._n_docs == 0 or Nq == 0:
            scores = torch.full((Nq, k), float("-inf"), dtype=acc, device=dev)
            pos = torch.full((Nq, k), -1, dtype=torch.int64, device=dev)
        else:
            parts = []
            for d0, d1, t0, t1, cu in self._shards():
                c = None
                if cand is not None:
                    c = torch.where((cand >= d0) & (cand < d1), cand - d0, -1)
                s, i = maxsim_topk(
                    q, self._tokens[t0:t1], cu, k, q_mask=q_mask, candidates=c, reduce=reduce, backend=backend
                )
                parts.append((s, torch.where(i >= 0, i + d0, i)))
            scores, pos = parts[0] if len(parts) == 1 else _merge_topk(parts, k)
        ids = self._ids_of(pos)
        if single:
            return scores[0], ids[0]
        return scores, ids

    def _queries(self, q, q_mask):
        single = False
        if isinstance(q, torch.Tensor):
            if q.dim() == 2:
                single = True
                q = q.unsqueeze(0)
                if q_mask is not None:
                    q_mask = q_mask.unsqueeze(0) if q_mask.dtype == torch.bool else q_mask.reshape(1)
            if q.dim() != 3 or not q.is_floating_point():
                raise ValueError(f"q must be floating-point [Nq, Lq, dim], [Lq, dim] or a list of [L_i, dim] tensors, "
                                 f"got {_describe(q)}")  # fmt: skip
        else:
            if q_mask is not None:
                raise ValueError("q_mask goes with a tensor q; a list of queries carries its own lengths")
            qs = list(q)
            for i, x in enumerate(qs):
                if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
                    raise ValueError(f"q[{i}] must be a floating-point [L, dim] tensor, got {_describe(x)}")
            dim = qs[0].shape[1] if qs else (self._dim or 0)
            dt = self._dtype or (qs[0].dtype if qs else torch.float32)
            dev = self._device or (qs[0].device if qs else "cpu")
            q = torch.nn.utils.rnn.pad_sequence([x.to(dev, dt) for x in qs], batch_first=True) if qs else \
                torch.zeros(0, 0, dim, dtype=dt, device=dev)  # fmt: skip
            q_mask = torch.tensor([x.shape[0] for x in qs], dtype=torch.int64, device=dev)
        if self._dim is not None and q.shape[-1] != self._dim:
            raise ValueError(f"queries must have dim {self._dim} (the index's), got {_describe(q)}")
        if self._dtype is not None or self._device is not None:
            q = q.to(device=self._device or q.device, dtype=self._dtype or q.dtype)
            if q_mask is not None:
                q_mask = q_mask.to(q.device)
        if self.normalize:
            q = self._normalized(q)
        return q, q_mask, single

    def _candidate_positions(self, candidates, Nq: int) -> torch.Tensor:
        """External candidate ids -> int64 positions [C] or [Nq, C] on the device (-1: none)."""
        if isinstance(candidates, torch.Tensor):
            if candidates.dim() not in (1, 2) or candidates.is_floating_point():
                raise ValueError(f"candidates must be integer ids [C] or [Nq, C], got {_describe(candidates)}")
            if candidates.dim() == 2 and candidates.shape[0] != Nq:
                raise ValueError(f"candidates [Nq, C] must have Nq = {Nq} rows, got {_describe(candidates)}")
            rows = candidates.tolist()
        else:
            rows = list(candidates)
        nested = bool(rows) and isinstance(rows[0], (list, tuple, torch.Tensor))
        if nested:
            rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
            if len(rows) != Nq:
                raise ValueError(f"per-query candidates must have one row per query ({Nq}), got {len(rows)}")
            width = max((len(r) for r in rows), default=0)
            table = [[self._position(x) for x in r] + [-1] * (width - len(r)) for r in rows]
        else:
            table = [self._position(x) for x in rows]
        return torch.tensor(table, dtype=torch.int64, device=self._device or "cpu")

    def _position(self, x) -> int:
        if x is None or (isinstance(x, int) and x == -1):
            return -1
        try:
            return self._pos[x]
        except KeyError:
            raise KeyError(f"candidate id {x!r} is not in the index") from None

    def _ids_of(self, pos: torch.Tensor):
        if self._id_kind == "str":
            return [[self._ids[p] if p >= 0 else None for p in row] for row in pos.tolist()]
        if self._id_kind is None:
            return pos
        ids = self._cache.get("ids")
        if ids is None or ids.device != pos.device:
            ids = self._id_buf[: self._n_docs].to(pos.device)  # a view on the CPU, one copy per add elsewhere
            self._cache["ids"] = ids
        if ids.numel() == 0:
            return pos
        return torch.where(pos >= 0, ids[pos.clamp_min(0)], pos)

    def _cu_device(self, d0: int, d1: int, t0: int) -> torch.Tensor:
        return (self._cu[d0 : d1 + 1] - t0).to(torch.int32).to(self._device or "cpu")

    def _shards(self) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """(first doc, end doc, first token, end token, int32 cu_seqlens on the device) per
        shard of fewer than 2^24 tokens (one shard unless the corpus is larger), cached."""
        shards = self._cache.get("shards")
        if shards is None:
            cu = self._cu[: self._n_docs + 1]
            shards, d0 = [], 0
            while d0 < self._n_docs or not shards:
                t0 = int(cu[d0])
                d1 = int(torch.searchsorted(cu, t0 + _SHARD_TOKENS, right=True)) - 1
                d1 = min(max(d1, d0 + 1), self._n_docs)
                if int(cu[d1]) - t0 > _SHARD_TOKENS:
                    raise ValueError(f"document {d0} has {int(cu[d1]) - t0} tokens: more than maxsim_topk takes "
                                     f"({_SHARD_TOKENS})")  # fmt: skip
                shards.append((d0, d1, t0, int(cu[d1]), self._cu_device(d0, d1, t0)))
                d0 = d1
                if d0 >= self._n_docs:
                    break
            self._cache["shards"] = shards
        return shards

    # ------------------------------------------------------------------ moves
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MaxSimIndex:
        """Move / convert the stored tokens in place (as ``nn.Module.to``); returns self."""
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, float64, got {dtype}")
        if device is not None:
            self._device = torch.device(device)
        if dtype is not None:
            self._dtype = dtype
        if self._tokens is not None:
            self._tokens = self._corpus().to(device=self._device, dtype=self._dtype).contiguous()
        self._cache.clear()
        return self

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, *, format: str = "auto") -> None:
        """Write the index to ``path``: safetensors when installed (``format="auto"`` or
        "safetensors"), else ``torch.save`` ("torch"). Tensors: ``tokens`` [T, dim],
        ``cu_seqlens`` int32 [N + 1], ``ids`` int64 [N] or the UTF-8 bytes of str ids
        (``ids_utf8`` uint8 + ``ids_offsets`` int64 [N + 1]); metadata: format name, version
        (1), dim, dtype, normalize, id kind."""
        fmt = _resolve_format(format)
        tensors = {
            "tokens": self._corpus().detach().to("cpu").contiguous(),
            "cu_seqlens": self._cu[: self._n_docs + 1].to(torch.int32).contiguous(),
        }
        if self._id_kind == "str":
            raw = [s.encode("utf-8") for s in self._ids]
            lens = torch.tensor([len(b) for b in raw], dtype=torch.int64)
            offs = torch.zeros(len(raw) + 1, dtype=torch.int64)
            offs[1:] = torch.cumsum(lens, 0)
            tensors["ids_utf8"] = torch.frombuffer(bytearray(b"".join(raw)) or bytearray(1), dtype=torch.uint8)[
                : int(offs[-1])
            ].clone()
            tensors["ids_offsets"] = offs
        else:
            tensors["ids"] = self._id_buf[: self._n_docs].clone()
        meta = {
            "format": _FORMAT,
            "version": str(_VERSION),
            "dim": str(self._dim if self._dim is not None else ""),
            "dtype": _dtype_name(self._dtype) if self._dtype is not None else "",
            "normalize": json.dumps(self.normalize),
            "id_kind": self._id_kind or "",
            "next_id": str(self._next_id),
        }
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, os.fspath(path), metadata=meta)
        else:
            torch.save({"metadata": meta, "tensors": tensors}, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None) -> MaxSimIndex:
        """Read an index written by ``save`` (either format; detected from the file), onto
        ``device`` (default: the CPU). Checks the format name and version."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK":  # torch.save's zip container
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or "metadata" not in blob or "tensors" not in blob:
                raise ValueError(f"{path} is not a saved MaxSimIndex (no metadata / tensors)")
            meta, tensors = blob["metadata"], blob["tensors"]
        else:
            try:
                from safetensors import safe_open
            except ImportError as e:
                raise ValueError(f"{path} is not a torch.save file, and safetensors is not installed to read it") from e
            try:
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise ValueError(f"{path} is neither a safetensors nor a torch.save file: {e}") from e
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved MaxSimIndex (format {meta.get('format')!r})")
        version = int(meta.get("version", "0"))
        if version > _VERSION:
            raise ValueError(f"{path} has MaxSimIndex format version {version}; this sparseops reads up to {_VERSION}")
        dtype = _DTYPES.get(meta["dtype"]) if meta.get("dtype") else None
        dim = int(meta["dim"]) if meta.get("dim") else None
        device = device if device is not None else "cpu"
        index = cls(dim, dtype=dtype, device=device, normalize=json.loads(meta["normalize"]))
        cu = tensors["cu_seqlens"].to(torch.int64)
        n = cu.numel() - 1
        if meta.get("id_kind") == "str":
            raw = tensors["ids_utf8"].numpy().tobytes()
            offs = tensors["ids_offsets"].tolist()
            ids = [raw[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
        else:
            ids = tensors["ids"].tolist()
        tokens = tensors["tokens"]
        if tokens.shape[0] != int(cu[-1]) or len(ids) != n:
            raise ValueError(f"{path} is inconsistent: {tokens.shape[0]} tokens, cu_seqlens ends at {int(cu[-1])}, "
                             f"{len(ids)} ids for {n} documents")  # fmt: skip
        if n:
            index._id_kind = meta.get("id_kind") or None
            index._dim, index._dtype = tokens.shape[1], tokens.dtype
            index._tokens = tokens.to(index._device).contiguous()
            index._cu = cu.clone()
            index._n_docs, index._n_tokens = n, tokens.shape[0]
            index._ids = ids
            if index._id_kind == "int":
                index._id_buf = torch.tensor(ids, dtype=torch.int64)
            index._pos = {x: i for i, x in enumerate(ids)}
        else:
            index._id_kind = meta.get("id_kind") or None
        index._next_id = int(meta.get("next_id", "0") or 0)
        return index


def _resolve_format(format: str) -> str:
    if format not in ("auto", "safetensors", "torch"):
        raise ValueError(f'format must be "auto", "safetensors" or "torch", got {format!r}')
    if format == "torch":
        return "torch"
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        if format == "safetensors":
            raise
        return "torch"
    return "safetensors"


def _merge_topk(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of per-shard top-k lists. Shards are in document order and each list is
    best first with ties to the lower document, so a stable descending sort of their
    concatenation keeps ties to the lower document."""
    scores = torch.cat([s for s, _ in parts], dim=1)
    pos = torch.cat([i for _, i in parts], dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), pos.gather(1, order)
