// CUDA launchers of the fused MaxSim forward ("cuda" backend of maxsim and of maxsim_varlen
// without a pairs list). The block body is sparseops/maxsim_fused.cuh; here it runs on
// DeviceArch, the PTX instructions it is written against: cp.async (16-byte, zero-fill past
// a document's end), ldmatrix.x4, mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate),
// warp shuffles. The C++ op calls these directly: no Python between the op and the launch.
//
// Host work per call: a tile choice, a few integer operations of the launch plan and one
// kernel launch. Device facts (SM count, shared memory per block) and each kernel's
// occupancy are looked up once per (device, kernel, shared memory size) and cached.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "sparseops/maxsim.h"
#include "sparseops/maxsim_fused.cuh"
#include "sparseops/maxsim_fused_host.h"

namespace sparseops {
namespace maxsim_fused {
namespace {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The instructions the block body uses, on the GPU.
struct DeviceArch {
  __device__ __forceinline__ int tid() const { return threadIdx.x; }
  __device__ __forceinline__ int64_t block() const { return blockIdx.x; }
  __device__ __forceinline__ char* smem() const {
    extern __shared__ __align__(16) char dynamic_smem[];
    return dynamic_smem;
  }
  __device__ __forceinline__ void syncthreads() { __syncthreads(); }
  __device__ __forceinline__ void syncwarp() { __syncwarp(); }
  // src_bytes 0 reads nothing and zero-fills the 16 bytes (ragged tails, chunk padding).
  __device__ __forceinline__ void cp_async16(char* dst, const char* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
  }
  __device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  template <int N>
  __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
  }
  __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const char* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p))
                 : "memory");
  }
  __device__ __forceinline__ void mma(BF16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                      uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ void mma(FP16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                      uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ float shfl_xor(float v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  }
  __device__ __forceinline__ int32_t shfl_xor(int32_t v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  }
  __device__ __forceinline__ void lds16(uint32_t (&w)[4], const char* p) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
  __device__ __forceinline__ float bits_to_float(uint32_t b) { return __uint_as_float(b); }
  __device__ __forceinline__ float half_to_float(BF16, uint16_t h) {
    return __uint_as_float(uint32_t(h) << 16);
  }
  __device__ __forceinline__ float half_to_float(FP16, uint16_t h) {
    return __half2float(__ushort_as_half(h));
  }
  __device__ __forceinline__ float fma(float x, float y, float z) { return __fmaf_rn(x, y, z); }
};

template <class K>
__global__ void __launch_bounds__(kMaxWarps* kWarpSize) maxsim_fused_kernel(const Params p) {
  DeviceArch a;
  maxsim_block<K>(a, p);
}

struct DeviceFacts {
  int sms = 0;
  int64_t max_smem = 0;  // opt-in dynamic shared memory per block
};

const DeviceFacts& device_facts(int device) {
  static std::mutex mu;
  static std::map<int, DeviceFacts> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceFacts f;
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  f.sms = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  f.max_smem = v;
  return cache.emplace(device, f).first->second;
}

// Resident blocks per SM of kernel `fn` at this block size and shared memory (cached); also
// raises the kernel's dynamic shared-memory limit the first time it is seen on a device.
int blocks_per_sm(const void* fn, int device, int threads, int64_t smem, int64_t max_smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int64_t>, int> cache;
  static std::map<std::pair<const void*, int>, bool> raised;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(fn, device, threads, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (!raised[{fn, device}]) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(max_smem)));
    raised[{fn, device}] = true;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, threads, size_t(smem)));
  blocks = std::max(blocks, 1);
  cache.emplace(key, blocks);
  return blocks;
}

void launch(Params p, TileChoice choice, at::ScalarType dtype, const at::Tensor& like) {
  const int device = like.get_device();
  const DeviceFacts& f = device_facts(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  with_tile(choice, dtype, [&](auto k) {
    using K = decltype(k);
    int64_t smem = 0;
    TORCH_CHECK(plan_block<K>(p, f.max_smem, kMaxWarps, smem),
                "sparseops.maxsim (cuda): an embedding of ", p.dim,
                " does not fit this GPU's shared memory (", f.max_smem,
                " bytes per block); use backend=\"triton\"");
    const void* fn = reinterpret_cast<const void*>(&maxsim_fused_kernel<K>);
    const int threads = p.warps * kWarpSize;
    const int per_sm = blocks_per_sm(fn, device, threads, smem, f.max_smem);
    // Persistent: one wave of blocks; each owns a share of the documents (never fewer than
    // one document per block).
    p.ctas = int(std::max<int64_t>(1, std::min<int64_t>(p.nd, int64_t(per_sm) * f.sms)));
    maxsim_fused_kernel<K><<<p.ctas, threads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace maxsim_fused

void maxsim_cuda_kernel(const at::Tensor& q, const at::Tensor& d, const at::Tensor& q_mask,
                        const at::Tensor& d_mask, const MaxSimConfig& cfg, at::Tensor& scores,
                        at::Tensor& argmax) {
  using namespace maxsim_fused;
  const c10::cuda::CUDAGuard guard(q.device());
  Params p = padded_params(q, d, q_mask, d_mask, cfg, scores, argmax);
  const TileChoice c =
      choose_tile(q.scalar_type(), cfg.dim, p.rows_q, aligned16(q) && aligned16(d));
  launch(p, c, q.scalar_type(), q);
}

void maxsim_varlen_cuda_kernel(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& d,
                               const at::Tensor& cu_d, const MaxSimVarlenConfig& cfg,
                               at::Tensor& scores, at::Tensor& argmax) {
  using namespace maxsim_fused;
  const c10::cuda::CUDAGuard guard(q.device());
  if (cfg.total_q == 0) {  // every query is empty: every score is 0, the argmax has no entry
    scores.zero_();
    return;
  }
  Params p = packed_params(q, cu_q, d, cu_d, cfg, scores, argmax);
  const TileChoice c =
      choose_tile(q.scalar_type(), cfg.dim, p.rows_q, aligned16(q) && aligned16(d));
  launch(p, c, q.scalar_type(), q);
}

}  // namespace sparseops
