// How one C++ op reaches every backend. Each op has exactly one schema, with a trailing
// `str backend="auto"` argument; its CPU and CUDA kernels (csrc/ops/<family>.cpp) parse the
// arguments once, allocate the outputs, then either run the native C++ kernel of the
// tensors' device or hand the prepared inputs and the outputs to the Python kernel that
// python/sparseops registered for (op, backend): a Triton launcher or the pure-torch
// reference. Autograd and the fake implementation belong to the op, so every backend shares
// them and `torch.ops.sparseops.<op>` can reach every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace sparseops {

// Backend names, in the order the error messages list them.
inline constexpr const char* kBackendNames = "auto, cuda, triton, cpu, reference";

// True when `backend` runs the native C++ kernel of `like`'s device ("auto", or the device's
// own backend: "cpu" on CPU tensors, "cuda" on CUDA tensors); false for the Python-kernel
// backends ("triton", "reference"). Any other name, or a native backend of another device,
// is an error naming the op, the backend and the tensors' device.
bool runs_native(const char* op, c10::string_view backend, const at::Tensor& like);

// A scalar option handed to a Python kernel: (name, value).
using KernelOption = std::pair<const char*, std::variant<int64_t, double, bool, std::string>>;

// Runs the Python kernel registered for (op, backend) on prepared inputs (an undefined
// tensor arrives as None) and preallocated outputs that it must write in full. A Python
// exception becomes a c10::Error carrying its message.
void call_python_kernel(const char* op, c10::string_view backend,
                        const std::vector<at::Tensor>& inputs,
                        const std::vector<at::Tensor>& outputs,
                        const std::vector<KernelOption>& options);

}  // namespace sparseops
