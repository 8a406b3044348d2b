#!/usr/bin/env bash
# The README's test command: install what the tests need, build sparseops, run the suite.
# Works on a fresh CPU machine (torch 2.13.0 CPU build from the local wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-build-isolation -e .
python -c "import sparseops, json; print(json.dumps(sparseops.build_info(), indent=1))"
python -m pytest -q "$@"
