// N:M structured sparsity: the parsed arguments shared by the op layer (csrc/ops/nm_sparse.cpp)
// and the CPU kernels (csrc/cpu/nm_sparse.cpp). Format: NM_FORMAT (see
// python/sparseops/reference/nm_sparse.py, the specification).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace sparseops {

// Bits per stored position: 1, 2, 4, 4 for m = 2, 4, 8, 16.
inline int nm_meta_bits(int64_t m) { return m == 2 ? 1 : m == 4 ? 2 : 4; }
inline int64_t nm_meta_bytes(int64_t kept, int64_t m) { return (kept * nm_meta_bits(m) + 7) / 8; }

struct NMConfig {
  int64_t n = 0;
  int64_t m = 0;
  int64_t out = 0;  // weight rows
  int64_t in = 0;   // dense columns (in % m == 0)
  int64_t groups = 0;  // in / m
  int64_t kept = 0;    // groups * n
  int64_t meta_bytes = 0;
  int bits = 0;
};

// Batch crossovers of the CPU nm_linear (see csrc/cpu/nm_sparse.cpp): one row of x streams the
// weight as stored against x gathered by the kept columns (fp32 / bf16, m / n in {2, 4, 8}, VBMI),
// else expanded in registers. Weight rows in lanes (sparse arithmetic, at every batch from their
// crossover): bf16 2:4, 1:4, 2:8 (avx512_bf16) and fp32 n:m with m in {4, 8}, n in {1, 2, 4} from
// kNMLaneRows rows, fp32 2:4 and 4:8 from kNMLaneRowsFp32Half. Otherwise, from 2 rows, fp32 and
// bf16 (with avx512_bf16) weights of the byte-table patterns go to register blocks of 3 weight
// rows x 8 rows of x; fp16 (and bf16 without avx512_bf16) from kNMTableRows rows lays x out in
// fp32 tables with sparse arithmetic;
// from kNMDenseCrossoverRows it decompresses the weight tile by tile and calls at::mm. 16-bit
// inputs on CPUs with VBMI2 go to 16-bit tiles (oneDNN's bf16 / fp16 GEMM) from kNMDense16Rows
// (bf16 register blocks: from kNMReg16Rows). Measured (4096x4096 2:4, one thread, ratio to torch
// F.linear on the masked weight, interleaved, load 4-6, 2-core EPYC Zen 4, 2026-12-07): bf16
// register blocks 1.22x at R = 4, 0.95x at 16, 0.80x at 32, 0.69x at 64 against 1.08x / 0.64x /
// 0.72x / 0.80x for the previous rows / tiles; fp32 register blocks 2.28x at 4, 1.71x at 16,
// 1.28x at 32, 1.12x at 64 against 1.71x / 1.04x / 0.96x / 1.21x for the previous rows / tables /
// BLAS tiles. bf16 weight rows in lanes (one vpshufb + one vdpbf16ps per 16 kept pairs), against
// the paths they replaced (2 threads, alternating processes, 4096x4096, 2026-12-07): 2:4 1.00x the
// register blocks at R = 4, 1.12x at 8, 1.18x the pair tables at 12, 1.09x at 16, 1.38x the 16-bit
// tiles at 128 (1.20x torch F.linear); 1:4 1.12x / 1.57x / 1.75x / 2.17x the register blocks at
// R = 4 / 8 / 12 / 16 and 3.3x the tiles at 128 (1.66x F.linear); 2:8 1.54x / 1.74x / 2.08x / 2.15x
// and 1.89x (1.67x F.linear). At R = 2 the register blocks stay (lanes 0.86-0.94x).
// fp32 weight rows in lanes (one vpermilps / vpermps + one FMA per 16 kept values; m in {4, 8}):
// 1:4 1.24x / 1.43x / 1.73x the register blocks at R = 4 / 8 / 16 and 2.49x at 64 (the BLAS tiles),
// 2:8 1.85x at 16 and 2.86x at 64; 2:4 0.96x / 0.97x at 4 / 8, 1.04x at 16, 1.47x / 1.27x the BLAS
// tiles at 64 / 128: so fp32 at density 1/2 from kNMLaneRowsFp32Half rows, the rest from
// kNMLaneRows.
// nm_compress's outputs: an undefined one is not wanted (nm_compress's outputs= argument), and
// the kernels skip its stores (nullptr).
template <typename T>
inline T* nm_compress_out(at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

constexpr int64_t kNMTableRows = 12;
constexpr int64_t kNMLaneRows = 4;
constexpr int64_t kNMLaneRowsFp32Half = 16;  // fp32 2:4 and 4:8
constexpr int64_t kNMDense16Rows = 8;
constexpr int64_t kNMReg16Rows = 48;
constexpr int64_t kNMDenseCrossoverRows = 64;

// Kernel contracts (CPU):
//  nm_linear_cpu_kernel: x2d [R, in] contiguous (R >= 1), values [out, kept] contiguous (dtype of
//    x), meta uint8 [out, meta_bytes] contiguous, bias [out] (dtype of x) or undefined, out [R, out]
//    contiguous, written in full. fp32 accumulation (fp64 for fp64).
//  nm_compress_cpu_kernel: w [out, in] contiguous; select = scores ([out, in] contiguous, any
//    float dtype, or undefined = |w|) ranking (prune), or keep (bool [out, in] contiguous, at most
//    n per group, padded with the lowest unkept positions); values/meta/mask outputs contiguous,
//    each undefined when not wanted (then never written: nm_compress_out).
void nm_linear_cpu_kernel(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                          const at::Tensor& bias, const NMConfig& cfg, at::Tensor& out);
void nm_compress_cpu_kernel(const at::Tensor& w, const at::Tensor& scores, const at::Tensor& keep,
                            const NMConfig& cfg, at::Tensor& values, at::Tensor& meta,
                            at::Tensor& mask);

// The 2:4 sparse tensor cores (sparseops/nm_sp24.h has the layout) take fp16 / bf16 weights of
// any n:m with n <= 2 (at most 2 kept values in each aligned group of 4 columns; 1:2 too).
inline bool nm_maps_to_sp24(int64_t n, int64_t m) { return n <= 2; }

// Hardware metadata (int32 [hw_mtiles(out), hw_ksteps(in), 16], nm_sp24.h) of an NM_FORMAT
// meta [out, meta_bytes] (contiguous uint8), n <= 2. check: verify strictly increasing
// positions per group first (an error naming meta otherwise).
at::Tensor nm_sp24_meta_cpu_kernel(const at::Tensor& meta, const NMConfig& cfg, bool check);

// The CPU emulators of the CUDA kernels (tests only; csrc/cpu/nm_sp24.cpp):
//  nm_sp24_emulate_cpu_kernel: nm_linear_cuda_kernel's data flow (shared-memory stages,
//    ldmatrix, mma.sp per the PTX ISA, epilogue) with config (sp24::ConfigId) forced; x2d
//    [R, in] fp16 / bf16 contiguous, values, meta, hw (from nm_sp24_meta), bias or undefined;
//    returns out [R, out]. Throws if a stage leaves shared memory unwritten or written twice,
//    an ldmatrix phase has a bank conflict, or a metadata nibble is invalid.
//  nm_compress_emulate_cpu_kernel: nm_compress_cuda_kernel's per-thread blocks, same contract.
at::Tensor nm_sp24_emulate_cpu_kernel(const at::Tensor& x2d, const at::Tensor& values,
                                      const at::Tensor& meta, const at::Tensor& hw,
                                      const at::Tensor& bias, const NMConfig& cfg, int64_t config);
void nm_compress_emulate_cpu_kernel(const at::Tensor& w, const at::Tensor& scores,
                                    const at::Tensor& keep, const NMConfig& cfg,
                                    at::Tensor& values, at::Tensor& meta, at::Tensor& mask);

#ifdef SPARSEOPS_WITH_CUDA
// Kernel contracts (CUDA, csrc/cuda/nm_sparse.cu), on the current device and stream:
//  nm_linear_cuda_kernel: as nm_linear_cpu_kernel, x2d fp16 / bf16, n <= 2, plus hw = the
//    weight's hardware metadata (nm_sp24_meta_cuda_kernel, cached by the op layer).
//  nm_sp24_meta_cuda_kernel: as nm_sp24_meta_cpu_kernel (check: one host sync).
//  nm_compress_cuda_kernel: as nm_compress_cpu_kernel (keep: bool; scores any float dtype).
void nm_linear_cuda_kernel(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                           const at::Tensor& hw, const at::Tensor& bias, const NMConfig& cfg,
                           at::Tensor& out);
at::Tensor nm_sp24_meta_cuda_kernel(const at::Tensor& meta, const NMConfig& cfg, bool check);
void nm_compress_cuda_kernel(const at::Tensor& w, const at::Tensor& scores, const at::Tensor& keep,
                             const NMConfig& cfg, at::Tensor& values, at::Tensor& meta,
                             at::Tensor& mask);
#endif

}  // namespace sparseops
