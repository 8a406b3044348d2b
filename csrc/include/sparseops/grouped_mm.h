// grouped_mm: one GEMM per group over a jagged dimension (sparseops.grouped_mm, the semantics
// of torch._grouped_mm without its restrictions; python/sparseops/reference/grouped_mm.py is
// the specification), and its fusion helpers gather_rows / scatter_rows / row_scale. The op
// layer (csrc/ops/grouped_mm.cpp) parses and checks the arguments once into a config; the
// kernels take prepared tensors and never check user input.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparseops {

enum class GroupedLayout : int {
  k2d3d = 0,  // a [S, K], b [G, K, N], offs over a's rows      -> out [S, N]
  k2d2d = 1,  // a [M, S], b [S, N], offs over K (ragged K)      -> out [G, M, N]
  k3d3d = 2,  // a [G, M, K], b [G, K, N], no offs (batched)     -> out [G, M, N]
  k3d2d = 3,  // a [G, M, K], b [K, S], offs over b's columns    -> out [M, S]
};

struct GroupedMmConfig {
  GroupedLayout layout = GroupedLayout::k2d3d;
  int64_t g = 0;   // groups
  int64_t m = 0;   // fixed rows of a group's output (2d2d, 3d3d, 3d2d)
  int64_t n = 0;   // fixed columns of a group's output (2d3d, 2d2d, 3d3d)
  int64_t k = 0;   // fixed contraction length (2d3d, 3d3d, 3d2d)
  int64_t s = 0;   // length of the jagged dimension (0 for 3d3d)
  bool has_bias = false;
  at::ScalarType out_dtype = at::kFloat;
};

// CPU kernel. a, b in one dtype with any strides; offs [G] contiguous int32, checked
// non-decreasing in [0, s] (undefined for 3d3d); bias contiguous ([G, N], or [S] for 3d2d)
// in out's dtype, or undefined; out contiguous in cfg.out_dtype with the layout's shape.
// Writes out in full: every group's product (+ bias), zeros past offs[-1] and for empty
// ragged-K groups (+ bias).
void grouped_mm_cpu_kernel(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs,
                           const at::Tensor& bias, const GroupedMmConfig& cfg, at::Tensor& out);

// Fusion helpers (CPU kernels, csrc/cpu/grouped_mm.cpp). index: contiguous int32 with
// values in [-1, rows) (checked by the op layer); a / src / x of any row stride and unit
// column stride; out contiguous.
// out[i] = a[index[i]], zeros where index[i] == -1.
void gather_rows_cpu_kernel(const at::Tensor& a, const at::Tensor& index, at::Tensor& out);
// out = 0; out[index[i]] += src[i] for index[i] >= 0, at the accumulation dtype, in source order.
void scatter_rows_cpu_kernel(const at::Tensor& src, const at::Tensor& index, at::Tensor& out);
// out[i] = x[i] * scale[i] (scale contiguous at the accumulation dtype).
void row_scale_cpu_kernel(const at::Tensor& x, const at::Tensor& scale, at::Tensor& out);

}  // namespace sparseops
