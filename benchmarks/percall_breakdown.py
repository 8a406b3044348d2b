"""Where a decode-sized routing call's time goes, layer by layer (CPU, T = 1 by default).

    python -m benchmarks.percall_breakdown [--tokens 1] [--threads 1] [--reps 15]

For each router shape it times, interleaved round by round and with per-thread CPU time
(``time.thread_time_ns``: a descheduled thread on a shared machine accrues none, so the
medians stay stable at load 15 where wall time does not), each layer of a call:

  public          sparseops.topk_route / route as a user calls them (eager entry first)
  eager entry     _C._topk_route_eager / _C._route_eager alone: argument conversion, the
                  dispatch-key guard, parsing, allocation, the kernel, wrapping the outputs
  torch.ops       torch.ops.sparseops.<op>.default(..., "cpu"): the dispatcher path (schema-
                  driven argument parsing of the strings and optionals, the autograd kernel,
                  a redispatch, the CPU kernel) that the eager entry skips
  guards          torch.compiler.is_compiling() and the default-backend read the public
                  functions do before the entry
  choose()        the backend registry's dispatcher (what the op path calls first)
  torch.mul       one tiny ATen op, the yardstick of one dispatcher round trip
  composite       the torch code a user writes today (benchmarks.bench_routing), for ratios

The C++ side of the op path splits further under callgrind (instruction counts, repeatable on
a busy machine): ``valgrind --tool=callgrind python -c "..."`` over 2,000 calls, then
``callgrind_annotate --inclusive=yes`` for invokeOperatorFromPython, topk_route_autograd,
parse_topk_route, empty_cpu and topk_route_cpu_kernel (the numbers in the routing README).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def _timer(fn: Callable[[], object], calls: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(calls):
        fn()
    return (time.thread_time_ns() - t0) / calls / 1e3


def _cases(shape, T: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    import sparseops
    from benchmarks.bench_routing import composite_metadata, composite_topk
    from sparseops import _backend
    from sparseops.ops import routing as R
    from sparseops.testing import router_inputs

    logits, kw = router_inputs(shape, T, dtype=dtype)
    k, E = shape.k, shape.num_experts
    a = dict(R.TopkRouteOptions(k)._asdict())
    a.pop("k")
    a.update({n: v for n, v in kw.items() if n in a})
    bias = kw.get("bias")
    args = (logits, k, a["scoring"], a["order"], a["renormalize"], bias, a["n_group"], a["topk_group"],
            float(a["scale"]), None, a["group_scoring"])  # fmt: skip
    comp = composite_topk(shape)
    ops = torch.ops.sparseops
    x16 = torch.ones(16)
    cases = {
        "topk_route public": lambda: sparseops.topk_route(logits, k, **kw),
        "topk_route torch.ops": lambda: ops.topk_route.default(*args, "cpu"),
        "route public": lambda: sparseops.route(logits, k, **kw),
        "route torch.ops": lambda: ops.route.default(*args, 0, "cpu"),
        "guards (is_compiling + default)": lambda: (torch.compiler.is_compiling(), _backend._default),
        "choose()": lambda: R._TOPK_ROUTE.choose(None, logits),
        "torch.mul (16 fp32)": lambda: torch.mul(x16, x16),
        "composite topk": lambda: comp(logits, bias),
        "composite pair": lambda: composite_metadata(comp(logits, bias)[1], E),
    }
    if getattr(_backend._C, "_topk_route_eager", None) is not None:
        meta = sparseops.RouteMeta
        cases["topk_route eager entry"] = lambda: _backend._C._topk_route_eager(*args, "cpu")
        cases["route eager entry"] = lambda: _backend._C._route_eager(*args, 0, "cpu", meta)
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    from sparseops.testing import ROUTER_SHAPES

    p = argparse.ArgumentParser(prog="python -m benchmarks.percall_breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="logits dtype")
    p.add_argument("--reps", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--calls", type=int, default=2000, help="calls per case per round")
    p.add_argument("--models", nargs="+", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import os

    print(f"T = {args.tokens}, {args.dtype} logits, {args.threads} thread(s), per-thread CPU time, medians of "
          f"{args.reps} interleaved rounds; load {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")  # fmt: skip
    for shape in ROUTER_SHAPES:
        if args.models and shape.name not in args.models:
            continue
        cases = _cases(shape, args.tokens, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
        times: dict[str, list[float]] = {n: [] for n in cases}
        with torch.inference_mode():
            for fn in cases.values():
                _timer(fn, 200)
            for _ in range(args.reps):
                for n, fn in cases.items():
                    times[n].append(_timer(fn, args.calls))
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"\n{shape.name} (E={shape.num_experts}, k={shape.k})")
        for n, t in med.items():
            extra = ""
            if n.startswith("topk_route"):
                extra = f"  = {t / med['composite topk']:.3f} x composite topk"
            elif n.startswith("route "):
                extra = f"  = {t / med['composite pair']:.3f} x composite pair"
            print(f"  {n:34s} {t:8.3f} us{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
