#!/usr/bin/env bash
# Builds sparseops with its CUDA kernels for sm_80, sm_90 and sm_90a on a machine that has
# nvcc and no GPU, against the CUDA build of torch lying on this machine's disk, then loads
# the extension and checks that every C++ op has a CUDA kernel registered. CUDA code that
# does not compile, link or load cannot land (CI runs this).
#
# The CUDA torch lives in a throwaway venv ($SPARSEOPS_CUDA_VENV, made once and reused), so
# the CPU torch the tests use stays untouched. The build runs on a copy of the working tree.
#   TORCH_CUDA_WHEELS  folder with torch-2.14.1+cu130 and the nvidia-* wheels it loads
#                      (default /opt/pypi-more/files)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "check_cuda_build: no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; }
wheels=${TORCH_CUDA_WHEELS:-/opt/pypi-more/files}
venv=${SPARSEOPS_CUDA_VENV:-/tmp/sparseops-cuda-venv}

if [ ! -f "$venv/.ready" ]; then
  echo "== making $venv (CUDA torch from $wheels)"
  torch_wheel=$(ls "$wheels"/torch-2.14.1-cp3*-manylinux*_x86_64.whl 2>/dev/null | head -n 1)
  [ -n "$torch_wheel" ] || { echo "check_cuda_build: no CUDA torch wheel in $wheels"; exit 1; }
  rm -rf "$venv"
  python -m venv "$venv"
  # --no-deps: the wheels on disk are the CUDA runtime torch needs to import; nothing else
  # (triton included) is needed to build.
  "$venv/bin/pip" install -q --no-deps "$torch_wheel" "$wheels"/nvidia_*.whl "$wheels"/cuda_*.whl
  "$venv/bin/pip" install -q "setuptools>=77" wheel ninja numpy typing_extensions sympy filelock jinja2 networkx fsspec
  touch "$venv/.ready"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work")
cd "$work"
echo "== building for sm_80, sm_90, sm_90a with $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="8.0;9.0;9.0a" MAX_JOBS=${MAX_JOBS:-2} SPARSEOPS_REQUIRE_EXT=1 \
    "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1; then
  grep -E "error|FAILED" -A3 build.log | head -n 60
  echo "check_cuda_build: FAILED to build"
  exit 1
fi
grep -E "warning" build.log | grep -v "torch/include" | head -n 20 || true
echo "built in $(( $(date +%s) - start )) s"

PYTHONPATH="$work/python" "$venv/bin/python" - <<'EOF'
import torch

import sparseops

info = sparseops.build_info()
print("build_info:", {k: info[k] for k in ("torch_version", "cuda", "cuda_version", "cuda_arches")})
assert info["extension"] and info["cuda"], info
assert {"800", "900"} <= set(info["cuda_arches"].split(",")), info["cuda_arches"]
for op in ("topk_route", "route_metadata", "nm_linear", "nm_compress", "nm_sp24_meta", "moe_mlp", "maxsim", "maxsim_varlen"):
    table = torch._C._dispatch_dump(f"sparseops::{op}")
    assert "\nCUDA: registered" in table, table
print("check_cuda_build: CUDA kernels build, link, load and are registered")
EOF
