"""Test set-up: Triton under its interpreter when no GPU is present, device/backend matrices."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

# Must happen before any module compiles a Triton kernel (sparseops imports kernels lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sparseops  # noqa: E402
from sparseops.testing import unshadow_hub_kernels  # noqa: E402

# Hugging Face's `kernels` package (imported by transformers) before this checkout's kernels/
# folder can shadow it: pytest runs from the repository root.
unshadow_hub_kernels()

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_params(op: str, devices=DEVICES):
    """(device, backend) pairs for ``op`` from its backend registry, for what this machine can
    run; GPU pairs are marked ``gpu``, Triton pairs ``triton`` (the interpreter on CPU)."""
    params = []
    for device in devices:
        for backend in sparseops.available_backends(op, device):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            if backend == "triton":
                marks.append(pytest.mark.triton)
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def interpreted(device: str, backend: str) -> bool:
    """True for Triton on CPU tensors: the interpreter is slow, so such tests shrink their shapes."""
    return backend == "triton" and device == "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rerun_in_subprocess(test_file: str, selection: str, **env: str) -> None:
    """Run the tests of ``test_file`` selected by ``-k selection`` in a fresh Python with extra
    environment variables (for choices a process makes once, such as the CPU kernels' ISA),
    and assert that some ran and all passed."""
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", selection],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " 0 passed" not in r.stdout
