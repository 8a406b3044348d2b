// CUDA decode / small-T path of moe_mlp: three launches for the whole routed layer, each over
// all T*k (token, expert) slots at once, no routing metadata, no host synchronisation
// (CUDA-graph capturable at fixed T). ids outside [-1, E) on CUDA tensors (which the op layer
// cannot check without a host synchronisation) are treated as dropped: never an
// out-of-bounds read.
//   1. up:      one warp per (slot, output column pair): the dot products of x[t] with the
//               gate and up rows of w13[e] (fp32 accumulation, vectorised loads of the rows),
//               bias, the activation (sparseops/moe.h, shared with the CPU kernel); writes the
//               pre-activation (what the backward reads) and the activation at fp32.
//   2. down:    one warp per (slot, output row of w2[e]): <act(slot), w2[e][h]> + b2, times the
//               routing weight, into a [T*k, H] fp32 slot buffer.
//   3. combine: y[t, h] = sum over the kept slots j in slot order (deterministic, no atomics).
// At decode the layer is a stream of the touched expert weights: every warp reads its rows
// once per slot and the reads of one warp are coalesced. Larger T re-reads each expert's
// rows once per routed token; the grouped-GEMM paths serve that regime.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "sparseops/cuda_reduce.cuh"
#include "sparseops/moe.h"

namespace sparseops {
namespace {

constexpr int kWarps = 8;  // warps per block
constexpr int kLanes = 32;

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ acc_t dot_row(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                         int64_t n, int lane) {
  acc_t acc = 0;
  for (int64_t i = lane; i < n; i += kLanes) acc += acc_t(a[i]) * acc_t(b[i]);
  return warp_sum(acc);
}

struct Strides {
  int64_t w13_e, w13_r, w2_e, w2_r;  // expert and row strides (unit inner stride)
};

// Stage 1: warp w of block b handles slot s = blockIdx.y, column c (one of I columns of the
// activation; for gated activations it reads the gate and up rows of that column).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void moe_up_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w13,
                              const scalar_t* __restrict__ b13, const int32_t* __restrict__ ids,
                              scalar_t* __restrict__ pre, acc_t* __restrict__ act, MoeConfig cfg,
                              Strides st) {
  const int lane = threadIdx.x % kLanes;
  const int64_t slot = blockIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kWarps + threadIdx.x / kLanes;
  if (c >= cfg.inter) return;  // whole warps retire together
  const int e = ids[slot];
  const bool gated = moe_gated(cfg.act);
  const int64_t P = cfg.p, I = cfg.inter;
  const int64_t gi = gated ? (cfg.interleaved ? 2 * c : c) : c;
  const int64_t ui = cfg.interleaved ? 2 * c + 1 : I + c;
  if (e < 0 || e >= cfg.e) {  // dropped slot (or an id out of range): zero pre-activation
    if (lane == 0) {
      pre[slot * P + gi] = scalar_t(0);
      if (gated) pre[slot * P + ui] = scalar_t(0);
      act[slot * I + c] = acc_t(0);
    }
    return;
  }
  const scalar_t* xr = x + (slot / cfg.k) * cfg.h;
  const scalar_t* we = w13 + e * st.w13_e;
  acc_t g = dot_row(xr, we + gi * st.w13_r, cfg.h, lane);
  if (b13) g += acc_t(b13[e * P + gi]);
  // Round through the pre-activation's dtype, as the CPU kernel does.
  g = acc_t(scalar_t(g));
  acc_t a;
  if (gated) {
    acc_t u = dot_row(xr, we + ui * st.w13_r, cfg.h, lane);
    if (b13) u += acc_t(b13[e * P + ui]);
    u = acc_t(scalar_t(u));
    a = act_gated<acc_t>(cfg.act, g, u, acc_t(cfg.alpha), acc_t(cfg.limit));
    if (lane == 0) pre[slot * P + ui] = scalar_t(u);
  } else {
    a = act_plain<acc_t>(cfg.act, g);
  }
  if (lane == 0) {
    pre[slot * P + gi] = scalar_t(g);
    act[slot * I + c] = acc_t(scalar_t(a));
  }
}

// Stage 2: warp per (slot, output row h).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void moe_down_kernel(const acc_t* __restrict__ act, const scalar_t* __restrict__ w2,
                                const scalar_t* __restrict__ b2, const int32_t* __restrict__ ids,
                                const acc_t* __restrict__ weights, acc_t* __restrict__ slot_buf,
                                MoeConfig cfg, Strides st) {
  const int lane = threadIdx.x % kLanes;
  const int64_t slot = blockIdx.y;
  const int64_t h = int64_t(blockIdx.x) * kWarps + threadIdx.x / kLanes;
  if (h >= cfg.h) return;
  const int e = ids[slot];
  if (e < 0 || e >= cfg.e) return;  // never read by the combine
  const acc_t* ar = act + slot * cfg.inter;
  const scalar_t* wr = w2 + e * st.w2_e + h * st.w2_r;
  acc_t acc = 0;
  for (int64_t i = lane; i < cfg.inter; i += kLanes) acc += ar[i] * acc_t(wr[i]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const acc_t o = acc_t(scalar_t(acc)) + (b2 ? acc_t(b2[e * cfg.h + h]) : acc_t(0));
    slot_buf[slot * cfg.h + h] = o * weights[slot];
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void moe_combine_kernel(const acc_t* __restrict__ slot_buf, const int32_t* __restrict__ ids,
                                   scalar_t* __restrict__ y, int64_t T, int64_t K, int64_t H,
                                   int64_t E) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * H) return;
  const int64_t t = i / H, h = i % H;
  acc_t acc = 0;
  for (int64_t j = 0; j < K; ++j)
    if (ids[t * K + j] >= 0 && ids[t * K + j] < E) acc += slot_buf[(t * K + j) * H + h];
  y[i] = scalar_t(acc);
}

}  // namespace

// Contract as moe_mlp_cpu_kernel, on CUDA tensors; w13 / w2 have unit inner stride.
void moe_mlp_cuda_kernel(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                         const at::Tensor& b2, const MoeConfig& cfg, at::Tensor& y,
                         at::Tensor& pre) {
  const int64_t n = cfg.t * cfg.k;
  if (n == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor act = at::empty({n, cfg.inter}, x.options().dtype(acc));
  at::Tensor slot_buf = at::empty({n, cfg.h}, x.options().dtype(acc));
  const Strides st{w13.stride(0), w13.stride(1), w2.stride(0), w2.stride(1)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_mlp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* b13p = cfg.has_b13 ? b13.data_ptr<scalar_t>() : nullptr;
    const scalar_t* b2p = cfg.has_b2 ? b2.data_ptr<scalar_t>() : nullptr;
    const dim3 block(kWarps * kLanes);
    const dim3 up_grid(static_cast<unsigned>((cfg.inter + kWarps - 1) / kWarps), static_cast<unsigned>(n));
    moe_up_kernel<scalar_t><<<up_grid, block, 0, stream>>>(
        x.data_ptr<scalar_t>(), w13.data_ptr<scalar_t>(), b13p, ids.data_ptr<int32_t>(),
        pre.data_ptr<scalar_t>(), act.data_ptr<acc_t>(), cfg, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 down_grid(static_cast<unsigned>((cfg.h + kWarps - 1) / kWarps), static_cast<unsigned>(n));
    moe_down_kernel<scalar_t><<<down_grid, block, 0, stream>>>(
        act.data_ptr<acc_t>(), w2.data_ptr<scalar_t>(), b2p, ids.data_ptr<int32_t>(),
        weights.data_ptr<acc_t>(), slot_buf.data_ptr<acc_t>(), cfg, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = cfg.t * cfg.h;
    moe_combine_kernel<scalar_t><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
        slot_buf.data_ptr<acc_t>(), ids.data_ptr<int32_t>(), y.data_ptr<scalar_t>(), cfg.t, cfg.k,
        cfg.h, cfg.e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace sparseops
