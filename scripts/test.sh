#!/usr/bin/env bash
# The README's test command: install what the tests need, build sparseops, run the suite.
# Works on a fresh CPU machine (torch 2.13.0 CPU build from the local wheel cache). Extra
# arguments go to pytest. The per-call micro-benchmarks are not tests: see benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source scripts/_install.sh
python -c "import sparseops, json; print(json.dumps(sparseops.build_info(), indent=1))"
# One worker per core (pytest-xdist): most of the suite is single-threaded Python (the Triton
# interpreter, the reference), so two workers on 2 cores cut the wall time (fresh clone, 2 cores,
# 2026-12-07: 2,807 tests in 205 s).
echo "== pytest -n auto $*"
python -m pytest -q -n auto "$@"
echo "== scripts/test.sh finished in $(( $(date +%s) - start )) s"
