#!/usr/bin/env bash
# The README's main job: install, build, then the benchmark demo of every op family on the
# available device (CUDA if torch sees a GPU, else CPU). Extra arguments go to the demo:
#   scripts/demo.sh --quick     a few shapes, short budgets (~1.5 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source scripts/_install.sh
echo "== benchmark demo: python -m benchmarks.demo $*"
python -m benchmarks.demo "$@"
echo "== scripts/demo.sh finished in $(( $(date +%s) - start )) s"
