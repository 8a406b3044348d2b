// moe_mlp: the routed expert MLPs of one MoE layer (sparseops.moe_mlp). The op layer
// (csrc/ops/moe.cpp) parses and checks the arguments once into a MoeConfig; the kernels take
// prepared tensors and never check user input.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SPARSEOPS_MOE_HD __host__ __device__
#else
#define SPARSEOPS_MOE_HD
#endif

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

SPARSEOPS_MOE_HD inline bool moe_gated(MoeActivation a) { return static_cast<int>(a) <= 4; }

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

// The activations and their derivatives at the accumulation type, shared by the CPU and
// CUDA kernels (one definition of the formulas).
template <typename acc_t>
SPARSEOPS_MOE_HD inline acc_t moe_sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

template <typename acc_t>
SPARSEOPS_MOE_HD inline acc_t act_plain(MoeActivation a, acc_t v) {
  switch (a) {
    case MoeActivation::kSilu:
      return v * moe_sigmoid(v);
    case MoeActivation::kGelu:
      return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(0.70710678118654752440)));
    case MoeActivation::kGeluTanh: {
      const acc_t kBeta = acc_t(0.79788456080286535588);  // sqrt(2 / pi)
      return acc_t(0.5) * v * (acc_t(1) + std::tanh(kBeta * (v + acc_t(0.044715) * v * v * v)));
    }
    case MoeActivation::kRelu:
      return v > acc_t(0) ? v : acc_t(0);
    case MoeActivation::kRelu2:
      return v > acc_t(0) ? v * v : acc_t(0);
    default:
      return v;
  }
}

template <typename acc_t>
SPARSEOPS_MOE_HD inline acc_t act_gated(MoeActivation a, acc_t g, acc_t u, acc_t alpha, acc_t limit) {
  switch (a) {
    case MoeActivation::kSwiglu:
      return act_plain(MoeActivation::kSilu, g) * u;
    case MoeActivation::kGeglu:
      return act_plain(MoeActivation::kGelu, g) * u;
    case MoeActivation::kGegluTanh:
      return act_plain(MoeActivation::kGeluTanh, g) * u;
    case MoeActivation::kReglu:
      return act_plain(MoeActivation::kRelu, g) * u;
    case MoeActivation::kSwigluOai: {
      g = std::min(g, limit);
      u = std::max(std::min(u, limit), -limit);
      return (u + acc_t(1)) * (g * moe_sigmoid(g * alpha));
    }
    default:
      return g * u;
  }
}

// d act / d (gate, up) for the gated activations, d act / d h for the others, at acc_t.
template <typename acc_t>
SPARSEOPS_MOE_HD inline acc_t dact_plain(MoeActivation a, acc_t v) {
  switch (a) {
    case MoeActivation::kSilu: {
      const acc_t s = moe_sigmoid(v);
      return s * (acc_t(1) + v * (acc_t(1) - s));
    }
    case MoeActivation::kGelu: {
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(v * acc_t(0.70710678118654752440)));
      const acc_t pdf = std::exp(acc_t(-0.5) * v * v) * acc_t(0.39894228040143267794);
      return cdf + v * pdf;
    }
    case MoeActivation::kGeluTanh: {
      const acc_t kBeta = acc_t(0.79788456080286535588), kKappa = acc_t(0.044715);
      const acc_t t = std::tanh(kBeta * (v + kKappa * v * v * v));
      return acc_t(0.5) * (acc_t(1) + t) +
             acc_t(0.5) * v * (acc_t(1) - t * t) * kBeta * (acc_t(1) + acc_t(3) * kKappa * v * v);
    }
    case MoeActivation::kRelu:
      return v > acc_t(0) ? acc_t(1) : acc_t(0);
    case MoeActivation::kRelu2:
      return v > acc_t(0) ? acc_t(2) * v : acc_t(0);
    default:
      return acc_t(1);
  }
}

// (d gate, d up) of act_gated for the incoming gradient da.
template <typename acc_t>
SPARSEOPS_MOE_HD inline void dact_gated(MoeActivation a, acc_t g, acc_t u, acc_t da, acc_t alpha, acc_t limit,
                       acc_t& dg, acc_t& du) {
  switch (a) {
    case MoeActivation::kSwiglu:
      dg = da * u * dact_plain(MoeActivation::kSilu, g);
      du = da * act_plain(MoeActivation::kSilu, g);
      return;
    case MoeActivation::kGeglu:
      dg = da * u * dact_plain(MoeActivation::kGelu, g);
      du = da * act_plain(MoeActivation::kGelu, g);
      return;
    case MoeActivation::kGegluTanh:
      dg = da * u * dact_plain(MoeActivation::kGeluTanh, g);
      du = da * act_plain(MoeActivation::kGeluTanh, g);
      return;
    case MoeActivation::kReglu:
      dg = g > acc_t(0) ? da * u : acc_t(0);
      du = g > acc_t(0) ? da * g : acc_t(0);
      return;
    default: {  // swiglu_oai; the clamps pass the gradient inside their bounds (as torch's)
      const acc_t gc = std::min(g, limit);
      const acc_t uc = std::max(std::min(u, limit), -limit);
      const acc_t s = moe_sigmoid(gc * alpha);
      dg = g <= limit ? da * (uc + acc_t(1)) * (s + alpha * gc * s * (acc_t(1) - s)) : acc_t(0);
      du = (u >= -limit && u <= limit) ? da * gc * s : acc_t(0);
      return;
    }
  }
}

// CPU forward. x [T, H] contiguous; w13 [E, P, H], w2 [E, H, I] in x's dtype with any
// strides whose per-expert matrices at::mm accepts; weights [T, k] contiguous at the
// accumulation dtype (fp32, fp64 for fp64 x); ids [T, k] contiguous int32 in [-1, E);
// b13 [E, P], b2 [E, H] contiguous in x's dtype or undefined. Writes y [T, H] and
// pre [T*k, P] (slot-major pre-activation incl. bias, zero rows for dropped slots) in full.
void moe_mlp_cpu_kernel(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                        const at::Tensor& weights, const at::Tensor& ids, const at::Tensor& b13,
                        const at::Tensor& b2, const MoeConfig& cfg, at::Tensor& y, at::Tensor& pre);

// CUDA forward (csrc/cuda/moe.cu), the decode / small-T path: the contract of the CPU
// kernel, with w13 / w2 of unit inner stride.
void moe_mlp_cuda_kernel(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
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
