// Host side of the fused MaxSim forward (sparseops/maxsim_fused.cuh), shared by the CUDA
// launcher (csrc/cuda/maxsim.cu) and the CPU emulator (csrc/testing/maxsim_cuda_emulator.cpp)
// so that both run the block body on the same parameters, tile choice and launch plan.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

#include "sparseops/maxsim.h"
#include "sparseops/maxsim_fused.cuh"

namespace sparseops {
namespace maxsim_fused {

// Which block body runs: tensor cores (bf16 / fp16 with 16-byte aligned rows), FFMA with
// 16-byte cp.async (fp32 with 16-byte aligned rows), FFMA with element copies (the rest).
enum class TileKind { kTensorCore, kSimtAsync, kSimtSync };

struct TileChoice {
  TileKind kind;
  int mtp;  // 32-row groups per chunk (chunk rows = 32 * mtp)
};

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// rows: query rows scored against every document (Nq * Lq, or total_q). A chunk holds up to
// 128 rows on tensor cores (so up to 4 ColBERT queries share one read of the corpus), 64
// with FFMA (its [32 x 32] tiles are 4x larger per row in registers and shared memory).
inline TileChoice choose_tile(at::ScalarType dtype, int64_t dim, int64_t rows, bool aligned) {
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  if (half && dim % 8 == 0 && aligned)
    return {TileKind::kTensorCore, rows <= 32 ? 1 : (rows <= 64 ? 2 : 4)};
  if (dtype == at::kFloat && dim % 4 == 0 && aligned)
    return {TileKind::kSimtAsync, rows <= 32 ? 1 : 2};
  return {TileKind::kSimtSync, 1};
}

// Calls fn(K{}) with the block body type K of the choice and dtype.
template <class Fn>
void with_tile(TileChoice c, at::ScalarType dtype, Fn&& fn) {
  const bool bf16 = dtype == at::kBFloat16;
  switch (c.kind) {
    case TileKind::kTensorCore: {
      TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
                  "maxsim cuda: tensor-core tile needs bf16/fp16");
      if (c.mtp == 1) return bf16 ? fn(TcTile<BF16, 1>{}) : fn(TcTile<FP16, 1>{});
      if (c.mtp == 2) return bf16 ? fn(TcTile<BF16, 2>{}) : fn(TcTile<FP16, 2>{});
      return bf16 ? fn(TcTile<BF16, 4>{}) : fn(TcTile<FP16, 4>{});
    }
    case TileKind::kSimtAsync:
      TORCH_CHECK(dtype == at::kFloat, "maxsim cuda: the cp.async FFMA tile takes fp32");
      if (c.mtp == 1) return fn(SimtTile<float, F32, 1, true>{});
      return fn(SimtTile<float, F32, 2, true>{});
    case TileKind::kSimtSync:
    default:
      if (dtype == at::kFloat) return fn(SimtTile<float, F32, 1, false>{});
      if (bf16) return fn(SimtTile<uint16_t, BF16, 1, false>{});
      TORCH_CHECK(dtype == at::kHalf, "maxsim cuda: unsupported dtype ", dtype);
      return fn(SimtTile<uint16_t, FP16, 1, false>{});
  }
}

inline void set_masks(Params& p, const at::Tensor& q_mask, const at::Tensor& d_mask, TokenMask qk,
                      TokenMask dk) {
  p.q_mask = int(qk);
  if (qk == TokenMask::kBool) p.q_bool = reinterpret_cast<const uint8_t*>(q_mask.data_ptr());
  if (qk == TokenMask::kLengths) p.q_len = q_mask.data_ptr<int32_t>();
  p.d_mask = int(dk);
  if (dk == TokenMask::kBool) p.d_bool = reinterpret_cast<const uint8_t*>(d_mask.data_ptr());
  if (dk == TokenMask::kLengths) p.d_len = d_mask.data_ptr<int32_t>();
}

inline void set_argmax(Params& p, at::Tensor& argmax) {
  TORCH_INTERNAL_ASSERT(argmax.scalar_type() == at::kShort || argmax.scalar_type() == at::kInt);
  p.argmax = argmax.data_ptr();
  p.argmax16 = argmax.scalar_type() == at::kShort;
}

// maxsim's contract (csrc/include/sparseops/maxsim.h): q [Nq, Lq, dim], d [Nd, Ld, dim]
// contiguous, masks prepared by the op layer, Nq, Nd, Lq, Ld >= 1.
inline Params padded_params(const at::Tensor& q, const at::Tensor& d, const at::Tensor& q_mask,
                            const at::Tensor& d_mask, const MaxSimConfig& cfg, at::Tensor& scores,
                            at::Tensor& argmax) {
  Params p;
  p.q = q.data_ptr();
  p.d = d.data_ptr();
  p.dim = cfg.dim;
  p.nq = cfg.nq;
  p.lq = cfg.lq;
  p.rows_q = cfg.nq * cfg.lq;
  p.nd = cfg.nd;
  p.ld = cfg.ld;
  set_masks(p, q_mask, d_mask, cfg.q_mask, cfg.d_mask);
  p.pylate = cfg.pylate;
  p.mean = cfg.reduce == MaxSimReduce::kMean;
  p.scores = scores.data_ptr<float>();
  set_argmax(p, argmax);
  return p;
}

// maxsim_varlen's all-pairs contract: q [total_q, dim], d [total_d, dim], cu_q / cu_d int32.
inline Params packed_params(const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& d,
                            const at::Tensor& cu_d, const MaxSimVarlenConfig& cfg,
                            at::Tensor& scores, at::Tensor& argmax) {
  Params p;
  p.q = q.data_ptr();
  p.d = d.data_ptr();
  p.dim = cfg.dim;
  p.nq = cfg.nq;
  p.rows_q = cfg.total_q;
  p.cu_q = cu_q.data_ptr<int32_t>();
  p.nd = cfg.nd;
  p.cu_d = cu_d.data_ptr<int32_t>();
  p.mean = cfg.reduce == MaxSimReduce::kMean;
  p.scores = scores.data_ptr<float>();
  set_argmax(p, argmax);
  return p;
}

}  // namespace maxsim_fused
}  // namespace sparseops
