// The one TORCH_LIBRARY(sparseops, m) block: every C++ schema of the package, one comment
// each, plus the pybind11 module that reports build facts and installs the Python-kernel
// runner. Kernels are registered per family in csrc/ops/*.cpp with TORCH_LIBRARY_IMPL.
//
// Every op ends with `str backend="auto"`: "auto" runs the C++ kernel of the inputs' device,
// "cpu"/"cuda" force it, "triton"/"reference" run the Python kernel (sparseops/backend.h).
// sparseops' public functions choose the backend from the inputs (sparseops._backend).
#include <torch/extension.h>

#include <string>

#ifdef SPARSEOPS_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION

#include "sparseops/build_info.h"
#endif
#include "sparseops/routing.h"

TORCH_LIBRARY(sparseops, m) {
  // Top-k MoE routing: logits [T, E] -> (weights [T, k] fp32/fp64, ids [T, k] int32).
  m.def(
      "topk_route(Tensor logits, int k, str scoring=\"softmax\", str order=\"softmax_then_topk\", "
      "bool renormalize=True, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "float scale=1.0, Tensor? expert_mask=None, str group_scoring=\"top2_sum\", "
      "str backend=\"auto\") -> (Tensor weights, Tensor ids)");
  // Stable expert-major layout of the T*k routed slots, optionally padded to block_m rows.
  // num_experts is a SymInt so route's composite can pass logits.sym_size(1) under
  // torch.compile without specialising on the logits' shape (the kernels take it as int).
  m.def(
      "route_metadata(Tensor ids, SymInt num_experts, int block_m=0, str backend=\"auto\") -> "
      "(Tensor counts, Tensor offs, Tensor sorted_slots, Tensor inverse, Tensor tokens, "
      "Tensor padded_slots, Tensor block_expert, Tensor padded_offs)");
  // topk_route then route_metadata in one call from Python (one dispatcher crossing fewer
  // per decode step); outputs are topk_route's followed by route_metadata's.
  m.def(
      "route(Tensor logits, int k, str scoring=\"softmax\", str order=\"softmax_then_topk\", "
      "bool renormalize=True, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "float scale=1.0, Tensor? expert_mask=None, str group_scoring=\"top2_sum\", int block_m=0, "
      "str backend=\"auto\") -> (Tensor weights, Tensor ids, Tensor counts, Tensor offs, "
      "Tensor sorted_slots, Tensor inverse, Tensor tokens, Tensor padded_slots, "
      "Tensor block_expert, Tensor padded_offs)");
  // MaxSim late interaction: q [Nq, Lq, dim], d [Nd, Ld, dim] -> (scores [Nq, Nd] fp32/fp64,
  // argmax [Nq, Nd, Lq] int32, -1 where nothing was taken); masks are bool [N, L] or lengths [N].
  // Every MaxSim op takes int8 documents with fp32 per-token scales d_scale (d.shape[:-1]),
  // last in the schema so that positional calls of the float-only schema keep working.
  m.def(
      "maxsim(Tensor q, Tensor d, Tensor? q_mask=None, Tensor? d_mask=None, "
      "str reduce=\"sum\", bool pylate_mask=False, str backend=\"auto\", "
      "Tensor? d_scale=None) -> (Tensor scores, Tensor argmax)");
  // ---- maxsim family (ms-ops): ragged, aligned pairs, top-k search, shared backward.
  // Packed tokens with int32 cu_seqlens; pairs [P, 2] -> scores [P], argmax flat; else
  // scores [Nq, Nd], argmax [Nd, total_q].
  m.def(
      "maxsim_varlen(Tensor q, Tensor cu_q, Tensor d, Tensor cu_d, Tensor? pairs=None, "
      "str reduce=\"sum\", str backend=\"auto\", Tensor? d_scale=None) -> "
      "(Tensor scores, Tensor argmax)");
  // ---- moe: the routed expert MLPs of one MoE layer. x [T, H], w13 [E, 2I or I, H],
  // w2 [E, H, I], weights / ids [T, k] (-1 = dropped) -> (y [T, H], pre [T*k, 2I or I], the
  // slot-major pre-activation the backward reads), both in x's dtype.
  m.def(
      "moe_mlp(Tensor x, Tensor w13, Tensor w2, Tensor weights, Tensor ids, "
      "str activation=\"swiglu\", str gate_up_layout=\"concat\", Tensor? b13=None, "
      "Tensor? b2=None, float alpha=1.702, float limit=7.0, str backend=\"auto\") -> "
      "(Tensor y, Tensor pre)");
  // moe_mlp's backward from the forward's saved inputs and pre-activation; the bias grads
  // are empty [0] tensors when the bias is None.
  m.def(
      "moe_mlp_backward(Tensor dy, Tensor x, Tensor w13, Tensor w2, Tensor weights, Tensor ids, "
      "Tensor pre, Tensor? b13, Tensor? b2, str activation, str gate_up_layout, float alpha, "
      "float limit, str backend=\"auto\") -> (Tensor dx, Tensor dw13, Tensor dw2, "
      "Tensor dweights, Tensor db13, Tensor db2)");
  // ---- end moe
  // Aligned pairs: q [B, Lq, dim] with d [B, K, Ld, dim] -> scores [B, K], argmax [B, K, Lq].
  m.def(
      "maxsim_pairs(Tensor q, Tensor d, Tensor? q_mask=None, Tensor? d_mask=None, "
      "str reduce=\"sum\", bool pylate_mask=False, str backend=\"auto\", "
      "Tensor? d_scale=None) -> (Tensor scores, Tensor argmax)");
  // Top-k documents of a packed corpus: q [Nq, Lq, dim] -> scores [Nq, k], ids [Nq, k] int64.
  m.def(
      "maxsim_topk(Tensor q, Tensor d, Tensor cu_d, int k, Tensor? q_mask=None, "
      "Tensor? candidates=None, str reduce=\"sum\", str backend=\"auto\", "
      "Tensor? d_scale=None) -> (Tensor scores, Tensor ids)");
  // The backward of every MaxSim op from its saved argmax: per-pair grad [P], token rows,
  // meta [P, 6] -> (dq, dd) in the accumulate dtype ([0] when not wanted); int8 d rows come
  // with d_scale [Rd] and give dq only.
  m.def(
      "maxsim_backward(Tensor grad, Tensor q, Tensor d, Tensor argmax, Tensor meta, int num_q, "
      "int num_d, bool need_dq, bool need_dd, str backend=\"auto\", Tensor? d_scale=None) -> "
      "(Tensor dq, Tensor dd)");
  // ---- nm_sparse
  // N:M sparse linear: x [..., in] @ decompress(values, meta)^T + bias (NM_FORMAT).
  m.def(
      "nm_linear(Tensor x, Tensor values, Tensor meta, int n, int m, int in_features, "
      "Tensor? bias=None, str backend=\"auto\") -> Tensor");
  // N:M compress: prune=True keeps the n best scores (|w| if None) per group (fused mask +
  // compress); prune=False keeps mask (default: w's non-zeros), an error when w is not N:M.
  // outputs: "all", "compressed" (values + meta: nm_compress) or "mask" (nm_mask); an output
  // not asked for is an empty [0] tensor, never written.
  m.def(
      "nm_compress(Tensor w, int n, int m, Tensor? scores=None, Tensor? mask=None, "
      "bool prune=False, str backend=\"auto\", str outputs=\"all\") -> "
      "(Tensor values, Tensor meta, Tensor mask)");
  // The 2:4 sparse-tensor-core metadata (int32 [mtiles, ksteps, 16], sparseops/nm_sp24.h) of
  // an n:m meta with n <= 2, validated; the CUDA nm_linear caches it per meta tensor.
  m.def("nm_sp24_meta(Tensor meta, int n, int m, int out_features, int in_features) -> Tensor");
  // Tests only, CPU: nm_linear / nm_compress through the CPU emulators of their CUDA kernels
  // (config: 0 S, 1 M, 2 L, 3 generic M; csrc/cpu/nm_sp24.cpp).
  m.def(
      "_nm_sp24_emulate(Tensor x, Tensor values, Tensor meta, Tensor hw_meta, Tensor? bias, "
      "int n, int m, int in_features, int config) -> Tensor");
  m.def(
      "_nm_compress_emulate(Tensor w, int n, int m, Tensor? scores=None, Tensor? mask=None, "
      "bool prune=False, str outputs=\"all\") -> (Tensor values, Tensor meta, Tensor mask)");
  // ---- end nm_sparse
  // ---- grouped_mm (gg): one GEMM per group over a jagged dimension (torch._grouped_mm's
  // layouts: 2D x 3D a [S, K] b [G, K, N] -> [S, N]; 2D x 2D ragged K -> [G, M, N]; 3D x 3D
  // batched; 3D x 2D a [G, M, K] b [K, S] -> [M, S]); offs int32 cumulative ends [G].
  m.def(
      "grouped_mm(Tensor a, Tensor b, Tensor? offs=None, Tensor? bias=None, "
      "ScalarType? out_dtype=None, str backend=\"auto\") -> Tensor");
  // Fusion helpers, index int32/int64 with -1 = no row: out[i] = a[index[i]] (zeros for -1);
  // out [out_rows, D] = sum of src[i] into row index[i]; out[i] = x[i] * scale[i].
  m.def("gather_rows(Tensor a, Tensor index, str backend=\"auto\") -> Tensor");
  m.def("scatter_rows(Tensor src, Tensor index, SymInt out_rows, str backend=\"auto\") -> Tensor");
  m.def("row_scale(Tensor x, Tensor scale, str backend=\"auto\") -> Tensor");
  // ---- end grouped_mm
}

namespace sparseops {
void bind_python_kernels(pybind11::module_& m);  // csrc/ops/python_kernels.cpp
void bind_routing_eager(pybind11::module_& m);   // csrc/ops/routing_eager.cpp
void bind_maxsim_emulator(pybind11::module_& m);  // csrc/testing/maxsim_cuda_emulator.cpp
void bind_moe_pack(pybind11::module_& m);          // csrc/ops/moe_pack_py.cpp
}  // namespace sparseops

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

// Limits the C++ checks enforce, so Python states them without a second copy.
pybind11::dict limits() {
  pybind11::dict d;
  d["routing_max_experts"] = sparseops::kMaxExperts;
  d["routing_max_topk"] = sparseops::kMaxTopk;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparseops C++/CUDA kernels; the ops themselves are torch.ops.sparseops.*";
  m.def("build_info", &build_info, "Compiled arches, CUDA and torch versions of this build.");
  m.def("limits", &limits, "Size limits the C++ ops check (max experts, max top-k).");
  sparseops::bind_python_kernels(m);
  sparseops::bind_routing_eager(m);
  sparseops::bind_maxsim_emulator(m);
  sparseops::bind_moe_pack(m);
}
