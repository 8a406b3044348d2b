// N:M sparse op layer: argument parsing (every user-facing check, for every backend), output
// allocation and the backend switch (native CPU kernel or the Python kernels). Autograd and
// the fakes are registered from Python (python/sparseops/ops/nm_sparse.py).
#include "sparseops/nm_sparse.h"

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

Tensor nm_linear(const Tensor& x, const Tensor& values, const Tensor& meta, int64_t n, int64_t m,
                 int64_t in_features, const std::optional<Tensor>& bias, c10::string_view backend) {
  check_dtype(x, "x", kDtypes);
  check_dim(values, "values", 2);
  check_dim(meta, "meta", 2);
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension, got ", describe(x));
  const NMConfig cfg = make_config(n, m, values.size(0), in_features);
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
  Tensor b;
  if (bias.has_value()) {
    b = *bias;
    check_same_device(b, "bias", x, "x");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == cfg.out && b.scalar_type() == x.scalar_type(),
                "bias must have shape [", cfg.out, "] and the dtype of x (", x.scalar_type(),
                "), got ", describe(b));
    b = b.contiguous();
  }
  const bool native = runs_native("nm_linear", backend, x);
  TORCH_CHECK(!native || x.is_cpu(), "sparseops.nm_linear has no CUDA C++ kernel in this build");
  std::vector<int64_t> oshape(x.sizes().begin(), x.sizes().end() - 1);
  const int64_t R = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  oshape.push_back(cfg.out);
  Tensor out = at::empty({R, cfg.out}, x.options());
  if (out.numel() > 0 && in_features == 0) {
    if (b.defined()) out.copy_(b.expand({R, cfg.out})); else out.zero_();
  } else if (out.numel() > 0) {
    const Tensor x2d = x.reshape({out.size(0), in_features}).contiguous();
    const Tensor v = values.contiguous();
    const Tensor mt = meta.contiguous();
    if (native) {
      nm_linear_cpu_kernel(x2d, v, mt, b, cfg, out);
    } else {
      call_python_kernel("nm_linear", backend, {x2d, v, mt, b}, {out},
                         {{"n", n}, {"m", m}, {"in_features", in_features}});
    }
  }
  return out.view(oshape);
}

std::tuple<Tensor, Tensor, Tensor> nm_compress(const Tensor& w, int64_t n, int64_t m,
                                               const std::optional<Tensor>& scores,
                                               const std::optional<Tensor>& mask, bool prune,
                                               c10::string_view backend) {
  check_dim(w, "w", 2);
  check_dtype(w, "w", kDtypes);
  const NMConfig cfg = make_config(n, m, w.size(0), w.size(1));
  Tensor s, keep;
  if (scores.has_value()) {
    TORCH_CHECK(prune, "scores are only used with prune=True (nm_mask)");
    TORCH_CHECK(!mask.has_value(), "pass scores or mask, not both");
    check_same_device(*scores, "scores", w, "w");
    check_dtype(*scores, "scores", kDtypes);
    TORCH_CHECK(scores->sizes() == w.sizes(), "scores must have the shape of w ", w.sizes(),
                ", got ", describe(*scores));
    s = scores->contiguous();
  }
  const Tensor wc = w.contiguous();
  if (!prune) {
    if (mask.has_value()) {
      check_same_device(*mask, "mask", w, "w");
      TORCH_CHECK(mask->scalar_type() == at::kBool && mask->sizes() == w.sizes(),
                  "mask must be a bool tensor of the shape of w ", w.sizes(), ", got ",
                  describe(*mask));
      keep = mask->contiguous();
      const bool outside = (wc.ne(0) & keep.logical_not()).any().item<bool>();
      TORCH_CHECK(!outside, "w has non-zeros outside mask: nm_compress never drops values ",
                  "(apply the mask first: w * mask)");
    } else {
      keep = wc.ne(0);
    }
    if (keep.numel() > 0) {
      const int64_t most =
          keep.view({cfg.out, cfg.groups, m}).sum(-1).max().item<int64_t>();
      TORCH_CHECK(most <= n, "w is not ", n, ":", m, " sparse",
                  mask.has_value() ? " under mask" : "", ": a group of ", m, " keeps ", most,
                  " values (at most n=", n, "); prune it first with nm_mask");
    }
  } else {
    TORCH_CHECK(!mask.has_value(), "mask is not used with prune=True");
  }
  Tensor values = at::empty({cfg.out, cfg.kept}, w.options());
  Tensor meta = at::empty({cfg.out, cfg.meta_bytes}, w.options().dtype(at::kByte));
  Tensor mk = at::empty({cfg.out, cfg.in}, w.options().dtype(at::kBool));
  if (cfg.out == 0 || cfg.in == 0) return {values, meta, mk};
  const bool native = runs_native("nm_compress", backend, w);
  TORCH_CHECK(!native || w.is_cpu(), "sparseops.nm_compress has no CUDA C++ kernel in this build");
  if (native) {
    nm_compress_cpu_kernel(wc, s, keep, cfg, values, meta, mk);
  } else {
    // The Python kernels rank scores only (NM_FORMAT's nm_compress_triton contract): a keep
    // mask becomes scores 1 (kept) / 0, and the ranking's ties to the lower index pad a short
    // group with its lowest unkept positions, as the keep path of the CPU kernel does.
    const Tensor sc = keep.defined() ? keep.to(at::kFloat) : s;
    call_python_kernel("nm_compress", backend, {wc, sc}, {values, meta, mk}, {{"n", n}, {"m", m}});
  }
  return {values, meta, mk};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_compress", &nm_compress);
}

#ifdef SPARSEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("nm_linear", &nm_linear);
  m.impl("nm_compress", &nm_compress);
}
#endif

}  // namespace sparseops
