"""The compiled extension, the per-op backend registry and the one dispatcher.

Backends: "cuda" (C++/CUDA kernels), "triton", "cpu" (C++ kernels), "reference" (pure
torch). Each op is declared once as an ``Op`` with a ``facts`` function: the few properties
of its inputs that its backends' reasons depend on (device type and dtype for routing; the
N:M pattern or the head dim for other families), as a hashable tuple. Each backend of each
op is registered once with a rank and ``unsupported_reason(*facts) -> str | None``, plus a
Python kernel for the backends the C++ op hands to Python (Triton launchers, the reference).

``backend=None`` (or "auto") picks the lowest-ranked backend that can take the inputs;
``SPARSEOPS_BACKEND`` (read at import) or ``set_default_backend`` changes that default; an
explicit ``backend=`` forces one, and a forced backend that cannot take the inputs raises an
error listing every backend's reason. The choice is cached per (facts, requested backend),
so a call costs one facts tuple and one dict lookup (~0.3 us).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch  # loads libc10/libtorch, which _C links against

try:
    from . import _C

    HAS_C = True
    _C_ERROR = ""
except ImportError as exc:  # no compiler at install time, or an ABI mismatch
    _C = None
    HAS_C = False
    _C_ERROR = str(exc)

BACKENDS = ("cuda", "triton", "cpu", "reference")

# Facts fixed at import, so that choose() is plain Python that torch.compile can trace.
_HAS_CUDA_KERNELS = HAS_C and bool(_C.build_info()["cuda"])
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when its kernels are first compiled; set it before importing.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_default: str | None = os.environ.get("SPARSEOPS_BACKEND") or None
if _default == "auto":
    _default = None
if _default is not None and _default not in BACKENDS:
    # Checked here: otherwise every later call failed with "unknown backend 'x'", naming
    # neither the variable nor where the name came from (the caller passed no backend=).
    raise ValueError(f"SPARSEOPS_BACKEND must be one of {BACKENDS} or 'auto' (or unset), got {_default!r}")
_warned_no_c = False

Facts = tuple
PythonKernel = Callable[[list, list, dict], None]


class Backend(NamedTuple):
    # auto picks the lowest rank that can take the inputs; a callable rank (*facts) -> int
    # lets an op prefer one backend for some inputs (moe_mlp: the CUDA decode kernel at small T).
    rank: int | Callable[..., int]
    unsupported_reason: Callable[..., str | None]  # (*facts) -> None when it can run them
    kernel: PythonKernel | None  # (inputs, outputs, options) for backends run in Python


class Op:
    """One op's backends and the dispatcher that chooses among them.

    ``facts(*inputs)`` turns the op's leading inputs into the hashable tuple its reasons
    read; it raises TypeError naming the argument when an input is not a tensor.
    """

    def __init__(self, name: str, facts: Callable[..., Facts]) -> None:
        self.name = name
        self.facts = facts
        self.backends: dict[str, Backend] = {}
        self._cache: dict[tuple[Facts, str | None], str] = {}
        OPS[name] = self

    def register(
        self,
        backend: str,
        *,
        rank: int | Callable[..., int],
        unsupported_reason: Callable[..., str | None],
        kernel: PythonKernel | None = None,
    ) -> None:
        assert backend in BACKENDS, backend
        self.backends[backend] = Backend(rank, unsupported_reason, kernel)
        self._cache.clear()

    def rank_of(self, backend: str, facts: Facts) -> int:
        """The rank of ``backend`` for inputs with these facts."""
        rank = self.backends[backend].rank
        return rank(*facts) if callable(rank) else rank

    def reasons(self, *inputs: Any) -> dict[str, str | None]:
        """Each registered backend's reason for refusing these inputs (None: it can run them)."""
        facts = self.facts(*inputs)
        return {name: b.unsupported_reason(*facts) for name, b in self.backends.items()}

    def choose(self, backend: str | None, *inputs: Any) -> str:
        """The backend that runs this call; raises when a forced one cannot take the inputs."""
        try:
            key = (self.facts(*inputs), backend if backend is not None else _default)
        except TypeError as exc:
            raise TypeError(f"sparseops.{self.name}: {exc}") from None
        if torch.compiler.is_compiling():
            # Neither read nor write the cache while torch.compile traces: its contents would
            # become guards (a miss guards "key not in cache"), and the next eager call that
            # fills the entry would force a recompile.
            return self._resolve(*key)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._resolve(*key)
        return hit

    def _resolve(self, facts: Facts, name: str | None) -> str:
        reasons = {b: entry.unsupported_reason(*facts) for b, entry in self.backends.items()}
        if name is None or name == "auto":
            # A plain loop (not min(key=...)): torch.compile traces this on a cache miss.
            chosen = None
            for b, why in reasons.items():
                if why is None and (chosen is None or self.rank_of(b, facts) < self.rank_of(chosen, facts)):
                    chosen = b
            if chosen == "reference" and not HAS_C:
                _warn_no_c()
            return chosen
        if name not in self.backends:
            raise RuntimeError(
                f"sparseops.{self.name}: unknown backend {name!r}; choose one of {tuple(self.backends)} or 'auto'"
            )
        if reasons[name] is not None:
            every = "; ".join(f"{b}: {why or 'available'}" for b, why in reasons.items())
            raise RuntimeError(
                f"sparseops.{self.name}: backend {name!r} cannot take these inputs ({_describe_facts(facts)}): "
                f"{reasons[name]}. Backends: {every}"
            )
        return name


OPS: dict[str, Op] = {}


def _describe_facts(facts: Facts) -> str:
    return ", ".join(str(f) for f in facts)


def tensor_facts(arg: str) -> Callable[..., Facts]:
    """Facts (device type, dtype) of the op's first input, named ``arg`` in error messages.

    A device (or device string) stands for a tensor on it, so ``resolve_backend(op, "cuda")``
    answers without building a tensor.
    """

    def facts(x: Any, *_: Any) -> Facts:
        if isinstance(x, torch.Tensor):
            # x.device.type builds a torch.device (~0.7 us, measured 2026-12-02 on the 2-core
            # EPYC); the two flags cost ~0.05 us each and answer for nearly every call.
            device = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
            return (device, x.dtype)
        if isinstance(x, (str, torch.device)):
            return (torch.device(x).type, None)
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")

    return facts


# ---------------------------------------------------------------------------------------------
# Reasons shared by every op whose C++ op has CPU and CUDA kernels and hands Triton and the
# reference to Python. They take the facts of tensor_facts: (device type, dtype).


def native_cpu(device: str, *_: Any) -> str | None:
    if device != "cpu":
        return f"takes CPU tensors, got {device} tensors"
    return None if HAS_C else f"the C++ extension is not built ({_C_ERROR})"


def native_cuda(device: str, *_: Any) -> str | None:
    if device != "cuda":
        return f"takes CUDA tensors, got {device} tensors"
    if not HAS_C:
        return f"the C++ extension is not built ({_C_ERROR})"
    return None if _HAS_CUDA_KERNELS else "this build of sparseops has no CUDA kernels"


def triton_kernels(device: str, *_: Any) -> str | None:
    if not _HAS_TRITON:
        return "triton is not installed"
    if not HAS_C:
        return f"Triton kernels are reached through the C++ op, and the C++ extension is not built ({_C_ERROR})"
    if device == "cuda":
        return None
    if device == "cpu":
        return None if TRITON_INTERPRET else "runs CPU tensors only under TRITON_INTERPRET=1"
    return f"has no kernels for {device} tensors"


def always(*_: Any) -> str | None:
    return None


def run_python_kernel(op: str, backend: str, inputs: list, outputs: list, options: dict) -> None:
    """Called by the C++ op (csrc/ops/python_kernels.cpp) for its Triton and reference backends."""
    entry = OPS[op].backends[backend]
    if entry.kernel is None:
        raise RuntimeError(f"sparseops.{op}: backend {backend!r} has no Python kernel")
    # torch.ops.sparseops.<op>(..., backend=...) comes here without choose(): check the
    # backend's reason, or Triton on CPU tensors without TRITON_INTERPRET=1 fails deep inside
    # the Triton launcher instead of saying why (~1 us; these kernels take far longer).
    why = entry.unsupported_reason(*OPS[op].facts(inputs[0]))
    if why is not None:
        raise RuntimeError(f"sparseops.{op}: backend {backend!r} cannot take these inputs: {why}")
    entry.kernel(inputs, outputs, options)


if HAS_C:
    _C._set_python_kernel_runner(run_python_kernel)


# ---------------------------------------------------------------------------------------------
# Public helpers


def build_info() -> dict:
    """What this installation can run: compiled arches, CUDA/torch versions, backends per op."""
    info = dict(_C.build_info()) if HAS_C else {"cuda": False, "cuda_version": None, "cuda_arches": ""}
    info["limits"] = dict(_C.limits()) if HAS_C else {}
    info["extension"] = HAS_C
    info["extension_error"] = _C_ERROR or None
    info["torch_version"] = torch.__version__
    info["triton"] = _triton_version()
    info["backends"] = {op: {device: available_backends(op, device) for device in ("cpu", "cuda")} for op in OPS}
    return info


def _triton_version() -> str | None:
    if not _HAS_TRITON:
        return None
    import triton

    return triton.__version__


def set_default_backend(name: str | None) -> None:
    """Force a backend for every later call that passes no ``backend=`` (None/"auto": automatic)."""
    global _default
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    _default = None if name == "auto" else name
    for op in OPS.values():
        op._cache.clear()


def _op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; ops with a backend choice: {tuple(OPS)}")
    return OPS[name]


def available_backends(op: str, *inputs: Any) -> list[str]:
    """The backends that can run ``op`` on these inputs (or a device), best first."""
    entry = _op(op)
    usable = [b for b, why in entry.reasons(*inputs).items() if why is None]
    facts = entry.facts(*inputs)
    return sorted(usable, key=lambda b: (entry.rank_of(b, facts), BACKENDS.index(b)))


def resolve_backend(op: str, *inputs: Any, backend: str | None = None) -> str:
    """The backend a call of ``op`` on these inputs (or a device) runs (None: what auto picks)."""
    return _op(op).choose(backend, *inputs)


def _warn_no_c() -> None:
    global _warned_no_c
    if not _warned_no_c:
        _warned_no_c = True
        warnings.warn(
            "sparseops: the C++/CUDA extension is not available "
            f"({_C_ERROR}); ops fall back to the pure-PyTorch references",
            RuntimeWarning,
            stacklevel=4,
        )
