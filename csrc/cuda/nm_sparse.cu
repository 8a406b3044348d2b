// N:M sparse CUDA kernels (sm_80+; none of it has run on a GPU yet: the layouts and the
// algorithms are proven by the CPU emulator, csrc/cpu/nm_sp24.cpp, tests/test_nm_cuda.py).
//
// nm_linear on the 2:4 sparse tensor cores: y^T = W x^T with
// mma.sp::ordered_metadata.sync.aligned.m16n8k32 (bf16 / fp16 in, fp32 accumulation): A = 16
// weight rows (their kept values, read straight from NMWeight.values), B = 8 rows of x, D = 16
// x 8 outputs. Every address comes from sparseops/nm_sp24.h, which the emulator shares:
//  - a CTA computes BM weight rows x BN rows of x with a WM x WN x WK warp grid; a stage holds
//    64 * WK dense columns: cp.async 16-byte copies of the values tile, the x tile and the hw
//    metadata into swizzled shared memory, STAGES deep (cp.async.wait_group pipelining);
//  - per k32 step a warp reads its A fragments (ldmatrix.x4 of the values tile), its B
//    fragments (ldmatrix.x4 of the x tile: x is row-major [rows, in], which is B's "col"
//    layout) and one 32-bit metadata word per m16 tile (the hw meta, built once per weight);
//  - the epilogue stages the fp32 accumulators in shared memory (summing the WK split-K
//    slices in a fixed order), adds the bias and stores y along `out` (coalesced).
// Configurations (sp24::Config): S (BM 32, BN 16, 2 x 1 x 4 warps, split-K inside the CTA:
// decode, rows <= 16), M (64 x 64, 2 x 2 x 1), L (128 x 128, 2 x 4 x 1: large batch). The
// fast path (2:4, in % 16 == 0, 16-byte aligned x and values) uses all three; the generic
// path (every other n <= 2 pattern, any in, any alignment) builds the same shared-memory
// tiles with element-wise loads (sp24_group maps each group of 4 columns onto 2:4 slots) and
// uses M. Rows of x are unlimited (grid x), M = 1 works (rows past the end are zero-filled).
//
// nm_compress (fused prune + compress): one thread per block of groups whose packed
// positions fill whole meta bytes (sparseops/nm_compress.h): reads the block once (16-byte
// loads when aligned), ranks each group in registers, writes values, mask and meta bytes.
//
// nm_sp24_meta: one thread per hw meta word (sp24_meta_word), plus a check kernel for the
// strictly increasing positions the hardware needs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "sparseops/nm_compress.h"
#include "sparseops/nm_sp24.h"
#include "sparseops/nm_sparse.h"

namespace sparseops {
namespace {

using at::Tensor;
using namespace sp24;

// ---- PTX wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes 0 zero-fills (rows and columns past the end).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct MmaSp;
template <>
struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e));
  }
};
template <>
struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e));
  }
};

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float(float v) {
  return __float2half_rn(v);
}

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// Two 16-bit values as one 32-bit shared-memory word (element v0 at the lower address).
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 v0, __nv_bfloat16 v1) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(v0)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(v1)) << 16);
}
__device__ __forceinline__ uint32_t pack2(__half v0, __half v1) {
  return static_cast<uint32_t>(__half_as_ushort(v0)) |
         (static_cast<uint32_t>(__half_as_ushort(v1)) << 16);
}

// ---- nm_linear --------------------------------------------------------------------------------

struct LinearParams {
  int64_t rows, out, in, kept, meta_bytes, ksteps;
  int n, m, bits;
};

template <class C, typename T, bool kFast>
__global__ void __launch_bounds__(C::kThreads)
    nm_sp24_linear_kernel(const T* __restrict__ x, const T* __restrict__ values,
                          const uint8_t* __restrict__ meta, const uint8_t* __restrict__ hw,
                          const T* __restrict__ bias, T* __restrict__ y, LinearParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31;
  int wm, wn, wk;
  warp_coords<C>(tid >> 5, wm, wn, wk);
  const int64_t n0 = int64_t(blockIdx.x) * C::BN;
  const int64_t m0 = int64_t(blockIdx.y) * C::BM;
  const int64_t num_kt = (p.in + C::kBK - 1) / C::kBK;
  const uint32_t sbase = smem_addr(smem);
  const T zero = from_float<T>(0.f);

  auto load_stage = [&](int slot, int64_t kt) {
    const uint32_t st = sbase + slot * C::kStageBytes;
    if constexpr (kFast) {
      for (int c = tid; c < copies<C>(); c += C::kThreads) {
        const Copy cp = stage_copy<C>(c, m0, n0, kt, p.out, p.rows, p.in, p.ksteps);
        const void* src = hw + cp.col;
        if (cp.src == Src::kValues) {
          src = cp.valid ? values + cp.row * p.kept + cp.col : values;
        } else if (cp.src == Src::kX) {
          src = cp.valid ? x + cp.row * p.in + cp.col : x;
        }
        cp_async16(st + cp.smem, src, cp.valid);
      }
    } else {
      uint8_t* sm = smem + slot * C::kStageBytes;
      for (int i = tid; i < a_items<C>(); i += C::kThreads) {
        int r, qq;
        const int off = a_item_smem<C>(i, r, qq);
        const int64_t row = m0 + r, q = kt * 16 * C::WK + qq;
        T v0 = zero, v1 = zero;
        if (row < p.out && 4 * q < p.in) {
          const Group gr = sp24_group(meta + row * p.meta_bytes, p.n, p.m, p.bits, p.kept, q);
          const T* vr = values + row * p.kept;
          if (gr.src[0] >= 0) v0 = vr[gr.src[0]];
          if (gr.src[1] >= 0) v1 = vr[gr.src[1]];
        }
        *reinterpret_cast<uint32_t*>(sm + off) = pack2(v0, v1);
      }
      for (int i = tid; i < x_items<C>(); i += C::kThreads) {
        int r, pp;
        const int off = x_item_smem<C>(i, r, pp);
        const int64_t row = n0 + r, col = kt * C::kBK + 2 * pp;
        T v0 = zero, v1 = zero;
        if (row < p.rows) {
          if (col < p.in) v0 = x[row * p.in + col];
          if (col + 1 < p.in) v1 = x[row * p.in + col + 1];
        }
        *reinterpret_cast<uint32_t*>(sm + off) = pack2(v0, v1);
      }
      const int first_meta = C::BM * C::kAChunks + C::BN * C::kXChunks;
      for (int c = tid; c < C::kMetaChunks; c += C::kThreads) {
        const Copy cp = stage_copy<C>(first_meta + c, m0, n0, kt, p.out, p.rows, p.in, p.ksteps);
        cp_async16(st + cp.smem, hw + cp.col, true);
      }
    }
  };

  float acc[C::kMT][C::kNT][4];
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  auto compute = [&](int slot) {
    const uint32_t st = sbase + slot * C::kStageBytes;
    const uint8_t* sm = smem + slot * C::kStageBytes;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      uint32_t a[C::kMT][4], e[C::kMT], b[C::kNT][4];
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt) {
        ldmatrix_x4(a[mt], st + a_ldmatrix<C>(lane, wm, wk, mt, s));
        e[mt] = *reinterpret_cast<const uint32_t*>(sm + meta_lds<C>(lane, wm, wk, mt, s));
      }
#pragma unroll
      for (int nt = 0; nt < C::kNT; ++nt)
        ldmatrix_x4(b[nt], st + x_ldmatrix<C>(lane, wn, wk, nt, s));
#pragma unroll
      for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt) MmaSp<T>::run(acc[mt][nt], a[mt], b[nt], e[mt]);
    }
  };

  // Multistage pipeline: one commit group per stage (empty groups past the end keep the
  // count uniform); wait_group<STAGES - 2> leaves tile kt complete, the barrier publishes it
  // to every warp and retires tile kt - 1, whose slot the next loads overwrite.
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < num_kt) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < num_kt; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int64_t next = kt + C::STAGES - 1;
    if (next < num_kt) load_stage(static_cast<int>(next % C::STAGES), next);
    cp_async_commit();
    compute(static_cast<int>(kt % C::STAGES));
  }
  cp_async_wait<0>();
  __syncthreads();

  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[red_slot<C>(lane, wm, wn, wk, mt, nt, i)] = acc[mt][nt][i];
  __syncthreads();
  for (int idx = tid; idx < C::BN * C::BM; idx += C::kThreads) {
    const int nn = idx / C::BM, r = idx % C::BM;
    const int64_t row = n0 + nn, col = m0 + r;
    if (row < p.rows && col < p.out) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < C::WK; ++k) v += red[(k * C::BN + nn) * C::kRedStride + r];
      if (bias != nullptr) v += to_float(bias[col]);
      y[row * p.out + col] = from_float<T>(v);
    }
  }
}

int sm_count() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  static int cached[64] = {0};
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cached[dev] = sms;
  return sms;
}

template <class C, typename T, bool kFast>
void launch_linear(const T* x, const T* values, const uint8_t* meta, const uint8_t* hw,
                   const T* bias, T* y, const LinearParams& p, cudaStream_t stream) {
  auto kernel = nm_sp24_linear_kernel<C, T, kFast>;
  // Shared memory above 48 KB needs an opt-in, once per kernel and device.
  static std::atomic<uint64_t> opted_in{0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if ((opted_in.load(std::memory_order_relaxed) & bit) == 0) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  TORCH_CHECK((p.out + C::BM - 1) / C::BM <= 65535, "nm_linear (cuda): out_features = ", p.out,
              " needs more than 65535 row tiles of ", C::BM);
  const dim3 grid(static_cast<unsigned>((p.rows + C::BN - 1) / C::BN),
                  static_cast<unsigned>((p.out + C::BM - 1) / C::BM));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(x, values, meta, hw, bias, y, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void linear_typed(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& hw,
                  const Tensor& bias, const NMConfig& cfg, Tensor& out) {
  LinearParams p;
  p.rows = x2d.size(0);
  p.out = cfg.out;
  p.in = cfg.in;
  p.kept = cfg.kept;
  p.meta_bytes = cfg.meta_bytes;
  p.ksteps = hw.size(1);
  p.n = static_cast<int>(cfg.n);
  p.m = static_cast<int>(cfg.m);
  p.bits = cfg.bits;
  const T* xp = reinterpret_cast<const T*>(x2d.data_ptr());
  const T* vp = reinterpret_cast<const T*>(values.data_ptr());
  const T* bp = bias.defined() ? reinterpret_cast<const T*>(bias.data_ptr()) : nullptr;
  T* yp = reinterpret_cast<T*>(out.data_ptr());
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const uint8_t* hp = reinterpret_cast<const uint8_t*>(hw.data_ptr());
  const bool fast = fast_path(cfg.n, cfg.m, cfg.in, reinterpret_cast<uint64_t>(xp),
                              reinterpret_cast<uint64_t>(vp));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (choose_config(p.rows, p.out, fast, sm_count())) {
    case ConfigId::kS:
      launch_linear<ConfigS, T, true>(xp, vp, mp, hp, bp, yp, p, stream);
      break;
    case ConfigId::kM:
      launch_linear<ConfigM, T, true>(xp, vp, mp, hp, bp, yp, p, stream);
      break;
    case ConfigId::kL:
      launch_linear<ConfigL, T, true>(xp, vp, mp, hp, bp, yp, p, stream);
      break;
    case ConfigId::kGeneric:
      launch_linear<ConfigM, T, false>(xp, vp, mp, hp, bp, yp, p, stream);
      break;
  }
}

// ---- nm_sp24_meta -----------------------------------------------------------------------------

__global__ void nm_sp24_meta_kernel(const uint8_t* __restrict__ meta, uint32_t* __restrict__ hw,
                                    int64_t meta_bytes, int n, int m, int bits, int64_t out,
                                    int64_t in, int64_t mtiles, int64_t ksteps) {
  const int64_t total = mtiles * ksteps * 16;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int w = static_cast<int>(i % 16);
    const int64_t ks = i / 16 % ksteps, mt = i / 16 / ksteps;
    hw[i] = sp24_meta_word(meta, meta_bytes, n, m, bits, out, in, mt, ks, w);
  }
}

__global__ void nm_meta_check_kernel(const uint8_t* __restrict__ meta, int64_t meta_bytes, int n,
                                     int bits, int64_t out, int64_t groups, int* __restrict__ bad) {
  const int64_t total = out * groups;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (!sp24_group_valid(meta + (i / groups) * meta_bytes, n, bits, i % groups)) atomicOr(bad, 1);
  }
}

unsigned blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : b > 65535 * 16 ? 65535 * 16 : b);
}

// ---- nm_compress ------------------------------------------------------------------------------

enum ScoreKind : int { kAbsW = 0, kF32, kF16, kBF16, kF64, kKeep };

struct CompressParams {
  int64_t out, in, groups, kept, meta_bytes, blocks_per_row;
  int n, bits, block_groups;
  ScoreKind kind;
};

__device__ __forceinline__ double load_score(const void* s, int64_t i, ScoreKind kind) {
  switch (kind) {
    case kF32:
      return static_cast<const float*>(s)[i];
    case kF16:
      return __half2float(static_cast<const __half*>(s)[i]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(s)[i]);
    case kF64:
      return static_cast<const double*>(s)[i];
    default:
      return static_cast<const bool*>(s)[i] ? 1.0 : 0.0;
  }
}

template <typename T>
__device__ __forceinline__ double abs_key(T v) {
  return fabs(static_cast<double>(to_float(v)));
}
template <>
__device__ __forceinline__ double abs_key(double v) {
  return fabs(v);
}

template <typename T, int M>
__global__ void nm_compress_kernel(const T* __restrict__ w, const void* __restrict__ scores,
                                   T* __restrict__ values, uint8_t* __restrict__ meta,
                                   bool* __restrict__ mask, CompressParams p) {
  constexpr int kMaxGroups = M == 2 ? 8 : M == 4 ? 4 : 2;  // block_groups(n, bits) bound
  constexpr int kMaxElems = kMaxGroups * M;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= p.out * p.blocks_per_row) return;
  const int64_t row = tid / p.blocks_per_row, blk = tid % p.blocks_per_row;
  const int64_t g0 = blk * p.block_groups;
  const int groups =
      static_cast<int>(p.groups - g0 < p.block_groups ? p.groups - g0 : p.block_groups);
  const int64_t base = row * p.in + g0 * M;  // first weight of the block
  const int elems = groups * M;

  // The block's weights in registers: 16-byte loads when the whole block is aligned.
  T wl[kMaxElems];
  constexpr int kPerVec = 16 / sizeof(T);
  if ((reinterpret_cast<uintptr_t>(w + base) % 16 == 0) && elems % kPerVec == 0) {
#pragma unroll
    for (int v = 0; v < kMaxElems / kPerVec; ++v) {
      if (v * kPerVec < elems) {
        const uint4 raw = reinterpret_cast<const uint4*>(w + base)[v];
        const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < kPerVec; ++e) wl[v * kPerVec + e] = t[e];
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < kMaxElems; ++e) {
      if (e < elems) wl[e] = w[base + e];
    }
  }
  double keys[kMaxElems];
#pragma unroll
  for (int e = 0; e < kMaxElems; ++e) {
    if (e < elems)
      keys[e] = p.kind == kAbsW ? abs_key(wl[e]) : load_score(scores, base + e, p.kind);
  }
  // values / meta (both or neither) and mask null: outputs nobody asked for.
  bool* mrow = mask != nullptr ? mask + base : nullptr;
  nmc::compress_block<M, kMaxGroups>(
      wl, [&](int i) { return keys[i]; }, p.n, p.bits, groups,
      values != nullptr ? values + row * p.kept + g0 * p.n : nullptr,
      [&](int i, bool k) {
        if (mrow != nullptr) mrow[i] = k;
      },
      meta != nullptr ? meta + row * p.meta_bytes + g0 * p.n * p.bits / 8 : nullptr);
}

template <typename T>
void compress_typed(const Tensor& w, const void* scores, ScoreKind kind, const NMConfig& cfg,
                    Tensor& values, Tensor& meta, Tensor& mask) {
  CompressParams p;
  p.out = cfg.out;
  p.in = cfg.in;
  p.groups = cfg.groups;
  p.kept = cfg.kept;
  p.meta_bytes = cfg.meta_bytes;
  p.n = static_cast<int>(cfg.n);
  p.bits = cfg.bits;
  p.block_groups = nmc::block_groups(p.n, p.bits);
  p.blocks_per_row = (cfg.groups + p.block_groups - 1) / p.block_groups;
  p.kind = kind;
  const int64_t threads_total = p.out * p.blocks_per_row;
  if (threads_total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = (threads_total + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "nm_compress: weight too large for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  T* vp = nm_compress_out<T>(values);
  uint8_t* mp = nm_compress_out<uint8_t>(meta);
  bool* kp = nm_compress_out<bool>(mask);
  switch (cfg.m) {
    case 2:
      nm_compress_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(wp, scores, vp, mp, kp, p);
      break;
    case 4:
      nm_compress_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(wp, scores, vp, mp, kp, p);
      break;
    case 8:
      nm_compress_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(wp, scores, vp, mp, kp, p);
      break;
    default:
      nm_compress_kernel<T, 16><<<blocks, kThreads, 0, stream>>>(wp, scores, vp, mp, kp, p);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void nm_linear_cuda_kernel(const Tensor& x2d, const Tensor& values, const Tensor& meta,
                           const Tensor& hw, const Tensor& bias, const NMConfig& cfg, Tensor& out) {
  if (x2d.scalar_type() == at::kBFloat16) {
    linear_typed<__nv_bfloat16>(x2d, values, meta, hw, bias, cfg, out);
  } else {
    TORCH_INTERNAL_ASSERT(x2d.scalar_type() == at::kHalf);
    linear_typed<__half>(x2d, values, meta, hw, bias, cfg, out);
  }
}

Tensor nm_sp24_meta_cuda_kernel(const Tensor& meta, const NMConfig& cfg, bool check) {
  const int64_t mtiles = hw_mtiles(cfg.out), ksteps = hw_ksteps(cfg.in);
  Tensor hw = at::empty({mtiles, ksteps, 16}, meta.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  nm_sp24_meta_kernel<<<blocks_for(hw.numel(), kThreads), kThreads, 0, stream>>>(
      meta.data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(hw.data_ptr()), cfg.meta_bytes,
      static_cast<int>(cfg.n), static_cast<int>(cfg.m), cfg.bits, cfg.out, cfg.in, mtiles, ksteps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (check && cfg.out * cfg.groups > 0) {
    Tensor bad = at::zeros({1}, meta.options().dtype(at::kInt));
    nm_meta_check_kernel<<<blocks_for(cfg.out * cfg.groups, kThreads), kThreads, 0, stream>>>(
        meta.data_ptr<uint8_t>(), cfg.meta_bytes, static_cast<int>(cfg.n), cfg.bits, cfg.out,
        cfg.groups, bad.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // One host synchronisation per weight (the conversion is cached), never per call.
    TORCH_CHECK(bad.item<int>() == 0, "meta is not a valid ", cfg.n, ":", cfg.m,
                " NM_FORMAT meta: the kept positions of some group are not strictly increasing");
  }
  return hw;
}

void nm_compress_cuda_kernel(const Tensor& w, const Tensor& scores, const Tensor& keep,
                             const NMConfig& cfg, Tensor& values, Tensor& meta, Tensor& mask) {
  ScoreKind kind = kAbsW;
  const void* sp = nullptr;
  if (keep.defined()) {
    kind = kKeep;
    sp = keep.data_ptr();
  } else if (scores.defined()) {
    sp = scores.data_ptr();
    switch (scores.scalar_type()) {
      case at::kFloat:
        kind = kF32;
        break;
      case at::kHalf:
        kind = kF16;
        break;
      case at::kBFloat16:
        kind = kBF16;
        break;
      default:
        TORCH_INTERNAL_ASSERT(scores.scalar_type() == at::kDouble);
        kind = kF64;
        break;
    }
  }
  switch (w.scalar_type()) {
    case at::kFloat:
      compress_typed<float>(w, sp, kind, cfg, values, meta, mask);
      break;
    case at::kDouble:
      compress_typed<double>(w, sp, kind, cfg, values, meta, mask);
      break;
    case at::kHalf:
      compress_typed<__half>(w, sp, kind, cfg, values, meta, mask);
      break;
    default:
      TORCH_INTERNAL_ASSERT(w.scalar_type() == at::kBFloat16);
      compress_typed<__nv_bfloat16>(w, sp, kind, cfg, values, meta, mask);
      break;
  }
}

}  // namespace sparseops
