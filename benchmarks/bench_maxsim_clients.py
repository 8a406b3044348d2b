"""MaxSim clients: sparseops' PyLate / colpali drop-ins and contrastive loss against the real
packages' own functions, on CPU, fp32 and bf16.

Problems (dim 128, DESIGN.md shapes):
  pylate.colbert_scores      1 query x 32 tokens against Nd documents x 300 tokens padded,
                             ragged 50-300 real tokens (bool documents_mask): PyLate's re-rank
                             call. Baseline: PyLate 1.6's ``colbert_scores(..., backend="torch")``
                             (its einsum path, the one CPU users get).
  pylate.ColBERTScores       32 queries x 32 tokens against 32 x 2 (positive + hard negative)
                             documents x 180 tokens: the contrastive losses' scoring.
  colpali.score_multi_vector 4 queries x 16-24 tokens against P ColPali pages x 1030 tokens
                             (lists of tensors). Baseline: colpali-engine 0.3.18's
                             ``BaseVisualRetrieverProcessor.score_multi_vector``
                             (COLPALI_SCORES_BACKEND=torch).
  loss fwd+bwd               PyLate's Contrastive scoring + cross-entropy (B 32, N 2, 32 x 180
                             tokens, normalised embeddings) forward and backward, against
                             ``sparseops.nn.maxsim_contrastive_loss(pylate_mask=True)``.
The peers come from ``sparseops.testing.import_maxsim_peer`` (scripts/install_maxsim_peers.sh);
where one does not import, its rows are the transcription of its torch path
(tests/test_maxsim_integrations.py checks the two agree) and say so in the impl name.
Casts and padding of the inputs are outside the timing; the colpali rows include the per-call
padding both implementations do.

CLI: python -m benchmarks.bench_maxsim_clients [--quick] [--dtypes fp32 bf16] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import _harness as H

FAMILY = "maxsim_clients"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _peer(module: str, bare: tuple[str, ...]):
    from sparseops.testing import PeerUnavailable, import_maxsim_peer

    try:
        return import_maxsim_peer(module, bare)[0]
    except PeerUnavailable as e:
        print(f"   {module} unavailable ({e}); timing its transcription instead", flush=True)
        return None


def _pylate_scores_einsum(q, d, qm=None, dm=None):
    """pylate/scores/colbert.py 1.6.0's torch path, transcribed (when PyLate does not import)."""
    s = torch.einsum("ash,bth->abst", q, d)
    if qm is not None:
        s = s * qm.unsqueeze(1).unsqueeze(3)
    if dm is not None:
        s = s * dm.unsqueeze(0).unsqueeze(2)
    return s.max(axis=-1).values.sum(axis=-1)


def _colpali_smv(qs, ps, batch_size=128):
    """colpali-engine 0.3.18's score_multi_vector with its torch maxsim_inbatch, transcribed."""
    rows = []
    for i in range(0, len(qs), batch_size):
        qb = torch.nn.utils.rnn.pad_sequence(qs[i : i + batch_size], batch_first=True)
        cols = []
        for j in range(0, len(ps), batch_size):
            pb = torch.nn.utils.rnn.pad_sequence(ps[j : j + batch_size], batch_first=True)
            cols.append(torch.einsum("bnd,csd->bcns", qb, pb).amax(dim=3).sum(dim=2))
        rows.append(torch.cat(cols, dim=1).cpu())
    return torch.cat(rows, dim=0).to(torch.float32)


def _ragged_mask(N: int, L: int, low: int, seed: int) -> torch.Tensor:
    from sparseops.testing import maxsim_lengths

    lens = maxsim_lengths(N, L, low=low, seed=seed)
    return torch.arange(L)[None, :] < lens[:, None]


def _check_against(want: torch.Tensor, dt: str):
    def check(out: Any) -> str:
        err = (out.float() - want.float()).abs().max().item()
        tol = 2e-3 if dt == "fp32" else 0.5  # bf16 einsum rounds every similarity to bf16
        return "ok" if err <= tol * max(1.0, want.abs().max().item()) else f"max err {err:.2e}"

    return check


def run(session: H.Session, *, out_dir: Path, dtypes: Sequence[str] = ("fp32", "bf16")) -> list[H.Result]:
    so = H.import_sparseops()
    from sparseops.integrations import colpali as so_colpali
    from sparseops.integrations import pylate as so_pylate
    from sparseops.nn import maxsim_contrastive_loss
    from sparseops.testing import maxsim_inputs

    pylate = _peer("pylate.scores.colbert", ("pylate.utils",))
    colpali = _peer("colpali_engine.utils.processing_utils", ("colpali_engine",))
    os.environ["COLPALI_SCORES_BACKEND"] = "torch"
    if pylate is not None:
        pl_name, pl_scores = "pylate:colbert_scores(torch)", lambda *a: pylate.colbert_scores(*a, backend="torch")
        pl_grouped = lambda q, d, qm, dm: pylate.ColBERTScores()(q, d, qm, dm, backend="torch")  # noqa: E731
    else:
        pl_name, pl_scores = "pylate-transcribed:einsum", _pylate_scores_einsum

        def pl_grouped(q, d, qm, dm):
            D, N = d.shape[:2]
            return torch.stack([_pylate_scores_einsum(q, d[:, j], qm, dm[:, j]) for j in range(N)], 2).reshape(
                -1, D * N
            )

    cp_name = "colpali:score_multi_vector" if colpali is not None else "colpali-transcribed:einsum"
    cp_smv = (
        (lambda qs, ps: colpali.BaseVisualRetrieverProcessor.score_multi_vector(qs, ps, device="cpu"))
        if colpali is not None
        else _colpali_smv
    )

    dim = 128
    docs = (100,) if session.quick else (100, 1000)
    pages = (32,) if session.quick else (32, 100)
    session.plan(len(dtypes) * (len(docs) + 1 + len(pages) + 1))
    for dt in dtypes:
        dtype = DTYPES[dt]
        # --- re-rank: 1 query against Nd ragged documents (PyLate's rank.rerank call)
        for Nd in docs:
            q, d = maxsim_inputs(1, 32, Nd, 300, dim, dtype=dtype, seed=Nd)
            dm = _ragged_mask(Nd, 300, 50, Nd)
            want = so.maxsim(q.double(), d.double(), d_mask=dm, pylate_mask=True, backend="reference")
            cases = [
                H.Case(pl_name, "baseline", lambda q=q, d=d, dm=dm: pl_scores(q, d, None, dm)),
                H.Case("sparseops:integrations.pylate", "sparseops",
                       lambda q=q, d=d, dm=dm: so_pylate.colbert_scores(q, d, None, dm)),
            ]  # fmt: skip
            for c in cases:
                c.check = _check_against(want, dt)
            session.measure_group(
                cases, family=FAMILY, op="pylate.colbert_scores", shape="1x32 vs Nd x 300 (50-300 real), dim 128",
                params="Lq=32 Ld=300 dim=128 ragged", size=Nd, size_name="Nd", dtype=dt,
                bytes=d.numel() * d.element_size(), flops=2 * 32 * Nd * 300 * dim, headline=True,
            )  # fmt: skip
        # --- in-batch scoring of the contrastive losses
        B, N = 32, 2
        q, d = maxsim_inputs(B, 32, B * N, 180, dim, dtype=dtype, seed=7)
        d4, dm = d.view(B, N, 180, dim), _ragged_mask(B * N, 180, 30, 7).view(B, N, 180)
        want = so.maxsim(q.double(), d.double(), d_mask=dm.view(-1, 180), pylate_mask=True, backend="reference")
        cases = [
            H.Case(pl_name.replace("colbert_scores", "ColBERTScores"), "baseline",
                   lambda q=q, d4=d4, dm=dm: pl_grouped(q, d4, None, dm)),
            H.Case("sparseops:integrations.pylate", "sparseops",
                   lambda q=q, d4=d4, dm=dm: so_pylate.ColBERTScores()(q, d4, None, dm)),
        ]  # fmt: skip
        for c in cases:
            c.check = _check_against(want, dt)
        session.measure_group(
            cases, family=FAMILY, op="pylate.ColBERTScores", shape="32x32 vs 32x2 x 180, dim 128",
            params="B=32 N=2 Lq=32 Ld=180 dim=128", size=B, size_name="B", dtype=dt,
            bytes=d.numel() * d.element_size(), flops=2 * B * 32 * B * N * 180 * dim,
        )  # fmt: skip
        # --- colpali: 4 queries against P pages of 1030 tokens, lists of tensors
        for P in pages:
            qp, _ = maxsim_inputs(4, 24, 1, 1, dim, dtype=dtype, seed=P)
            qs = [qp[i, : 16 + 2 * i].clone() for i in range(4)]
            _, pg = maxsim_inputs(1, 1, P, 1030, dim, dtype=dtype, seed=P + 1)
            ps = [pg[i].clone() for i in range(P)]
            want = _colpali_smv([x.double() for x in qs], [x.double() for x in ps])
            cases = [
                H.Case(cp_name, "baseline", lambda qs=qs, ps=ps: cp_smv(qs, ps)),
                H.Case("sparseops:integrations.colpali", "sparseops",
                       lambda qs=qs, ps=ps: so_colpali.score_multi_vector(qs, ps, device="cpu")),
            ]  # fmt: skip
            for c in cases:
                c.check = _check_against(want, dt)
            session.measure_group(
                cases, family=FAMILY, op="colpali.score_multi_vector", shape="4x(16-22) vs P x 1030 (lists), dim 128",
                params="Lq=16-22 Ld=1030 dim=128", size=P, size_name="P", dtype=dt,
                bytes=sum(x.numel() * x.element_size() for x in ps), flops=2 * 76 * P * 1030 * dim, headline=True,
            )  # fmt: skip
        # --- contrastive loss forward + backward (grad enabled inside the timed call)
        q, d = maxsim_inputs(B, 32, B * N, 180, dim, dtype=dtype, seed=9)
        q = F.normalize(q.float(), dim=-1).to(dtype).requires_grad_(True)
        d4 = F.normalize(d.float(), dim=-1).to(dtype).view(B, N, 180, dim).requires_grad_(True)
        dm = _ragged_mask(B * N, 180, 30, 9).view(B, N, 180)
        labels = torch.arange(B) * N

        def theirs(q=q, d4=d4, dm=dm, labels=labels):
            with torch.inference_mode(False), torch.enable_grad():
                q.grad = d4.grad = None
                loss = F.cross_entropy(pl_grouped(q, d4, None, dm) / 0.05, labels)
                loss.backward()
                return loss.detach()

        def ours(q=q, d4=d4, dm=dm):
            with torch.inference_mode(False), torch.enable_grad():
                q.grad = d4.grad = None
                loss = maxsim_contrastive_loss(q, d4, d_mask=dm, pylate_mask=True, temperature=0.05)
                loss.backward()
                return loss.detach()

        want = theirs() if dt == "fp32" else None
        cases = [
            H.Case(pl_name.replace("colbert_scores", "Contrastive") + " fwd+bwd", "baseline", theirs),
            H.Case("sparseops:maxsim_contrastive_loss fwd+bwd", "sparseops", ours),
        ]
        if want is not None:
            for c in cases:
                c.check = lambda out, want=want: "ok" if abs(float(out) - float(want)) < 1e-4 else f"loss {float(out)}"
        session.measure_group(
            cases, family=FAMILY, op="contrastive loss fwd+bwd", shape="B 32, N 2, 32 x 180, dim 128",
            params="B=32 N=2 Lq=32 Ld=180 dim=128 t=0.05", size=B, size_name="B", dtype=dt,
            bytes=d.numel() * d.element_size(), flops=3 * 2 * B * 32 * B * N * 180 * dim,
        )  # fmt: skip
        session.write_csv(FAMILY, out_dir)
    return session.family_results(FAMILY)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_maxsim_clients", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest size of each problem, short budgets")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, help=H.THREADS_HELP)
    args = p.parse_args(argv)
    session, out_dir = H.open_session(args, torch.device("cpu"))
    results = run(session, out_dir=out_dir, dtypes=args.dtypes)
    for r in results:
        print(
            f"{r.op} {r.dtype} {r.size_name}={r.size} {r.impl}: median {H.fmt_num(r.median_us)} us "
            f"(p20 {H.fmt_num(r.p20_us)}, p80 {H.fmt_num(r.p80_us)}){' NOISY' if r.noisy else ''}, "
            f"{r.speedups} {r.speedup_bands} check {r.check} {r.note}",
            flush=True,
        )
    session.log(f"wrote {out_dir / (FAMILY + '.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
