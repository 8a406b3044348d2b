"""N:M structured sparsity: ``sparseops.nm_mask``, ``nm_compress``, ``nm_decompress``,
``nm_linear`` and the compressed weight ``NMWeight``.

Format (NM_FORMAT, fixed): a dense weight W [out, in] (nn.Linear layout) is cut into groups of
m consecutive values along ``in`` (m in {2, 4, 8, 16}, ``in % m == 0``); each group keeps n < m
of them. ``values`` [out, in // m * n] holds group g's kept values at [g*n, g*n + n) in
increasing position order; ``meta`` uint8 [out, ceil(kept * b / 8)] packs each kept value's
position p in [0, m) in b = 1, 2, 4, 4 bits (m = 2, 4, 8, 16): value j at byte (j*b) // 8,
bit (j*b) % 8; its dense column is (j // n) * m + p. A group with fewer than n non-zeros stores
explicit zeros at its lowest unkept positions. 2:4 bf16 takes 0.5625x the dense bytes.

The ops ``sparseops::nm_linear`` and ``sparseops::nm_compress`` are declared once in C++
(csrc/registration.cpp) and parsed there for every backend (csrc/ops/nm_sparse.cpp). This
module registers their fakes, the autograd of nm_linear, the backends with their reasons and
Python kernels, and the public functions. Semantics: ``sparseops.reference.nm_sparse``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from .. import _backend
from ..reference import nm_sparse as ref
from ._common import accumulate_dtype as _accumulate_dtype
from ._common import describe as _describe

__all__ = ["NMWeight", "nm_compress", "nm_decompress", "nm_linear", "nm_mask"]

_BITS = {2: 1, 4: 2, 8: 4, 16: 4}


def _check_pattern(n, m) -> None:
    if not isinstance(m, int) or m not in _BITS:
        raise ValueError(f"m must be one of 2, 4, 8, 16, got m={m!r}")
    if not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f"n must satisfy 1 <= n < m, got n={n!r}, m={m}")


# ---------------------------------------------------------------------------------------------
# Format helpers (plain torch: any device, traceable by torch.compile).


def _columns(meta: torch.Tensor, n: int, m: int, kept: int) -> torch.Tensor:
    """Dense column (int64 [out, kept]) of every kept value, decoded from meta."""
    b = _BITS[m]
    j = torch.arange(kept, device=meta.device)
    byte = meta.to(torch.int64).index_select(1, (j * b) // 8)
    pos = (byte >> ((j * b) % 8)) & ((1 << b) - 1)
    return (j // n) * m + pos


def _decompress(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, in_features: int) -> torch.Tensor:
    out, kept = values.shape
    dense = values.new_zeros((out, in_features))
    if kept == 0 or out == 0:
        return dense
    return dense.scatter_(1, _columns(meta, n, m, kept), values)


# ---------------------------------------------------------------------------------------------
# Fakes: shapes of every backend (SymInt-friendly), with the Python twins of the C++ checks
# that shapes depend on.


def _nm_linear_fake(x, values, meta, n, m, in_features, bias=None, backend="auto"):
    for name, t in (("values", values), ("meta", meta), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} must be on the same device as x ({x.device}), got {_describe(t)}")
    if values.dim() != 2:
        raise RuntimeError(f"values must be a 2-D tensor, got {_describe(values)}")
    if x.dim() < 1:
        raise RuntimeError(f"x must have at least 1 dimension, got {_describe(x)}")
    torch._check(x.shape[-1] == in_features, lambda: f"x.size(-1) must equal in_features = {in_features}")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _nm_compress_fake(w, n, m, scores=None, mask=None, prune=False, backend="auto", outputs="all"):
    if w.dim() != 2:
        raise RuntimeError(f"w must be a 2-D tensor, got {_describe(w)}")
    out, k = w.shape
    kept = k // m * n
    compressed, with_mask = outputs != "mask", outputs != "compressed"  # the rest: empty [0]
    return (
        w.new_empty((out, kept) if compressed else (0,)),
        w.new_empty((out, (kept * _BITS[m] + 7) // 8) if compressed else (0,), dtype=torch.uint8),
        w.new_empty((out, k) if with_mask else (0,), dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------
# Autograd of nm_linear: y = x @ W^T + b with W = decompress(values, meta).
#   dx = dy @ W;  dvalues[r, j] = (dy^T @ x)[r, col(r, j)] (the dense weight gradient gathered
#   at the kept columns: a kept zero still gets its gradient, so training can move it);
#   dbias = dy summed over the rows. meta has no gradient. Accumulated in fp32 (fp64 for fp64).


def _setup_context(ctx, inputs, output) -> None:
    x, values, meta, n, m, in_features, bias, _backend_name = inputs
    ctx.nm = (n, m, in_features)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, values, meta)


def _nm_linear_backward(ctx, dy):
    x, values, meta = ctx.saved_tensors
    n, m, in_features = ctx.nm
    acc = _accumulate_dtype(x.dtype)
    out = values.shape[0]
    dy2 = dy.reshape(-1, out).to(acc)
    need = ctx.needs_input_grad
    dx = dv = db = None
    if need[0]:
        w = _decompress(values.to(acc), meta, n, m, in_features)
        dx = (dy2 @ w).to(x.dtype).reshape(x.shape)
    if need[1]:
        dw = dy2.T @ x.reshape(-1, in_features).to(acc)
        dv = dw.gather(1, _columns(meta, n, m, values.shape[1])).to(values.dtype)
    if ctx.has_bias and need[6]:
        db = dy2.sum(0).to(x.dtype)
    return dx, dv, None, None, None, None, db, None


def _nm_sp24_meta_fake(meta, n, m, out_features, in_features):
    # sparseops/nm_sp24.h: [ceil(out / 128) * 8 m16 tiles, ceil(in / 256) * 8 k32 steps, 16]
    return meta.new_empty(((out_features + 127) // 128 * 8, (in_features + 255) // 256 * 8, 16), dtype=torch.int32)


def _nm_sp24_emulate_fake(x, values, meta, hw_meta, bias, n, m, in_features, config):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _nm_compress_emulate_fake(w, n, m, scores=None, mask=None, prune=False, outputs="all"):
    return _nm_compress_fake(w, n, m, scores, mask, prune, outputs=outputs)


if _backend.HAS_C:
    torch.library.register_fake("sparseops::nm_linear")(_nm_linear_fake)
    torch.library.register_fake("sparseops::nm_compress")(_nm_compress_fake)
    torch.library.register_fake("sparseops::nm_sp24_meta")(_nm_sp24_meta_fake)
    torch.library.register_fake("sparseops::_nm_sp24_emulate")(_nm_sp24_emulate_fake)
    torch.library.register_fake("sparseops::_nm_compress_emulate")(_nm_compress_emulate_fake)
    torch.library.register_autograd("sparseops::nm_linear", _nm_linear_backward, setup_context=_setup_context)
    _linear_op = torch.ops.sparseops.nm_linear.default
    _compress_op = torch.ops.sparseops.nm_compress.default


# ---------------------------------------------------------------------------------------------
# Backends. The Python kernels take what the C++ op prepared (NM_FORMAT's kernel contract):
#   nm_linear: inputs (x2d [R, in] contiguous, values, meta, bias or None), output out [R, out];
#   nm_compress: inputs (w [out, in] contiguous, scores [out, in] or None = |w|), outputs
#     (values, meta, mask), the ones options["outputs"] does not ask for empty (not written);
#     a given mask arrives as scores (1.0 kept, 0.0 not), which the ranking (ties to the lower
#     index) turns into the mask padded with the lowest unkept positions.


def _linear_reference_kernel(inputs, outputs, options) -> None:
    x2d, values, meta, bias = inputs
    y = ref.nm_linear_ref(x2d, values, meta, options["n"], options["m"], options["in_features"], bias)
    outputs[0].copy_(y)


def _compress_reference_kernel(inputs, outputs, options) -> None:
    w, scores = inputs
    n, m = options["n"], options["m"]
    mask = ref.nm_mask_ref(w, n, m, scores=scores)
    values, meta, mask = ref.nm_compress_ref(w, n, m, mask=mask)
    for o, t in zip(outputs, (values, meta, mask)):
        if o.numel() > 0:  # an output not asked for is empty
            o.copy_(t)


def _linear_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.nm_sparse import nm_linear_triton

    x2d, values, meta, bias = inputs
    nm_linear_triton(x2d, values, meta, bias, outputs[0], options["n"], options["m"])


def _compress_triton_kernel(inputs, outputs, options) -> None:
    from ..kernels.nm_sparse import nm_compress_triton

    w, scores = inputs
    values, meta, mask = outputs
    want = options["outputs"]
    nm_compress_triton(
        w, scores, options["n"], options["m"], values if want != "mask" else None,
        meta if want != "mask" else None, mask if want != "compressed" else None,
    )  # fmt: skip


def _triton_reason(device, dtype, *_):
    return _backend.triton_kernels(device)


# nm_linear on CUDA: which backend `auto` takes (the cuda one is csrc/cuda/nm_sparse.cu: mma.sp
# on the 2:4 sparse tensor cores; none of these choices has been measured on a GPU yet):
#  - fp16 / bf16, 2:4, any batch: cuda. At small batch both kernels read the same bytes
#    (0.5625x dense), and the tensor cores need no expansion of the kept values in registers;
#    at large batch mma.sp has twice the dense tensor-core rate, which Triton (no sparse dot,
#    triton#6891) cannot reach.
#  - fp16 / bf16, other n <= 2 patterns (1:2, 1:4, 2:8, 1:8, 2:16, 1:16): they map exactly onto
#    2:4 groups with explicit zeros, so the tensor cores read them as 2:4 (0.5625x dense bytes)
#    while Triton reads the pattern itself (1:4: 0.31x). Up to _SMALL_BATCH rows (memory-bound)
#    triton; above it cuda. The crossover is an estimate from bytes and peak rates (H100:
#    ~3.3 TB/s, mma.sync at roughly half of wgmma's 990 dense TFLOP/s), not a measurement.
#  - n > 2 (3:4, 4:8, 8:16 ...): a group of 4 columns can hold 3 or 4 kept values, which 2:4
#    hardware cannot take (even when a given weight happens to fit, the choice would depend on
#    the data): triton.
#  - fp32: triton (the tensor cores would need tf32, which rounds the inputs); fp64: reference.
_SMALL_BATCH = 64
_X_FACTS = _backend.tensor_facts("x")


def _linear_facts(x, nmw=None, *_):
    """(device, dtype, n, m, small): n, m and small only for CUDA tensors; small (rows <= 64)
    only for the patterns whose auto choice depends on the batch."""
    device, dtype = _X_FACTS(x)
    if device != "cuda" or not isinstance(nmw, NMWeight) or not isinstance(x, torch.Tensor):
        return (device, dtype, None, None, None)
    n, m = nmw.n, nmw.m
    small = None
    if (n, m) != (2, 4) and n <= 2:
        rows = 1
        for s in x.shape[:-1]:
            rows = rows * s
        small = bool(rows <= _SMALL_BATCH)
    return (device, dtype, n, m, small)


def _cuda_linear_reason(device, dtype=None, n=None, m=None, small=None):
    why = _backend.native_cuda(device)
    if why is not None:
        return why
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return (
            f"runs fp16 / bf16 on the 2:4 sparse tensor cores, got {dtype} (tf32 would round fp32 inputs to "
            "10-bit mantissas; the triton backend runs fp32)"
        )
    if n is not None and n > 2:
        return (
            f"{n}:{m} can put {min(n, 4)} kept values into one group of 4 columns, and the 2:4 sparse tensor "
            "cores take at most 2"
        )
    return None


def _cuda_linear_rank(device, dtype=None, n=None, m=None, small=None):
    return 2 if small else 0  # 2: behind triton (rank 1)


_LINEAR = _backend.Op("nm_linear", _linear_facts)
_LINEAR.register("cuda", rank=_cuda_linear_rank, unsupported_reason=_cuda_linear_reason)
_LINEAR.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_LINEAR.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_linear_triton_kernel)
_LINEAR.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_linear_reference_kernel)
# nm_compress / nm_mask on CUDA: the fused CUDA kernel for every pattern and dtype (one pass,
# registers only); triton is the fallback where the build has no CUDA kernels.
_COMPRESS = _backend.Op("nm_compress", _backend.tensor_facts("w"))
_COMPRESS.register("cuda", rank=0, unsupported_reason=_backend.native_cuda)
_COMPRESS.register("cpu", rank=0, unsupported_reason=_backend.native_cpu)
_COMPRESS.register("triton", rank=1, unsupported_reason=_triton_reason, kernel=_compress_triton_kernel)
_COMPRESS.register("reference", rank=9, unsupported_reason=_backend.always, kernel=_compress_reference_kernel)


# ---------------------------------------------------------------------------------------------
# NMWeight


class NMWeight:
    """An N:M compressed weight of dense shape [out, in]: ``values``, ``meta``, ``n``, ``m``.

    ``dense()`` / ``nm_decompress`` rebuild W; ``to(...)`` moves both tensors (a floating dtype
    converts values only); ``to_state_dict(prefix)`` / ``from_state_dict(sd, prefix)`` store it
    as three tensors (``values``, ``meta`` and an int64 ``nm_shape`` = [n, m, out, in]), so
    torch.save and safetensors both carry it; ``torch.save(nmw)`` itself also round-trips,
    including ``torch.load(weights_only=True)``.
    """

    __slots__ = ("values", "meta", "n", "m", "shape")

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, n: int, m: int, shape) -> None:
        _check_pattern(n, m)
        out, k = (int(s) for s in shape)
        kept = k // m * n
        nbytes = (kept * _BITS[m] + 7) // 8
        if k % m != 0:
            raise ValueError(f"shape[1] (in_features = {k}) must be a multiple of m={m}")
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (out, kept):
            raise ValueError(
                f"values must have shape [{out}, {kept}] for {n}:{m} of [{out}, {k}], got {_describe(values)}"
            )
        if not isinstance(meta, torch.Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != (out, nbytes):
            raise ValueError(f"meta must be uint8 of shape [{out}, {nbytes}], got {_describe(meta)}")
        self.values, self.meta, self.n, self.m, self.shape = values, meta, n, m, torch.Size((out, k))

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dense(self) -> torch.Tensor:
        """The dense weight [out, in] (zeros off the kept positions)."""
        return _decompress(self.values, self.meta, self.n, self.m, self.shape[1])

    def mask(self) -> torch.Tensor:
        """Bool [out, in]: the stored positions (n per group, padded zeros included)."""
        return _decompress(torch.ones_like(self.values, dtype=torch.bool), self.meta, self.n, self.m, self.shape[1])

    def to(self, *args, **kwargs) -> NMWeight:
        """Like Tensor.to: a device moves values and meta, a floating dtype converts values."""
        values = self.values.to(*args, **kwargs)
        meta = self.meta.to(device=values.device, non_blocking=kwargs.get("non_blocking", False))
        return NMWeight(values, meta, self.n, self.m, self.shape)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            prefix + "values": self.values,
            prefix + "meta": self.meta,
            prefix + "nm_shape": torch.tensor([self.n, self.m, *self.shape], dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> NMWeight:
        n, m, out, k = (int(v) for v in sd[prefix + "nm_shape"].tolist())
        return cls(sd[prefix + "values"], sd[prefix + "meta"], n, m, (out, k))

    def __reduce__(self):
        return (_nmweight_from_parts, (self.values, self.meta, self.n, self.m, tuple(self.shape)))

    def __repr__(self) -> str:
        return (
            f"NMWeight({self.n}:{self.m}, shape={list(self.shape)}, dtype={self.values.dtype}, "
            f"device={self.values.device})"
        )


def _nmweight_from_parts(values, meta, n, m, shape) -> NMWeight:
    return NMWeight(values, meta, n, m, shape)


torch.serialization.add_safe_globals([NMWeight, _nmweight_from_parts])


# ---------------------------------------------------------------------------------------------
# Transposable masks: N:M along both dims, per m x m block (n kept in every row and column).
# m <= 4: exact, the block pattern with the largest kept score among every n-regular m x m 0/1
# pattern (2 for 1:2, 24 / 90 / 24 for 1:4 / 2:4 / 3:4), the first in enumeration order on
# ties. m in {8, 16}: greedy (entries taken best first, ties to the lower flat index, while
# their row and column have room; vectorised over blocks) and, for the few blocks it leaves
# short, an augmenting-path repair (bipartite b-matching) that completes them; not optimal.
# NaN scores rank as +inf. sparseops.reference.nm_sparse.nm_transposable_mask_ref is the spec.

_PATTERNS: dict[tuple[int, int], torch.Tensor] = {}


def _regular_patterns(n: int, m: int) -> torch.Tensor:
    key = (n, m)
    if key not in _PATTERNS:
        pats = []
        for choice in itertools.product(list(itertools.combinations(range(m), n)), repeat=m):
            mat = torch.zeros(m, m, dtype=torch.bool)
            for i, cols in enumerate(choice):
                mat[i, list(cols)] = True
            if bool((mat.sum(0) == n).all()):
                pats.append(mat)
        _PATTERNS[key] = torch.stack(pats)
    return _PATTERNS[key]


def _transposable_mask(s: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, k = s.shape
    s = torch.nan_to_num(s.to(torch.float64), nan=float("inf"), posinf=float("inf"))
    blocks = s.reshape(out // m, m, k // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)
    nb = blocks.shape[0]
    if nb == 0:
        return torch.zeros(out, k, dtype=torch.bool, device=s.device)
    if m <= 4:
        pats = _regular_patterns(n, m).to(s.device)
        finite = torch.where(torch.isinf(blocks), torch.full_like(blocks, 1e300), blocks)
        best = torch.einsum("bij,pij->bp", finite, pats.to(torch.float64)).argmax(-1)
        sel = pats[best]
    else:
        order = torch.sort(blocks.reshape(nb, m * m), dim=1, descending=True, stable=True).indices
        rows, cols = order // m, order % m
        rc = torch.zeros(nb, m, dtype=torch.int64, device=s.device)
        cc = torch.zeros_like(rc)
        flat = torch.zeros(nb, m * m, dtype=torch.bool, device=s.device)
        ar = torch.arange(nb, device=s.device)
        for t in range(m * m):
            i, j = rows[:, t], cols[:, t]
            ok = (rc[ar, i] < n) & (cc[ar, j] < n)
            flat[ar, order[:, t]] = ok
            rc[ar, i] += ok
            cc[ar, j] += ok
        sel = flat.view(nb, m, m)
        short = torch.nonzero((rc < n).any(1)).flatten().tolist()
        if short:
            fixed = sel.cpu()
            for b in short:
                fixed[b] = _repair(fixed[b], n, m)
            sel = fixed.to(s.device)
    return sel.view(out // m, k // m, m, m).permute(0, 2, 1, 3).reshape(out, k)


def _repair(block: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Completes a partial n-regular selection of one m x m block by augmenting paths."""
    sel = block.tolist()
    rc = [sum(r) for r in sel]
    cc = [sum(sel[i][j] for i in range(m)) for j in range(m)]
    while True:
        r0 = next((i for i in range(m) if rc[i] < n), None)
        if r0 is None:
            return torch.tensor(sel, dtype=torch.bool)
        parent: dict = {}
        seen = {("r", r0)}
        frontier = [("r", r0)]
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
        if end is None:  # cannot happen: K_{m,m} has an n-regular subgraph
            raise RuntimeError("nm_mask: transposable repair found no augmenting path")
        node = end
        while node in parent:
            p = parent[node]
            if node[0] == "c":
                sel[p[1]][node[1]] = True
            else:
                sel[node[1]][p[1]] = False
            node = p
        rc[r0] += 1
        cc[end[1]] += 1


# ---------------------------------------------------------------------------------------------
# Public API


def nm_mask(
    w: torch.Tensor,
    n: int,
    m: int,
    *,
    scores: torch.Tensor | None = None,
    transposable: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Bool [out, in]: the n best positions of every group of m consecutive values of w [out, in].

    Ranking by ``scores`` (same shape, any float dtype; default |w|): larger first, ties to the
    lower index, a NaN score above every number (as torch.topk). ``transposable=True``: a mask
    that is also N:M along ``out`` (per m x m block n in every row and column; out % m == 0;
    exact for m <= 4, greedy with repair for m = 8, 16: see the module source), computed in
    torch on w's device; ``backend`` then does not apply. Only the mask is written (the
    fused op's outputs="mask": no values or meta are made).
    """
    _check_pattern(n, m)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D tensor [out, in], got {_describe(w)}")
    if w.shape[1] % m != 0:
        raise ValueError(f"w.shape[1] (in_features = {w.shape[1]}) must be a multiple of m={m}")
    if scores is not None and (not isinstance(scores, torch.Tensor) or scores.shape != w.shape):
        raise ValueError(f"scores must be a tensor of the shape of w {list(w.shape)}, got {_describe(scores)}")
    if transposable:
        if w.shape[0] % m != 0:
            raise ValueError(
                f"transposable=True needs w.shape[0] (out_features = {w.shape[0]}) to be a multiple of m={m}"
            )
        s = w.detach().abs() if scores is None else scores.detach()
        return _transposable_mask(s, n, m)
    name = _COMPRESS.choose(backend, w)
    if _backend.HAS_C:
        scores = None if scores is None else scores.detach()
        return _compress_op(w.detach(), n, m, scores, None, True, name, outputs="mask")[2]
    return ref.nm_mask_ref(w.detach(), n, m, scores=scores)


def nm_compress(
    w: torch.Tensor,
    n: int,
    m: int,
    mask: torch.Tensor | None = None,
    *,
    prune: bool = False,
    scores: torch.Tensor | None = None,
    backend: str | None = None,
) -> NMWeight:
    """Compress w [out, in] (fp32 / fp16 / bf16 / fp64) to the N:M format.

    prune=False (default): keeps ``mask`` (bool [out, in], at most n per group) or, without a
    mask, w's non-zeros; w must be N:M under it (a group with more than n non-zeros, or a
    non-zero outside the mask, is an error: compression never drops values). A group keeping
    fewer than n stores explicit zeros at its lowest unkept positions.
    prune=True: keeps the n best scores per group (|w| or ``scores``; as ``nm_mask``) in one
    fused pass. Not differentiable (compression is a storage step).
    """
    _check_pattern(n, m)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {_describe(w)}")
    if mask is not None and prune:
        raise ValueError("pass mask (prune=False) or prune=True, not both")
    if scores is not None and not prune:
        raise ValueError("scores are only used with prune=True")
    name = _COMPRESS.choose(backend, w)
    w = w.detach()
    if _backend.HAS_C:
        values, meta, _ = _compress_op(w, n, m, scores, mask, prune, name, outputs="compressed")
    else:
        if prune:
            mask = ref.nm_mask_ref(w, n, m, scores=scores)
        values, meta, _ = ref.nm_compress_ref(w, n, m, mask=mask)
    return NMWeight(values, meta, n, m, w.shape)


def nm_decompress(nmw: NMWeight) -> torch.Tensor:
    """The dense weight [out, in] of an NMWeight (its kept values, zeros elsewhere)."""
    if not isinstance(nmw, NMWeight):
        raise TypeError(f"nmw must be an NMWeight, got {type(nmw).__name__}")
    return nmw.dense()


def nm_linear(
    x: torch.Tensor,
    nmw: NMWeight,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x @ nm_decompress(nmw)^T + bias, like F.linear with an N:M weight; [..., out].

    x [..., in] (any strides, nmw's dtype: fp32 / fp16 / bf16 / fp64), bias [out] or None;
    products accumulated in fp32 (fp64 for fp64). Differentiable in x, nmw.values (the dense
    weight gradient at the kept positions) and bias. backend: None/"auto", "cpu", "triton",
    "cuda" (where built: fp16 / bf16, n <= 2, on the 2:4 sparse tensor cores; the hardware
    metadata is built on the first call per meta tensor and cached) or "reference".
    """
    if not isinstance(nmw, NMWeight):
        raise TypeError(f"nmw must be an NMWeight, got {type(nmw).__name__}")
    name = _LINEAR.choose(backend, x, nmw)
    if _backend.HAS_C:
        return _linear_op(x, nmw.values, nmw.meta, nmw.n, nmw.m, nmw.shape[1], bias, name)
    return ref.nm_linear_ref(x, nmw.values, nmw.meta, nmw.n, nmw.m, nmw.shape[1], bias)
