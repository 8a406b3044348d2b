// The bridge from a C++ op to its Python kernels (see sparseops/backend.h). Python registers
// one runner at import (sparseops._backend); the C++ op calls it with the GIL held. Only the
// Triton and reference backends come through here: the native kernels never touch Python.
#include <torch/extension.h>

#include <string>

#include "sparseops/backend.h"

namespace sparseops {
namespace {

// Leaked on purpose: destroying a Python object after the interpreter has shut down crashes.
pybind11::object* runner = nullptr;

pybind11::object to_python(const std::variant<int64_t, double, bool, std::string>& v) {
  return std::visit([](const auto& x) -> pybind11::object { return pybind11::cast(x); }, v);
}

}  // namespace

bool runs_native(const char* op, c10::string_view backend, const at::Tensor& like) {
  if (backend == "auto") return true;
  if (backend == "triton" || backend == "reference") return false;
  if (backend == "cpu" || backend == "cuda") {
    TORCH_CHECK(like.device().type() == (backend == "cpu" ? at::kCPU : at::kCUDA), "sparseops.",
                op, ": backend \"", std::string(backend), "\" cannot take ", like.device(),
                " tensors");
    return true;
  }
  TORCH_CHECK(false, "sparseops.", op, ": backend must be one of ", kBackendNames, ", got \"",
              std::string(backend), "\"");
}

void call_python_kernel(const char* op, c10::string_view backend,
                        const std::vector<at::Tensor>& inputs,
                        const std::vector<at::Tensor>& outputs,
                        const std::vector<KernelOption>& options) {
  pybind11::gil_scoped_acquire gil;
  TORCH_CHECK(runner != nullptr, "sparseops.", op, ": no Python kernels are registered (import ",
              "sparseops before calling torch.ops.sparseops.", op, " with backend \"",
              std::string(backend), "\")");
  try {
    pybind11::list py_inputs;
    for (const at::Tensor& t : inputs) {
      py_inputs.append(t.defined() ? pybind11::cast(t) : pybind11::none());
    }
    pybind11::list py_outputs;
    for (const at::Tensor& t : outputs) py_outputs.append(pybind11::cast(t));
    pybind11::dict py_options;
    for (const auto& [name, value] : options) py_options[name] = to_python(value);
    (*runner)(op, std::string(backend), py_inputs, py_outputs, py_options);
  } catch (pybind11::error_already_set& e) {
    // Name the op and the backend: the Python message alone ("ValueError: ...") does not say
    // which of the package's kernels failed.
    TORCH_CHECK(false, "sparseops.", op, " (backend \"", std::string(backend), "\"): ", e.what());
  }
}

void bind_python_kernels(pybind11::module_& m) {
  m.def(
      "_set_python_kernel_runner",
      [](pybind11::object fn) {
        if (runner == nullptr) runner = new pybind11::object();
        *runner = std::move(fn);
      },
      "Installs run(op, backend, inputs, outputs, options), which calls the Python kernel of "
      "(op, backend).");
}

}  // namespace sparseops
