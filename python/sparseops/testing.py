"""Tolerances and input builders shared by the tests and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


# --------------------------------------------------------------------------- standard shapes
# The team's standard MoE router shapes (DESIGN.md, Benchmarks): tests and benchmarks take
# them from here so both exercise the same configurations.


@dataclass(frozen=True)
class RouterShape:
    """A model's router: E experts, top-k and its scoring rule, as ``topk_route`` takes them."""

    name: str
    num_experts: int
    k: int
    scoring: str = "softmax"
    order: str = "softmax_then_topk"
    bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0

    def params(self) -> str:
        """Short description, e.g. ``E=256 k=8 sigmoid+bias groups=8/top4 scale=2.5``."""
        p = f"E={self.num_experts} k={self.k} {self.scoring}"
        if self.order != "softmax_then_topk":
            p += f" {self.order}"
        if self.bias:
            p += "+bias"
        if self.n_group > 1:
            p += f" groups={self.n_group}/top{self.topk_group}"
        if self.scale != 1.0:
            p += f" scale={self.scale:g}"
        return p

    def route_kwargs(self, bias: torch.Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments for ``topk_route`` / ``route`` / ``topk_route_ref`` (defaults left out)."""
        kw: dict[str, Any] = {"scoring": self.scoring}
        if self.order != "softmax_then_topk":
            kw["order"] = self.order
        if self.bias:
            if bias is None:
                raise ValueError(f"{self.name} routes with a selection bias: pass one (router_bias)")
            kw["bias"] = bias
        if self.n_group > 1:
            kw.update(n_group=self.n_group, topk_group=self.topk_group)
        if self.scale != 1.0:
            kw["scale"] = self.scale
        return kw


ROUTER_SHAPES: tuple[RouterShape, ...] = (
    RouterShape("Mixtral-8x7B", 8, 2),
    RouterShape("Qwen3-30B-A3B", 128, 8),
    RouterShape("DeepSeek-V3", 256, 8, scoring="sigmoid", bias=True, n_group=8, topk_group=4, scale=2.5),
    RouterShape("gpt-oss-120b", 128, 4, order="topk_then_softmax"),
)
# Tokens per routing call: decode steps (CUDA-graph replay on GPU) and prefill / training.
DECODE_TOKENS: tuple[int, ...] = (1, 16, 64)
PREFILL_TOKENS: tuple[int, ...] = (1024, 4096, 16384)
ROUTER_TOKENS: tuple[int, ...] = DECODE_TOKENS + PREFILL_TOKENS


def router_shape(name: str) -> RouterShape:
    """The standard shape called ``name`` (KeyError listing the names otherwise)."""
    for s in ROUTER_SHAPES:
        if s.name == name:
            return s
    raise KeyError(f"no router shape {name!r}; have {[s.name for s in ROUTER_SHAPES]}")


def router_bias(E: int, *, device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """[E] fp32 selection bias of DeepSeek-V3's scale (0.1 * randn)."""
    g = torch.Generator().manual_seed(seed + 7919)
    return (0.1 * torch.randn(E, generator=g)).to(device)


def router_inputs(
    shape: RouterShape,
    T: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(logits [T, E], keyword arguments) for one routing call at a standard shape.

    Unit-scale random logits (roughly balanced random routing, as in ANCHORS' baselines);
    a bias where the shape has one. ``seed`` defaults to one derived from (E, T), so every
    caller of the same shape and T sees the same inputs.
    """
    seed = 1000 * shape.num_experts + T if seed is None else seed
    logits = router_logits(T, shape.num_experts, dtype=dtype, device=device, seed=seed)
    bias = router_bias(shape.num_experts, device=device, seed=seed) if shape.bias else None
    return logits, shape.route_kwargs(bias)


# --------------------------------------------------------------------------- MaxSim
# Standard MaxSim shapes (DESIGN.md): dim 128, 32 query tokens, ColBERT documents of 180 /
# 300 tokens, ColPali pages of 1030.
MAXSIM_DIM = 128
MAXSIM_QUERY_TOKENS = 32
MAXSIM_DOC_TOKENS: tuple[int, ...] = (180, 300, 1030)


def maxsim_inputs(
    Nq: int,
    Lq: int,
    Nd: int,
    Ld: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    ties: bool = False,
    negative: bool = False,
    noncontiguous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [Nq, Lq, dim], d [Nd, Ld, dim]) token embeddings of unit scale.

    Entries are randn / sqrt(dim), so a similarity is O(1) whatever dim is (never zeros,
    which would hide a broken max). ``ties`` puts them on a grid of 1/2 with few distinct
    values, so dot products are exact in every dtype and documents repeat similarities (the
    lowest index must win). ``negative`` makes every similarity negative (d = -|d|, q = |q|):
    a max that starts at 0 instead of -inf shows up. ``noncontiguous`` returns strided views
    of the same values.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Nq, Lq, dim, generator=g, dtype=torch.float64)
    d = torch.randn(Nd, Ld, dim, generator=g, dtype=torch.float64)
    if ties:
        q = (q.clamp(-1, 1) * 2).round() / 2
        d = (d.clamp(-1, 1) * 2).round() / 2
    else:
        q, d = q / max(dim, 1) ** 0.5, d / max(dim, 1) ** 0.5
    if negative:
        q, d = q.abs() + 0.01, -d.abs() - 0.01
    q, d = q.to(dtype).to(device), d.to(dtype).to(device)
    if noncontiguous:
        # Same values, strided views: every other row of a buffer twice as long in dim 1,
        # and q transposed in memory ([Lq, Nq, dim] storage).
        wide = torch.empty(Nd, 2 * Ld, dim, dtype=dtype, device=device)
        wide[:, ::2] = d
        d = wide[:, ::2]
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
    return q, d


def maxsim_lengths(N: int, L: int, *, low: int = 0, device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """Ragged int64 lengths [N] in [low, L] (both ends included, so empty rows appear when low = 0)."""
    g = torch.Generator().manual_seed(seed + 101)
    return torch.randint(low, L + 1, (N,), generator=g).to(device)


def maxsim_bool_mask(
    N: int, L: int, *, p: float = 0.3, device: torch.device | str = "cpu", seed: int = 0
) -> torch.Tensor:
    """A non-prefix bool mask [N, L] (True = real token) with a fraction ``p`` of tokens masked."""
    g = torch.Generator().manual_seed(seed + 202)
    return (torch.rand(N, L, generator=g) >= p).to(device)


# MaxSim peers (tests/test_maxsim_integrations.py, benchmarks/bench_maxsim_clients.py): PyLate
# and colpali-engine pull a CUDA torch 2.11 / a torchvision that does not import beside the
# CPU torch (ANCHORS §4), so they are installed with --no-deps into a folder of their own
# (scripts/install_maxsim_peers.sh) and only their scoring modules are imported, with the
# packages whose __init__ pulls the heavy dependencies loaded as bare packages.
MAXSIM_PEER_PINS = {"pylate": "pylate==1.6.0", "colpali_engine": "colpali-engine==0.3.18"}


class PeerUnavailable(RuntimeError):
    """A peer package cannot be imported here; the message says why."""


def maxsim_peers_dir() -> str:
    """Where scripts/install_maxsim_peers.sh puts the peers: $SPARSEOPS_PEERS_DIR or /tmp/sparseops-peers."""
    import os

    return os.environ.get("SPARSEOPS_PEERS_DIR", "/tmp/sparseops-peers")


def unshadow_hub_kernels() -> None:
    """Import Hugging Face's PyPI package ``kernels`` (a transformers dependency, looked up by
    ``generate()`` and by colpali-engine's imports) without a sparseops checkout on sys.path:
    ``python -m pytest`` or ``python -m benchmarks...`` from the repository root puts the root
    there, where this repository's ``kernels/`` folder (installed as ``sparseops.kernels``)
    would shadow it ("cannot import name 'CUDAProperties' from 'kernels'"). tests/conftest.py
    calls it before any test imports transformers. A no-op when ``kernels`` is imported
    already or not installed."""
    import importlib
    import os
    import sys

    if "kernels" in sys.modules:
        return

    def is_checkout(p: str) -> bool:
        p = p or os.getcwd()
        return os.path.isfile(os.path.join(p, "kernels", "_common.py")) and os.path.isdir(os.path.join(p, "csrc"))

    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if not is_checkout(p)]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers never imports it
    finally:
        sys.path[:] = saved


def import_maxsim_peer(module: str, bare: tuple[str, ...] = ()) -> tuple[Any, str]:
    """Import ``module`` of a MaxSim peer (installed normally or in ``maxsim_peers_dir()``).

    When the plain import fails (a package __init__ importing sentence-transformers,
    datasets or torchvision), the packages named in ``bare`` are registered as bare packages
    (their __init__ not run, their submodules importable from their folder) and the import is
    tried again. Returns (module, how it was imported); raises ``PeerUnavailable``.
    """
    import importlib
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    unshadow_hub_kernels()
    package = module.split(".")[0]
    pin = MAXSIM_PEER_PINS.get(package, package)
    if importlib.util.find_spec(package) is None:
        folder = maxsim_peers_dir()
        if os.path.isdir(os.path.join(folder, package)) and folder not in sys.path:
            sys.path.append(folder)  # appended: it never shadows torch or anything installed
            importlib.invalidate_caches()
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise PeerUnavailable(
            f"{package} is not installed (bash scripts/install_maxsim_peers.sh installs {pin} with --no-deps "
            f"into {maxsim_peers_dir()})"
        )
    try:
        return importlib.import_module(module), "imported as installed"
    except Exception as e:  # ImportError, or an error raised by a dependency at import time
        first = f"{type(e).__name__}: {e}"
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    root = os.path.dirname(spec.origin) if spec.origin else list(spec.submodule_search_locations)[0]
    for name in bare:
        path = os.path.join(root, *name.split(".")[1:])
        mod = types.ModuleType(name)
        mspec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mspec.submodule_search_locations = [path]
        mod.__spec__, mod.__path__, mod.__package__ = mspec, [path], name
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise PeerUnavailable(
            f"{module} does not import: as installed ({first}); with {', '.join(bare) or 'nothing'} bare "
            f"({type(e).__name__}: {e})"
        ) from e
    return mod, f"the plain import failed ({first}); imported with {', '.join(bare)} as bare packages"


# --------------------------------------------------------------------------- moe_mlp
# Random unit-scale inputs of one MoE expert layer for sparseops.moe_mlp (tests, benchmarks).


def moe_inputs(
    T: int,
    H: int,
    inter: int,
    E: int,
    k: int,
    *,
    gated: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    drop: float = 0.0,
    skew: float = 0.0,
    bias: bool = False,
) -> dict[str, Any]:
    """x [T, H], w13 [E, 2I or I, H], w2 [E, H, I] scaled so every stage stays unit-scale,
    softmax-like weights [T, k] fp32, ids [T, k] int32 (``random_ids``), optional biases."""
    g = torch.Generator().manual_seed(seed)
    P = 2 * inter if gated else inter

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    out = {
        "x": rnd(T, H),
        "w13": rnd(E, P, H, scale=H**-0.5),
        "w2": rnd(E, H, inter, scale=inter**-0.5),
        "weights": torch.rand(T, k, generator=g, dtype=torch.float64).softmax(-1).to(torch.float32).to(device),
        "ids": random_ids(T, k, E, device=device, seed=seed, drop=drop, skew=skew)
        if k <= E
        else torch.randint(0, E, (T, k), generator=g, dtype=torch.int32).to(device),  # repeated experts
        "b13": rnd(E, P, scale=0.1) if bias else None,
        "b2": rnd(E, H, scale=0.1) if bias else None,
    }
    return out


def nm_weight(
    out: int,
    k: int,
    n: int,
    m: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    scale: float = 1.0,
):
    """A random N:M weight [out, k] (randn * scale, pruned to its n largest |w| per group by
    the reference) as (masked dense tensor, NMWeight), both on ``device``. Built by the
    reference so that it does not depend on the backend under test."""
    from sparseops import NMWeight
    from sparseops.reference import nm_sparse as ref

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, k, generator=g) * scale).to(dtype)
    mask = ref.nm_mask_ref(w, n, m)
    dense = w * mask
    values, meta, _ = ref.nm_compress_ref(dense, n, m, mask=mask)
    return dense.to(device), NMWeight(values.to(device), meta.to(device), n, m, (out, k))
