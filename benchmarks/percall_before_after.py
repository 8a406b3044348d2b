"""Per-call time of two sparseops builds, "before" and "after", measured in alternation.

    python -m benchmarks.percall_before_after --before /work/venv-before/bin/python \\
        [--after PYTHON] [--out benchmarks/results/<device>] [--quick]

The issue's bound: the C++ path stays within 1.2x of the landed baseline's per-call time
on CPU at T = 1. Each interpreter (a venv with one build of sparseops installed; ``--after``
defaults to this one) runs a worker process (``benchmarks/_worker.py``); the two take turns,
one chunk of single timed calls each per case and round, the order flipping every round,
so load from other processes falls on both alike. Per case: the median, p20 and p80 of
every call, and the median (p20, p80) over rounds of the per-round ratio of chunk medians.

Cases (backend "cpu", the C++ path, under ``torch.inference_mode()``): ``topk_route``,
``route_metadata`` and ``route`` at T = 1 and 16 for E = 8 (k 2, Mixtral) and E = 128
(k 8, Qwen3-30B-A3B), plus ``torch.mul`` of a 16-element tensor in each interpreter (the
dispatcher-cost yardstick: a change there is the machine or torch, not sparseops).

Writes ``percall.csv`` (family ``percall``: impl ``before:<commit>`` as the baseline,
``after:<commit>``; headline rows = the sparseops ops at T 1) into the results folder and regenerates its
README, whose verdict says at how many cases after/before <= 1.2.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FAMILY = "percall"
SHAPES = (("Mixtral-8x7B", 8, 2), ("Qwen3-30B-A3B", 128, 8))
TOKENS = (1, 16)
OPS = ("topk_route", "route_metadata", "route")


def _commit(path: str | None) -> str:
    if not path:
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cases() -> list[dict[str, Any]]:
    """Worker specs, in measuring order."""
    out = []
    for _name, E, k in SHAPES:
        for T in TOKENS:
            for op in OPS:
                out.append({"op": f"sparseops.{op}", "E": E, "k": k, "T": T, "dtype": "fp32", "backend": "cpu"})
    out.append({"op": "torch.mul", "numel": 16})
    return out


def _q(v: Sequence[float], q: float) -> float:
    from benchmarks._harness import _quantile

    return _quantile(sorted(v), q)


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks import _harness as H
    from benchmarks import _worker, report

    p = argparse.ArgumentParser(prog="python -m benchmarks.percall_before_after", description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="python of the venv with the 'before' build")
    p.add_argument("--after", default=sys.executable, help="python of the 'after' build (default: this one)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<cpu slug>)")
    p.add_argument("--rounds", type=int, default=None, help="alternations per case (default 30, --quick 10)")
    p.add_argument("--chunk", type=float, default=0.03, help="seconds of calls per chunk (default 0.03)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rounds = args.rounds or (10 if args.quick else 30)

    import torch

    device = torch.device("cpu")
    out_dir = args.out or H.default_out_dir(device, args.quick)
    env = H.environment(device)
    env.update(quick=str(args.quick), timer=f"alternating worker processes, {rounds} rounds x {args.chunk:g} s chunks")
    print(f"device: {env['device_name']}  load {env['load_1m']}  ->  {out_dir}", flush=True)

    t_start = time.perf_counter()
    with _worker.Worker(args.before) as before, _worker.Worker(args.after) as after:
        builds = {}
        for tag, w in (("before", before), ("after", after)):
            commit = _commit(w.info.get("sparseops_path"))
            builds[tag] = (w, f"{tag}:{commit}")
            print(f"{tag}: {w.python}  torch {w.info['torch']}  sparseops from {w.info.get('sparseops_path')}  "
                  f"commit {commit}", flush=True)  # fmt: skip
        env["sparseops"] = str(after.info.get("sparseops", ""))
        specs = cases()
        rows: list[H.Result] = []
        for n, spec in enumerate(specs, 1):
            op = spec["op"].removeprefix("sparseops.")
            shape = f"E={spec['E']} k={spec['k']}" if "E" in spec else "yardstick"
            size = spec.get("T", 1)
            got: dict[str, list[list[float]]] = {}
            skipped = {}
            handles = {}
            for tag in ("before", "after"):
                try:
                    handles[tag] = builds[tag][0].case(spec)
                except _worker.WorkerError as exc:
                    skipped[tag] = str(exc)
            for r in range(rounds):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for tag in order:
                    if tag in handles:
                        got.setdefault(tag, []).append(handles[tag].chunk(args.chunk))
            per_round = {tag: [statistics.median(c) for c in chunks] for tag, chunks in got.items()}
            ratio = None
            if len(per_round) == 2:
                ratios = [b / a for b, a in zip(per_round["before"], per_round["after"], strict=True)]
                ratio = (statistics.median(ratios), _q(ratios, 0.2), _q(ratios, 0.8))
            line = [f"[{time.perf_counter() - t_start:6.1f}s] {n:>2}/{len(specs)} {op:<15} {shape:<10} T={size:<3}"]
            for tag in ("before", "after"):
                impl = builds[tag][1]
                res = H.Result(FAMILY, op, shape, "backend=cpu inference_mode", "T", size, "fp32", impl,
                               "baseline" if tag == "before" else "sparseops",
                               headline=size == 1 and op != "torch.mul")  # fmt: skip
                res.note = f"{builds[tag][0].python}, torch {builds[tag][0].info['torch']}"
                if tag in skipped:
                    res.note = f"skipped: {skipped[tag]}"
                    line.append(f"{tag} skipped ({skipped[tag][:60]})")
                else:
                    us = sorted(x * 1e6 for c in got[tag] for x in c)
                    res.median_us, res.p20_us, res.p80_us = _q(us, 0.5), _q(us, 0.2), _q(us, 0.8)
                    res.samples, res.rounds = len(us), rounds
                    res.spread = res.p80_us / res.p20_us
                    res.noisy = res.spread > H.SPREAD_TARGET
                    line.append(f"{tag} {res.median_us:7.2f} µs [{res.p20_us:.2f}-{res.p80_us:.2f}]"
                                + (" NOISY" if res.noisy else ""))  # fmt: skip
                    if tag == "after" and ratio is not None:
                        base = builds["before"][1]
                        res.speedups = f"{base}={ratio[0]:.3f}"
                        res.speedup_bands = f"{base}={ratio[1]:.3f}:{ratio[2]:.3f}"
                rows.append(res)
            if ratio is not None:
                line.append(f"after/before {1 / ratio[0]:.3f} [{1 / ratio[2]:.3f}-{1 / ratio[1]:.3f}]")
            print("  ".join(line), flush=True)
    path = H.write_csv(rows, out_dir / f"{FAMILY}.csv", env)
    report.write_report(out_dir)
    print(f"wrote {path} and {out_dir / 'README.md'}", flush=True)
    print("\n".join(report.family_verdict(FAMILY, report.load_results(out_dir)[FAMILY])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
