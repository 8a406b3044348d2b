// A CPU emulator of the fused MaxSim CUDA forward, for tests on machines without a GPU
// (sparseops._C._maxsim_cuda_emulate). It runs the very block body the GPU runs
// (sparseops/maxsim_fused.cuh) with the same parameters and launch plan
// (sparseops/maxsim_fused_host.h): every thread of a block is a fiber (ucontext), and the
// warp-wide instructions are carried out from their PTX ISA definitions once all 32 lanes
// have arrived:
//   * ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives the
//     32-bit word at byte 4 * (l % 4) of row l / 4 of each matrix.
//   * mma.m16n8k16 (row.col, f32 accumulate), with g = lane / 4, t = lane % 4:
//     A regs {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]},
//     B regs {B[2t..][g], B[2t+8..][g]}, C/D {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
//   * shfl.xor, bar.warp.sync, bar.sync (all lanes must reach the same instruction; a lane
//     at another one, or a barrier some threads never reach, is reported as divergence).
//   * cp.async: the 16 destination bytes are poisoned (all ones: NaN in every float format)
//     when the copy is issued and written when cp.async.wait_group retires its group, so a
//     read before the wait, or a refill of a stage still being read, gives NaN scores.
//     Sources must lie inside q or d, destinations inside the block's shared memory, both
//     16-byte aligned.
// Products are exact in fp32 for bf16 / fp16 inputs, and the emulated mma adds its 16 terms
// in fp64 before rounding, so on inputs whose dot products are exact (small grids) the
// emulator and the GPU agree bit for bit; elsewhere they differ by summation rounding only.
#include "maxsim_cuda_emulator.h"

#include <ATen/ATen.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparseops/maxsim.h"
#include "sparseops/maxsim_fused.cuh"
#include "sparseops/maxsim_fused_host.h"

namespace sparseops {
namespace maxsim_fused {
namespace {

TileChoice parse_tile(const std::string& tile, at::ScalarType dtype, int64_t dim, int64_t rows,
                      bool aligned, int64_t mtp) {
  TileChoice c = choose_tile(dtype, dim, rows, aligned);
  if (tile == "tc")
    c.kind = TileKind::kTensorCore;
  else if (tile == "simt")
    c.kind = TileKind::kSimtAsync;
  else if (tile == "simt_sync")
    c.kind = TileKind::kSimtSync;
  else
    TORCH_CHECK(tile == "auto", "tile must be auto, tc, simt or simt_sync, got ", tile);
  if (mtp > 0) c.mtp = int(mtp);
  if (c.kind == TileKind::kSimtSync) c.mtp = 1;
  if (c.kind == TileKind::kSimtAsync && c.mtp > 2) c.mtp = 2;
  if (c.kind == TileKind::kTensorCore && c.mtp == 3) c.mtp = 4;
  return c;
}

// q, d and the masks as the op layer prepares them (contiguous; bool masks; int32 lengths);
// cu_q / cu_d given: the packed all-pairs form. Fills scores / argmax like the CUDA kernel.
std::string maxsim_cuda_emulate(const at::Tensor& q, const at::Tensor& d,
                                const std::optional<at::Tensor>& q_mask,
                                const std::optional<at::Tensor>& d_mask,
                                const std::optional<at::Tensor>& cu_q,
                                const std::optional<at::Tensor>& cu_d, bool mean, bool pylate,
                                at::Tensor scores, at::Tensor argmax, const std::string& tile,
                                int64_t mtp, int64_t ctas, int64_t max_smem, int64_t max_warps) {
#if defined(__linux__)
  TORCH_CHECK(q.is_cpu() && q.is_contiguous() && d.is_contiguous(),
              "emulator: contiguous CPU tensors");
  const bool packed = cu_q.has_value();
  Params p;
  std::vector<at::Tensor> keep;
  if (packed) {
    MaxSimVarlenConfig cfg;
    cfg.nq = cu_q->numel() - 1;
    cfg.nd = cu_d->numel() - 1;
    cfg.total_q = q.size(0);
    cfg.total_d = d.size(0);
    cfg.dim = q.size(1);
    cfg.reduce = mean ? MaxSimReduce::kMean : MaxSimReduce::kSum;
    p = packed_params(q, *cu_q, d, *cu_d, cfg, scores, argmax);
  } else {
    MaxSimConfig cfg;
    cfg.nq = q.size(0);
    cfg.lq = q.size(1);
    cfg.dim = q.size(2);
    cfg.nd = d.size(0);
    cfg.ld = d.size(1);
    cfg.reduce = mean ? MaxSimReduce::kMean : MaxSimReduce::kSum;
    cfg.pylate = pylate;
    at::Tensor qm, dm;
    auto kind = [](const std::optional<at::Tensor>& m, at::Tensor& out) {
      if (!m.has_value()) return TokenMask::kNone;
      out = m->contiguous();
      if (out.scalar_type() == at::kBool) return TokenMask::kBool;
      TORCH_CHECK(out.scalar_type() == at::kInt, "emulator: lengths must be int32");
      return TokenMask::kLengths;
    };
    cfg.q_mask = kind(q_mask, qm);
    cfg.d_mask = kind(d_mask, dm);
    keep = {qm, dm};
    p = padded_params(q, d, qm, dm, cfg, scores, argmax);
  }
  std::vector<emu::Range> global = {
      {static_cast<const char*>(q.data_ptr()), static_cast<const char*>(q.data_ptr()) + q.nbytes()},
      {static_cast<const char*>(d.data_ptr()),
       static_cast<const char*>(d.data_ptr()) + d.nbytes()}};
  const TileChoice c =
      parse_tile(tile, q.scalar_type(), p.dim, p.rows_q, aligned16(q) && aligned16(d), mtp);
  std::string name;
  with_tile(c, q.scalar_type(), [&](auto k) {
    using K = decltype(k);
    emu::emulate_grid<K>(p, max_smem, int(max_warps), ctas, global);
    name = c.kind == TileKind::kTensorCore
               ? "tc"
               : (c.kind == TileKind::kSimtAsync ? "simt" : "simt_sync");
    name += "/mtp" + std::to_string(K::kMtp) + "/warps" + std::to_string(p.warps) + "/ctas" +
            std::to_string(p.ctas) + "/chunk" + std::to_string(p.chunk_rows);
  });
  return name;
#else
  TORCH_CHECK(false, "the MaxSim CUDA emulator needs Linux (ucontext)");
#endif
}

}  // namespace
}  // namespace maxsim_fused

void bind_maxsim_emulator(pybind11::module_& m) {
  m.def("_maxsim_cuda_emulate", &maxsim_fused::maxsim_cuda_emulate, pybind11::arg("q"),
        pybind11::arg("d"), pybind11::arg("q_mask"), pybind11::arg("d_mask"), pybind11::arg("cu_q"),
        pybind11::arg("cu_d"), pybind11::arg("mean"), pybind11::arg("pylate"),
        pybind11::arg("scores"), pybind11::arg("argmax"), pybind11::arg("tile") = "auto",
        pybind11::arg("mtp") = 0, pybind11::arg("ctas") = 0, pybind11::arg("max_smem") = 232448,
        pybind11::arg("max_warps") = maxsim_fused::kMaxWarps,
        "Runs the fused MaxSim CUDA forward's block body on the CPU (tests only); returns the "
        "tile / plan it used.");
}

}  // namespace sparseops
