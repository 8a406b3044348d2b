"""Compile the grouped-GEMM / MoE Triton kernels for sm_90 without a GPU and report, per
kernel variant, registers per thread, local-memory stack (spills), shared memory, and whether
the weights come through TMA (cp.async.bulk.tensor), the MMAs are wgmma and the K loop is
software-pipelined (async copies in the TTGIR).

    python scripts/compile_triton_sm90.py

It runs triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) and cuobjdump's
resource usage on the cubin (both ship with the triton wheel). Integer arguments are
specialised the way the JIT launcher specialises them at run time: strides equal to 1 become
constants (so loads are known contiguous and vectorise: without this the pointer loads are
neither vectorised nor pipelined), sizes and strides that are multiples of 16 carry the
divisibility hint, pointers are 16-byte aligned. The variants are the tile table's
(kernels/grouped_mm.py ``tile_config``) at the standard MoE shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.grouped_mm as gm  # noqa: E402
import kernels.moe as mo  # noqa: E402

F32 = tl.float32


def compile_one(label, fn, ptrs, consts, num_warps, num_stages, *, div16=(), ones=()):
    consts = dict(consts, **{o: 1 for o in ones})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    try:
        k = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
        )
    except Exception as exc:  # noqa: BLE001 - reported, the others go on
        print(f"{label:48s} COMPILE FAILED: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        return False
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    fields = dict(w.split(":") for line in usage.splitlines() if "REG:" in line for w in line.split() if ":" in w)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    feats = [
        name for name, key in (("tma", "cp.async.bulk.tensor"), ("wgmma", "wgmma"), ("mma", "mma.sync")) if key in ptx
    ]
    pipelined = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local")
    print(
        f"{label:48s} regs {fields.get('REG', '?'):>3}  spill-stack {fields.get('STACK', '?'):>4} B  "
        f"smem {k.metadata.shared // 1024:>3} KB  {'+'.join(feats) or 'fma'}  async copies {pipelined}",
        flush=True,
    )
    return fields.get("STACK") == "0"


def main() -> int:
    ok = True
    # ragged-M (grouped_mm 2D x 3D, the MoE down projection and dx): bf16 table rows, fp32, fp64.
    P = dict(
        a_ptr="bf16",
        b_ptr="bf16",
        out_ptr="bf16",
        bias_ptr="bf16",
        scale_ptr="fp32",
        offs_ptr="i32",
        gidx_ptr="i32",
        sidx_ptr="i32",
    )
    div = ("S", "NB", "K", "s_am", "s_bg", "s_bn", "s_bk", "s_om", "d1", "d2", "d3", "ds0", "ds1", "ds2", "s_biasg")
    base = dict(A_GATHER=False, BIAS=1, SCALE=True, ZERO_TAIL=False, DOT=0, ACC=F32, K_FOR=True, BLOCK_G=256)
    for bm, bn, bk, w, st, gmode, mode in [
        (16, 64, 128, 4, 4, 1, 1),
        (32, 64, 128, 4, 4, 1, 1),
        (64, 128, 64, 4, 4, 1, 1),
        (128, 128, 64, 8, 4, 1, 1),
        (128, 256, 64, 8, 3, 8, 1),
        (128, 256, 64, 8, 3, 8, 3),
        (128, 128, 64, 8, 4, 1, 0),
    ]:
        c = dict(base, B_DESC=mode, STAGES=st, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gmode)
        ones = ("s_ak", "s_on", "s_bk") if mode in (0, 1) else ("s_ak", "s_on", "s_bn")
        ok &= compile_one(
            f"ragged_m bf16 {bm}x{bn}x{bk} b_mode {mode}", gm._ragged_m_kernel, P, c, w, st, div16=div, ones=ones
        )
    p32 = {k: ("fp32" if v == "bf16" else v) for k, v in P.items()}
    c = dict(base, B_DESC=1, DOT=1, STAGES=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=1)
    ok &= compile_one(
        "ragged_m fp32 ieee 64x64x16", gm._ragged_m_kernel, p32, c, 8, 3, div16=div, ones=("s_ak", "s_on", "s_bk")
    )
    p64 = {k: ("fp64" if v == "bf16" else v) for k, v in P.items()}
    c = dict(base, B_DESC=0, DOT=2, ACC=tl.float64, STAGES=2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=8, GROUP_M=1)
    ok &= compile_one(
        "ragged_m fp64 32x32x8", gm._ragged_m_kernel, p64, c, 4, 2, div16=div, ones=("s_ak", "s_on", "s_bk")
    )
    # ragged-K (grouped_mm 2D x 2D, the MoE weight gradients with their gathers and row sums).
    PK = dict(
        a_ptr="bf16",
        b_ptr="bf16",
        out_ptr="bf16",
        bias_ptr="bf16",
        offs_ptr="i32",
        aidx_ptr="i32",
        bidx_ptr="i32",
        rs_ptr="bf16",
        rscale_ptr="fp32",
    )
    dk = ("M", "N", "K", "s_ag", "s_am", "s_ak", "s_bg", "s_bk", "s_bn", "s_og", "s_om", "s_on")
    bk = dict(
        RAGGED=True, BIAS=False, DOT=0, ACC=F32, K_FOR=True, STAGES=4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=1
    )
    for label, extra in [
        ("ragged_k dW2: A gathered, scaled row sum", dict(A_GATHER=True, B_GATHER=False, ROWSUM=2)),
        ("ragged_k dW13: B gathered, row sum", dict(A_GATHER=False, B_GATHER=True, ROWSUM=1)),
        ("ragged_k grouped_mm 2d2d + bias", dict(A_GATHER=False, B_GATHER=False, ROWSUM=0, BIAS=True)),
    ]:
        ok &= compile_one(
            label, gm._ragged_k_kernel, PK, dict(bk, **extra), 8, 4, div16=dk, ones=("s_am", "s_bn", "s_on")
        )
    # MoE GEMM-1 (gather, two accumulators, bias + activation epilogue).
    PU = dict(
        x_ptr="bf16",
        w_ptr="bf16",
        b13_ptr="bf16",
        pre_ptr="bf16",
        h_ptr="bf16",
        offs_ptr="i32",
        tok_ptr="i32",
        slot_ptr="i32",
    )
    du = ("S", "INTER", "H", "P", "s_xm", "s_bg", "s_bpart", "s_bn", "d1", "d2", "d3", "ds0", "ds1", "ds2", "up_off")
    bu = dict(GATED=True, HAS_BIAS=True, DOT=0, ACC=F32, K_FOR=True, BLOCK_G=128, BLOCK_K=64)
    for label, bm, bn, w, st, gmode, mode, act, colm in [
        ("moe_up swiglu concat 128x64(x2)", 128, 64, 8, 4, 8, 1, 0, 1),
        ("moe_up swiglu concat 64x64(x2)", 64, 64, 4, 4, 1, 1, 0, 1),
        ("moe_up swiglu_oai interleaved 128x64(x2)", 128, 64, 8, 4, 8, 2, 4, 2),
        ("moe_up geglu_tanh concat 16x64(x2) decode", 16, 64, 4, 4, 1, 1, 2, 1),
    ]:
        c = dict(bu, ACT=act, COLM=colm, B_DESC=mode, STAGES=st, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gmode)
        ok &= compile_one(label, mo._moe_up_kernel, PU, c, w, st, div16=du, ones=("s_bk",))
    # MoE backward dH (gather, activation backward + routing-weight partials in the epilogue).
    PD = dict(
        dy_ptr="bf16",
        w_ptr="bf16",
        pre_ptr="bf16",
        wt_ptr="fp32",
        offs_ptr="i32",
        tok_ptr="i32",
        slot_ptr="i32",
        dz_ptr="bf16",
        hw_ptr="bf16",
        part_ptr="fp32",
        ws_ptr="fp32",
    )
    dd = ("S", "INTER", "H", "P", "s_dym", "s_bg", "s_bk", "d1", "d2", "d3", "ds0", "ds1", "ds2", "up_off")
    bd = dict(COLM=1, DOT=0, ACC=F32, K_FOR=True, BLOCK_G=128, B_DESC=3, STAGES=4, BLOCK_K=64, GROUP_M=1)
    for label, act, gated, bm, w in [
        ("moe_dh swiglu 128x32", 0, True, 128, 8),
        ("moe_dh swiglu_oai 128x32", 4, True, 128, 8),
        ("moe_dh geglu_tanh 128x32", 2, True, 128, 8),
        ("moe_dh gelu 64x32", 6, False, 64, 4),
    ]:
        c = dict(bd, ACT=act, GATED=gated, BLOCK_M=bm, BLOCK_N=32)
        ok &= compile_one(label, mo._moe_dh_kernel, PD, c, w, 4, div16=dd, ones=("s_bn",))
    PC = dict(buf_ptr="bf16", inv_ptr="i32", ids_ptr="i32", y_ptr="bf16")
    ok &= compile_one(
        "moe combine k=8", mo._moe_combine_kernel, PC, dict(KTOP=8, ACC=F32, BLOCK_T=4, BLOCK_H=512), 4, 1, div16=("H",)
    )
    PW = dict(part_ptr="fp32", inv_ptr="i32", ids_ptr="i32", dy_ptr="bf16", b2_ptr="bf16", dw_ptr="fp32")
    ok &= compile_one(
        "moe dweights",
        mo._moe_dweights_kernel,
        PW,
        dict(KTOP=8, HAS_B2=True, ACC=F32, BLOCK_S=32, BLOCK_P=32, BLOCK_H=128),
        4,
        1,
        div16=("H",),
    )
    print("all compiled without spills" if ok else "SOME VARIANTS FAILED OR SPILL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
