"""Probe of the C++ CPU routing kernels against the torch composites (interleaved runs).

    python benchmarks/cpu_routing_probe.py [--threads 2] [--dtypes fp32,bf16] [--T 1,16,...]

For each router (Mixtral 8/2, Qwen3-30B-A3B 128/8, DeepSeek-V3 256/8 grouped) and T it times,
in alternation, the torch composite (softmax -> topk -> renormalise; DeepSeek as vLLM's
plain-torch grouped_topk), sparseops.topk_route(backend="cpu"), the composite pair
(composite + argsort/bincount/cumsum metadata) and sparseops.route(backend="cpu"), and prints
medians and ratios. The floor of the pair is its bytes (logits read, weights/ids written,
metadata written) over the copy bandwidth of a large preallocated torch copy_ in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sparseops
from sparseops.testing import router_logits

ROUTERS = {
    "mixtral": dict(E=8, k=2, kw={}),
    "qwen3": dict(E=128, k=8, kw={}),
    "deepseek": dict(E=256, k=8, kw=dict(scoring="sigmoid", n_group=8, topk_group=4, scale=2.5)),
}


def composite(x, E, k, kw, bias):
    if "n_group" in kw:
        T = x.shape[0]
        G, tg = kw["n_group"], kw["topk_group"]
        scores = x.float().sigmoid()
        s = scores + bias
        group_scores = s.view(T, G, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_scores.topk(tg, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        tmp = s.masked_fill(~score_mask.bool(), float("-inf"))
        ids = tmp.topk(k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * kw["scale"], ids
    p = torch.softmax(x, dim=-1, dtype=torch.float32)
    w, ids = p.topk(k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


def composite_meta(ids, E):
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0)
    return order, counts, offs


def interleaved(fns, reps, min_time=0.15):
    times = [[] for _ in fns]
    for f in fns:
        f()
    t_end = time.perf_counter() + min_time * len(fns)
    r = 0
    while r < reps or time.perf_counter() < t_end:
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
        r += 1
        if r > 20000:
            break
    return [statistics.median(t) for t in times]


def copy_bandwidth():
    a = torch.empty(64 * 2**20, dtype=torch.float32)
    a.uniform_()
    b = torch.empty_like(a)
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--T", default="1,16,128,1024,4096,16384")
    ap.add_argument("--routers", default="mixtral,qwen3,deepseek")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = copy_bandwidth()
    print(f"load {os.getloadavg()[0]:.2f}  threads {args.threads}  copy {bw / 1e9:.1f} GB/s")
    print(f"{'router':9s} {'dtype':5s} {'T':>6s} {'comp us':>9s} {'ours us':>9s} {'ratio':>6s} "
          f"{'pair us':>9s} {'cpair':>6s} {'xfloor':>6s}")
    for name in args.routers.split(","):
        r = ROUTERS[name]
        E, k, kw = r["E"], r["k"], dict(r["kw"])
        bias = 0.1 * torch.randn(E) if "n_group" in kw else None
        if bias is not None:
            kw["bias"] = bias
        for dt in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
            for T in [int(t) for t in args.T.split(",")]:
                x = router_logits(T, E, dtype=dtype, seed=T)
                ckw = {kk: v for kk, v in kw.items() if kk != "bias"}
                t_comp, t_ours, t_cpair, t_pair = interleaved(
                    [
                        lambda: composite(x, E, k, ckw, bias),
                        lambda: sparseops.topk_route(x, k, backend="cpu", **kw),
                        lambda: composite_meta(composite(x, E, k, ckw, bias)[1], E),
                        lambda: sparseops.route(x, k, backend="cpu", **kw),
                    ],
                    args.reps,
                )
                n = T * k
                nbytes = x.numel() * x.element_size() + n * 8 + 3 * n * 4 + 2 * E * 4
                floor = nbytes / bw
                print(f"{name:9s} {dt:5s} {T:6d} {t_comp * 1e6:9.1f} {t_ours * 1e6:9.1f} "
                      f"{t_ours / t_comp:6.3f} {t_pair * 1e6:9.1f} {t_pair / t_cpair:6.3f} {t_pair / floor:6.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
