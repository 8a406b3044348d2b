#!/usr/bin/env bash
# One command for a GPU machine: build for the local GPU, run the whole test suite (GPU tests
# included), compute-sanitizer over the CUDA-backend tests, then the benchmarks.
#
#   scripts/gpu_check.sh OUTDIR [--quick]
#
# Writes to OUTDIR: build.log, build_info.json, tests.log, sanitizer.log, bench.log and
# results.tar.gz (benchmarks/results/<gpu>/: CSVs, tables, plots; unpack into benchmarks/results/).
# Six files, within what the device tool brings back. No network needed (the GPU machine
# has none): it uses the torch, triton and pytest already installed there. Exit status is
# non-zero when the build, the tests or the sanitizer fail; the benchmarks run regardless.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [--quick]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export SPARSEOPS_REQUIRE_EXT=1
# Build only for the GPU in this machine (plus PTX-free sm_90a modules on Hopper): a full
# multi-arch build costs minutes of the lease.
cap=$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

echo "== build for sm_${cap/./} ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1))"
start=$(date +%s)
if ! python -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  echo "gpu_check: build failed"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
python -c "import json, sparseops; print(json.dumps(sparseops.build_info(), indent=1))" | tee "$out/build_info.json"

echo "== tests"
python -m pytest -q -ra -p no:cacheprovider tests 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== compute-sanitizer (memcheck, racecheck) over the CUDA-backend tests"
sanitizer=${CUDA_HOME}/bin/compute-sanitizer
command -v compute-sanitizer >/dev/null 2>&1 && sanitizer=compute-sanitizer
: >"$out/sanitizer.log"
# Each run: test files and a -k filter over the CUDA C++ kernels at small shapes (Triton kernels
# are left out: the sanitizer checks our CUDA code; production sizes would take hours under it).
sanitized_runs=(
  "tests/test_routing_gpu.py tests/test_routing_topk.py tests/test_routing_metadata.py|cuda and not triton and not compile"
  "tests/test_maxsim_gpu.py|sanitizer"
  "tests/test_nm_cuda.py|odd_shapes or generic_path or compress_bitwise or agrees_with_emulator or meta_cache"
  "tests/test_moe_mlp.py|cuda_decode"
)
for tool in memcheck racecheck synccheck; do
  echo "-- $tool" | tee -a "$out/sanitizer.log"
  for entry in "${sanitized_runs[@]}"; do
    # shellcheck disable=SC2086 # the file list is split on purpose
    "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all \
      python -m pytest -q -x -p no:cacheprovider -k "${entry#*|}" ${entry%%|*} 2>&1 | tail -n 30 | tee -a "$out/sanitizer.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
done

echo "== benchmarks"
slug=$(python -c 'from benchmarks._harness import device_slug, pick_device; print(device_slug(pick_device()))')
python -m benchmarks.demo --out "benchmarks/results/$slug" "$@" 2>&1 | tee "$out/bench.log"
tar -czf "$out/results.tar.gz" -C benchmarks/results "$slug"

echo "gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) (logs in $out)"
exit $status
