"""MoE routing: sparseops.topk_route + sparseops.route_metadata against what users write today.

Shapes (``sparseops.testing.ROUTER_SHAPES``, DESIGN.md): Mixtral-8x7B (E 8, k 2),
Qwen3-30B-A3B (128, 8), DeepSeek-V3 (256, 8, sigmoid + selection bias, 8 groups, top-4
groups, scale 2.5), gpt-oss-120b (128, 4, top-k then softmax); T = 1, 16, 64 (decode) and
1024, 4096, 16384; fp32 and bf16 logits.

Baselines (kind "baseline"):
  torch:composite     the torch code a user writes now. Softmax routers (Mixtral, Qwen3):
                      softmax(fp32) -> topk -> renormalise. gpt-oss: topk of the logits ->
                      softmax(fp32) of the k picked. DeepSeek-V3: sigmoid, + bias, group
                      score = sum of the two best biased scores per group, keep the top-4
                      groups, top-k inside them, weights from the unbiased sigmoid,
                      renormalise, x 2.5 (HF transformers / vLLM grouped_topk style). Then
                      the metadata: stable argsort of the flat ids, bincount, cumsum,
                      inverse permutation, token of every sorted slot.
  compile(composite)  torch.compile of the composite above (the pair compiled as one function).
  compile(reference)  torch.compile of sparseops.reference.routing's topk_route_ref and
                      route_metadata_ref.
  ipex                intel-extension-for-pytorch's CPU ``torch_ipex::topk_softmax`` /
                      ``torch_ipex::grouped_topk`` (top-k only; bf16 logits only: ANCHORS
                      records garbage from fp32). Optional: ipex pins torch 2.8, so it lives
                      in its own venv, named by SPARSEOPS_IPEX_PYTHON=<venv>/bin/python, and
                      runs in a worker process whose timing chunks alternate with this
                      process's rounds. Skipped with a note when the variable is unset.
  SGLang's CPU kernels have no wheel: benchmarks/results/README.md records the issue's
  measured ratios as a bar instead of a measured row.
sparseops rows: every backend ``available_backends`` lists for the device, each op alone
and the pair (``sparseops.route``), plus ``auto`` (backend=None) for the pair.
torch.compile rows are skipped where compiling fails (once per shape group, not retried).

Floor bytes (``_bytes``): read logits (and bias) once, write weights (fp32) and ids (int32);
the metadata reads ids and writes counts, offs, sorted_slots, inverse and tokens (int32);
the pair does not read its ids back. floor_us = bytes / measured copy bandwidth (read +
written bytes of a large copy); x_floor = time / floor. The pair is the headline.

CLI: python -m benchmarks.bench_routing [--device cpu|cuda] [--quick] [--out DIR]
     [--tokens T ...] [--dtypes fp32 bf16] [--models NAME ...] [--ops OP ...] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import _harness as H

FAMILY = "routing"
OPS = ("topk_route", "route_metadata", "pair")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_TOKENS = (1, 64, 4096)


def _testing() -> Any:
    H.import_sparseops()
    import sparseops.testing as testing

    return testing


@dataclass(frozen=True)
class Sweep:
    """One dtype's slice of the run: which token counts, and whether to time torch.compile."""

    dtype: str
    tokens: tuple[int, ...]
    compile: bool


def default_sweeps(device: torch.device, quick: bool) -> list[Sweep]:
    """Full: fp32 and bf16 logits at every standard T, torch.compile included (GPU: bf16 only).

    --quick: fp32 at T = 1, 64, 4096 and no torch.compile (it costs seconds of compilation
    per shape on a 2-core CPU); the full run has it.
    """
    tokens = _testing().ROUTER_TOKENS
    if device.type == "cuda":
        return [Sweep("bf16", QUICK_TOKENS if quick else tokens, not quick)]
    if quick:
        return [Sweep("fp32", QUICK_TOKENS, False)]
    return [Sweep("fp32", tokens, True), Sweep("bf16", tokens, True)]


# --------------------------------------------------------------------------- baselines


def composite_topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3 router as written in HF transformers: softmax(fp32) -> topk -> renorm."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def composite_topk_then_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss router as written in HF transformers: topk of the logits -> softmax(fp32) of the k."""
    values, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=torch.float32), ids


def composite_topk_grouped(
    logits: torch.Tensor, k: int, bias: torch.Tensor, n_group: int, topk_group: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 router as written in HF transformers / vLLM's torch grouped_topk."""
    T, E = logits.shape
    scores = logits.float().sigmoid()
    biased = scores + bias
    group_scores = biased.view(T, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    ids = biased.masked_fill(expert_mask == 0, float("-inf")).topk(k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


def composite_metadata(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Group slots by expert the way users do today: argsort, bincount, cumsum, inverse."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    sorted_slots = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)  # a host sync on CUDA (it reads max)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # int32 ends, as torch._grouped_mm takes
    inverse = torch.empty_like(sorted_slots)
    inverse[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    tokens = sorted_slots // k
    return counts, offs, sorted_slots, inverse, tokens


def composite_topk(cfg: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The composite top-k for ``cfg``, as fn(logits, bias) -> (weights, ids)."""
    if cfg.scoring == "sigmoid" or cfg.bias or cfg.n_group > 1:
        return lambda logits, bias: composite_topk_grouped(logits, cfg.k, bias, cfg.n_group, cfg.topk_group, cfg.scale)
    if cfg.order == "topk_then_softmax":
        return lambda logits, bias: composite_topk_then_softmax(logits, cfg.k)
    return lambda logits, bias: composite_topk_softmax(logits, cfg.k)


# --------------------------------------------------------------------------- checks


def _bytes(cfg: Any, T: int, elt: int) -> dict[str, int]:
    """Bytes each op must move at least: what it reads once plus what it writes once.

    topk_route: logits (T*E*elt) and the bias (E*4) in, weights (T*k*4) and ids (T*k*4) out.
    route_metadata: ids in (T*k*4); counts, offs (E*4 each), sorted_slots, inverse, tokens
    (T*k*4 each) out. The pair (``route``) needs no second read of the ids it wrote: its
    floor is topk_route's bytes plus the metadata's outputs (a fused kernel counts the ids
    while they are still in cache). Write-allocate reads are not counted, as in the copy
    bandwidth they are divided by (read + written bytes of a large ``copy_``).
    """
    E, k = cfg.num_experts, cfg.k
    topk = T * E * elt + (E * 4 if cfg.bias else 0) + T * k * (4 + 4)
    meta_out = 2 * E * 4 + 3 * T * k * 4
    return {"topk_route": topk, "route_metadata": T * k * 4 + meta_out, "pair": topk + meta_out}


def _check_topk(ref_w: torch.Tensor, ref_ids: torch.Tensor, out: Any) -> str:
    w, ids = out[0], out[1]
    if ids.dtype != torch.int32 or tuple(ids.shape) != tuple(ref_ids.shape):
        return f"ids {ids.dtype} {tuple(ids.shape)}, expected int32 {tuple(ref_ids.shape)}"
    bad = (ids != ref_ids).sum().item()
    if bad:
        return f"ids differ in {bad} of {ids.numel()}"
    # Weights: both sides accumulate in fp32; exp() implementations differ in the last bits.
    err = (w.float() - ref_w.float()).abs().max().item() if w.numel() else 0.0
    return "ok" if err <= 1e-5 else f"weights max err {err:.2e}"


def _check_meta(ref_meta: Sequence[torch.Tensor], meta: Sequence[torch.Tensor]) -> str:
    for name, got, want in zip(H.import_sparseops().RouteMeta._fields, meta, ref_meta, strict=False):
        if got is None:  # the padded layout is None without block_m; the reference gives empties
            if want.numel():
                return f"{name} missing"
            continue
        if got.dtype != torch.int32 or got.shape != want.shape:
            return f"{name} {got.dtype} {tuple(got.shape)}, expected int32 {tuple(want.shape)}"
        if not torch.equal(got, want):
            return f"{name} differs in {(got != want).sum().item()} of {want.numel()}"
    return "ok"


def _check_pair(ref_w: torch.Tensor, ref_ids: torch.Tensor, ref_meta: Sequence[torch.Tensor], out: Any) -> str:
    """Check a (weights, ids, RouteMeta) triple against the reference."""
    msg = _check_topk(ref_w, ref_ids, out)
    return msg if msg != "ok" else _check_meta(ref_meta, out[2])


# --------------------------------------------------------------------------- ipex (optional)


IPEX_ENV = "SPARSEOPS_IPEX_PYTHON"


def ipex_worker(log: Callable[[str], None]) -> Any | None:
    """A worker process running the ipex venv's python, or None (with a printed note)."""
    py = os.environ.get(IPEX_ENV)
    if not py:
        log(
            f"note: ipex baseline skipped: set {IPEX_ENV}=<venv>/bin/python of a venv with "
            "intel-extension-for-pytorch (it pins torch 2.8, so it cannot share this one)"
        )
        return None
    from benchmarks import _worker

    try:
        w = _worker.Worker(py, imports=["intel_extension_for_pytorch"])
    except Exception as exc:
        log(f"note: ipex baseline skipped: {py} did not start a worker: {exc}")
        return None
    log(f"ipex worker: {w.info}")
    return w


def _ipex_case(worker: Any, cfg: Any, T: int, dtype: str) -> H.Case | None:
    if worker is None or dtype != "bf16" or cfg.order != "softmax_then_topk":
        return None  # fp32 logits give garbage in ipex 2.8 (ANCHORS); no top-k-then-softmax kernel
    spec = {
        "op": "ipex.grouped_topk" if cfg.n_group > 1 else "ipex.topk_softmax",
        "E": cfg.num_experts, "k": cfg.k, "T": T, "dtype": dtype, "n_group": cfg.n_group,
        "topk_group": cfg.topk_group, "scale": cfg.scale, "bias": cfg.bias,
    }  # fmt: skip
    try:
        ext = worker.case(spec)
    except Exception as exc:
        print(f"note: ipex {spec['op']} E={cfg.num_experts} T={T}: {exc}", flush=True)
        return None
    return H.Case("ipex", "baseline", external=ext, note=f"out of process, torch {worker.info.get('torch', '?')}")


# --------------------------------------------------------------------------- run


def _raise_recompile_limit() -> None:
    # Four routers x six token counts x two dtypes recompile more than the default limit of 8,
    # past which dynamo silently runs eager: the row would time eager code under the
    # compile label.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def sparseops_backends(so: Any, device: torch.device) -> tuple[list[str], list[str]]:
    """Backends to time per op; drops Triton on CPU (the interpreter is for tests, not speed)."""
    out = []
    for op in ("topk_route", "route_metadata"):
        names = list(so.available_backends(op, device))
        if device.type == "cpu" and "triton" in names:
            names.remove("triton")
        out.append(names)
    if device.type == "cpu":
        print("note: not timing backend 'triton' on CPU (TRITON_INTERPRET is for tests)", flush=True)
    return out[0], out[1]


def _auto_choice(so: Any, device: torch.device) -> str:
    """What backend=None runs on ``device`` (for the log)."""
    return ", ".join(f"{op} -> {so.resolve_backend(op, device)}" for op in ("topk_route", "route_metadata"))


class _Compiled:
    """torch.compile'd baselines of one router shape, built lazily; failures remembered."""

    def __init__(self, cfg: Any) -> None:
        from sparseops.reference.routing import route_metadata_ref, topk_route_ref

        comp = composite_topk(cfg)

        def comp_pair(logits: torch.Tensor, bias: torch.Tensor | None) -> Any:
            w, ids = comp(logits, bias)
            return w, ids, composite_metadata(ids, cfg.num_experts)

        self.fns = {
            ("composite", "topk_route"): torch.compile(comp),
            ("composite", "route_metadata"): torch.compile(composite_metadata),
            ("composite", "pair"): torch.compile(comp_pair),
            ("reference", "topk_route"): torch.compile(topk_route_ref),
            ("reference", "route_metadata"): torch.compile(route_metadata_ref),
        }
        self.broken: set[tuple[str, str]] = set()


def run(
    session: H.Session,
    *,
    out_dir: Path,
    sweeps: Sequence[Sweep] | None = None,
    models: Sequence[Any] | None = None,
    ops: Sequence[str] = OPS,
    use_compile: bool = True,
) -> list[H.Result]:
    """Time every routing implementation for every (model, dtype, tokens, op); write routing.csv."""
    so = H.import_sparseops()
    testing = _testing()
    models = list(models) if models is not None else list(testing.ROUTER_SHAPES)
    dev = session.device
    sweeps = list(sweeps) if sweeps is not None else default_sweeps(dev, session.quick)
    if not use_compile:
        sweeps = [Sweep(s.dtype, s.tokens, False) for s in sweeps]
    topk_backends, meta_backends = sparseops_backends(so, dev)
    if os.environ.get("SPARSEOPS_BACKEND"):
        session.log(f"note: SPARSEOPS_BACKEND={os.environ['SPARSEOPS_BACKEND']} forces what 'auto' picks")
    session.log(f"routing backends: topk_route {topk_backends}, route_metadata {meta_backends}")
    session.log(f"auto picks: {_auto_choice(so, dev)}")
    if not any(s.compile for s in sweeps):
        session.log("note: torch.compile baselines off in this run (--quick / --no-compile); the full run has them")
    else:
        _raise_recompile_limit()
    worker = ipex_worker(session.log) if dev.type == "cpu" else None
    session.plan(sum(len(s.tokens) * len(models) * len(ops) for s in sweeps))
    try:
        for sweep in sweeps:
            for cfg in models:
                compiled = _Compiled(cfg) if sweep.compile else None
                for T in sweep.tokens:
                    _run_shape(session, so, cfg, T, sweep, topk_backends, meta_backends, ops, compiled, worker)
                session.write_csv(FAMILY, out_dir)  # keep what is done if a later shape dies
    finally:
        if worker is not None:
            worker.close()
    return session.family_results(FAMILY)


def _run_shape(
    session: H.Session,
    so: Any,
    cfg: Any,
    T: int,
    sweep: Sweep,
    topk_backends: list[str],
    meta_backends: list[str],
    ops: Sequence[str],
    compiled: _Compiled | None,
    worker: Any | None,
) -> None:
    from sparseops.reference.routing import route_metadata_ref, topk_route_ref

    testing = _testing()
    dev = session.device
    E, k = cfg.num_experts, cfg.k
    logits, kw = testing.router_inputs(cfg, T, dtype=DTYPES[sweep.dtype], device=dev)
    bias = kw.get("bias")
    with torch.inference_mode():
        ref_w, ref_ids = topk_route_ref(logits, k, **kw)
        ref_meta = route_metadata_ref(ref_ids, E)
    ids32, ids64 = ref_ids.contiguous(), ref_ids.long()
    nbytes = _bytes(cfg, T, logits.element_size())
    comp = composite_topk(cfg)

    def comp_pair() -> Any:
        w, ids = comp(logits, bias)
        return w, ids, composite_metadata(ids, E)

    def check_topk(out: Any) -> str:
        return _check_topk(ref_w, ref_ids, out)

    def check_meta(out: Any) -> str:
        return _check_meta(ref_meta, out)

    def check_pair(out: Any) -> str:
        return _check_pair(ref_w, ref_ids, ref_meta, out)

    for op in ops:
        # Baselines. The composite metadata syncs (bincount reads the max on CUDA): no graph.
        cases = []
        if op == "topk_route":
            cases.append(H.Case("torch:composite", "baseline", lambda: comp(logits, bias)))
        elif op == "route_metadata":
            cases.append(H.Case("torch:composite", "baseline", lambda: composite_metadata(ids64, E), graph=False))
        else:
            cases.append(H.Case("torch:composite", "baseline", comp_pair, graph=False))
        if compiled is not None:
            cases += _compiled_cases(compiled, op, logits, bias, ids64, ids32, k, E, kw)
        if op == "topk_route":
            ipex = _ipex_case(worker, cfg, T, sweep.dtype)
            if ipex is not None:
                cases.append(ipex)
        # sparseops: each backend, then auto for the pair (sparseops.route: the pair in one call).
        backends = topk_backends if op == "topk_route" else meta_backends
        if op == "pair":
            backends = [b for b in topk_backends if b in meta_backends]
        for b in backends:
            # The reference metadata uses boolean indexing (a host sync): not capturable.
            graph = op == "topk_route" or b != "reference"
            if op == "topk_route":
                fn, check = (lambda b=b: so.topk_route(logits, k, **kw, backend=b)), check_topk
            elif op == "route_metadata":
                fn, check = (lambda b=b: so.route_metadata(ids32, E, backend=b)), check_meta
            else:
                fn, check = (lambda b=b: so.route(logits, k, **kw, backend=b)), check_pair
            cases.append(H.Case(f"sparseops:{b}", "sparseops", fn, graph=graph, check=check))
        if op == "pair":
            cases.append(H.Case("sparseops:auto", "sparseops", lambda: so.route(logits, k, **kw), check=check_pair))
        rows = session.measure_group(
            cases, family=FAMILY, op=op, shape=cfg.name, params=cfg.params(), size=T, dtype=sweep.dtype,
            bytes=nbytes[op], headline=op == "pair",
        )  # fmt: skip
        if compiled is not None:
            for r in rows:
                if r.impl.startswith("compile(") and r.median_us is None:
                    which = r.impl[len("compile(") : -1]
                    compiled.broken.add((which, op))


def _compiled_cases(
    compiled: _Compiled, op: str, logits: torch.Tensor, bias: Any, ids64: Any, ids32: Any, k: int, E: int, kw: dict
) -> list[H.Case]:
    f = compiled.fns
    cases = []
    for which in ("composite", "reference"):
        impl = f"compile({which})"
        parts = {(which, "topk_route"), (which, "route_metadata")}
        broken = (which, op) in compiled.broken or (op == "pair" and which == "reference" and compiled.broken & parts)
        if broken:
            cases.append(H.Case(impl, "baseline", _raise_compile_broken))
            continue
        if which == "composite":
            if op == "topk_route":
                fn = lambda fc=f[(which, op)]: fc(logits, bias)
            elif op == "route_metadata":
                fn = lambda fc=f[(which, op)]: fc(ids64, E)
            else:
                fn = lambda fc=f[(which, op)]: fc(logits, bias)
        else:
            fn = _compiled_ref_fn(f[(which, "topk_route")], f[(which, "route_metadata")], op, logits, ids32, k, E, kw)

        # route_metadata (both styles) has data-dependent shapes (a host sync): no graph.
        cases.append(H.Case(impl, "baseline", fn, graph=op == "topk_route"))
    return cases


def _compiled_ref_fn(
    c_topk: Callable, c_meta: Callable, op: str, logits: torch.Tensor, ids32: torch.Tensor, k: int, E: int, kw: dict
) -> Callable[[], Any]:
    if op == "topk_route":
        return lambda: c_topk(logits, k, **kw)
    if op == "route_metadata":
        return lambda: c_meta(ids32, E)

    def pair() -> Any:
        w, ids = c_topk(logits, k, **kw)
        return w, ids, c_meta(ids, E)

    return pair


def _raise_compile_broken() -> None:
    raise RuntimeError("torch.compile failed on an earlier shape of this model; not retried")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks.bench_routing``."""
    names = [s.name for s in _testing().ROUTER_SHAPES]
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_routing", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing, no torch.compile")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default: the standard ones)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None, help="logit dtypes")
    p.add_argument("--models", nargs="+", choices=names, default=None)
    p.add_argument("--ops", nargs="+", choices=OPS, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile", action="store_true", help="time torch.compile baselines even with --quick")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the routing benchmark alone, then regenerate the report of its results folder."""
    from benchmarks import report

    args = build_parser().parse_args(argv)
    session, out_dir = H.open_session(args)
    sweeps = default_sweeps(session.device, args.quick)
    if args.tokens or args.dtypes:
        sweeps = [
            Sweep(d, tuple(args.tokens) if args.tokens else sweeps[0].tokens, sweeps[0].compile)
            for d in (args.dtypes or [s.dtype for s in sweeps])
        ]
    if args.compile:
        sweeps = [Sweep(s.dtype, s.tokens, True) for s in sweeps]
    models = [m for m in _testing().ROUTER_SHAPES if args.models is None or m.name in args.models]
    run(session, out_dir=out_dir, sweeps=sweeps, models=models, ops=args.ops or OPS, use_compile=not args.no_compile)
    path = report.write_report(out_dir)
    print(report.summary_text(out_dir), flush=True)
    print(report.verdict_text(out_dir), flush=True)
    session.log(f"wrote {out_dir / (FAMILY + '.csv')} and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
