// Argument checks shared by every op: each failure names the argument, its shape, dtype
// and device, so a user sees what was wrong without reading our source.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace sparseops {

// "shape [4, 8], dtype Float, device cpu"
inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return s.str();
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, " must be a ", dim, "-D tensor, got ", describe(t));
}

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  std::ostringstream s;
  for (auto d : allowed) s << d << " ";
  TORCH_CHECK(false, name, " must have dtype in { ", s.str(), "}, got ", describe(t));
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", describe(t));
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, ".size(", dim, ") must equal ", what, " = ", expected,
              ", got ", describe(t));
}

constexpr int64_t kInt32Max = 2147483647;

}  // namespace sparseops
