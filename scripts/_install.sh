# Sourced by scripts/demo.sh and scripts/test.sh: install what the README's commands need,
# then build sparseops, saying what happens and how long it took (no silent minutes).
#
# The C++ build reuses object files in build/temp-* (setup.py keeps that folder stable), so
# a rebuild of an unchanged tree only relinks: seconds instead of minutes. The full pip
# output goes to build/pip-install.log; the compile steps and a heartbeat are printed.

_elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

echo "== installing requirements-dev.txt (torch, triton, pytest, ...; the first time takes a while)"
t=$(date +%s)
# pip warns once per configured find-links folder that does not exist on this machine kind;
# those lines say nothing about this install, everything else pip prints stays.
set +e
python -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
_status=${PIPESTATUS[0]}
set -e
[ "$_status" = 0 ] || { echo "installing requirements-dev.txt FAILED"; exit 1; }
echo "   done in $(_elapsed "$t")"

# PyLate / colpali-engine wheels without their dependency trees, for the MaxSim integration
# tests and benchmarks (never fatal: those tests skip, saying why, when the install fails).
echo "== MaxSim peers (PyLate, colpali-engine: scoring modules only)"
bash scripts/install_maxsim_peers.sh

echo "== building sparseops (C++ kernels): first build a few minutes on 2 cores, unchanged tree seconds"
mkdir -p build
log=build/pip-install.log
t=$(date +%s)
# sleep's own output goes nowhere: once the loop is killed, an orphaned sleep must not hold
# the caller's stdout pipe open (`scripts/demo.sh | tee log` would wait for it).
( while sleep 20 </dev/null >/dev/null 2>&1; do echo "   ... still building ($(_elapsed "$t"))"; done ) &
_beat=$!
set +e
python -m pip install -v --no-build-isolation -e . 2>&1 | tee "$log" \
  | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|ninja: no work to do|error:|Successfully installed' \
  | sed -u -E 's/^\s*(\[[0-9]+\/[0-9]+\]).* -c ([^ ]+) .*/   \1 compiling \2/; s/^\s*ninja: no work to do\./   ninja: no work to do (object files reused)/; s/^Successfully/   Successfully/'
_status=${PIPESTATUS[0]}
set -e
kill "$_beat" 2>/dev/null || true
wait "$_beat" 2>/dev/null || true
if [ "$_status" != 0 ]; then
  tail -n 40 "$log"
  echo "build FAILED after $(_elapsed "$t") (full log: $log)"
  exit 1
fi
echo "   built in $(_elapsed "$t") (full log: $log)"
