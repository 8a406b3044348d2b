// Warp- and block-level reductions and scans shared by the CUDA kernels of every family
// (routing, grouped GEMM, MaxSim). Device-only: include from .cu files.
//
// Conventions:
//   * Warp functions must be called by all 32 lanes of a warp (they use kFullWarpMask);
//     a kernel that retires lanes early must retire whole warps.
//   * Every lane gets the same result from the reductions (butterfly shuffles), so results
//     can steer uniform control flow without another broadcast.
//   * Block functions must be called by every thread of the block, blockDim.x a multiple of
//     32 and at most 1024, from code every thread reaches (they contain __syncthreads).
//   * Ordering ties: warp_argmax keeps the lowest index among equal values, with the rule
//     of sparseops::ranks_before (ranking.h), the one every backend uses.
// Only CUDA built-ins are used: no ATen or CUB headers, so the header is cheap to include.
#pragma once

#include <cuda_runtime.h>

#include "sparseops/ranking.h"

namespace sparseops {

constexpr int kWarpSize = 32;
// Lane mask of a full warp, for the *_sync intrinsics.
constexpr unsigned kFullWarpMask = 0xffffffffu;
// Scratch elements block_inclusive_scan / block_exclusive_scan need in shared memory: one
// per warp (at most 32) plus the block total.
constexpr int kBlockScanScratch = kWarpSize + 1;

// max that ignores a NaN operand (fmax semantics) for floating types, so a butterfly gives
// every lane the same value even when some lanes hold NaN; plain max for integers.
__device__ __forceinline__ float nan_ignoring_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double nan_ignoring_max(double a, double b) { return fmax(a, b); }
template <typename T>
__device__ __forceinline__ T nan_ignoring_max(T a, T b) {
  return a < b ? b : a;
}

// Max over the warp, NaNs ignored (a warp of NaNs gives NaN).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = nan_ignoring_max(v, __shfl_xor_sync(kFullWarpMask, v, offset));
  }
  return v;
}

// Sum over the warp. Butterfly order: a + b == b + a bitwise, so every lane ends with the
// identical total (a tree order, not the sequential one: floating sums differ from a
// serial loop by rounding).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

// In place, every lane ends with the warp's best (value, index): the largest value, the
// lowest index among equal values. Values must not be NaN (map NaN to -inf first) so that
// ranks_before is a strict total order on distinct indices and all lanes agree. A lane
// with nothing to offer passes -inf and a sentinel index larger than every real one, so
// any real entry, even one valued -inf, beats it.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& value, int& index) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other_value = __shfl_xor_sync(kFullWarpMask, value, offset);
    const int other_index = __shfl_xor_sync(kFullWarpMask, index, offset);
    if (ranks_before(other_value, other_index, value, index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// Inclusive prefix sum over the lanes of a warp: lane l gets v[0] + ... + v[l].
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T up = __shfl_up_sync(kFullWarpMask, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Exclusive prefix sum over the lanes of a warp: lane l gets v[0] + ... + v[l-1] (0 on
// lane 0). For integers; a floating exclusive scan would round differently from this
// inclusive-minus-own-value form.
template <typename T>
__device__ __forceinline__ T warp_exclusive_scan(T v) {
  return warp_inclusive_scan(v) - v;
}

// Inclusive prefix sum of one value per thread over the block, in threadIdx.x order;
// *total (optional) receives the block total on every thread. scratch: kBlockScanScratch
// elements of shared memory, free again when the function returns (it ends synchronised).
template <typename T>
__device__ T block_inclusive_scan(T v, T* scratch, T* total = nullptr) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const T inclusive = warp_inclusive_scan(v);
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const T warp_total = lane < num_warps ? scratch[lane] : T(0);
    const T warp_inclusive = warp_inclusive_scan(warp_total);
    __syncwarp();  // all of warp 0 read scratch before it is overwritten
    if (lane < num_warps) scratch[lane] = warp_inclusive - warp_total;  // warps before this one
    if (lane == kWarpSize - 1) scratch[kWarpSize] = warp_inclusive;
  }
  __syncthreads();
  const T result = scratch[warp] + inclusive;
  if (total != nullptr) *total = scratch[kWarpSize];
  __syncthreads();  // everyone has read scratch: free for the next scan
  return result;
}

// Exclusive prefix sum of one value per thread over the block (0 on thread 0); see
// block_inclusive_scan. Integers (see warp_exclusive_scan).
template <typename T>
__device__ T block_exclusive_scan(T v, T* scratch, T* total = nullptr) {
  return block_inclusive_scan(v, scratch, total) - v;
}

// In-place exclusive prefix sum of data[0, len) (shared or global memory) by the whole
// block; returns the total on every thread. Each thread scans a contiguous chunk of
// ceil(len / blockDim.x) elements serially, the chunk sums go through
// block_exclusive_scan. Ends synchronised, so data is ready for every thread.
template <typename T>
__device__ T block_exclusive_scan_inplace(T* data, int len, T* scratch) {
  const int per_thread = (len + blockDim.x - 1) / blockDim.x;
  const int begin = min(len, static_cast<int>(threadIdx.x) * per_thread);
  const int end = min(len, begin + per_thread);
  T local = 0;
  for (int i = begin; i < end; ++i) local += data[i];
  T total;
  T running = block_exclusive_scan(local, scratch, &total);
  for (int i = begin; i < end; ++i) {
    const T v = data[i];
    data[i] = running;
    running += v;
  }
  __syncthreads();  // data complete before anyone reads it
  return total;
}

}  // namespace sparseops
