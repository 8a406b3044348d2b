#!/usr/bin/env bash
# Install the MaxSim peers the integration tests and benchmarks/bench_maxsim_clients.py
# compare against: PyLate and colpali-engine, wheels only (--no-deps), into their own folder
# ($SPARSEOPS_PEERS_DIR, default /tmp/sparseops-peers). Their dependency trees would pull a
# CUDA torch 2.11 (fast-plaid's pin) and a torchvision that does not import beside the CPU
# torch 2.13 (ANCHORS §4); the tests import only their scoring modules. Keep the pins in step
# with sparseops.testing.MAXSIM_PEER_PINS. Never fatal: without them those tests skip, saying why.
set -uo pipefail
dir=${SPARSEOPS_PEERS_DIR:-/tmp/sparseops-peers}
if PYTHONPATH="$dir" python -c 'import importlib.metadata as m, sys
sys.exit(0 if (m.version("pylate"), m.version("colpali-engine")) == ("1.6.0", "0.3.18") else 1)' 2>/dev/null; then
  echo "   MaxSim peers already in $dir"
  exit 0
fi
rm -rf "$dir"
python -m pip install -q --no-deps --target "$dir" "pylate==1.6.0" "colpali-engine==0.3.18" 2>&1 \
  | grep -v -e "is ignored: it is neither a file nor a directory" -e "Running pip as the 'root' user"
if [ "${PIPESTATUS[0]}" = 0 ]; then
  echo "   MaxSim peers (pylate 1.6.0, colpali-engine 0.3.18) installed into $dir"
else
  echo "   could not install the MaxSim peers into $dir: their integration tests will skip"
fi
exit 0
