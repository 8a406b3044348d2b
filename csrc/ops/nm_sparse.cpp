// N:M sparse op layer: argument parsing (every user-facing check, for every backend), output
// allocation and the backend switch (native CPU / CUDA kernels or the Python kernels). Autograd
// and the fakes are registered from Python (python/sparseops/ops/nm_sparse.py).
//
// The CUDA nm_linear runs on the 2:4 sparse tensor cores and reads the weight's metadata in
// the hardware's register order ("hw meta", sparseops/nm_sp24.h). It is derived once per
// weight, never per call, and lives in a process-wide cache here, keyed by the meta tensor
// itself (its TensorImpl, held weakly, plus its version counter and data pointer): NMLinear
// builds a fresh NMWeight on every forward, so a cache on NMWeight would miss every call,
// while its `meta` buffer lives as long as the module. Consequences: the first CUDA call with
// a weight builds it (one small kernel and one host sync to validate meta; during CUDA-graph
// capture the check is skipped); `.to()` another device or dtype makes a new meta tensor,
// whose first call builds its own; an in-place change of meta (load_state_dict's copy_)
// bumps its version and rebuilds; an entry dies with its meta tensor (swept at the next
// build). Nothing goes into state_dict: it is derived data. nm_sp24_meta(meta, ...) exposes
// the conversion itself.
#include "sparseops/nm_sparse.h"

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "sparseops/backend.h"
#include "sparseops/checks.h"
#include "sparseops/nm_sp24.h"

#ifdef SPARSEOPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace sparseops {
namespace {

using at::Tensor;

NMConfig make_config(int64_t n, int64_t m, int64_t out, int64_t in) {
  TORCH_CHECK(m == 2 || m == 4 || m == 8 || m == 16, "m must be one of 2, 4, 8, 16, got m=", m);
  TORCH_CHECK(n >= 1 && n < m, "n must satisfy 1 <= n < m, got n=", n, ", m=", m);
  TORCH_CHECK(in >= 0 && in < (int64_t(1) << 31), "in_features must lie in [0, 2^31), got ", in);
  TORCH_CHECK(in % m == 0, "in_features (", in, ") must be a multiple of m=", m,
              " (groups of m run along the input dimension)");
  NMConfig c;
  c.n = n;
  c.m = m;
  c.out = out;
  c.in = in;
  c.groups = in / m;
  c.kept = c.groups * n;
  c.bits = nm_meta_bits(m);
  c.meta_bytes = nm_meta_bytes(c.kept, m);
  return c;
}

const std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kHalf, at::kBFloat16,
                                                        at::kDouble};

// nm_linear's arguments, checked and made contiguous, and its output.
struct LinearArgs {
  NMConfig cfg;
  Tensor x2d, values, meta, bias, out;
  std::vector<int64_t> oshape;
};

LinearArgs prepare_linear(const Tensor& x, const Tensor& values, const Tensor& meta, int64_t n,
                          int64_t m, int64_t in_features, const std::optional<Tensor>& bias) {
  check_dtype(x, "x", kDtypes);
  check_dim(values, "values", 2);
  check_dim(meta, "meta", 2);
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension, got ", describe(x));
  LinearArgs a;
  a.cfg = make_config(n, m, values.size(0), in_features);
  const NMConfig& cfg = a.cfg;
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "values must have the dtype of x (",
              x.scalar_type(), "), got ", describe(values));
  check_same_device(values, "values", x, "x");
  check_same_device(meta, "meta", x, "x");
  TORCH_CHECK(meta.scalar_type() == at::kByte, "meta must be uint8, got ", describe(meta));
  check_size(values, "values", 1, cfg.kept, "in_features * n / m");
  TORCH_CHECK(meta.size(0) == cfg.out && meta.size(1) == cfg.meta_bytes, "meta must have shape [",
              cfg.out, ", ", cfg.meta_bytes, "] for ", n, ":", m, " and in_features=", in_features,
              ", got ", describe(meta));
  TORCH_CHECK(x.size(-1) == in_features, "x.size(-1) must equal in_features = ", in_features,
              ", got ", describe(x));
  if (bias.has_value()) {
    a.bias = *bias;
    check_same_device(a.bias, "bias", x, "x");
    TORCH_CHECK(a.bias.dim() == 1 && a.bias.size(0) == cfg.out &&
                    a.bias.scalar_type() == x.scalar_type(),
                "bias must have shape [", cfg.out, "] and the dtype of x (", x.scalar_type(),
                "), got ", describe(a.bias));
    a.bias = a.bias.contiguous();
  }
  a.oshape.assign(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t R = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  a.oshape.push_back(cfg.out);
  a.out = at::empty({R, cfg.out}, x.options());
  a.x2d = x.reshape({R, in_features}).contiguous();
  a.values = values.contiguous();
  a.meta = meta.contiguous();
  return a;
}

// What the sparse tensor cores take (the cuda backend of nm_linear), as an error naming why.
void check_sp24(const Tensor& x, const NMConfig& cfg) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparseops.nm_linear: the cuda backend runs fp16 / bf16 on the 2:4 sparse tensor "
              "cores, got x of ", describe(x), "; use backend=\"triton\" (fp32) or "
              "\"reference\"");
  TORCH_CHECK(nm_maps_to_sp24(cfg.n, cfg.m), "sparseops.nm_linear: the cuda backend maps n:m "
              "onto the 2:4 sparse tensor cores only for n <= 2 (at most 2 kept values in each "
              "group of 4 columns), got ", cfg.n, ":", cfg.m, "; use backend=\"triton\"");
}

Tensor build_sp24_meta(const Tensor& meta, const NMConfig& cfg) {
  const Tensor mc = meta.contiguous();
  if (mc.is_cpu()) return nm_sp24_meta_cpu_kernel(mc, cfg, /*check=*/true);
#ifdef SPARSEOPS_WITH_CUDA
  c10::cuda::CUDAGuard guard(mc.device());
  return nm_sp24_meta_cuda_kernel(mc, cfg, /*check=*/true);
#else
  TORCH_CHECK(false, "nm_sp24_meta: this build of sparseops has no CUDA kernels");
#endif
}

// The hw meta cache (see the top of this file). Leaked on purpose: tensors must not be freed
// after the CUDA runtime has shut down.
struct Sp24Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source;
  int64_t version;
  const void* data;
  int64_t n, m, out, in;
  Tensor hw;
};
std::mutex& sp24_mutex() {
  static auto* mu = new std::mutex();
  return *mu;
}
std::unordered_map<const c10::TensorImpl*, Sp24Entry>& sp24_cache() {
  static auto* cache = new std::unordered_map<const c10::TensorImpl*, Sp24Entry>();
  return *cache;
}

Tensor sp24_meta_cached(const Tensor& meta, const NMConfig& cfg) {
  const c10::TensorImpl* key = meta.unsafeGetTensorImpl();
  // Inference tensors have no version counter (they can only change inside inference_mode).
  const int64_t version = meta.is_inference() ? -1 : static_cast<int64_t>(meta._version());
  auto fresh = [&](const Sp24Entry& e) {
    return !e.source.expired() && e.version == version && e.data == meta.data_ptr() &&
           e.n == cfg.n && e.m == cfg.m && e.out == cfg.out && e.in == cfg.in;
  };
  {
    std::lock_guard<std::mutex> lock(sp24_mutex());
    auto it = sp24_cache().find(key);
    if (it != sp24_cache().end() && fresh(it->second)) return it->second.hw;
  }
  Tensor hw = build_sp24_meta(meta, cfg);
  std::lock_guard<std::mutex> lock(sp24_mutex());
  auto& cache = sp24_cache();
  for (auto it = cache.begin(); it != cache.end();) {
    it = it->second.source.expired() ? cache.erase(it) : std::next(it);
  }
  cache.insert_or_assign(
      key, Sp24Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                         meta.getIntrusivePtr()),
                     version, meta.data_ptr(), cfg.n, cfg.m, cfg.out, cfg.in, hw});
  return hw;
}

Tensor nm_linear(const Tensor& x, const Tensor& values, const Tensor& meta, int64_t n, int64_t m,
                 int64_t in_features, const std::optional<Tensor>& bias, c10::string_view backend) {
  LinearArgs a = prepare_linear(x, values, meta, n, m, in_features, bias);
  const bool native = runs_native("nm_linear", backend, x);
#ifndef SPARSEOPS_WITH_CUDA
  TORCH_CHECK(!native || x.is_cpu(), "sparseops.nm_linear has no CUDA C++ kernel in this build");
#endif
  if (native && x.is_cuda()) check_sp24(x, a.cfg);
  Tensor& out = a.out;
  if (out.numel() > 0 && in_features == 0) {
    if (a.bias.defined()) out.copy_(a.bias.expand(out.sizes())); else out.zero_();
  } else if (out.numel() > 0) {
    if (native && x.is_cpu()) {
      nm_linear_cpu_kernel(a.x2d, a.values, a.meta, a.bias, a.cfg, out);
#ifdef SPARSEOPS_WITH_CUDA
    } else if (native) {
      c10::cuda::CUDAGuard guard(x.device());
      const Tensor hw = sp24_meta_cached(meta, a.cfg);  // keyed by the caller's meta tensor
      nm_linear_cuda_kernel(a.x2d, a.values, a.meta, hw, a.bias, a.cfg, out);
#endif
    } else {
      call_python_kernel("nm_linear", backend, {a.x2d, a.values, a.meta, a.bias}, {out},
                         {{"n", n}, {"m", m}, {"in_features", in_features}});
    }
  }
  return out.view(a.oshape);
}

// nm_sp24_meta: the hw meta of an NM_FORMAT meta (n <= 2), validated.
Tensor nm_sp24_meta(const Tensor& meta, int64_t n, int64_t m, int64_t out_features,
                    int64_t in_features) {
  check_dim(meta, "meta", 2);
  TORCH_CHECK(meta.scalar_type() == at::kByte, "meta must be uint8, got ", describe(meta));
  TORCH_CHECK(out_features >= 0, "out_features must be >= 0, got ", out_features);
  const NMConfig cfg = make_config(n, m, out_features, in_features);
  TORCH_CHECK(nm_maps_to_sp24(n, m), "nm_sp24_meta: ", n, ":", m, " does not map onto the 2:4 "
              "sparse tensor cores (n must be <= 2)");
  TORCH_CHECK(meta.size(0) == cfg.out && meta.size(1) == cfg.meta_bytes, "meta must have shape [",
              cfg.out, ", ", cfg.meta_bytes, "] for ", n, ":", m, " and in_features=", in_features,
              ", got ", describe(meta));
  return build_sp24_meta(meta, cfg);
}

// _nm_sp24_emulate: nm_linear through the CPU emulator of the CUDA kernel (tests).
Tensor nm_sp24_emulate(const Tensor& x, const Tensor& values, const Tensor& meta,
                       const Tensor& hw_meta, const std::optional<Tensor>& bias, int64_t n,
                       int64_t m, int64_t in_features, int64_t config) {
  LinearArgs a = prepare_linear(x, values, meta, n, m, in_features, bias);
  TORCH_CHECK(x.is_cpu(), "_nm_sp24_emulate runs on CPU tensors, got x of ", describe(x));
  check_sp24(x, a.cfg);
  TORCH_CHECK(config >= 0 && config <= 3, "config must be 0 (S), 1 (M), 2 (L) or 3 (generic M), "
              "got ", config);
  TORCH_CHECK(hw_meta.scalar_type() == at::kInt && hw_meta.dim() == 3 &&
                  hw_meta.size(0) == sp24::hw_mtiles(a.cfg.out) &&
                  hw_meta.size(1) == sp24::hw_ksteps(a.cfg.in) && hw_meta.size(2) == 16,
              "hw_meta must be int32 [", sp24::hw_mtiles(a.cfg.out), ", ",
              sp24::hw_ksteps(a.cfg.in), ", 16] (nm_sp24_meta), got ", describe(hw_meta));
  if (a.out.numel() == 0 || in_features == 0) {  // no kernel runs (as nm_linear)
    if (a.bias.defined()) return a.out.copy_(a.bias.expand(a.out.sizes())).view(a.oshape);
    return a.out.zero_().view(a.oshape);
  }
  Tensor y = nm_sp24_emulate_cpu_kernel(a.x2d, a.values, a.meta, hw_meta.contiguous(), a.bias,
                                        a.cfg, config);
  return y.view(a.oshape);
}

// nm_compress's arguments: w contiguous, the ranking (scores or a keep mask) and the outputs
// (an output not asked for is empty; the kernels get it undefined and skip its stores).
struct CompressArgs {
  NMConfig cfg;
  Tensor w, scores, keep, values, meta, mask;
  bool want_compressed = true, want_mask = true;
  // The outputs as the kernels take them: undefined = not wanted.
  std::array<Tensor, 3> kernel_outputs() const {
    return {want_compressed ? values : Tensor(), want_compressed ? meta : Tensor(),
            want_mask ? mask : Tensor()};
  }
};

CompressArgs prepare_compress(const Tensor& w, int64_t n, int64_t m,
                              const std::optional<Tensor>& scores,
                              const std::optional<Tensor>& mask, bool prune,
                              c10::string_view outputs) {
  check_dim(w, "w", 2);
  check_dtype(w, "w", kDtypes);
  CompressArgs a;
  a.cfg = make_config(n, m, w.size(0), w.size(1));
  const NMConfig& cfg = a.cfg;
  if (scores.has_value()) {
    TORCH_CHECK(prune, "scores are only used with prune=True (nm_mask)");
    TORCH_CHECK(!mask.has_value(), "pass scores or mask, not both");
    check_same_device(*scores, "scores", w, "w");
    check_dtype(*scores, "scores", kDtypes);
    TORCH_CHECK(scores->sizes() == w.sizes(), "scores must have the shape of w ", w.sizes(),
                ", got ", describe(*scores));
    a.scores = scores->contiguous();
  }
  a.w = w.contiguous();
  if (!prune) {
    if (mask.has_value()) {
      check_same_device(*mask, "mask", w, "w");
      TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == w.sizes(),
                  "mask must be a bool tensor of the shape of w ", w.sizes(), ", got ",
                  describe(*mask));
      a.keep = mask->contiguous();
      const bool outside = (a.w.ne(0) & a.keep.logical_not()).any().item<bool>();
      TORCH_CHECK(!outside, "w has non-zeros outside mask: nm_compress never drops values ",
                  "(apply the mask first: w * mask)");
    } else {
      a.keep = a.w.ne(0);
    }
    if (a.keep.numel() > 0) {
      const int64_t most =
          a.keep.view({cfg.out, cfg.groups, m}).sum(-1).max().item<int64_t>();
      TORCH_CHECK(most <= n, "w is not ", n, ":", m, " sparse",
                  mask.has_value() ? " under mask" : "", ": a group of ", m, " keeps ", most,
                  " values (at most n=", n, "); prune it first with nm_mask");
    }
  } else {
    TORCH_CHECK(!mask.has_value(), "mask is not used with prune=True");
  }
  TORCH_CHECK(outputs == "all" || outputs == "compressed" || outputs == "mask",
              "outputs must be \"all\", \"compressed\" or \"mask\", got \"", std::string(outputs), "\"");
  a.want_compressed = outputs != "mask";
  a.want_mask = outputs != "compressed";
  const auto opt = w.options();
  a.values = a.want_compressed ? at::empty({cfg.out, cfg.kept}, opt) : at::empty({0}, opt);
  a.meta = at::empty(a.want_compressed ? std::vector<int64_t>{cfg.out, cfg.meta_bytes} : std::vector<int64_t>{0},
                     opt.dtype(at::kByte));
  a.mask = at::empty(a.want_mask ? std::vector<int64_t>{cfg.out, cfg.in} : std::vector<int64_t>{0},
                     opt.dtype(at::kBool));
  return a;
}

std::tuple<Tensor, Tensor, Tensor> nm_compress(const Tensor& w, int64_t n, int64_t m,
                                               const std::optional<Tensor>& scores,
                                               const std::optional<Tensor>& mask, bool prune,
                                               c10::string_view backend, c10::string_view outputs) {
  CompressArgs a = prepare_compress(w, n, m, scores, mask, prune, outputs);
  const NMConfig& cfg = a.cfg;
  if (cfg.out == 0 || cfg.in == 0) return {a.values, a.meta, a.mask};
  const bool native = runs_native("nm_compress", backend, w);
#ifndef SPARSEOPS_WITH_CUDA
  TORCH_CHECK(!native || w.is_cpu(), "sparseops.nm_compress has no CUDA C++ kernel in this build");
#endif
  auto [values, meta, keep_out] = a.kernel_outputs();
  if (native && w.is_cpu()) {
    nm_compress_cpu_kernel(a.w, a.scores, a.keep, cfg, values, meta, keep_out);
#ifdef SPARSEOPS_WITH_CUDA
  } else if (native) {
    c10::cuda::CUDAGuard guard(w.device());
    nm_compress_cuda_kernel(a.w, a.scores, a.keep, cfg, values, meta, keep_out);
#endif
  } else {
    // The Python kernels rank scores only (NM_FORMAT's nm_compress_triton contract): a keep
    // mask becomes scores 1 (kept) / 0, and the ranking's ties to the lower index pad a short
    // group with its lowest unkept positions, as the keep path of the CPU kernel does. They
    // get every output and the outputs option (the ones not wanted are empty).
    const Tensor sc = a.keep.defined() ? a.keep.to(at::kFloat) : a.scores;
    call_python_kernel("nm_compress", backend, {a.w, sc}, {a.values, a.meta, a.mask},
                       {{"n", n}, {"m", m}, {"outputs", std::string(outputs)}});
  }
  return {a.values, a.meta, a.mask};
}

// _nm_compress_emulate: nm_compress through the CPU emulator of the CUDA kernel (tests).
std::tuple<Tensor, Tensor, Tensor> nm_compress_emulate(const Tensor& w, int64_t n, int64_t m,
                                                       const std::optional<Tensor>& scores,
                                                       const std::optional<Tensor>& mask,
                                                       bool prune, c10::string_view outputs) {
  TORCH_CHECK(w.is_cpu(), "_nm_compress_emulate runs on CPU tensors, got w of ", describe(w));
  CompressArgs a = prepare_compress(w, n, m, scores, mask, prune, outputs);
  if (a.cfg.out > 0 && a.cfg.in > 0) {
    auto [values, meta, keep_out] = a.kernel_outputs();
    nm_compress_emulate_cpu_kernel(a.w, a.scores, a.keep, a.cfg, values, meta, keep_out);
  }
  return {a.values, a.meta, a.mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_compress", &nm_compress);
  m.impl("nm_sp24_meta", &nm_sp24_meta);
  m.impl("_nm_sp24_emulate", &nm_sp24_emulate);
  m.impl("_nm_compress_emulate", &nm_compress_emulate);
}

#ifdef SPARSEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_compress", &nm_compress);
  m.impl("nm_sp24_meta", &nm_sp24_meta);
}
#endif

}  // namespace sparseops
