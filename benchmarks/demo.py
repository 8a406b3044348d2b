"""The project's main job: benchmark every op family on the available device.

    python -m benchmarks.demo [--quick] [--device cpu|cuda] [--out DIR] [--only FAMILY ...] [--no-percall]

Runs each family's benchmark (cuda if ``torch.cuda.is_available()``, else cpu) in one
process, so all of them share one set of measured ceilings, then the per-call
micro-benchmarks (``benchmarks/test_percall.py`` under pytest-benchmark, JSON kept beside
the CSVs). It prints the expected duration first, a progress line per problem (with the
time left), the headline tables, and ends with a short verdict per family: at how many
shapes sparseops is faster than each baseline, the worst ratio, and how far from the byte
floor it runs. Results: ``<family>.csv``, ``percall.json``, the generated ``README.md`` and
plots under ``benchmarks/results/<device-slug>/`` (``<device-slug>-quick/`` with --quick).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks import _harness as H
from benchmarks import report

# One line per family. A family module defines FAMILY (the CSV name) and
# run(session, *, out_dir) -> list[Result], which writes out_dir/<FAMILY>.csv.
FAMILIES: tuple[str, ...] = (
    "benchmarks.bench_routing",
    "benchmarks.bench_maxsim",
    "benchmarks.bench_moe",
    "benchmarks.bench_grouped_mm",
    "benchmarks.bench_nm_sparse",
)

# Expected wall time, measured on the 2-core AMD EPYC CPU machine (torch 2.13, 2026-12-02,
# next to three compilers: load 4-7): --quick 63 s, full 942 s; GPU times estimated. A busy
# machine takes longer: groups that are not steady are repeated up to 5x (3x with --quick)
# their budget.
EXPECTED = {
    ("cpu", True): "about 1-1.5 minutes on a 2-core CPU (4 router shapes x T 1, 64, 4096, fp32, no torch.compile; "
    "MaxSim 1 x 100 documents)",
    ("cpu", False): "20-30 minutes or more on a 2-core CPU (routing: 4 router shapes x 6 T x fp32/bf16 with "
    "torch.compile, and MaxSim 1 x 100 / 1,000 documents took 15-20 minutes on 2026-12-02; the MoE, grouped GEMM "
    "and N:M families, added since, were not yet timed as part of the full demo)",
    ("cuda", True): "about 2 minutes on one GPU",
    ("cuda", False): "about 10 minutes on one GPU (torch.compile included)",
}


def run_percall(out_dir: Path, quick: bool, log) -> Path | None | bool:
    """``pytest benchmarks/test_percall.py --benchmark-json=out_dir/percall.json``.

    Returns the JSON path, None when the run failed, False when pytest-benchmark is missing
    (a note, not a failure).
    """
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        log("note: per-call micro-benchmarks skipped: pytest-benchmark is not installed (requirements-dev.txt)")
        return False
    path = out_dir / "percall.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pytest", str(Path(__file__).with_name("test_percall.py")), "-q",
        "-p", "no:cacheprovider", f"--benchmark-json={path}", "--benchmark-sort=name",
        "--benchmark-columns=median,iqr,min,rounds", f"--benchmark-max-time={0.05 if quick else 0.5}",
    ]  # fmt: skip
    log("per-call micro-benchmarks: " + " ".join(cmd[1:4]) + f" ... (~{10 if quick else 40} s)")
    import torch

    # Same thread count as this process (--threads) in the pytest process.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=H.REPO_ROOT, capture_output=True, text=True, env=env)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    if proc.returncode != 0:
        log(f"per-call micro-benchmarks FAILED (exit {proc.returncode}): {tail[0]}")
        print(proc.stdout[-3000:] + proc.stderr[-2000:], flush=True)
        return None
    strip_raw_samples(path)
    log(f"per-call micro-benchmarks: {tail[0]} -> {path}")
    return path


def strip_raw_samples(path: Path) -> None:
    """Drop pytest-benchmark's per-round samples (``stats.data``) from its JSON, keep the stats.

    The samples are ~40,000 numbers per benchmark (about 20 MB for the file), too big to
    commit beside the CSVs; every statistic the report uses (median, IQR, min, rounds) stays.
    """
    import json

    data = json.loads(path.read_text())
    for bench in data.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    path.write_text(json.dumps(data, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    """Run every family; return 1 if any of them raised (the others still run)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few shapes, short budgets (~1.5 min on 2 CPU cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--only", nargs="+", help="family names to run (default: all)")
    p.add_argument("--no-percall", action="store_true", help="skip the pytest-benchmark per-call micro-benchmarks")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    session, out_dir = H.open_session(args)
    print(f"expected duration: {EXPECTED[(session.device.type, args.quick)]}", flush=True)
    if not args.quick:
        print("(python -m benchmarks.demo --quick: the short version)", flush=True)
    print(f"results -> {out_dir}", flush=True)

    failed = []
    for name in FAMILIES:
        module = importlib.import_module(name)
        if args.only and module.FAMILY not in args.only:
            continue
        session.log(f"=== {module.FAMILY} ===")
        try:
            module.run(session, out_dir=out_dir)
        except Exception:  # one broken family must not hide the others' results
            traceback.print_exc()
            failed.append(module.FAMILY)
            if session.family_results(module.FAMILY):
                session.write_csv(module.FAMILY, out_dir)

    if not args.no_percall and not args.only:
        session.log("=== per-call ===")
        if run_percall(out_dir, args.quick, session.log) is None:
            failed.append("percall")

    if any(out_dir.glob("*.csv")):
        path = report.write_report(out_dir)
        print(report.summary_text(out_dir), flush=True)
        percall = report.percall_text(out_dir)
        if percall:
            print("\n" + percall, flush=True)
        print(f"\nreport: {path}", flush=True)
        print("\n=== verdict ===", flush=True)
        print(report.verdict_text(out_dir), flush=True)
    status = f"failed: {', '.join(failed)}" if failed else "all families done"
    print(f"{status} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
