#!/usr/bin/env bash
# Compiles every CUDA source for sm_80, sm_90 and sm_90a, and every C++ source with the CUDA
# code paths switched on, against the headers of a CUDA build of torch. Runs on a machine
# with nvcc and no GPU (CI), so CUDA code that does not compile cannot land.
#
# Headers: the installed torch when it is a CUDA build; otherwise the torch/include folder of
# a CUDA torch wheel ($TORCH_CUDA_WHEEL, default: the torch 2.14.1+cu130 wheel on this
# machine's disk), unpacked once into $SPARSEOPS_HEADER_CACHE.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
nvcc="$CUDA_HOME/bin/nvcc"
[ -x "$nvcc" ] || { echo "check_cuda_compile: no nvcc at $nvcc (set CUDA_HOME)"; exit 1; }

torch_inc=$(python - <<'EOF' 2>/dev/null || true
import torch
from torch.utils.cpp_extension import include_paths
if torch.version.cuda:
    print(include_paths()[0])
EOF
)
if [ -z "$torch_inc" ]; then
  wheel=${TORCH_CUDA_WHEEL:-$(ls /opt/pypi-more/files/torch-2.14.1-cp3*-manylinux*_x86_64.whl 2>/dev/null | head -n 1)}
  [ -n "$wheel" ] && [ -f "$wheel" ] || { echo "check_cuda_compile: no CUDA torch wheel found (set TORCH_CUDA_WHEEL)"; exit 1; }
  cache=${SPARSEOPS_HEADER_CACHE:-/tmp/sparseops-torch-cuda-headers}/$(basename "$wheel" .whl)
  if [ ! -f "$cache/.done" ]; then
    rm -rf "$cache" && mkdir -p "$cache"
    unzip -q -o "$wheel" 'torch/include/*' -d "$cache"
    touch "$cache/.done"
  fi
  torch_inc="$cache/torch/include"
fi
py_inc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
includes=(-I"$root/csrc/include" -I"$torch_inc" -I"$torch_inc/torch/csrc/api/include" -I"$py_inc" -I"$CUDA_HOME/include")
defines=(-DSPARSEOPS_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI=1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Portable sources must build for every arch in the list; files named *_sm90a.cu are
# Hopper-only and build for sm_90a alone (setup.py makes them a separate module).
arches=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90a,code=sm_90a)
status=0
shopt -s nullglob globstar
for src in csrc/**/*.cu; do
  case "$src" in
    *_sm90a.cu) gencode=(-gencode=arch=compute_90a,code=sm_90a) ;;
    *) gencode=("${arches[@]}") ;;
  esac
  echo "nvcc  $src"
  if ! "$nvcc" -std=c++20 -O3 -c "$src" -o "$out/$(basename "$src").o" "${gencode[@]}" "${includes[@]}" "${defines[@]}" \
      --expt-relaxed-constexpr -Xcompiler -fPIC -Xptxas -warn-spills \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__; then
    status=1
  fi
done
for src in csrc/**/*.cpp; do
  echo "c++   $src (CUDA paths on)"
  if ! c++ -std=c++20 -fsyntax-only "$src" "${includes[@]}" "${defines[@]}"; then
    status=1
  fi
done
[ "$status" = 0 ] && echo "check_cuda_compile: all sources compile" || echo "check_cuda_compile: FAILED"
exit "$status"
