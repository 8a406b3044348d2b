#!/usr/bin/env bash
# The README's main job: install, build, then the benchmark demo of every op family on the
# available device (CUDA if torch sees a GPU, else CPU). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-build-isolation -e .
python -m benchmarks.demo "$@"
