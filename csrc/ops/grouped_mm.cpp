// grouped_mm, gather_rows, scatter_rows, row_scale op layer: argument parsing (the one owner
// of the user-facing checks for every backend), output allocation and the backend switch
// (native CPU kernel, or the Python kernel of the triton / reference backends, see
// sparseops/backend.h). Kernels: csrc/cpu/grouped_mm.cpp, python/sparseops/reference/
// grouped_mm.py, kernels/grouped_mm.py (Triton). No CUDA C++ kernel exists yet:
// backend="cuda" (and "auto" on CUDA tensors, which the Python registry resolves to "triton")
// is an error here.
//
// offs is checked on CPU (non-decreasing, in [0, jagged length]); on CUDA it is NOT checked,
// to keep the op free of host syncs: an invalid offs there is undefined behaviour.
// The autograd formulas are registered from Python (sparseops/ops/grouped_mm.py).
#include "sparseops/grouped_mm.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "sparseops/backend.h"
#include "sparseops/checks.h"

namespace sparseops {
namespace {

using at::Tensor;

const char* layout_name(GroupedLayout l) {
  switch (l) {
    case GroupedLayout::k2d3d:
      return "2d3d";
    case GroupedLayout::k2d2d:
      return "2d2d";
    case GroupedLayout::k3d3d:
      return "3d3d";
    default:
      return "3d2d";
  }
}

void check_offs_values(const Tensor& offs, int64_t length, const char* what) {
  if (!offs.is_cpu() || offs.numel() == 0) return;  // CUDA: unchecked (no host sync)
  const Tensor o = offs.contiguous();
  const int32_t* p = o.data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t g = 0; g < o.numel(); ++g) {
    TORCH_CHECK(p[g] >= prev, "offs must be non-decreasing cumulative group ends starting at >= 0, ",
                "got offs[", g, "] = ", p[g], (g == 0 ? " < 0" : " < offs[" + std::to_string(g - 1) + "] = " +
                                                               std::to_string(prev)));
    prev = p[g];
  }
  TORCH_CHECK(prev <= length, "offs[-1] = ", prev, " must be <= ", what, " = ", length);
}

GroupedMmConfig parse_grouped_mm(const Tensor& a, const Tensor& b, const std::optional<Tensor>& offs,
                                 const std::optional<Tensor>& bias,
                                 std::optional<at::ScalarType> out_dtype) {
  GroupedMmConfig cfg;
  TORCH_CHECK(a.dim() == 2 || a.dim() == 3, "a must be a 2-D or 3-D tensor, got ", describe(a));
  TORCH_CHECK(b.dim() == 2 || b.dim() == 3, "b must be a 2-D or 3-D tensor, got ", describe(b));
  check_dtype(a, "a", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "b must have the dtype of a (", a.scalar_type(),
              "), got ", describe(b));
  check_same_device(b, "b", a, "a");
  const at::ScalarType dt = a.scalar_type();
  cfg.out_dtype = out_dtype.value_or(dt);
  TORCH_CHECK(cfg.out_dtype == dt ||
                  (cfg.out_dtype == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16)),
              "out_dtype must be None, a's dtype (", dt, ") or Float for Half / BFloat16 inputs, got ",
              cfg.out_dtype);
  if (a.dim() == 2 && b.dim() == 3) {
    cfg.layout = GroupedLayout::k2d3d;
  } else if (a.dim() == 2) {
    cfg.layout = GroupedLayout::k2d2d;
  } else if (b.dim() == 3) {
    cfg.layout = GroupedLayout::k3d3d;
  } else {
    cfg.layout = GroupedLayout::k3d2d;
  }
  if (cfg.layout == GroupedLayout::k3d3d) {
    TORCH_CHECK(!offs.has_value(), "offs must be None when a and b are both 3-D (batched), got ",
                describe(*offs));
    cfg.g = a.size(0);
    check_size(b, "b", 0, cfg.g, "the number of groups a.size(0)");
    cfg.m = a.size(1);
    cfg.k = a.size(2);
    check_size(b, "b", 1, cfg.k, "the contraction size a.size(2)");
    cfg.n = b.size(2);
  } else {
    TORCH_CHECK(offs.has_value(), "offs is required when a or b is 2-D (layout ",
                layout_name(cfg.layout), ": a ", describe(a), ", b ", describe(b), ")");
    const Tensor& o = *offs;
    check_dim(o, "offs", 1);
    check_dtype(o, "offs", {at::kInt});
    check_same_device(o, "offs", a, "a");
    cfg.g = o.size(0);
    switch (cfg.layout) {
      case GroupedLayout::k2d3d:
        cfg.s = a.size(0);
        cfg.k = a.size(1);
        check_size(b, "b", 1, cfg.k, "the contraction size a.size(1)");
        check_size(b, "b", 0, cfg.g, "the number of groups offs.size(0)");
        cfg.n = b.size(2);
        check_offs_values(o, cfg.s, "a.size(0) (the rows of a)");
        break;
      case GroupedLayout::k2d2d:
        cfg.m = a.size(0);
        cfg.s = a.size(1);
        check_size(b, "b", 0, cfg.s, "the contraction size a.size(1)");
        cfg.n = b.size(1);
        check_offs_values(o, cfg.s, "a.size(1) (the ragged contraction size)");
        break;
      default:  // 3d2d
        check_size(a, "a", 0, cfg.g, "the number of groups offs.size(0)");
        cfg.m = a.size(1);
        cfg.k = a.size(2);
        check_size(b, "b", 0, cfg.k, "the contraction size a.size(2)");
        cfg.s = b.size(1);
        check_offs_values(o, cfg.s, "b.size(1) (the columns of b)");
        break;
    }
    TORCH_CHECK(cfg.s <= kInt32Max, "grouped_mm needs the jagged dimension to fit in int32, got ",
                cfg.s);
  }
  if (bias.has_value()) {
    const Tensor& bb = *bias;
    check_same_device(bb, "bias", a, "a");
    TORCH_CHECK(bb.scalar_type() == dt || bb.scalar_type() == cfg.out_dtype,
                "bias must have the dtype of a or out_dtype (", dt, "), got ", describe(bb));
    if (cfg.layout == GroupedLayout::k3d2d) {
      TORCH_CHECK(bb.dim() == 1 && bb.size(0) == cfg.s, "bias must have shape [", cfg.s,
                  "] (one value per column of b) for 3-D a and 2-D b, got ", describe(bb));
    } else {
      TORCH_CHECK(bb.dim() == 2 && bb.size(0) == cfg.g && bb.size(1) == cfg.n, "bias must have shape [",
                  cfg.g, ", ", cfg.n, "] (groups, output columns), got ", describe(bb));
    }
    cfg.has_bias = true;
  }
  return cfg;
}

std::vector<int64_t> out_shape(const GroupedMmConfig& cfg) {
  switch (cfg.layout) {
    case GroupedLayout::k2d3d:
      return {cfg.s, cfg.n};
    case GroupedLayout::k3d2d:
      return {cfg.m, cfg.s};
    default:
      return {cfg.g, cfg.m, cfg.n};
  }
}

Tensor grouped_mm(const Tensor& a, const Tensor& b, const std::optional<Tensor>& offs,
                  const std::optional<Tensor>& bias, std::optional<at::ScalarType> out_dtype,
                  c10::string_view backend) {
  const GroupedMmConfig cfg = parse_grouped_mm(a, b, offs, bias, out_dtype);
  const bool native = runs_native("grouped_mm", backend, a);
  TORCH_CHECK(!native || a.is_cpu(), "sparseops.grouped_mm has no CUDA C++ kernel yet: use ",
              "backend=\"triton\" (what \"auto\" picks from Python) or \"reference\"");
  Tensor out = at::empty(out_shape(cfg), a.options().dtype(cfg.out_dtype));
  if (out.numel() == 0) return out;
  const Tensor oc = offs.has_value() ? offs->contiguous() : Tensor();
  const Tensor bc = bias.has_value() ? bias->to(cfg.out_dtype).contiguous() : Tensor();
  if (native) {
    grouped_mm_cpu_kernel(a, b, oc, bc, cfg, out);
  } else {
    call_python_kernel("grouped_mm", backend, {a, b, oc, bc}, {out},
                       {{"layout", std::string(layout_name(cfg.layout))}});
  }
  return out;
}

// ---- fusion helpers

Tensor check_index(const Tensor& index, const Tensor& like, const char* like_name, int64_t rows,
                   const char* rows_what) {
  check_dim(index, "index", 1);
  check_dtype(index, "index", {at::kInt, at::kLong});
  check_same_device(index, "index", like, like_name);
  if (index.is_cpu() && index.numel() > 0) {
    const auto [lo, hi] = at::aminmax(index);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < rows, "index must hold row indices in [0, ", rows_what, " = ",
                rows, ") or -1 (no row), got values in [", lo_v, ", ", hi_v, "]");
  }
  TORCH_CHECK(index.numel() <= kInt32Max, "index must have fewer than 2^31 entries, got ",
              describe(index));
  return index.to(at::kInt).contiguous();
}

void check_rows_operand(const Tensor& t, const char* name) {
  check_dim(t, name, 2);
  check_dtype(t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
}

Tensor unit_cols(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

Tensor gather_rows(const Tensor& a, const Tensor& index, c10::string_view backend) {
  check_rows_operand(a, "a");
  const Tensor ic = check_index(index, a, "a", a.size(0), "a.size(0)");
  const bool native = runs_native("gather_rows", backend, a);
  TORCH_CHECK(!native || a.is_cpu(), "sparseops.gather_rows has no CUDA C++ kernel yet: use ",
              "backend=\"reference\"");
  Tensor out = at::empty({ic.numel(), a.size(1)}, a.options());
  if (out.numel() == 0) return out;
  const Tensor ac = unit_cols(a);
  if (native) {
    gather_rows_cpu_kernel(ac, ic, out);
  } else {
    call_python_kernel("gather_rows", backend, {ac, ic}, {out}, {});
  }
  return out;
}

Tensor scatter_rows(const Tensor& src, const Tensor& index, int64_t out_rows, c10::string_view backend) {
  check_rows_operand(src, "src");
  TORCH_CHECK(out_rows >= 0, "out_rows must be >= 0, got ", out_rows);
  const Tensor ic = check_index(index, src, "src", out_rows, "out_rows");
  check_size(ic, "index", 0, src.size(0), "the rows of src src.size(0)");
  const bool native = runs_native("scatter_rows", backend, src);
  TORCH_CHECK(!native || src.is_cpu(), "sparseops.scatter_rows has no CUDA C++ kernel yet: use ",
              "backend=\"reference\"");
  Tensor out = at::empty({out_rows, src.size(1)}, src.options());
  if (out.numel() == 0) return out;
  const Tensor sc = unit_cols(src);
  if (native) {
    scatter_rows_cpu_kernel(sc, ic, out);
  } else {
    call_python_kernel("scatter_rows", backend, {sc, ic}, {out}, {});
  }
  return out;
}

Tensor row_scale(const Tensor& x, const Tensor& scale, c10::string_view backend) {
  check_rows_operand(x, "x");
  check_dim(scale, "scale", 1);
  check_dtype(scale, "scale", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_same_device(scale, "scale", x, "x");
  check_size(scale, "scale", 0, x.size(0), "the rows of x x.size(0)");
  const bool native = runs_native("row_scale", backend, x);
  TORCH_CHECK(!native || x.is_cpu(), "sparseops.row_scale has no CUDA C++ kernel yet: use ",
              "backend=\"reference\"");
  Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xc = unit_cols(x);
  const Tensor sc = scale.to(acc).contiguous();
  if (native) {
    row_scale_cpu_kernel(xc, sc, out);
  } else {
    call_python_kernel("row_scale", backend, {xc, sc}, {out}, {});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("row_scale", &row_scale);
}

#ifdef SPARSEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(sparseops, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("gather_rows", &gather_rows);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("row_scale", &row_scale);
}
#endif

}  // namespace sparseops
