// MaxSim op layer: argument parsing (the one owner of the user-facing checks for every
// backend), output allocation and the backend switch (native kernel or Python kernel, see
// sparseops/backend.h). Knows nothing of tiles: the kernels live in csrc/cpu/maxsim.cpp and
// kernels/maxsim.py. There is no CUDA C++ kernel yet: on CUDA tensors "auto" is resolved to
// "triton" by the Python registry, and an explicit backend="cuda" is an error here.
//
// The autograd formula is registered from Python (sparseops/ops/maxsim.py,
// torch.library.register_autograd): the forward kernel runs for hundreds of microseconds or
// more at the shapes MaxSim is used at, so the ~9 us of a Python autograd wrapper (H100 host,
// torch 2.11, 2026-11) is noise, and the backward is plain torch ops for every backend.
#include "sparseops/maxsim.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "sparseops/backend.h"
#include "sparseops/checks.h"

namespace sparseops {
namespace {

using at::Tensor;

const char* mask_kind_name(TokenMask k) {
  switch (k) {
    case TokenMask::kBool:
      return "bool";
    case TokenMask::kLengths:
      return "lengths";
    default:
      return "none";
  }
}

// Checks one q_mask / d_mask argument against its tensor (rows n of length L) and returns its
// kind; `prepared` becomes what the kernels take (contiguous bool, or int32 lengths in
// [0, L]). Lengths out of range are an error on CPU; on CUDA, where checking would need a
// host synchronisation, they are clamped to [0, L] (documented in sparseops.maxsim).
TokenMask parse_token_mask(const std::optional<Tensor>& mask, const char* name, const Tensor& x,
                           const char* x_name, Tensor& prepared) {
  if (!mask.has_value()) return TokenMask::kNone;
  const Tensor& m = *mask;
  check_same_device(m, name, x, x_name);
  const int64_t n = x.size(0), L = x.size(1);
  if (m.scalar_type() == at::kBool) {
    TORCH_CHECK(m.dim() == 2 && m.size(0) == n && m.size(1) == L, name,
                " as a bool mask must have shape [", n, ", ", L, "] (", x_name, ".shape[:2]), got ",
                describe(m));
    prepared = m.contiguous();
    return TokenMask::kBool;
  }
  TORCH_CHECK(m.scalar_type() == at::kInt || m.scalar_type() == at::kLong, name,
              " must be a bool mask [", n, ", ", L, "] (True = real token) or int32/int64 ",
              "lengths [", n, "], got ", describe(m));
  TORCH_CHECK(m.dim() == 1 && m.size(0) == n, name, " as lengths must have shape [", n, "] (",
              x_name, ".shape[0]), got ", describe(m),
              " (a 2-D 0/1 integer mask must be converted with .bool())");
  if (m.is_cpu()) {
    if (m.numel() > 0) {
      const auto [lo, hi] = at::aminmax(m);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      TORCH_CHECK(lo_v >= 0 && hi_v <= L, name, " lengths must lie in [0, ", L, "] (", x_name,
                  ".shape[1]), got values in [", lo_v, ", ", hi_v, "] in ", describe(m));
    }
    prepared = m.to(at::kInt).contiguous();
  } else {
    prepared = m.clamp(0, L).to(at::kInt).contiguous();
  }
  return TokenMask::kLengths;
}

MaxSimConfig parse_maxsim(const Tensor& q, const Tensor& d, const std::optional<Tensor>& q_mask,
                          const std::optional<Tensor>& d_mask, c10::string_view reduce, Tensor& qm,
                          Tensor& dm) {
  check_dim(q, "q", 3);
  check_dim(d, "d", 3);
  check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(d.scalar_type() == q.scalar_type(), "d must have the dtype of q (", q.scalar_type(),
              "), got ", describe(d));
  check_same_device(d, "d", q, "q");
  check_size(d, "d", 2, q.size(2), "the embedding size q.size(2)");
  MaxSimConfig cfg;
  cfg.nq = q.size(0);
  cfg.lq = q.size(1);
  cfg.nd = d.size(0);
  cfg.ld = d.size(1);
  cfg.dim = q.size(2);
  // The argmax holds token indices in int32 (and the CPU kernel carries them as fp32 lanes,
  // exact below 2^24); the Triton kernels use int32 program ids.
  TORCH_CHECK(cfg.ld < (int64_t(1) << 24) && cfg.nq * cfg.nd <= kInt32Max,
              "maxsim needs Ld < 2^24 and Nq * Nd to fit in int32, got q ", describe(q), " and d ",
              describe(d));
  if (reduce == "sum") {
    cfg.reduce = MaxSimReduce::kSum;
  } else if (reduce == "mean") {
    cfg.reduce = MaxSimReduce::kMean;
  } else {
    TORCH_CHECK(false, "reduce must be \"sum\" or \"mean\", got \"", std::string(reduce), "\"");
  }
  cfg.q_mask = parse_token_mask(q_mask, "q_mask", q, "q", qm);
  cfg.d_mask = parse_token_mask(d_mask, "d_mask", d, "d", dm);
  return cfg;
}

std::tuple<Tensor, Tensor> maxsim(const Tensor& q, const Tensor& d,
                                  const std::optional<Tensor>& q_mask,
                                  const std::optional<Tensor>& d_mask, c10::string_view reduce,
                                  c10::string_view backend) {
  Tensor qm, dm;
  const MaxSimConfig cfg = parse_maxsim(q, d, q_mask, d_mask, reduce, qm, dm);
  const bool native = runs_native("maxsim", backend, q);
  TORCH_CHECK(!native || q.is_cpu(), "sparseops.maxsim has no CUDA C++ kernel yet: use ",
              "backend=\"triton\" (what \"auto\" picks from Python) or \"reference\"");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor scores = at::empty({cfg.nq, cfg.nd}, q.options().dtype(acc));
  Tensor argmax = at::empty({cfg.nq, cfg.nd, cfg.lq}, q.options().dtype(at::kInt));
  if (cfg.nq == 0 || cfg.nd == 0) return {scores, argmax};
  if (cfg.lq == 0 || cfg.ld == 0) {
    // No query token adds anything / no document has a token: every score is 0.
    scores.zero_();
    argmax.fill_(-1);
    return {scores, argmax};
  }
  const Tensor x = q.contiguous();
  const Tensor y = d.contiguous();
  if (native) {
    maxsim_cpu_kernel(x, y, qm, dm, cfg, scores, argmax);
  } else {
    call_python_kernel(
        "maxsim", backend, {x, y, qm, dm}, {scores, argmax},
        {{"q_mask", std::string(mask_kind_name(cfg.q_mask))},
         {"d_mask", std::string(mask_kind_name(cfg.d_mask))},
         {"reduce", std::string(cfg.reduce == MaxSimReduce::kMean ? "mean" : "sum")}});
  }
  return {scores, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) { m.impl("maxsim", &maxsim); }

#ifdef SPARSEOPS_WITH_CUDA
// The same op body for CUDA tensors: it checks, allocates and hands the Triton and reference
// backends their Python kernels.
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) { m.impl("maxsim", &maxsim); }
#endif

}  // namespace sparseops
