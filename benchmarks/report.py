"""Turn a results folder's CSVs into markdown tables and PNG plots.

    python -m benchmarks.report benchmarks/results/<device-slug>

Reads every ``<family>.csv`` in the folder and (re)writes ``README.md`` plus
``<family>_<op>_<metric>.png`` and ``<family>_speedup_<metric>.png`` beside them. Tables and
plots come only from the CSV, so they are never typed by hand; rerun this after editing
or merging CSVs.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._harness import REPO_ROOT, read_csv

# (column, label): do_bench device time on GPU / perf_counter time on CPU, then the GPU-only
# per-call times with host overhead (eager) and inside a CUDA graph (graph).
METRICS = (
    ("median_us", "median time"),
    ("eager_us", "eager per-call time (host overhead included)"),
    ("graph_us", "CUDA-graph per-call time"),
)
ENV_KEYS = (
    ("device_name", "device"),
    ("device", "results folder"),
    ("torch", "torch"),
    ("triton", "triton"),
    ("cuda", "CUDA"),
    ("python", "python"),
    ("cpu_threads", "CPU threads"),
    ("sparseops", "sparseops"),
    ("git_commit", "git commit"),
    ("date_utc", "date (UTC)"),
    ("load_1m", "load average before the run"),
    ("timer", "timer"),
    ("quick", "quick run"),
    ("copy_gbps", "copy bandwidth, GB/s (read+write)"),
    ("gemm_tflops", "GEMM, TFLOP/s"),
    ("gemm", "GEMM shape"),
    ("tiny_op_us", "tiny op per call, µs"),
    ("tiny_op_graph_us", "tiny op per call in a CUDA graph, µs"),
)


def load_results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """{family: rows} for every CSV in ``folder`` (sorted by family name)."""
    return {p.stem: read_csv(p) for p in sorted(Path(folder).glob("*.csv"))}


def fmt_cell(v: Any) -> str:
    """Table number: whole numbers from 100 up (thousands separated), else 3 significant digits."""
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[fmt_cell(c) for c in row] for row in rows]

    def numeric(i: int) -> bool:
        vals = [row[i] for row in rows if row[i] is not None and row[i] != ""]
        return bool(vals) and all(not isinstance(v, str) or v.endswith("*") for v in vals)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(c or "–" for c in row) + " |" for row in cells]
    return "\n".join(out)


def _ordered(values: Any) -> list:
    return list(dict.fromkeys(values))


def _timed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("median_us")]


def present_metrics(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The metrics with at least one value (only median_us on CPU)."""
    return [(m, label) for m, label in METRICS if any(r.get(m) for r in rows)]


def _impls(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    baselines = _ordered(r["impl"] for r in rows if r["kind"] == "baseline")
    ours = _ordered(r["impl"] for r in rows if r["kind"] == "sparseops")
    return baselines, ours


def _best(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """Fastest sparseops row by ``metric`` (the table marks it when it is noisy).

    ``auto`` counts only when nothing else was timed; rows whose check failed never win.
    The rows of a group were timed interleaved, so a burst of load hit them all alike and
    their medians stay comparable; preferring steady rows instead would crown a slow but
    steady backend (the reference) over a fast one that shared a noisy group. The verdicts
    do not use "best" at all (see ``_subject``).
    """
    ours = [r for r in rows if r["kind"] == "sparseops" and r.get(metric)]
    ours = [r for r in ours if r.get("check") in ("", "ok", None)] or ours
    explicit = [r for r in ours if not r["impl"].endswith(":auto")] or ours
    return min(explicit, key=lambda r: r[metric]) if explicit else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def speedups(row: dict[str, Any]) -> dict[str, float]:
    """{baseline: speedup} from a row's ``speedups`` column (paired ratios on CPU)."""
    out = {}
    for part in filter(None, (row.get("speedups") or "").split(";")):
        name, _, value = part.rpartition("=")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def speedup_bands(row: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{baseline: (p20, p80)} of the per-round speedups, from the ``speedup_bands`` column."""
    out = {}
    for part in filter(None, (row.get("speedup_bands") or "").split(";")):
        name, _, value = part.rpartition("=")
        lo, _, hi = value.partition(":")
        try:
            out[name] = (float(lo), float(hi))
        except ValueError:
            continue
    return out


def _speedup(row: dict[str, Any], base: dict[str, Any] | None, metric: str) -> float | None:
    """``base`` time over ``row`` time: the recorded (paired) ratio for the median, else medians."""
    if base is None:
        return None
    if metric == "median_us" and base["impl"] in speedups(row):
        return speedups(row)[base["impl"]]
    return _ratio(base.get(metric), row.get(metric))


def _mark(v: float | None, row: dict[str, Any] | None) -> Any:
    """A time for a table cell, with '*' when its row is noisy."""
    if v is None or row is None:
        return v
    return f"{fmt_cell(v)}*" if row.get("noisy") else v


NOISY_NOTE = (
    "`*` = noisy: p80/p20 above the spread target after the whole time budget (other processes "
    "were using the CPU). Implementations of one group are timed interleaved, so their medians stay "
    "comparable; the verdicts count a noisy row only "
    "where the per-round ratio band (p20-p80 of the paired ratios) lies wholly on one side of 1."
)


# --------------------------------------------------------------------------- tables


def summary_table(rows: list[dict[str, Any]], metric: str) -> str:
    """Headline rows: baselines, auto, the best sparseops backend, its speedups and × floor."""
    rows = [r for r in _timed(rows) if r["headline"]]
    if not rows or not any(r.get(metric) for r in rows):
        return ""
    baselines, ours = _impls(rows)
    auto = [i for i in ours if i.endswith(":auto")]
    ops = _ordered(r["op"] for r in rows)
    size_name = rows[0]["size_name"]
    headers = (["op"] if len(ops) > 1 else []) + ["shape", "dtype", size_name, "floor µs"]
    headers += [f"{b} µs" for b in baselines] + [f"{a} µs" for a in auto]
    headers += ["best sparseops", "µs", "× floor"] + [f"speedup vs {b}" for b in baselines]
    table = []
    for key in _ordered((r["op"], r["shape"], r["dtype"], r["size"]) for r in rows):
        group = [r for r in rows if (r["op"], r["shape"], r["dtype"], r["size"]) == key]
        by_impl = {r["impl"]: r for r in group}
        best = _best(group, metric)
        line: list[Any] = [key[0]] if len(ops) > 1 else []
        line += [key[1], key[2], key[3], group[0]["floor_us"]]
        line += [_mark(by_impl.get(b, {}).get(metric), by_impl.get(b)) for b in baselines + auto]
        if best is None:
            line += ["", None, None] + [None] * len(baselines)
        else:
            name = best["impl"].split(":", 1)[-1]
            if best.get("check") not in ("", "ok", None):
                name += " (CHECK FAILED)"  # a fast wrong answer is not a result
            elif best.get("noisy"):
                name += " (noisy)"
            line += [name, _mark(best[metric], best), _ratio(best[metric], best["floor_us"])]
            line += [_speedup(best, by_impl.get(b), metric) for b in baselines]
        table.append(line)
    return md_table(headers, table)


def detail_tables(rows: list[dict[str, Any]], metric: str) -> str:
    """One table per (op, shape, dtype): every implementation's ``metric`` against size."""
    rows = _timed(rows)
    parts = []
    for op in _ordered(r["op"] for r in rows):
        for shape, dtype in _ordered((r["shape"], r["dtype"]) for r in rows if r["op"] == op):
            group = [r for r in rows if (r["op"], r["shape"], r["dtype"]) == (op, shape, dtype)]
            if not any(r.get(metric) for r in group):
                continue
            baselines, ours = _impls(group)
            impls = baselines + ours
            size_name = group[0]["size_name"]
            table = []
            for size in _ordered(r["size"] for r in group):
                by_impl = {r["impl"]: r for r in group if r["size"] == size}
                floor = next(iter(by_impl.values()))["floor_us"]
                table.append([size, floor] + [_mark(by_impl.get(i, {}).get(metric), by_impl.get(i)) for i in impls])
            parts.append(f"**{op} — {shape} ({group[0]['params']}), {dtype}**, µs\n")
            parts.append(md_table([size_name, "floor"] + impls, table) + "\n")
    return "\n".join(parts)


def _problems(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        where = f"{r['op']} {r['shape']} {r['size_name']}={r['size']} {r['dtype']} {r['impl']}"
        if not r.get("median_us"):
            lines.append(f"- {where}: {r.get('note') or 'no time'}")
        elif r.get("check") not in ("", "ok", None):
            lines.append(f"- **{where}: check failed: {r['check']}**")
        elif "graph capture failed" in (r.get("note") or ""):
            lines.append(f"- {where}: {r['note']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- verdicts

# The bound for the per-call "after" build against the "before" one (percall family).
PERCALL_LIMIT = 1.2


def _subject(group: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sparseops row a verdict judges: ``auto`` (what a user's call runs) when timed.

    Not the fastest backend: picking the minimum of several measurements favours whichever
    was lucky. Else the only sparseops row, else the best steady one.
    """
    ours = [r for r in group if r["kind"] == "sparseops" and r.get("median_us")]
    auto = [r for r in ours if r["impl"].endswith(":auto")]
    if auto:
        return auto[0]
    return ours[0] if len(ours) == 1 else _best(group, "median_us")


def _where(r: dict[str, Any], with_op: bool = False) -> str:
    return (f"{r['op']} " if with_op else "") + f"{r['shape']} {r['size_name']}={r['size']} {r['dtype']}"


def family_verdict(family: str, rows: list[dict[str, Any]]) -> list[str]:
    """A few lines: per baseline, at how many steady shapes sparseops is faster, the worst
    ratio, the noisy shapes left out; then how far from the byte floor the largest sizes are."""
    head = [r for r in _timed(rows) if r["headline"]]
    if not head:
        return [f"{family}: nothing timed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in head:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["size"]), []).append(r)
    subjects = {key: _subject(g) for key, g in groups.items()}
    names = _ordered(s["impl"] for s in subjects.values() if s)
    ops = _ordered(r["op"] for r in head)
    lines = [f"{family} ({'/'.join(ops)}; judged: {', '.join(names)}; ratio = baseline / sparseops, >1 = faster):"]
    baselines, _ = _impls(head)
    for b in baselines:
        faster, slower, unsure, ratios, from_noisy = [], [], [], [], 0
        for key, group in groups.items():
            subj = subjects[key]
            base = next((r for r in group if r["impl"] == b), None)
            ratio = _speedup(subj, base, "median_us") if subj and base else None
            if ratio is None:
                continue
            ratios.append((ratio, subj))
            noisy = bool(subj.get("noisy") or base.get("noisy"))
            band = speedup_bands(subj).get(b)
            # Decided by the per-round ratio band when there is one: p20 > 1 means sparseops
            # won at least 80 % of the paired rounds, however noisy the times were. Without a
            # band (old CSVs) only steady rows decide.
            if band is not None:
                verdict = "faster" if band[0] > 1 else "slower" if band[1] < 1 else "unsure"
            else:
                verdict = "unsure" if noisy else "faster" if ratio > 1 else "slower"
            if verdict != "unsure" and noisy:
                from_noisy += 1
            {"faster": faster, "slower": slower, "unsure": unsure}[verdict].append((ratio, subj))
        if not ratios:
            continue
        worst = min(ratios, key=lambda t: t[0])
        text = f"  vs {b}: faster at {len(faster)} of {len(ratios)} cases, slower at {len(slower)}"
        if unsure:
            text += f", undecided at {len(unsure)} (ratio band straddles 1)"
        text += f"; worst {worst[0]:.2f}x ({_where(worst[1], len(ops) > 1)}), best {max(x for x, _ in ratios):.3g}x"
        if from_noisy:
            text += f"; {from_noisy} decided from noisy rows by the per-round ratio band"
        if b.startswith("before") and family == "percall":
            over = [x for x, _ in ratios if 1 / x > PERCALL_LIMIT]
            text += f"; after/before <= {PERCALL_LIMIT:g} at {len(ratios) - len(over)} of {len(ratios)}"
        lines.append(text)
    # Distance to the byte floor where it means something: the largest size of each shape
    # (decode sizes sit on host overhead, thousands of times above a sub-microsecond floor).
    far = []
    for shape in _ordered(k[1] for k in groups):
        for dtype in _ordered(k[2] for k in groups if k[1] == shape):
            keys = [k for k in groups if k[1] == shape and k[2] == dtype and subjects[k]]
            if not keys:
                continue
            key = max(keys, key=lambda k: k[3])
            subj = subjects[key]
            if subj.get("x_floor"):
                far.append(f"{shape} {dtype} {subj['size_name']}={key[3]}: {subj['x_floor']:.3g}x"
                           + ("*" if subj.get("noisy") else ""))  # fmt: skip
    if far:
        lines.append("  byte floor (largest size per shape): " + ", ".join(far))
    n_noisy = sum(1 for r in head if r.get("noisy"))
    if n_noisy:
        load = head[0].get("load_1m") or "?"
        lines.append(
            f"  {n_noisy} of {len(head)} headline rows noisy (load average {load} before the run): their "
            "times are uncertain; rerun on a quieter machine for steady numbers"
        )
    return lines


def verdict_text(folder: Path) -> str:
    """Every family's verdict lines (see ``family_verdict``), then the per-call line."""
    out = []
    for family, rows in load_results(Path(folder)).items():
        if rows:
            out.extend(family_verdict(family, rows))
    out.extend(percall_verdict(Path(folder)))
    return "\n".join(out)


# --------------------------------------------------------------------------- per-call JSON


def load_percall(folder: Path) -> list[dict[str, Any]]:
    """Rows of ``percall.json`` (pytest-benchmark): op, shape, T, mode, median/IQR/min µs, rounds."""
    import json

    path = Path(folder) / "percall.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        info, st = b.get("extra_info", {}), b.get("stats", {})
        rows.append({
            "op": info.get("op", b.get("name")), "shape": info.get("shape", ""), "E": info.get("E"),
            "k": info.get("k"), "T": info.get("T"), "mode": info.get("mode", ""), "backend": info.get("backend", ""),
            "median_us": st.get("median", 0) * 1e6, "iqr_us": st.get("iqr", 0) * 1e6,
            "min_us": st.get("min", 0) * 1e6, "rounds": st.get("rounds", 0),
            "date": data.get("datetime", ""), "commit": (data.get("commit_info") or {}).get("id", "")[:12],
        })  # fmt: skip
    return rows


def percall_table(folder: Path) -> str:
    """Markdown table of ``percall.json``: per-call medians, and as multiples of torch.mul."""
    rows = load_percall(folder)
    if not rows:
        return ""
    mul = {r["mode"]: r["median_us"] for r in rows if r["op"] == "torch.mul"}
    table = []
    for r in sorted(rows, key=lambda r: (r["mode"], r["op"] == "torch.mul", r["op"], r["E"] or 0, r["T"] or 0)):
        yard = mul.get(r["mode"])
        table.append([
            r["mode"], r["op"], f"E={r['E']} k={r['k']}" if r["E"] else "16 elements", r["T"] or 0,
            r["backend"] or "–", r["median_us"], r["iqr_us"], r["min_us"],
            _ratio(r["median_us"], yard), r["rounds"],
        ])  # fmt: skip
    headers = ["mode", "op", "shape", "T", "backend", "median µs", "IQR µs", "min µs", "× torch.mul", "rounds"]
    return md_table(headers, table)


def percall_text(folder: Path) -> str:
    """The per-call table for printing (empty without percall.json)."""
    table = percall_table(folder)
    return f"per-call (pytest-benchmark, host overhead at tiny sizes)\n{table}" if table else ""


def percall_verdict(folder: Path) -> list[str]:
    """One line per mode: the per-call medians at T=1 next to torch.mul's."""
    rows = load_percall(folder)
    out = []
    for mode in _ordered(r["mode"] for r in rows):
        mul = next((r["median_us"] for r in rows if r["mode"] == mode and r["op"] == "torch.mul"), None)
        parts = [
            f"{r['op']} {r['median_us']:.2f}"
            for r in rows
            if r["mode"] == mode and r["T"] == 1 and r["E"] == 8 and r["op"] != "torch.mul"
        ]
        if parts:
            yard = f" (torch.mul {mul:.2f} µs)" if mul else ""
            out.append(f"per-call, T=1 E=8, {mode}: " + ", ".join(parts) + f" µs{yard}")
    return out


# --------------------------------------------------------------------------- plots


def _plot_grid(rows: list[dict[str, Any]], path: Path, title: str, series: dict[str, Any], ylabel: str) -> Path:
    """Log-log axes, one per (dtype row, shape column).

    ``series`` maps a legend label to (fn(rows of one cell) -> [(x, y)] or [(x, y, noisy)],
    matplotlib style[, band fn(rows) -> [(x, low, high)]]). Bands are drawn shaded in the
    series' colour (the p20-p80 range); noisy points are drawn hollow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shapes = _ordered(r["shape"] for r in rows)
    dtypes = _ordered(r["dtype"] for r in rows)
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(4.2 * len(shapes), 3.4 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            cell = [r for r in rows if r["dtype"] == dtype and r["shape"] == shape]
            for label, (fn, style, *band) in series.items():
                pts = sorted(fn(cell))
                if pts:
                    # A fixed colour per series: panels lacking a series must not shift the rest.
                    color = "k" if style.startswith("k") else colors[list(series).index(label) % len(colors)]
                    ax.plot(
                        [p[0] for p in pts], [p[1] for p in pts], style.lstrip("k"),
                        color=color, label=label, markersize=4,
                    )  # fmt: skip
                    noisy = [p for p in pts if len(p) > 2 and p[2]]
                    if noisy:
                        ax.plot([p[0] for p in noisy], [p[1] for p in noisy], "o", color=color,
                                markerfacecolor="white", markersize=6, zorder=3)  # fmt: skip
                    spans = sorted(band[0](cell)) if band else []
                    if spans:
                        ax.fill_between([b[0] for b in spans], [b[1] for b in spans], [b[2] for b in spans],
                                        color=color, alpha=0.18, linewidth=0)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sizes = sorted({r["size"] for r in cell})
            ax.xaxis.set_minor_locator(NullLocator())  # label the measured sizes only
            ax.set_xticks(sizes, [str(x) for x in sizes], fontsize=7)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            # Minor labels only when the axis spans less than ~1.3 decades (else they crowd).
            ax.yaxis.set_minor_formatter(
                FuncFormatter(lambda v, _, ax=ax: f"{v:g}" if ax.get_ylim()[1] < 20 * ax.get_ylim()[0] else "")
            )
            ax.set_title(f"{shape}, {dtype}", fontsize=9)
            ax.set_xlabel(cell[0]["size_name"] if cell else "")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title + "\nshaded: p20-p80; hollow markers: noisy (p80/p20 above target)", fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 4), 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_family(family: str, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """Time-vs-size plots per (op, metric) and a speedup plot for the headline rows."""
    rows = _timed(rows)
    paths = []
    device = rows[0].get("device_name", "") if rows else ""
    for metric, label in present_metrics(rows):
        for op in _ordered(r["op"] for r in rows):
            op_rows = [r for r in rows if r["op"] == op and r.get(metric)]
            if not op_rows:
                continue
            baselines, ours = _impls(op_rows)
            series: dict[str, Any] = {}
            for impl in baselines + ours:
                # Baselines dashed; auto thin over the backend it picks, so both stay visible.
                style = "--o" if impl in baselines else "-.^" if impl.endswith(":auto") else "-s"
                series[impl] = (
                    lambda cell, impl=impl, m=metric: [
                        (r["size"], r[m], r.get("noisy")) for r in cell if r["impl"] == impl
                    ],
                    style,
                    # The p20-p80 band exists for the median only (eager/graph are batch means).
                    lambda cell, impl=impl, m=metric: [
                        (r["size"], r["p20_us"], r["p80_us"])
                        for r in cell
                        if r["impl"] == impl and m == "median_us" and r.get("p20_us") and r.get("p80_us")
                    ],
                )
            series["floor"] = (lambda cell: sorted({(r["size"], r["floor_us"]) for r in cell}), "k:")
            # Op labels may hold spaces and colons ("nm_linear 2:4"): not in file names (a colon
            # cannot be checked out on Windows).
            safe_op = "".join(c if c.isalnum() or c in "_.-" else "-" for c in op)
            path = folder / f"{family}_{safe_op}_{metric.removesuffix('_us')}.png"
            paths.append(_plot_grid(op_rows, path, f"{family} {op}: {label} — {device}", series, "µs"))

        head = [r for r in rows if r["headline"] and r.get(metric)]
        baselines, _ = _impls(head)
        if head and baselines:
            series = {}
            for b in baselines:

                def speedup(cell: list[dict[str, Any]], b: str = b, metric: str = metric) -> list[tuple[int, float]]:
                    pts = []
                    for size in _ordered(r["size"] for r in cell):
                        group = [r for r in cell if r["size"] == size]
                        best = _best(group, metric)
                        base = next((r for r in group if r["impl"] == b and r.get(metric)), None)
                        ratio = _speedup(best, base, metric) if best else None
                        if ratio:
                            pts.append((size, ratio, bool(best.get("noisy") or base.get("noisy"))))
                    return pts

                def band(cell: list[dict[str, Any]], b: str = b, metric: str = metric) -> list[tuple]:
                    out = []
                    for size in _ordered(r["size"] for r in cell):
                        best = _best([r for r in cell if r["size"] == size], metric)
                        lo_hi = speedup_bands(best).get(b) if best and metric == "median_us" else None
                        if lo_hi:
                            out.append((size, *lo_hi))
                    return out

                series[f"best sparseops vs {b}"] = (speedup, "-o", band)
            series["1x"] = (lambda cell: [(r["size"], 1.0) for r in cell], "k:")
            path = folder / f"{family}_speedup_{metric.removesuffix('_us')}.png"
            title = f"{family} headline speedup ({label}) — {device}"
            paths.append(_plot_grid(head, path, title, series, "speedup"))
    return paths


# --------------------------------------------------------------------------- report


def env_table(rows: list[dict[str, Any]]) -> str:
    """Environment and ceilings of a CSV (taken from its first row)."""
    first = rows[0]
    return md_table(["", ""], [[label, str(first.get(key) or "–")] for key, label in ENV_KEYS])


def family_section(family: str, rows: list[dict[str, Any]], folder: Path, plots: bool = True) -> str:
    """Markdown for one family: environment, headline summary, plots, detail tables, problems."""
    parts = [f"## {family}\n", env_table(rows) + "\n"]
    if _timed(rows):
        parts.append("### Verdict\n")
        parts.append("```\n" + "\n".join(family_verdict(family, rows)) + "\n```\n")
    metrics = present_metrics(_timed(rows))
    for metric, label in metrics:
        table = summary_table(rows, metric)
        if table:
            parts.append(f"### Headline — {label}\n")
            parts.append(
                "Speedup = baseline time / best sparseops time (on CPU the median of per-round "
                "ratios of interleaved calls); × floor = time / max(bytes / copy bandwidth, flops / "
                "GEMM peak). Best = fastest sparseops backend of the group (auto aside). " + NOISY_NOTE + "\n"
            )
            parts.append(table + "\n")
    if plots and _timed(rows):
        for path in plot_family(family, rows, folder):
            parts.append(f"![{path.stem}]({path.name})\n")
    for metric, label in metrics:
        parts.append(f"### All measurements — {label}\n")
        parts.append(NOISY_NOTE + "\n")
        parts.append(detail_tables(rows, metric))
    problems = _problems(rows)
    if problems:
        parts.append("### Skipped, failed checks, uncapturable\n")
        parts.append(problems + "\n")
    return "\n".join(parts)


def write_report(folder: Path) -> Path:
    """Regenerate ``folder/README.md`` and the PNGs from the CSVs in ``folder``."""
    folder = Path(folder)
    families = load_results(folder)
    device = next((rows[0].get("device_name", "") for rows in families.values() if rows), "")
    parts = [
        f"# sparseops benchmarks — {device}\n",
        "Generated by `python -m benchmarks.report " + _display(folder) + "` from the CSV files in "
        "this folder. Do not edit by hand: edit or rerun the benchmarks and regenerate.\n",
    ]
    for family, rows in families.items():
        if rows:
            parts.append(family_section(family, rows, folder))
    table = percall_table(folder)
    if table:
        parts.append("## per-call micro-benchmarks (pytest-benchmark)\n")
        parts.append(
            "From `percall.json` (`python -m pytest benchmarks/test_percall.py --benchmark-json=...`): "
            "host overhead of one call at tiny sizes; `inference` = under `torch.inference_mode()`, "
            "`plain` = autograd enabled, no input requires grad; × torch.mul = multiples of one tiny "
            "ATen call's cost in the same run.\n"
        )
        parts.append(table + "\n")
    path = folder / "README.md"
    path.write_text("\n".join(parts))
    return path


def summary_text(folder: Path) -> str:
    """The headline tables of every family in ``folder``, for printing at the end of a run."""
    out = []
    for family, rows in load_results(Path(folder)).items():
        for metric, label in present_metrics(_timed(rows)):
            table = summary_table(rows, metric)
            if table:
                out.append(f"\n{family} — {label} (µs; speedup = baseline / best sparseops)\n{table}")
        problems = _problems(rows)
        if problems:
            out.append(f"\n{family}: skipped / failed checks / uncapturable\n{problems}")
    return "\n".join(out)


def _display(folder: Path) -> str:
    """The folder as the command line to regenerate it shows it: relative to the repo root
    (so README.md does not change with the directory the report was run from)."""
    try:
        return str(folder.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return folder.name


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: regenerate the report of one or more results folders."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="results folders: benchmarks/results/<device-slug>")
    args = p.parse_args(argv)
    for folder in args.folders:
        if not any(folder.glob("*.csv")):
            p.error(f"{folder}: no CSV files")
        print(f"wrote {write_report(folder)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
