"""MoE routing: sparseops.topk_route + sparseops.route_metadata against what users write today.

Baselines (kind "baseline"):
  torch:composite     the torch code a user writes now. Softmax routers (Mixtral, Qwen3):
                      softmax(fp32) -> topk -> renormalise. DeepSeek-V3: sigmoid, + bias,
                      group score = sum of the two best biased scores per group, keep the
                      top-4 groups, top-k inside them, weights from the unbiased sigmoid,
                      renormalise, x 2.5 (HF transformers / vLLM grouped_topk style). Then
                      the metadata: stable argsort of the flat ids, bincount, cumsum,
                      inverse permutation, token of every sorted slot.
  compile(reference)  torch.compile of sparseops.reference.routing's topk_route_ref and
                      route_metadata_ref (skipped where compiling fails).
sparseops rows: every backend ``available_backends`` lists for the device, each op alone
and the pair, plus ``auto`` (backend=None) for the pair.

Floor bytes: read logits (and bias) once, write weights (fp32) and ids (int32), read ids,
write counts, offs, sorted_slots, inverse and tokens (int32). The pair is the headline.

CLI: python -m benchmarks.bench_routing [--device cpu|cuda] [--quick] [--out DIR]
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


@dataclass(frozen=True)
class RouterConfig:
    """A model's router: E experts, top-k, and its scoring rule (the team's standard MoE shapes)."""

    name: str
    num_experts: int
    k: int
    scoring: str = "softmax"
    bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0

    def params(self) -> str:
        """Short description for the CSV ``params`` column."""
        p = f"E={self.num_experts} k={self.k} {self.scoring}"
        if self.bias:
            p += "+bias"
        if self.n_group > 1:
            p += f" groups={self.n_group}/top{self.topk_group}"
        if self.scale != 1.0:
            p += f" scale={self.scale:g}"
        return p


MODELS = (
    RouterConfig("Mixtral-8x7B", 8, 2),
    RouterConfig("Qwen3-30B-A3B", 128, 8),
    RouterConfig("DeepSeek-V3", 256, 8, scoring="sigmoid", bias=True, n_group=8, topk_group=4, scale=2.5),
)
TOKENS = (1, 16, 64, 1024, 4096, 16384)
QUICK_TOKENS = (1, 64, 4096)
OPS = ("topk_route", "route_metadata", "pair")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Sweep:
    """One dtype's slice of the run: which token counts, and whether to compile the reference."""

    dtype: str
    tokens: tuple[int, ...]
    compile: bool


def default_sweeps(device: torch.device, quick: bool) -> list[Sweep]:
    """GPU: bf16 logits (what models produce). CPU: fp32 in full; bf16 on a few sizes.

    CPU default must finish in a few minutes on 2 cores: the bf16 slice checks the bf16
    load path at decode / prefill sizes without repeating the whole fp32 sweep, and skips
    torch.compile (it costs seconds of compilation per shape there). --quick drops bf16
    and torch.compile and keeps three token counts.
    """
    if device.type == "cuda":
        return [Sweep("bf16", QUICK_TOKENS if quick else TOKENS, True)]
    if quick:
        return [Sweep("fp32", QUICK_TOKENS, False)]
    return [Sweep("fp32", TOKENS, True), Sweep("bf16", (1, 64, 4096), False)]


# --------------------------------------------------------------------------- baselines


def composite_topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3 router as written in HF transformers: softmax(fp32) -> topk -> renorm."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


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


# --------------------------------------------------------------------------- checks


def _bytes(cfg: RouterConfig, T: int, elt: int) -> dict[str, int]:
    E, k = cfg.num_experts, cfg.k
    topk = T * E * elt + (E * 4 if cfg.bias else 0) + T * k * (4 + 4)
    meta = T * k * 4 + 2 * E * 4 + 3 * T * k * 4
    return {"topk_route": topk, "route_metadata": meta, "pair": topk + meta}


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


# --------------------------------------------------------------------------- run


def _compiled_refs() -> tuple[Callable, Callable]:
    from sparseops.reference.routing import route_metadata_ref, topk_route_ref

    # Three routers x six token counts x dtypes recompile more than the default limit of 8,
    # past which dynamo silently runs eager: the row would time eager code under the
    # compile label.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(topk_route_ref), torch.compile(route_metadata_ref)


def sparseops_backends(so: Any, device: torch.device) -> tuple[list[str], list[str]]:
    """Backends to time per op; drops Triton on CPU (the interpreter is for tests, not speed)."""
    out = []
    for op in ("topk_route", "route_metadata"):
        names = list(so.available_backends(op, device))
        if device.type == "cpu" and "triton" in names:
            print("note: not timing backend 'triton' on CPU (TRITON_INTERPRET is for tests)", flush=True)
            names.remove("triton")
        out.append(names)
    return out[0], out[1]


def _auto_choice(so: Any, device: torch.device) -> str:
    """What backend=None runs on ``device`` (for the log)."""
    return ", ".join(f"{op} -> {so.resolve_backend(op, device)}" for op in ("topk_route", "route_metadata"))


def run(
    session: H.Session,
    *,
    out_dir: Path,
    sweeps: Sequence[Sweep] | None = None,
    models: Sequence[RouterConfig] = MODELS,
    use_compile: bool = True,
) -> list[H.Result]:
    """Time every routing implementation for every (model, dtype, tokens); write routing.csv."""
    so = H.import_sparseops()
    from sparseops.reference.routing import route_metadata_ref, topk_route_ref

    dev = session.device
    sweeps = list(sweeps) if sweeps is not None else default_sweeps(dev, session.quick)
    topk_backends, meta_backends = sparseops_backends(so, dev)
    pair_backends = [b for b in topk_backends if b in meta_backends]
    if os.environ.get("SPARSEOPS_BACKEND"):
        session.log(f"note: SPARSEOPS_BACKEND={os.environ['SPARSEOPS_BACKEND']} forces what 'auto' picks")
    session.log(f"routing backends: topk_route {topk_backends}, route_metadata {meta_backends}")
    session.log(f"auto picks: {_auto_choice(so, dev)}")
    compiled = _compiled_refs() if use_compile and any(s.compile for s in sweeps) else None

    per_shape = 3 + len(topk_backends) + len(meta_backends) + len(pair_backends) + 1
    session.plan(sum(len(s.tokens) * len(models) * (per_shape + (3 if s.compile and compiled else 0)) for s in sweeps))

    for sweep in sweeps:
        dtype = DTYPES[sweep.dtype]
        for cfg in models:
            compile_broken: set[str] = set()
            for T in sweep.tokens:
                _run_shape(
                    session, so, cfg, T, sweep, dtype, topk_backends, meta_backends, pair_backends,
                    compiled if sweep.compile else None, compile_broken, topk_route_ref, route_metadata_ref,
                )  # fmt: skip
            session.write_csv(FAMILY, out_dir)  # keep what is done if a later shape dies
    return session.family_results(FAMILY)


def _run_shape(
    session: H.Session,
    so: Any,
    cfg: RouterConfig,
    T: int,
    sweep: Sweep,
    dtype: torch.dtype,
    topk_backends: list[str],
    meta_backends: list[str],
    pair_backends: list[str],
    compiled: tuple[Callable, Callable] | None,
    compile_broken: set[str],
    topk_route_ref: Callable,
    route_metadata_ref: Callable,
) -> None:
    dev = session.device
    E, k = cfg.num_experts, cfg.k
    gen = torch.Generator().manual_seed(1000 * E + T)
    # Unit-scale random logits: random (roughly balanced) routing, as in ANCHORS' baselines.
    logits = torch.randn(T, E, generator=gen).to(device=dev, dtype=dtype)
    bias = (0.1 * torch.randn(E, generator=gen)).to(dev) if cfg.bias else None
    kw: dict[str, Any] = {"scoring": cfg.scoring}
    if cfg.bias:
        kw["bias"] = bias
    if cfg.n_group > 1:
        kw.update(n_group=cfg.n_group, topk_group=cfg.topk_group)
    if cfg.scale != 1.0:
        kw["scale"] = cfg.scale

    with torch.inference_mode():
        ref_w, ref_ids = topk_route_ref(logits, k, **kw)
        ref_meta = route_metadata_ref(ref_ids, E)
    ids32, ids64 = ref_ids.contiguous(), ref_ids.long()
    nbytes = _bytes(cfg, T, logits.element_size())

    def measure(
        op: str, impl: str, kind: str, fn: Callable[[], Any], graph: bool, check: Callable | None = None
    ) -> H.Result | None:
        return session.measure(
            fn, family=FAMILY, op=op, shape=cfg.name, params=cfg.params(), size=T, dtype=sweep.dtype,
            impl=impl, kind=kind, bytes=nbytes[op], headline=op == "pair", graph=graph, check=check,
        )  # fmt: skip

    # torch composite. The metadata half syncs (bincount reads the max on CUDA): no graph.
    if cfg.n_group > 1 or cfg.bias or cfg.scoring != "softmax":

        def comp_topk() -> Any:
            return composite_topk_grouped(logits, k, bias, cfg.n_group, cfg.topk_group, cfg.scale)
    else:

        def comp_topk() -> Any:
            return composite_topk_softmax(logits, k)

    def comp_pair() -> Any:
        w, ids = comp_topk()
        return w, ids, composite_metadata(ids, E)

    measure("topk_route", "torch:composite", "baseline", comp_topk, graph=True)
    comp_meta = lambda: composite_metadata(ids64, E)
    measure("route_metadata", "torch:composite", "baseline", comp_meta, graph=False)
    measure("pair", "torch:composite", "baseline", comp_pair, graph=False)

    # torch.compile of the reference. route_metadata_ref has data-dependent shapes (a host
    # sync), so only the top-k half may be captured in a graph.
    if compiled is not None:
        c_topk, c_meta = compiled

        def cc_pair() -> Any:
            w, ids = c_topk(logits, k, **kw)
            return w, ids, c_meta(ids, E)

        cases = [
            ("topk_route", lambda: c_topk(logits, k, **kw), True),
            ("route_metadata", lambda: c_meta(ids32, E), False),
            ("pair", cc_pair, False),
        ]
        for op, fn, graph in cases:
            if op in compile_broken or (op == "pair" and compile_broken):
                session.measure(
                    _raise_compile_broken, family=FAMILY, op=op, shape=cfg.name, params=cfg.params(), size=T,
                    dtype=sweep.dtype, impl="compile(reference)", kind="baseline", bytes=nbytes[op],
                )  # fmt: skip
                continue
            if measure(op, "compile(reference)", "baseline", fn, graph) is None:
                compile_broken.add(op)

    # sparseops, each backend, each op alone and the pair; then auto for the pair.
    def so_topk(b: str | None) -> Callable[[], Any]:
        return lambda: so.topk_route(logits, k, **kw, backend=b)

    def so_meta(b: str | None) -> Callable[[], Any]:
        return lambda: so.route_metadata(ids32, E, backend=b)

    def so_pair(b: str | None) -> Callable[[], Any]:
        # sparseops.route is the pair in one call (one Python-to-C++ crossing on the C++ backends).
        return lambda: so.route(logits, k, **kw, backend=b)

    def check_topk(out: Any) -> str:
        return _check_topk(ref_w, ref_ids, out)

    def check_meta(out: Any) -> str:
        return _check_meta(ref_meta, out)

    def check_pair(out: Any) -> str:
        return _check_pair(ref_w, ref_ids, ref_meta, out)

    for b in dict.fromkeys(topk_backends + meta_backends):
        # The reference metadata uses boolean indexing (a host sync): not capturable.
        meta_graph = b != "reference"
        if b in topk_backends:
            measure("topk_route", f"sparseops:{b}", "sparseops", so_topk(b), True, check_topk)
        if b in meta_backends:
            measure("route_metadata", f"sparseops:{b}", "sparseops", so_meta(b), meta_graph, check_meta)
        if b in pair_backends:
            measure("pair", f"sparseops:{b}", "sparseops", so_pair(b), meta_graph, check_pair)
    measure("pair", "sparseops:auto", "sparseops", so_pair(None), True, check_pair)


def _raise_compile_broken() -> None:
    raise RuntimeError("torch.compile failed on an earlier shape of this model; not retried")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks.bench_routing``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_routing", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing (a smoke run)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help=f"token counts (default {TOKENS})")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None, help="logit dtypes")
    p.add_argument("--models", nargs="+", choices=[m.name for m in MODELS], default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the routing benchmark alone, then regenerate the report of its results folder."""
    from benchmarks import report

    args = build_parser().parse_args(argv)
    device = H.pick_device(args.device)
    so = H.import_sparseops()
    session = H.Session(device, quick=args.quick, sparseops_version=getattr(so, "__version__", ""))
    out_dir = args.out or H.default_out_dir(device, args.quick)
    print(session.header(), flush=True)
    sweeps = default_sweeps(device, args.quick)
    if args.tokens or args.dtypes:
        sweeps = [
            Sweep(d, tuple(args.tokens) if args.tokens else s.tokens, s.compile)
            for s in sweeps[:1]
            for d in (args.dtypes or [s.dtype])
        ]
    models = [m for m in MODELS if args.models is None or m.name in args.models]
    run(session, out_dir=out_dir, sweeps=sweeps, models=models, use_compile=not args.no_compile)
    path = report.write_report(out_dir)
    print(report.summary_text(out_dir), flush=True)
    session.log(f"wrote {out_dir / (FAMILY + '.csv')} and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
