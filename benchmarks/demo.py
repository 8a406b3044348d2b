"""The project's main job: benchmark every op family on the available device.

    python -m benchmarks.demo [--quick] [--device cpu|cuda] [--out DIR] [--only FAMILY ...]

Runs each family's benchmark (cuda if ``torch.cuda.is_available()``, else cpu) in one
process, so all of them share one set of measured ceilings, prints a progress line per
measurement and a summary at the end, and writes ``<family>.csv`` files plus the generated
``README.md`` and plots under ``benchmarks/results/<device-slug>/`` (``<device-slug>-quick/``
with --quick). On a 2-core CPU the default run takes a few minutes, --quick about one.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks import _harness as H
from benchmarks import report

# One line per family. A family module defines FAMILY (the CSV name) and
# run(session, *, out_dir) -> list[Result], which writes out_dir/<FAMILY>.csv.
FAMILIES: tuple[str, ...] = ("benchmarks.bench_routing",)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every family; return 1 if any of them raised (the others still run)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing (~1 min on 2 CPU cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--only", nargs="+", help="family names to run (default: all)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    device = H.pick_device(args.device)
    so = H.import_sparseops()
    session = H.Session(device, quick=args.quick, sparseops_version=getattr(so, "__version__", ""))
    out_dir = args.out or H.default_out_dir(device, args.quick)
    print(session.header(), flush=True)
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

    if any(out_dir.glob("*.csv")):
        path = report.write_report(out_dir)
        print(report.summary_text(out_dir), flush=True)
        print(f"\nreport: {path}", flush=True)
    status = f"failed families: {', '.join(failed)}" if failed else "all families done"
    print(f"{status} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
