// moe_mlp: the routed expert MLPs of one MoE layer (sparseops.moe_mlp). The op layer
// (csrc/ops/moe.cpp) parses and checks the arguments once into a MoeConfig; the kernels take
// prepared tensors and never check user input.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparseops {

enum class MoeActivation : int {
  // Gated: w13 holds gate and up, [E, 2I, H].
  kSwiglu = 0,     // silu(gate) * up
  kGeglu = 1,      // gelu(gate) * up (exact erf GELU)
  kGegluTanh = 2,  // gelu_tanh(gate) * up
  kReglu = 3,      // relu(gate) * up
  kSwigluOai = 4,  // gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit),
                   // (u + 1) * g * sigmoid(alpha * g)
  // Not gated: w13 is [E, I, H].
  kSilu = 5,
  kGelu = 6,
  kGeluTanh = 7,
  kRelu = 8,
  kRelu2 = 9,  // relu(h)^2
};

inline bool moe_gated(MoeActivation a) { return static_cast<int>(a) <= 4; }

struct MoeConfig {
  int64_t t = 0;        // tokens
  int64_t h = 0;        // hidden size
  int64_t e = 0;        // experts
  int64_t k = 0;        // slots per token
  int64_t inter = 0;    // intermediate size I
  int64_t p = 0;        // pre-activation width: 2I gated, I otherwise
  MoeActivation act = MoeActivation::kSwiglu;
  bool interleaved = false;  // gate/up layout of the gated activations
  bool has_b13 = false;
  bool has_b2 = false;
  double alpha = 1.702;
  double limit = 7.0;
};

// CPU forward. x [T, H] contiguous; w13 [E, P, H], w2 [E, H, I] in x's dtype with any
// strides whose per-expert matrices at::mm accepts; weights [T, k] contiguous at the
// accumulation dtype (fp32, fp64 for fp64 x); ids [T, k] contiguous int32 in [-1, E);
// b13 [E, P], b2 [E, H] contiguous in x's dtype or undefined. Writes y [T, H] and
// pre [T*k, P] (slot-major pre-activation incl. bias, zero rows for dropped slots) in full.
void moe_mlp_cpu_kernel(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                        const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                        const at::Tensor& b2, const MoeConfig& cfg, at::Tensor& y, at::Tensor& pre);

// CPU backward. dy [T, H], x [T, H], pre [T*k, P] contiguous in x's dtype; the rest as the
// forward. Writes dx [T, H], dw13 [E, P, H], dw2 [E, H, I] (x's dtype), dweights [T, k] at
// the accumulation dtype, db13 [E, P] / db2 [E, H] (x's dtype) when the biases are defined.
void moe_mlp_backward_cpu_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w13,
                                 const at::Tensor& w2, const at::Tensor& weights,
                                 const at::Tensor& ids, const at::Tensor& pre,
                                 const at::Tensor& b13, const at::Tensor& b2, const MoeConfig& cfg,
                                 at::Tensor& dx, at::Tensor& dw13, at::Tensor& dw2,
                                 at::Tensor& dweights, at::Tensor& db13, at::Tensor& db2);

}  // namespace sparseops
