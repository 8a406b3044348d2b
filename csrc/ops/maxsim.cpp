// MaxSim op layer for maxsim, maxsim_varlen, maxsim_pairs, maxsim_topk and maxsim_backward:
// argument parsing (the one owner of the user-facing checks for every backend), output
// allocation and the backend switch (native kernel or Python kernel, see sparseops/backend.h).
// Knows nothing of tiles: the kernels live in csrc/cpu/maxsim.cpp, kernels/maxsim.py and
// kernels/maxsim_pairs.py. The CUDA C++ kernel (csrc/cuda/maxsim.cu, the "cuda" backend) is
// the fused forward of maxsim and of maxsim_varlen without a pairs list, for fp32 / bf16 /
// fp16 and dim <= 256; other CUDA inputs under "auto" go to the Triton kernels, and an
// explicit backend="cuda" names the limit. maxsim_pairs, maxsim_topk and maxsim_backward
// have no CUDA C++ kernel (Triton on CUDA tensors).
//
// The autograd formulas are registered from Python (sparseops/ops/maxsim.py,
// torch.library.register_autograd) and all call sparseops::maxsim_backward: the forward
// kernels run for hundreds of microseconds or more at the shapes MaxSim is used at, so the
// ~9 us of a Python autograd wrapper (H100 host, torch 2.11, 2026-11) is noise.
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

// Why the CUDA C++ kernel cannot take these inputs (nullptr when it can). Mirrored by the
// "cuda" backend's reason in sparseops/ops/maxsim.py.
const char* cuda_kernel_refusal(const Tensor& q, int64_t dim) {
  const auto t = q.scalar_type();
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) {
    return "takes fp32, bf16 and fp16 (fp64 runs on \"triton\" or \"reference\")";
  }
  if (dim > 256) return "keeps 32-token tiles of the documents in shared memory: dim <= 256";
  return nullptr;
}

// For a native backend on CUDA tensors: true to run the CUDA kernel; false to hand "auto"
// to the Triton kernel (inputs the CUDA kernel does not take); an error for an explicit
// backend="cuda" it cannot take.
bool use_cuda_kernel(const char* op, c10::string_view backend, const Tensor& q, int64_t dim,
                     const char* extra_refusal = nullptr) {
  const char* why = extra_refusal ? extra_refusal : cuda_kernel_refusal(q, dim);
  if (why == nullptr) return true;
  TORCH_CHECK(backend == "auto", "sparseops.", op, ": backend \"cuda\" ", why, ", got q ", describe(q));
  return false;
}

// The Python kernel that runs when the native one does not: "auto" on CUDA tensors -> Triton.
c10::string_view native_or(c10::string_view backend) {
  return backend == "auto" ? c10::string_view("triton") : backend;
}

// The CUDA kernel's refusal of int8 documents (nullptr for float ones): Triton takes them.
const char* int8_refusal(const Tensor& d_scale) {
  return d_scale.defined() ? "takes float documents (int8 documents with d_scale run on \"triton\")" : nullptr;
}

MaxSimReduce parse_reduce(c10::string_view reduce) {
  if (reduce == "sum") return MaxSimReduce::kSum;
  if (reduce == "mean") return MaxSimReduce::kMean;
  TORCH_CHECK(false, "reduce must be \"sum\" or \"mean\", got \"", std::string(reduce), "\"");
}

// Under pylate_mask the kernels take bool masks only (a masked token still takes part).
TokenMask lengths_to_bool(TokenMask kind, Tensor& m, int64_t L) {
  if (kind != TokenMask::kLengths) return kind;
  m = (at::arange(L, m.options().dtype(at::kLong)).unsqueeze(0) < m.to(at::kLong).unsqueeze(1))
          .contiguous();
  return TokenMask::kBool;
}

const char* reduce_name(MaxSimReduce r) { return r == MaxSimReduce::kMean ? "mean" : "sum"; }

const std::initializer_list<at::ScalarType> kQueryDtypes = {at::kFloat, at::kHalf, at::kBFloat16,
                                                            at::kDouble};

// d's dtype: q's, or int8 (documents quantised per token, with d_scale). Returns whether d is
// int8; `prepared` becomes the scales as the kernels take them (contiguous fp32, flattened to
// one per row of d) or stays undefined. Scale values are not checked (any finite fp32; a
// negative scale flips that token's similarities).
bool parse_d_scale(const Tensor& q, const Tensor& d, const std::optional<Tensor>& d_scale,
                   Tensor& prepared) {
  const bool int8 = d.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || d.scalar_type() == q.scalar_type(), "d must have the dtype of q (",
              q.scalar_type(), ") or be int8 (with d_scale), got ", describe(d));
  if (!int8) {
    TORCH_CHECK(!d_scale.has_value(), "d_scale is only taken with int8 d (per-token scales of ",
                "quantised documents), got d ", describe(d), " and d_scale ", describe(*d_scale));
    return false;
  }
  const auto lead = d.sizes().slice(0, d.dim() - 1);
  TORCH_CHECK(d_scale.has_value(), "d is int8: d_scale (fp32 ", lead,
              ", one scale per document token) is required; sparseops.maxsim_quantize(d) ",
              "returns both, got d ", describe(d));
  const Tensor& s = *d_scale;
  check_same_device(s, "d_scale", q, "q");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.sizes() == lead, "d_scale must be fp32 ", lead,
              " (d.shape[:-1], one scale per document token of d ", describe(d), "), got ",
              describe(s));
  prepared = s.reshape({-1}).contiguous();
  return true;
}

MaxSimConfig parse_maxsim(const Tensor& q, const Tensor& d, const std::optional<Tensor>& q_mask,
                          const std::optional<Tensor>& d_mask, const std::optional<Tensor>& d_scale,
                          c10::string_view reduce, Tensor& qm, Tensor& dm, Tensor& ds,
                          bool pylate = false) {
  check_dim(q, "q", 3);
  check_dim(d, "d", 3);
  check_dtype(q, "q", kQueryDtypes);
  check_same_device(d, "d", q, "q");
  const bool d_int8 = parse_d_scale(q, d, d_scale, ds);
  check_size(d, "d", 2, q.size(2), "the embedding size q.size(2)");
  MaxSimConfig cfg;
  cfg.nq = q.size(0);
  cfg.lq = q.size(1);
  cfg.nd = d.size(0);
  cfg.ld = d.size(1);
  cfg.dim = q.size(2);
  // The argmax holds token indices in int16 / int32 (and the CPU kernel carries them as fp32
  // lanes, exact below 2^24); the Triton kernels use int32 program ids.
  TORCH_CHECK(cfg.ld < (int64_t(1) << 24) && cfg.nq * cfg.nd <= kInt32Max,
              "maxsim needs Ld < 2^24 and Nq * Nd to fit in int32, got q ", describe(q), " and d ",
              describe(d));
  cfg.reduce = parse_reduce(reduce);
  cfg.q_mask = parse_token_mask(q_mask, "q_mask", q, "q", qm);
  cfg.d_mask = parse_token_mask(d_mask, "d_mask", d, "d", dm);
  cfg.pylate = pylate;
  cfg.d_int8 = d_int8;
  if (pylate) {
    cfg.q_mask = lengths_to_bool(cfg.q_mask, qm, cfg.lq);
    cfg.d_mask = lengths_to_bool(cfg.d_mask, dm, cfg.ld);
  }
  return cfg;
}

std::tuple<Tensor, Tensor> maxsim(const Tensor& q, const Tensor& d,
                                  const std::optional<Tensor>& q_mask,
                                  const std::optional<Tensor>& d_mask, c10::string_view reduce,
                                  bool pylate_mask, c10::string_view backend,
                                  const std::optional<Tensor>& d_scale) {
  Tensor qm, dm, ds;
  const MaxSimConfig cfg =
      parse_maxsim(q, d, q_mask, d_mask, d_scale, reduce, qm, dm, ds, pylate_mask);
  bool native = runs_native("maxsim", backend, q);
  if (native && q.is_cuda()) native = use_cuda_kernel("maxsim", backend, q, cfg.dim, int8_refusal(ds));
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor scores = at::empty({cfg.nq, cfg.nd}, q.options().dtype(acc));
  Tensor argmax = at::empty({cfg.nq, cfg.nd, cfg.lq}, q.options().dtype(argmax_dtype(cfg.ld)));
  if (cfg.nq == 0 || cfg.nd == 0) return {scores, argmax};
  if (cfg.lq == 0 || cfg.ld == 0) {
    // No query token adds anything / no document has a token: every score is 0.
    scores.zero_();
    argmax.fill_(-1);
    return {scores, argmax};
  }
  const Tensor x = q.contiguous();
  const Tensor y = d.contiguous();
  if (native && q.is_cpu()) {
    maxsim_cpu_kernel(x, y, ds, qm, dm, cfg, scores, argmax);
  } else if (native) {
#ifdef SPARSEOPS_WITH_CUDA
    maxsim_cuda_kernel(x, y, qm, dm, cfg, scores, argmax);
#endif
  } else {
    call_python_kernel(
        "maxsim", native_or(backend), {x, y, qm, dm, ds}, {scores, argmax},
        {{"q_mask", std::string(mask_kind_name(cfg.q_mask))},
         {"d_mask", std::string(mask_kind_name(cfg.d_mask))},
         {"reduce", std::string(reduce_name(cfg.reduce))},
         {"pylate_mask", cfg.pylate}});
  }
  return {scores, argmax};
}

// ---- maxsim_varlen -------------------------------------------------------------------------

// cu_seqlens: int32 [n + 1], 0 first, non-decreasing, last = rows (values checked on CPU
// tensors; on CUDA, where that needs a host synchronisation, they are trusted).
int64_t check_cu_seqlens(const Tensor& cu, const char* name, const Tensor& x, const char* x_name) {
  check_same_device(cu, name, x, x_name);
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, " must be int32 (FlashAttention's cu_seqlens), got ",
              describe(cu));
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, name, " must be a 1-D tensor [N + 1] (N >= 0), got ",
              describe(cu));
  const int64_t n = cu.size(0) - 1;
  if (cu.is_cpu()) {
    const Tensor c = cu.contiguous();
    const int32_t* v = c.data_ptr<int32_t>();
    TORCH_CHECK(v[0] == 0, name, "[0] must be 0, got ", v[0]);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(v[i + 1] >= v[i], name, " must be non-decreasing, got ", name, "[", i, "] = ", v[i],
                  " > ", name, "[", i + 1, "] = ", v[i + 1]);
    }
    TORCH_CHECK(v[n] == x.size(0), name, "[-1] must equal ", x_name, ".shape[0] = ", x.size(0),
                " (the total number of tokens), got ", v[n]);
  }
  return n;
}

// Packed token rows [total, dim]: q itself (a float dtype), or d (q's dtype, or int8 when
// d_scale says so: parse_d_scale checks the pairing).
void check_tokens(const Tensor& x, const char* name, const Tensor& q) {
  check_dim(x, name, 2);
  if (&x == &q) {
    check_dtype(x, name, kQueryDtypes);
    return;
  }
  check_same_device(x, name, q, "q");
  check_size(x, name, 1, q.size(-1), "the embedding size q.size(-1)");
}

std::tuple<Tensor, Tensor> maxsim_varlen(const Tensor& q, const Tensor& cu_q, const Tensor& d,
                                         const Tensor& cu_d, const std::optional<Tensor>& pairs,
                                         c10::string_view reduce, c10::string_view backend,
                                         const std::optional<Tensor>& d_scale) {
  check_tokens(q, "q", q);
  check_tokens(d, "d", q);
  MaxSimVarlenConfig cfg;
  Tensor ds;
  cfg.d_int8 = parse_d_scale(q, d, d_scale, ds);
  cfg.nq = check_cu_seqlens(cu_q, "cu_q", q, "q");
  cfg.nd = check_cu_seqlens(cu_d, "cu_d", d, "d");
  cfg.total_q = q.size(0);
  cfg.total_d = d.size(0);
  cfg.dim = q.size(1);
  cfg.reduce = parse_reduce(reduce);
  TORCH_CHECK(cfg.total_d < (int64_t(1) << 24) && cfg.total_q <= kInt32Max &&
                  cfg.nq * cfg.nd <= kInt32Max,
              "maxsim_varlen needs fewer than 2^24 document tokens and Nq * Nd in int32, got q ",
              describe(q), " and d ", describe(d));
  bool native = runs_native("maxsim_varlen", backend, q);
  if (native && q.is_cuda()) {
    native = use_cuda_kernel("maxsim_varlen", backend, q, cfg.dim,
                             pairs.has_value() ? "scores all pairs only (pairs=None); pair lists run on "
                                                 "\"triton\""
                                               : int8_refusal(ds));
  }
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor pr, arg_off, scores, argmax;
  if (pairs.has_value()) {
    const Tensor& pt = *pairs;
    check_same_device(pt, "pairs", q, "q");
    TORCH_CHECK(pt.scalar_type() == at::kInt || pt.scalar_type() == at::kLong,
                "pairs must be int32/int64 [P, 2] (query, document), got ", describe(pt));
    TORCH_CHECK(pt.dim() == 2 && pt.size(1) == 2, "pairs must have shape [P, 2] (query, document), got ",
                describe(pt));
    pr = pt.to(at::kLong).contiguous();
    cfg.np = pr.size(0);
    if (pr.is_cpu() && cfg.np > 0) {
      const auto [lo, hi] = at::aminmax(pr.select(1, 0));
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < cfg.nq,
                  "pairs[:, 0] (query ids) must lie in [0, ", cfg.nq, ") (Nq = cu_q.numel() - 1), got values in [",
                  lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
      const auto [lo2, hi2] = at::aminmax(pr.select(1, 1));
      TORCH_CHECK(lo2.item<int64_t>() >= 0 && hi2.item<int64_t>() < cfg.nd,
                  "pairs[:, 1] (document ids) must lie in [0, ", cfg.nd,
                  ") (Nd = cu_d.numel() - 1), got values in [", lo2.item<int64_t>(), ", ",
                  hi2.item<int64_t>(), "]");
    }
    // Flat argmax: pair p's query tokens from arg_off[p] (a host read of the total on CUDA).
    const Tensor lq = (cu_q.slice(0, 1) - cu_q.slice(0, 0, cfg.nq)).to(at::kLong);
    const Tensor lens = cfg.np > 0 ? lq.index_select(0, pr.select(1, 0)) : at::zeros({0}, lq.options());
    const Tensor ends = at::cumsum(lens, 0);
    arg_off = (ends - lens).contiguous();
    const int64_t total = cfg.np > 0 ? ends[cfg.np - 1].item<int64_t>() : 0;
    scores = at::empty({cfg.np}, q.options().dtype(acc));
    argmax = at::empty({total}, q.options().dtype(argmax_dtype(cfg.total_d)));
    if (cfg.np == 0) return {scores, argmax};
  } else {
    scores = at::empty({cfg.nq, cfg.nd}, q.options().dtype(acc));
    argmax = at::empty({cfg.nd, cfg.total_q}, q.options().dtype(argmax_dtype(cfg.total_d)));
    if (cfg.nq == 0 || cfg.nd == 0) return {scores, argmax};
  }
  const Tensor x = q.contiguous(), y = d.contiguous();
  const Tensor cq = cu_q.contiguous(), cd = cu_d.contiguous();
  if (native && q.is_cpu()) {
    maxsim_varlen_cpu_kernel(x, cq, y, cd, ds, pr, arg_off, cfg, scores, argmax);
  } else if (native) {
#ifdef SPARSEOPS_WITH_CUDA
    maxsim_varlen_cuda_kernel(x, cq, y, cd, cfg, scores, argmax);
#endif
  } else {
    call_python_kernel("maxsim_varlen", native_or(backend), {x, cq, y, cd, pr, arg_off, ds}, {scores, argmax},
                       {{"reduce", std::string(reduce_name(cfg.reduce))}});
  }
  return {scores, argmax};
}

// ---- maxsim_pairs --------------------------------------------------------------------------

std::tuple<Tensor, Tensor> maxsim_pairs(const Tensor& q, const Tensor& d,
                                        const std::optional<Tensor>& q_mask,
                                        const std::optional<Tensor>& d_mask,
                                        c10::string_view reduce, bool pylate_mask,
                                        c10::string_view backend,
                                        const std::optional<Tensor>& d_scale) {
  check_dim(q, "q", 3);
  check_dim(d, "d", 4);
  check_dtype(q, "q", kQueryDtypes);
  check_same_device(d, "d", q, "q");
  Tensor ds;
  const bool d_int8 = parse_d_scale(q, d, d_scale, ds);
  check_size(d, "d", 0, q.size(0), "the batch size q.size(0)");
  check_size(d, "d", 3, q.size(2), "the embedding size q.size(2)");
  MaxSimPairsConfig cfg;
  cfg.b = q.size(0);
  cfg.lq = q.size(1);
  cfg.dim = q.size(2);
  cfg.k = d.size(1);
  cfg.ld = d.size(2);
  TORCH_CHECK(cfg.ld < (int64_t(1) << 24) && cfg.b * cfg.k <= kInt32Max,
              "maxsim_pairs needs Ld < 2^24 and B * K in int32, got d ", describe(d));
  cfg.reduce = parse_reduce(reduce);
  const Tensor y = d.reshape({cfg.b * cfg.k, cfg.ld, cfg.dim}).contiguous();
  Tensor qm, dm;
  cfg.q_mask = parse_token_mask(q_mask, "q_mask", q, "q", qm);
  std::optional<Tensor> dmask_flat;
  if (d_mask.has_value()) {
    const Tensor& m = *d_mask;
    check_same_device(m, "d_mask", q, "q");
    if (m.scalar_type() == at::kBool) {
      TORCH_CHECK(m.dim() == 3 && m.size(0) == cfg.b && m.size(1) == cfg.k && m.size(2) == cfg.ld,
                  "d_mask as a bool mask must have shape [", cfg.b, ", ", cfg.k, ", ", cfg.ld,
                  "] (d.shape[:3]), got ", describe(m));
      dmask_flat = m.reshape({cfg.b * cfg.k, cfg.ld});
    } else {
      TORCH_CHECK(m.dim() == 2 && m.size(0) == cfg.b && m.size(1) == cfg.k,
                  "d_mask must be a bool mask [", cfg.b, ", ", cfg.k, ", ", cfg.ld,
                  "] or int32/int64 lengths [", cfg.b, ", ", cfg.k, "] (d.shape[:2]), got ",
                  describe(m));
      dmask_flat = m.reshape({cfg.b * cfg.k});
    }
  }
  cfg.d_mask = parse_token_mask(dmask_flat, "d_mask", y, "d", dm);
  cfg.pylate = pylate_mask;
  cfg.d_int8 = d_int8;
  if (pylate_mask) {
    cfg.q_mask = lengths_to_bool(cfg.q_mask, qm, cfg.lq);
    cfg.d_mask = lengths_to_bool(cfg.d_mask, dm, cfg.ld);
  }
  const bool native = runs_native("maxsim_pairs", backend, q);
  TORCH_CHECK(!native || q.is_cpu(), "sparseops.maxsim_pairs has no CUDA C++ kernel yet: use ",
              "backend=\"triton\" (what \"auto\" picks from Python) or \"reference\"");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor scores = at::empty({cfg.b, cfg.k}, q.options().dtype(acc));
  Tensor argmax = at::empty({cfg.b, cfg.k, cfg.lq}, q.options().dtype(argmax_dtype(cfg.ld)));
  if (cfg.b == 0 || cfg.k == 0) return {scores, argmax};
  if (cfg.lq == 0 || cfg.ld == 0) {
    scores.zero_();
    argmax.fill_(-1);
    return {scores, argmax};
  }
  const Tensor x = q.contiguous();
  if (native) {
    maxsim_pairs_cpu_kernel(x, y, ds, qm, dm, cfg, scores, argmax);
  } else {
    call_python_kernel("maxsim_pairs", backend, {x, y, qm, dm, ds}, {scores, argmax},
                       {{"q_mask", std::string(mask_kind_name(cfg.q_mask))},
                        {"d_mask", std::string(mask_kind_name(cfg.d_mask))},
                        {"reduce", std::string(reduce_name(cfg.reduce))},
                        {"pylate_mask", cfg.pylate}});
  }
  return {scores, argmax};
}

// ---- maxsim_topk ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor> maxsim_topk(const Tensor& q, const Tensor& d, const Tensor& cu_d,
                                       int64_t k, const std::optional<Tensor>& q_mask,
                                       const std::optional<Tensor>& candidates,
                                       c10::string_view reduce, c10::string_view backend,
                                       const std::optional<Tensor>& d_scale) {
  check_dim(q, "q", 3);
  check_dtype(q, "q", kQueryDtypes);
  check_tokens(d, "d", q);
  TORCH_CHECK(k > 0, "k must be positive, got ", k);
  MaxSimTopkConfig cfg;
  Tensor ds;
  cfg.d_int8 = parse_d_scale(q, d, d_scale, ds);
  cfg.nq = q.size(0);
  cfg.lq = q.size(1);
  cfg.dim = q.size(2);
  cfg.nd = check_cu_seqlens(cu_d, "cu_d", d, "d");
  cfg.total_d = d.size(0);
  cfg.k = k;
  cfg.reduce = parse_reduce(reduce);
  TORCH_CHECK(cfg.total_d < (int64_t(1) << 24), "maxsim_topk needs fewer than 2^24 document tokens, got d ",
              describe(d));
  Tensor qm, cand;
  cfg.q_mask = parse_token_mask(q_mask, "q_mask", q, "q", qm);
  if (candidates.has_value()) {
    const Tensor& c = *candidates;
    check_same_device(c, "candidates", q, "q");
    TORCH_CHECK(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong,
                "candidates must be int32/int64 document ids [C] or [Nq, C], got ", describe(c));
    TORCH_CHECK(c.dim() == 1 || (c.dim() == 2 && c.size(0) == cfg.nq),
                "candidates must have shape [C] (shared) or [", cfg.nq, ", C] (per query), got ",
                describe(c));
    cand = c.to(at::kLong).contiguous();
    if (cand.is_cpu() && cand.numel() > 0) {
      const auto [lo, hi] = at::aminmax(cand);
      TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < cfg.nd,
                  "candidates must be document ids in [0, ", cfg.nd, ") (Nd = cu_d.numel() - 1) or -1 ",
                  "(no candidate), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
  }
  const bool native = runs_native("maxsim_topk", backend, q);
  TORCH_CHECK(!native || q.is_cpu(), "sparseops.maxsim_topk has no CUDA C++ kernel yet: use ",
              "backend=\"triton\" (what \"auto\" picks from Python) or \"reference\"");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor scores = at::empty({cfg.nq, k}, q.options().dtype(acc));
  Tensor ids = at::empty({cfg.nq, k}, q.options().dtype(at::kLong));
  if (cfg.nq == 0) return {scores, ids};
  const Tensor x = q.contiguous(), y = d.contiguous(), cd = cu_d.contiguous();
  if (native && cfg.lq > 0) {
    maxsim_topk_cpu_kernel(x, qm, y, ds, cd, cand, cfg, scores, ids);
  } else {
    // Lq = 0 (every score 0) goes to the reference kernel, which handles it.
    call_python_kernel("maxsim_topk", native ? c10::string_view("reference") : backend,
                       {x, y, cd, qm, cand, ds}, {scores, ids},
                       {{"k", k},
                        {"q_mask", std::string(mask_kind_name(cfg.q_mask))},
                        {"reduce", std::string(reduce_name(cfg.reduce))}});
  }
  return {scores, ids};
}

// ---- maxsim_backward -----------------------------------------------------------------------

std::tuple<Tensor, Tensor> maxsim_backward(const Tensor& grad, const Tensor& q, const Tensor& d,
                                           const Tensor& argmax, const Tensor& meta, int64_t num_q,
                                           int64_t num_d, bool need_dq, bool need_dd,
                                           c10::string_view backend,
                                           const std::optional<Tensor>& d_scale) {
  check_tokens(q, "q", q);
  check_tokens(d, "d", q);
  Tensor ds;
  const bool d_int8 = parse_d_scale(q, d, d_scale, ds);
  TORCH_CHECK(!(d_int8 && need_dd), "int8 documents are not differentiable (a quantised index ",
              "is frozen): need_dd must be false with int8 d, got d ", describe(d));
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.scalar_type() == acc && grad.dim() == 1, "grad must be a 1-D ", acc,
              " tensor [P], got ", describe(grad));
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(1) == 6 &&
                  meta.size(0) == grad.size(0),
              "meta must be int64 [P, 6], got ", describe(meta));
  TORCH_CHECK(argmax.scalar_type() == at::kInt || argmax.scalar_type() == at::kShort,
              "argmax must be int16 or int32 (what the forward saved), got ", describe(argmax));
  Tensor dq = need_dq ? at::empty(q.sizes(), q.options().dtype(acc)) : Tensor();
  Tensor dd = need_dd ? at::empty(d.sizes(), d.options().dtype(acc)) : Tensor();
  const bool native = runs_native("maxsim_backward", backend, q) && q.is_cpu();
  const Tensor g = grad.contiguous(), x = q.contiguous(), y = d.contiguous();
  const Tensor a = argmax.contiguous(), mt = meta.contiguous();
  if (native) {
    maxsim_backward_cpu_kernel(g, x, y, ds, a, mt, num_q, num_d, dq, dd);
  } else {
    // CUDA tensors under "auto": the Triton kernel (no CUDA C++ backward yet).
    std::vector<Tensor> outs;
    if (need_dq) outs.push_back(dq);
    if (need_dd) outs.push_back(dd);
    const bool native_name = backend == "auto" || backend == "cuda" || backend == "cpu";
    call_python_kernel(
        "maxsim_backward", native_name ? c10::string_view("triton") : backend, {g, x, y, a, mt, ds},
        outs, {{"need_dq", need_dq}, {"need_dd", need_dd}, {"num_q", num_q}, {"num_d", num_d}});
  }
  if (!need_dq) dq = at::zeros({0}, q.options().dtype(acc));
  if (!need_dd) dd = at::zeros({0}, d.options().dtype(acc));
  return {dq, dd};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("maxsim", &maxsim);
  m.impl("maxsim_varlen", &maxsim_varlen);
  m.impl("maxsim_pairs", &maxsim_pairs);
  m.impl("maxsim_topk", &maxsim_topk);
  m.impl("maxsim_backward", &maxsim_backward);
}

// Top-k ids and the backward op itself are not differentiable: no autograd formula, and no
// warning when a loss happens to read the top-k scores.
TORCH_LIBRARY_IMPL(sparseops, Autograd, m) {
  m.impl("maxsim_topk", torch::CppFunction::makeFallthrough());
  m.impl("maxsim_backward", torch::CppFunction::makeFallthrough());
}

#ifdef SPARSEOPS_WITH_CUDA
// The same op body for CUDA tensors: it checks, allocates, and runs the CUDA kernel
// (maxsim, maxsim_varlen) or hands the Triton and reference backends their Python kernels.
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("maxsim", &maxsim);
  m.impl("maxsim_varlen", &maxsim_varlen);
  m.impl("maxsim_pairs", &maxsim_pairs);
  m.impl("maxsim_topk", &maxsim_topk);
  m.impl("maxsim_backward", &maxsim_backward);
}
#endif

}  // namespace sparseops
