// The one TORCH_LIBRARY(sparseops, m) block: every C++ schema of the package, one comment
// each, plus the pybind11 module that reports build facts. Kernels are registered per
// family in csrc/ops/*.cpp with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

#include <string>

#ifdef SPARSEOPS_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION

#include "sparseops/build_info.h"
#endif

TORCH_LIBRARY(sparseops, m) {
  // Top-k MoE routing: logits [T, E] -> (weights [T, k] fp32/fp64, ids [T, k] int32).
  m.def(
      "topk_route(Tensor logits, int k, str scoring=\"softmax\", str order=\"softmax_then_topk\", "
      "bool renormalize=True, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "float scale=1.0, Tensor? expert_mask=None, str group_scoring=\"top2_sum\") -> (Tensor weights, "
      "Tensor ids)");
  // Gradient of topk_route's logits from the gradient of its weights (ids held fixed).
  m.def(
      "topk_route_backward(Tensor grad_weights, Tensor logits, Tensor ids, str scoring, "
      "str order, bool renormalize, float scale, Tensor? expert_mask) -> Tensor");
  // Stable expert-major layout of the T*k routed slots, optionally padded to block_m rows.
  m.def(
      "route_metadata(Tensor ids, int num_experts, int block_m=0) -> (Tensor counts, "
      "Tensor offs, Tensor sorted_slots, Tensor inverse, Tensor tokens, Tensor padded_slots, "
      "Tensor block_expert, Tensor padded_offs)");
  // topk_route then route_metadata in one call from Python (one dispatcher crossing fewer
  // per decode step); outputs are topk_route's followed by route_metadata's.
  m.def(
      "route(Tensor logits, int k, str scoring=\"softmax\", str order=\"softmax_then_topk\", "
      "bool renormalize=True, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "float scale=1.0, Tensor? expert_mask=None, str group_scoring=\"top2_sum\", int block_m=0) -> "
      "(Tensor weights, Tensor ids, "
      "Tensor counts, Tensor offs, Tensor sorted_slots, Tensor inverse, Tensor tokens, "
      "Tensor padded_slots, Tensor block_expert, Tensor padded_offs)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(TORCH_VERSION);
#ifdef SPARSEOPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_arches"] = sparseops::compiled_cuda_arches();
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_arches"] = std::string();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparseops C++/CUDA kernels; the ops themselves are torch.ops.sparseops.*";
  m.def("build_info", &build_info, "Compiled arches, CUDA and torch versions of this build.");
}
