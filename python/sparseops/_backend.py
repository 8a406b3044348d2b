"""Loading the compiled extension and choosing a backend per call.

Backends: "cuda" (C++/CUDA kernels), "triton", "cpu" (C++ kernels), "reference" (pure
torch). ``backend=None`` (or "auto") takes the first available one of the op's preference
list for the input's device; ``SPARSEOPS_BACKEND`` (read at import) or
``set_default_backend`` changes that default; an explicit ``backend=`` forces one and raises
an error that lists every backend's reason when it cannot take the inputs.

The choice is cached per (op, device type, name) so the hot path costs one dict lookup.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch  # loads libc10/libtorch, which _C links against

try:
    from . import _C  # noqa: F401  (registers torch.ops.sparseops.* as a side effect)

    HAS_C = True
    _C_ERROR = ""
except ImportError as exc:  # no compiler at install time, or an ABI mismatch
    _C = None
    HAS_C = False
    _C_ERROR = str(exc)

BACKENDS = ("cuda", "triton", "cpu", "reference")
# Ops with a backend choice; every one of them has all four backends today.
OPS = ("topk_route", "route_metadata")

# Facts fixed at import, so that choose() is plain Python that torch.compile can trace.
_HAS_CUDA_KERNELS = HAS_C and bool(_C.build_info()["cuda"])
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when its kernels are first compiled; set it before importing.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Why C++ first on CUDA: measured on an H100 host (torch 2.11, 2026-11) a C++ op costs ~9.5 us per
# call and a custom_op around a Triton launch ~37 us, and routing kernels run for a few us.
# Re-rank from benchmarks/results once GPU numbers exist for large T.
_PREFERENCE = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

_default: str | None = os.environ.get("SPARSEOPS_BACKEND") or None
_cache: dict[tuple[str, str, str | None], str] = {}
_warned_no_c = False


def build_info() -> dict:
    """What this installation can run: compiled arches, CUDA/torch versions, backends per op."""
    info = dict(_C.build_info()) if HAS_C else {"cuda": False, "cuda_version": None, "cuda_arches": ""}
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


def unavailable_reason(backend: str, device_type: str) -> str | None:
    """None when ``backend`` can run on ``device_type``, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"takes CPU tensors, got {device_type} tensors"
        return None if HAS_C else f"the C++ extension is not built ({_C_ERROR})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"takes CUDA tensors, got {device_type} tensors"
        if not HAS_C:
            return f"the C++ extension is not built ({_C_ERROR})"
        return None if _HAS_CUDA_KERNELS else "this build of sparseops has no CUDA kernels"
    if backend == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            return None if TRITON_INTERPRET else "runs CPU tensors only under TRITON_INTERPRET=1"
        return f"has no kernels for {device_type} tensors"
    return f"unknown backend; choose one of {BACKENDS}"


def set_default_backend(name: str | None) -> None:
    """Force a backend for every later call that passes no ``backend=`` (None/"auto": automatic)."""
    global _default
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    _default = None if name == "auto" else name
    _cache.clear()


def available_backends(op: str, device) -> list[str]:
    """The backends that can run ``op`` on ``device`` (a torch.device or a device-type string)."""
    device_type = getattr(device, "type", device)
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def resolve_backend(op: str, device, backend: str | None = None) -> str:
    """The backend a call of ``op`` on ``device`` runs with ``backend`` (None: what auto picks)."""
    return choose(op, getattr(device, "type", device), backend)


def choose(op: str, device_type: str, backend: str | None) -> str:
    """The backend that runs this call of ``op``; raises when a forced one cannot."""
    key = (op, device_type, backend)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    name = backend if backend is not None else _default
    if name is None or name == "auto":
        order = _PREFERENCE.get(device_type, ("reference",))
        chosen = next(b for b in order + ("reference",) if unavailable_reason(b, device_type) is None)
        if chosen == "reference" and not HAS_C:
            _warn_no_c()
    else:
        reason = unavailable_reason(name, device_type)
        if reason is not None:
            every = "; ".join(f"{b}: {unavailable_reason(b, device_type) or 'available'}" for b in BACKENDS)
            raise RuntimeError(
                f"sparseops.{op}: backend {name!r} cannot take {device_type} inputs: {reason}. "
                f"Backends for {device_type}: {every}"
            )
        chosen = name
    _cache[key] = chosen
    return chosen


def _warn_no_c() -> None:
    global _warned_no_c
    if not _warned_no_c:
        _warned_no_c = True
        warnings.warn(
            "sparseops: the C++/CUDA extension is not available "
            f"({_C_ERROR}); ops fall back to the pure-PyTorch references",
            RuntimeWarning,
            stacklevel=3,
        )
