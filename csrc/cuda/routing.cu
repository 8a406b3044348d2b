// MoE routing CUDA kernels. Semantics: python/sparseops/reference/routing.py (the spec);
// the contract (shapes, dtypes, what the op layer already checked) is in
// csrc/include/sparseops/routing.h.
//
// topk_route: one warp per token row. Lane l holds experts [l*VPT, l*VPT + VPT) in registers
// (VPT = E/32 rounded up to a power of two), so every per-expert array is indexed by
// compile-time constants and lives in registers. Selection is k rounds of a warp argmax;
// ties go to the lower expert index everywhere, which makes ids identical to the reference.
//
// route_metadata: a stable counting sort of the T*k slots by expert, deterministic by
// construction (no atomics: every position is a sum of counts taken in slot order).
// Small inputs (the decode case) take one launch; large inputs take three (tile
// histograms, per-expert prefix over tiles, placement).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "sparseops/checks.h"
#include "sparseops/cuda_reduce.cuh"
#include "sparseops/ranking.h"
#include "sparseops/routing.h"

namespace sparseops {
namespace {

// Index of "no candidate" in warp argmax reductions: larger than any expert or group index,
// so a real candidate (even one ranked -inf) always wins a tie against it.
constexpr int kNoIndex = INT_MAX;

// ---------------------------------------------------------------------------------------
// Small device helpers
// ---------------------------------------------------------------------------------------

// Infinity and the largest finite value of the accumulate type. Own constants rather than
// std::numeric_limits so the file does not depend on --expt-relaxed-constexpr.
template <typename T>
struct AccLimits;
template <>
struct AccLimits<float> {
  __device__ static float inf() { return INFINITY; }
  __device__ static float max_finite() { return FLT_MAX; }
};
template <>
struct AccLimits<double> {
  __device__ static double inf() { return static_cast<double>(INFINITY); }
  __device__ static double max_finite() { return DBL_MAX; }
};

// Full-accuracy libdevice exp (expf: at most 2 ulp, exp: at most 1 ulp). Never __expf (or
// -use_fast_math): its error would move weights beyond fp32 rounding.
__device__ __forceinline__ float accurate_exp(float x) { return expf(x); }
__device__ __forceinline__ double accurate_exp(double x) { return exp(x); }

// The reference's per_group = biased.nan_to_num(nan=-inf): torch.nan_to_num also maps +-inf
// to the largest finite magnitude when posinf/neginf are not given, so we do the same.
template <typename acc_t>
__device__ __forceinline__ acc_t group_value_of(acc_t v) {
  const acc_t inf = AccLimits<acc_t>::inf();
  if (isnan(v)) return -inf;
  if (v == inf) return AccLimits<acc_t>::max_finite();
  if (v == -inf) return -AccLimits<acc_t>::max_finite();
  return v;
}

// ---------------------------------------------------------------------------------------
// topk_route
// ---------------------------------------------------------------------------------------

// Rows (warps) per block. Four warps: a block is small enough that T = 1..64 decode rows
// spread over many SMs, and big enough to keep the SM schedulers busy for large T.
constexpr int kTopkWarpsPerBlock = 4;
constexpr int kTopkMaxThreads = kTopkWarpsPerBlock * kWarpSize;
// Dynamic shared memory without opting in to more (cudaFuncSetAttribute).
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

struct TopkRouteParams {
  int64_t num_tokens;
  int num_experts;
  int k;
  int n_group;  // 1: no group stage
  int topk_group;
  int group_size;       // E / n_group
  int lanes_per_group;  // power of two: lanes that scan one group's experts together
  bool group_top2;      // a group scores the sum of its two best values (else its best)
  bool sigmoid;
  bool topk_then_softmax;  // softmax scoring with order topk_then_softmax
  bool renormalize;
  bool needs_score;  // bias or groups: ranks need the fp64-computed score
  double scale;
};

// One warp per row; VPT experts per lane. Stages, all warp-synchronous:
//   1. load the row's logits (acc_t) and the per-lane candidate bitmask (e < E, enabled);
//   2. softmax statistics in acc_t for the weights (softmax_then_topk);
//   3. ranks: the logit, or with a bias the fp64 score rounded to acc_t plus the bias;
//      with groups also each expert's group value, into this warp's shared memory;
//   4. group scores (sum of the best two values, or the best one: group_scoring) and the
//      topk_group best groups;
//   5. k rounds of warp argmax over candidates; lane j keeps the expert of slot j;
//   6. weights on lanes j < k, coalesced stores of ids and weights.
template <typename scalar_t, typename acc_t, int VPT>
__global__ void __launch_bounds__(kTopkMaxThreads)
    topk_route_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ bias,
                      const bool* __restrict__ mask, const TopkRouteParams p,
                      acc_t* __restrict__ weights, int32_t* __restrict__ ids) {
  static_assert(VPT >= 1 && VPT <= 32 && (VPT & (VPT - 1)) == 0, "VPT: power of two <= 32");
  // Raw bytes: one extern array serves every acc_t instantiation.
  extern __shared__ __align__(16) unsigned char topk_smem[];

  const acc_t inf = AccLimits<acc_t>::inf();
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  // The whole warp leaves together, so the shuffles below always see 32 live lanes.
  if (row >= p.num_tokens) return;

  const int E = p.num_experts;
  const scalar_t* x_row = logits + row * E;
  const int first = lane * VPT;  // this lane's first expert

  // 1. Logits and candidates. A bitmask, not a -inf sentinel: an enabled expert whose rank
  //    is -inf must still be chosen before any non-candidate.
  acc_t val[VPT];
  uint32_t candidates = 0;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int e = first + j;
    val[j] = -inf;
    if (e < E) {
      val[j] = static_cast<acc_t>(x_row[e]);
      if (mask == nullptr || mask[e]) candidates |= 1u << j;
    }
  }
  const uint32_t enabled = candidates;
  const bool softmax_then_topk = !p.sigmoid && !p.topk_then_softmax;

  // 2. softmax over enabled experts, in acc_t like the reference's weights. A NaN logit makes
  //    sum_exp NaN (the max ignores it, its exp does not), hence every p NaN -> 0, as in
  //    softmax(...).nan_to_num(0).
  acc_t max_x = -inf;
  acc_t sum_exp = 0;
  if (softmax_then_topk) {
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if ((enabled >> j) & 1u) max_x = nan_ignoring_max(max_x, val[j]);
    }
    max_x = warp_max(max_x);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if ((enabled >> j) & 1u) sum_exp += accurate_exp(val[j] - max_x);
    }
    sum_exp = warp_sum(sum_exp);
  }

  // 3. Ranks. Without a bias the rank is the logit itself (it orders experts exactly as
  //    softmax or sigmoid would). Otherwise score_fp64 rounded to acc_t: computing it in
  //    double is what keeps ids identical across backends (selection_scores_ref).
  const bool grouped = p.n_group > 1;
  acc_t* group_value = nullptr;  // [E] this warp's biased scores, for the group stage
  acc_t* group_score = nullptr;  // [n_group]
  if (grouped) {
    group_value =
        reinterpret_cast<acc_t*>(topk_smem) + static_cast<int64_t>(warp) * (E + p.n_group);
    group_score = group_value + E;
  }
  if (p.needs_score) {
    double max_xd = -static_cast<double>(INFINITY);
    double sum_expd = 0.0;
    if (softmax_then_topk) {
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        if ((enabled >> j) & 1u) max_xd = nan_ignoring_max(max_xd, static_cast<double>(val[j]));
      }
      max_xd = warp_max(max_xd);
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        if ((enabled >> j) & 1u) sum_expd += exp(static_cast<double>(val[j]) - max_xd);
      }
      sum_expd = warp_sum(sum_expd);
    }
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int e = first + j;
      if (e >= E) continue;
      const bool is_enabled = (enabled >> j) & 1u;
      const double xd = static_cast<double>(val[j]);
      double score_fp64;
      if (p.sigmoid) {
        score_fp64 = 1.0 / (1.0 + exp(-xd));
      } else if (softmax_then_topk) {
        // A disabled expert's softmax is 0 (masked to -inf); a NaN row is 0 (nan_to_num).
        score_fp64 = is_enabled ? exp(xd - max_xd) / sum_expd : 0.0;
        if (isnan(score_fp64)) score_fp64 = 0.0;
      } else {
        score_fp64 = xd;  // topk_then_softmax ranks by the logit
      }
      const acc_t score = static_cast<acc_t>(score_fp64);
      const acc_t biased = bias != nullptr ? score + bias[e] : score;
      if (grouped) group_value[e] = is_enabled ? group_value_of(biased) : -inf;
      if (bias != nullptr) val[j] = biased;
    }
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    if (isnan(val[j])) val[j] = -inf;
  }

  // 4. Groups: score each group by the sum of its two best values (or by its best value
  //    with group_top2 off), keep the topk_group best groups (larger first, lower group
  //    index on ties).
  if (grouped) {
    __syncwarp();  // group_value written by every lane above
    const int G = p.n_group;
    const int gs = p.group_size;
    const int lpg = p.lanes_per_group;
    const int sub = lane & (lpg - 1);
    // With G <= 32 each group gets lpg = 32/G (rounded down to a power of two) lanes that
    // stride through its gs values, then a top-2 merge across those lanes: DeepSeek-V3
    // (E = 256, G = 8) scans 8 values per lane instead of 32. With G > 32 (gs <= 31)
    // each lane scans whole groups. Each lane reads at most ~2*E/32 values either way.
    for (int g0 = 0; g0 < G; g0 += kWarpSize / lpg) {  // uniform trip count: shuffles OK
      const int g = g0 + lane / lpg;
      acc_t top0 = -inf, top1 = -inf;  // best and second best of the multiset
      if (g < G) {
        for (int i = sub; i < gs; i += lpg) {
          const acc_t v = group_value[g * gs + i];
          if (v > top0) {
            top1 = top0;
            top0 = v;
          } else if (v > top1) {
            top1 = v;
          }
        }
      }
      for (int offset = lpg / 2; offset > 0; offset /= 2) {  // stays inside the lpg lanes
        const acc_t other0 = __shfl_xor_sync(kFullWarpMask, top0, offset);
        const acc_t other1 = __shfl_xor_sync(kFullWarpMask, top1, offset);
        if (other0 > top0) {
          top1 = other1 > top0 ? other1 : top0;
          top0 = other0;
        } else {
          top1 = other0 > top1 ? other0 : top1;
        }
      }
      if (sub == 0 && g < G) group_score[g] = p.group_top2 ? top0 + top1 : top0;
    }
    __syncwarp();  // group_score complete before any lane reads it

    if (p.topk_group < G) {
      // Round r picks the best group ranked strictly after round r-1's pick, so no per-group
      // "taken" flags are needed. Group scores are never NaN (values are finite or -inf),
      // so the order is total. After the loop (last_v, last_g) is the topk_group-th best
      // group, and a group is chosen iff it does not rank after it.
      acc_t last_v = inf;
      int last_g = -1;  // every group ranks after (+inf, -1)
      for (int r = 0; r < p.topk_group; ++r) {
        acc_t best_v = -inf;
        int best_g = kNoIndex;
        for (int g = lane; g < G; g += kWarpSize) {
          const acc_t v = group_score[g];
          if (ranks_before(last_v, last_g, v, g) && ranks_before(v, g, best_v, best_g)) {
            best_v = v;
            best_g = g;
          }
        }
        warp_argmax(best_v, best_g);
        last_v = best_v;
        last_g = best_g;
      }
#pragma unroll
      for (int j = 0; j < VPT; ++j) {
        if ((candidates >> j) & 1u) {
          const int g = (first + j) / gs;
          if (ranks_before(last_v, last_g, group_score[g], g)) candidates &= ~(1u << j);
        }
      }
    }
  }

  // 5. Selection: k rounds of warp argmax among candidates. Lane-local scan in index order
  //    with a strict '>' keeps the lowest index on ties; the butterfly does the same across
  //    lanes (lower lanes own lower indices). Lane j records slot j's expert.
  int slot_expert = -1;
  for (int r = 0; r < p.k; ++r) {
    acc_t best_v = -inf;
    int best_e = kNoIndex;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      if (((candidates >> j) & 1u) && (best_e == kNoIndex || val[j] > best_v)) {
        best_v = val[j];
        best_e = first + j;
      }
    }
    warp_argmax(best_v, best_e);
    if (best_e == kNoIndex) break;  // same on every lane: no candidate left, rest stay -1
    if (lane == r) slot_expert = best_e;
    if (best_e / VPT == lane) candidates &= ~(1u << (best_e % VPT));
  }

  // 6. Weights from unbiased scores, lane j < k for slot j. The chosen logit is re-read from
  //    global memory (the row was just loaded, so it is an L1/L2 hit) rather than carried
  //    through every argmax round.
  const bool in_k = lane < p.k;
  const bool valid = slot_expert >= 0;  // only lanes < k can hold an expert
  const acc_t x_sel = valid ? static_cast<acc_t>(x_row[slot_expert]) : acc_t(0);
  acc_t w;
  if (p.topk_then_softmax) {
    // softmax over the k slots, invalid slots as -inf: a NaN, +inf or all -inf selection
    // makes the whole row NaN -> 0, exactly like softmax(sel).nan_to_num(0).
    const acc_t sel = valid ? x_sel : -inf;
    const acc_t sel_max = warp_max(in_k ? sel : -inf);
    const acc_t sel_exp = in_k ? accurate_exp(sel - sel_max) : acc_t(0);
    const acc_t sel_sum = warp_sum(sel_exp);
    w = sel_exp / sel_sum;
    if (!valid || isnan(w)) w = 0;
  } else {
    acc_t prob = 0;
    if (valid) {
      if (p.sigmoid) {
        prob = acc_t(1) / (acc_t(1) + accurate_exp(-x_sel));  // NaN logit stays NaN (as ref)
      } else {
        prob = accurate_exp(x_sel - max_x) / sum_exp;
        if (isnan(prob)) prob = 0;
      }
    }
    w = prob;
    if (p.renormalize) {
      const acc_t total = warp_sum(w);  // lanes >= k and empty slots add 0
      w = total > acc_t(0) ? w / total : acc_t(0);
    }
  }
  w *= static_cast<acc_t>(p.scale);
  if (in_k) {
    const int64_t out = row * p.k + lane;  // slots of a row are consecutive: coalesced
    ids[out] = slot_expert;
    weights[out] = w;
  }
}

template <typename scalar_t, typename acc_t>
void launch_topk_route(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& mask,
                       const TopkRouteConfig& cfg, at::Tensor& weights, at::Tensor& ids) {
  const int64_t E = cfg.num_experts;
  TopkRouteParams p;
  p.num_tokens = cfg.num_tokens;
  p.num_experts = static_cast<int>(E);
  p.k = static_cast<int>(cfg.k);
  p.n_group = static_cast<int>(cfg.n_group);
  p.topk_group = static_cast<int>(cfg.topk_group);
  p.group_size = static_cast<int>(cfg.group_size());
  // kMax (DeepSeek-V2 group_limited_greedy) scores a group by its best value; so does
  // kTop2Sum for groups of one expert. The top-2 scan below runs either way (it is the
  // group's max plus a runner-up that kMax simply ignores).
  p.group_top2 = cfg.group_scoring == GroupScoring::kTop2Sum && p.group_size >= 2;
  p.lanes_per_group = 1;
  if (p.n_group <= kWarpSize) {
    while (p.lanes_per_group * 2 * p.n_group <= kWarpSize) p.lanes_per_group *= 2;
  }
  p.sigmoid = cfg.scoring == Scoring::kSigmoid;
  p.topk_then_softmax = cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kTopkThenSoftmax;
  p.renormalize = cfg.renormalize;
  p.needs_score = cfg.needs_score();
  p.scale = cfg.scale;

  const acc_t* bias_ptr = cfg.has_bias ? bias.const_data_ptr<acc_t>() : nullptr;
  const bool* mask_ptr = cfg.has_mask ? mask.const_data_ptr<bool>() : nullptr;
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  acc_t* weights_ptr = weights.mutable_data_ptr<acc_t>();
  int32_t* ids_ptr = ids.mutable_data_ptr<int32_t>();

  // Groups need (E + n_group) acc_t of shared memory per warp: at most 16 KB (E = 1024,
  // n_group = 1024, fp64), so with fewer warps per block it always fits the default 48 KB.
  int warps_per_block = kTopkWarpsPerBlock;
  int64_t smem_bytes = 0;
  if (p.n_group > 1) {
    const int64_t per_warp = (E + p.n_group) * static_cast<int64_t>(sizeof(acc_t));
    warps_per_block =
        static_cast<int>(std::min<int64_t>(kTopkWarpsPerBlock, kDefaultSharedBytes / per_warp));
    smem_bytes = per_warp * warps_per_block;
  }
  const int64_t blocks = (p.num_tokens + warps_per_block - 1) / warps_per_block;
  TORCH_CHECK(blocks <= INT_MAX, "topk_route: too many tokens for one launch, T = ", p.num_tokens);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // VPT = E/32 rounded up to a power of two, so lane l owns experts [l*VPT, l*VPT + VPT).
  int vpt = 1;
  while (vpt * kWarpSize < E) vpt *= 2;
  auto launch = [&](auto vpt_constant) {
    constexpr int kVpt = decltype(vpt_constant)::value;
    topk_route_kernel<scalar_t, acc_t, kVpt>
        <<<static_cast<unsigned>(blocks), warps_per_block * kWarpSize, smem_bytes, stream>>>(
            logits_ptr, bias_ptr, mask_ptr, p, weights_ptr, ids_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (vpt) {
    case 1:
      launch(std::integral_constant<int, 1>{});
      break;
    case 2:
      launch(std::integral_constant<int, 2>{});
      break;
    case 4:
      launch(std::integral_constant<int, 4>{});
      break;
    case 8:
      launch(std::integral_constant<int, 8>{});
      break;
    case 16:
      launch(std::integral_constant<int, 16>{});
      break;
    case 32:
      launch(std::integral_constant<int, 32>{});
      break;
    default:
      TORCH_CHECK(false, "topk_route: num_experts must be in [1, 1024], got ", E);
  }
}

// ---------------------------------------------------------------------------------------
// route_metadata
// ---------------------------------------------------------------------------------------

// Every metadata kernel but the column scan runs 8 warps (256 threads). The per-warp
// per-expert cursors, 8 * (E + 1) ints, are 32.8 KB at E = 1024: with the two E + 1 scans
// beside them the block stays under the 48 KB of dynamic shared memory that needs no opt-in.
constexpr int kMetaWarps = 8;
constexpr int kMetaThreads = kMetaWarps * kWarpSize;
// A tile of the large path: 128 consecutive slots per warp (4 steps of 32). 1024 slots per
// block keeps the [tiles, E + 1] workspace about the size of ids itself at E = 1024.
constexpr int kSlotsPerWarpInTile = 128;
constexpr int kTileSlots = kMetaWarps * kSlotsPerWarpInTile;
// Up to this many slots one launch does everything (decode: T = 1..512 with k = 8).
constexpr int64_t kSmallPathMaxSlots = 4096;
// Padded blocks per warp that make another small-path block worth launching.
constexpr int64_t kPaddedBlocksPerWarp = 4;
constexpr int64_t kSmallPathMaxBlocks = 32;
// Exclusive-scan scratch: one int per warp of a block (<= 32) plus the total.
constexpr int kScanScratchInts = kBlockScanScratch;

struct RouteMetadataParams {
  const int32_t* ids;  // [n]
  int n;               // T * k
  int k;
  int num_experts;  // E
  int block_m;      // 0: no padded layout
  int64_t num_padded_blocks;
  int32_t* counts;        // [E]
  int32_t* offs;          // [E]
  int32_t* sorted_slots;  // [n]
  int32_t* inverse;       // [n]
  int32_t* tokens;        // [n]
  int32_t* padded_slots;  // [P]
  int32_t* block_expert;  // [P / block_m]
  int32_t* padded_offs;   // [E]
};

// Bucket of a slot: its expert, or E for a dropped slot. Values outside [-1, E) (the CPU op
// rejects them; this kernel cannot report them without a host sync) count as dropped, so
// they never index anything out of bounds.
__device__ __forceinline__ int slot_bucket(int id, int num_experts) {
  return (id >= 0 && id < num_experts) ? id : num_experts;
}

// One warp walks slots [begin, end) in order, 32 at a time, keeping a running count per
// bucket in cursor[0..E] (this warp's row of shared memory). Slots of one step that share a
// bucket find each other with __match_any_sync; the lower lanes (lower slots) of a group go
// first, so a slot's position = cursor[bucket] before the step + its rank inside the step,
// which is the stable order.
//   kPlace = false: only counts (cursor starts at 0 and ends as the warp's histogram).
//   kPlace = true:  cursor starts at the absolute first position of this warp's run of each
//                   bucket, and every slot is written to its sorted position.
template <bool kPlace>
__device__ void rank_warp_slots(const RouteMetadataParams& p, int begin, int end, int* cursor,
                                const int* expert_start, const int* padded_start) {
  const int lane = threadIdx.x % kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarpSize) {  // uniform trip count
    const int64_t slot64 = base + lane;
    const bool live = slot64 < end;
    const int slot = static_cast<int>(slot64);
    const int bucket = live ? slot_bucket(p.ids[slot], p.num_experts) : -1;
    const unsigned peers = __match_any_sync(kFullWarpMask, bucket);
    const int rank_in_step = __popc(peers & lanes_below);
    if (kPlace && live) {
      const int pos = cursor[bucket] + rank_in_step;
      p.sorted_slots[pos] = slot;
      p.inverse[slot] = pos;
      p.tokens[pos] = slot / p.k;
      if (p.block_m > 0 && bucket < p.num_experts) {
        p.padded_slots[padded_start[bucket] + (pos - expert_start[bucket])] = slot;
      }
    }
    __syncwarp();  // every lane has read cursor[bucket] before its group leader bumps it
    if (live && rank_in_step == 0) cursor[bucket] += __popc(peers);
    __syncwarp();  // the bumps are visible to the next step
  }
}

__device__ __forceinline__ int round_up_to(int count, int multiple) {
  return static_cast<int>((static_cast<int64_t>(count) + multiple - 1) / multiple * multiple);
}

// expert_start / padded_start from per-bucket totals already stored in expert_start[0..E]
// (bucket E = dropped): exclusive scans, so expert_start[E] = kept rows and
// padded_start[E] = padded rows used. Whole block; ends synchronised.
__device__ void scan_expert_layout(const RouteMetadataParams& p, int* expert_start,
                                   int* padded_start, int* scratch) {
  const int cols = p.num_experts + 1;
  if (p.block_m > 0) {
    for (int e = threadIdx.x; e < cols; e += blockDim.x) {
      padded_start[e] = e < p.num_experts ? round_up_to(expert_start[e], p.block_m) : 0;
    }
  }
  __syncthreads();
  block_exclusive_scan_inplace(expert_start, cols, scratch);
  if (p.block_m > 0) block_exclusive_scan_inplace(padded_start, cols, scratch);
}

// counts, offs and padded_offs: written by one block only.
__device__ void write_expert_layout(const RouteMetadataParams& p, const int* expert_start,
                                    const int* padded_start) {
  for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {
    p.counts[e] = expert_start[e + 1] - expert_start[e];
    p.offs[e] = expert_start[e + 1];
    if (p.block_m > 0) p.padded_offs[e] = padded_start[e + 1];
  }
}

// Padded blocks [first, num_padded_blocks) with the given stride, one warp per block:
// block_expert (the expert whose padded range holds the block, as searchsorted(padded_offs,
// block_start, right=True); -1 past the last used block) and the sentinel n in every row
// that holds no slot. Kept rows are written by the placement pass, so the two sets of
// writes are disjoint and no ordering between them is needed.
__device__ void fill_padded_blocks(const RouteMetadataParams& p, int64_t first, int64_t stride,
                                   const int* expert_start, const int* padded_start) {
  const int lane = threadIdx.x % kWarpSize;
  const int E = p.num_experts;
  for (int64_t b = first; b < p.num_padded_blocks; b += stride) {
    const int64_t row0 = b * p.block_m;
    // First expert whose padded end (padded_start[e + 1]) lies beyond row0. Every lane
    // reads the same addresses (shared-memory broadcast).
    int lo = 0, hi = E;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (padded_start[mid + 1] > row0) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int expert = lo < E ? lo : -1;
    if (lane == 0) p.block_expert[b] = expert;
    // Rows [padded_start[e], padded_start[e] + count[e]) hold slots; the rest is padding.
    const int64_t kept_end = expert >= 0 ? static_cast<int64_t>(padded_start[expert]) +
                                               (expert_start[expert + 1] - expert_start[expert])
                                         : row0;
    for (int64_t r = row0 + lane; r < row0 + p.block_m; r += kWarpSize) {
      if (r >= kept_end) p.padded_slots[r] = p.n;
    }
  }
}

// Shared-memory layout of the single-launch and placement kernels, in ints.
__host__ __device__ constexpr int64_t placement_shared_ints(int64_t num_experts) {
  return (kMetaWarps + 2) * (num_experts + 1) + kScanScratchInts;
}

// Small path, one launch. Every block computes the full histogram and layout (n <= 4096
// slots: cheap, and it saves a second launch); block 0 alone writes counts/offs and places
// the slots, and all blocks share the padded rows, which outnumber the slots at decode
// (E = 256, block_m = 64, 512 slots: 16,640 padded rows). Warp w ranks the w-th contiguous
// chunk of the slots, so chunks, steps and lanes are all in slot order.
__global__ void __launch_bounds__(kMetaThreads)
    route_metadata_small_kernel(const RouteMetadataParams p) {
  extern __shared__ int meta_smem[];
  const int cols = p.num_experts + 1;
  int* cursor = meta_smem;                         // [kMetaWarps][E + 1]
  int* expert_start = cursor + kMetaWarps * cols;  // [E + 1]
  int* padded_start = expert_start + cols;         // [E + 1]
  int* scratch = padded_start + cols;              // [kScanScratchInts]
  const int warp = threadIdx.x / kWarpSize;

  for (int i = threadIdx.x; i < kMetaWarps * cols; i += blockDim.x) cursor[i] = 0;
  __syncthreads();
  // Chunks are whole 32-slot steps: ceil(n / 256) * 32 slots per warp.
  const int chunk = (p.n + kMetaThreads - 1) / kMetaThreads * kWarpSize;
  const int begin = min(p.n, warp * chunk);
  const int end = min(p.n, begin + chunk);
  rank_warp_slots<false>(p, begin, end, cursor + warp * cols, nullptr, nullptr);
  __syncthreads();

  // Per bucket: exclusive prefix over warps (each warp's offset inside the bucket) and the
  // bucket total, then the layout over buckets.
  for (int e = threadIdx.x; e < cols; e += blockDim.x) {
    int running = 0;
    for (int w = 0; w < kMetaWarps; ++w) {
      const int c = cursor[w * cols + e];
      cursor[w * cols + e] = running;
      running += c;
    }
    expert_start[e] = running;
  }
  scan_expert_layout(p, expert_start, padded_start, scratch);

  if (blockIdx.x == 0) {  // uniform per block, so the barrier inside is safe
    write_expert_layout(p, expert_start, padded_start);
    for (int e = threadIdx.x; e < cols; e += blockDim.x) {
      for (int w = 0; w < kMetaWarps; ++w) cursor[w * cols + e] += expert_start[e];
    }
    __syncthreads();
    rank_warp_slots<true>(p, begin, end, cursor + warp * cols, expert_start, padded_start);
  }
  if (p.block_m > 0) {
    fill_padded_blocks(p, static_cast<int64_t>(blockIdx.x) * kMetaWarps + warp,
                       static_cast<int64_t>(gridDim.x) * kMetaWarps, expert_start, padded_start);
  }
}

// Large path (a): one block per tile of kTileSlots consecutive slots writes the tile's
// bucket histogram tile_hist[tile][0..E] (column E: dropped slots).
__global__ void __launch_bounds__(kMetaThreads)
    route_metadata_tile_histogram_kernel(const RouteMetadataParams p, int* tile_hist) {
  extern __shared__ int meta_smem[];
  const int cols = p.num_experts + 1;
  int* cursor = meta_smem;  // [kMetaWarps][E + 1]
  const int warp = threadIdx.x / kWarpSize;

  for (int i = threadIdx.x; i < kMetaWarps * cols; i += blockDim.x) cursor[i] = 0;
  __syncthreads();
  const int64_t warp_begin =
      static_cast<int64_t>(blockIdx.x) * kTileSlots + warp * kSlotsPerWarpInTile;
  const int begin = static_cast<int>(std::min<int64_t>(p.n, warp_begin));
  const int end = static_cast<int>(std::min<int64_t>(p.n, warp_begin + kSlotsPerWarpInTile));
  rank_warp_slots<false>(p, begin, end, cursor + warp * cols, nullptr, nullptr);
  __syncthreads();
  int* hist_row = tile_hist + static_cast<int64_t>(blockIdx.x) * cols;
  for (int e = threadIdx.x; e < cols; e += blockDim.x) {
    int total = 0;
    for (int w = 0; w < kMetaWarps; ++w) total += cursor[w * cols + e];
    hist_row[e] = total;
  }
}

// Large path (b): per bucket, exclusive prefix of the tile histograms over tiles (in place)
// and the bucket totals. Block = 32 consecutive buckets x 32 contiguous ranges of tiles:
// each warp (fixed threadIdx.y) reads 32 neighbouring ints of one tile row, so loads and
// stores are coalesced; ceil((E + 1) / 32) blocks.
constexpr int kColumnScanRanges = 32;
constexpr int kColumnScanThreads = kWarpSize * kColumnScanRanges;

__global__ void __launch_bounds__(kColumnScanThreads)
    route_metadata_column_scan_kernel(int* tile_hist, int* bucket_totals, int64_t num_tiles,
                                      int cols) {
  __shared__ int range_sum[kColumnScanRanges][kWarpSize + 1];  // +1: no bank conflicts
  const int e = blockIdx.x * kWarpSize + threadIdx.x;
  const bool live = e < cols;
  const int64_t tiles_per_range = (num_tiles + kColumnScanRanges - 1) / kColumnScanRanges;
  const int64_t t0 = std::min<int64_t>(num_tiles, threadIdx.y * tiles_per_range);
  const int64_t t1 = std::min<int64_t>(num_tiles, t0 + tiles_per_range);

  int sum = 0;
  if (live) {
    for (int64_t t = t0; t < t1; ++t) sum += tile_hist[t * cols + e];
  }
  range_sum[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0) {
    int running = 0;
    for (int r = 0; r < kColumnScanRanges; ++r) {
      const int c = range_sum[r][threadIdx.x];
      range_sum[r][threadIdx.x] = running;
      running += c;
    }
    if (live) bucket_totals[e] = running;
  }
  __syncthreads();
  if (live) {
    int running = range_sum[threadIdx.y][threadIdx.x];
    for (int64_t t = t0; t < t1; ++t) {
      const int c = tile_hist[t * cols + e];
      tile_hist[t * cols + e] = running;
      running += c;
    }
  }
}

// Large path (c): one block per tile (same tiles as (a)). Each block rescans the E + 1
// bucket totals itself (cheaper than a fourth launch), recomputes its warps' histograms,
// and places its slots at
//   expert_start[e] + (e's slots in earlier tiles) + (in earlier warps) + (earlier steps)
//   + rank in step.
// Block 0 writes counts/offs/padded_offs; all blocks share the padded blocks.
__global__ void __launch_bounds__(kMetaThreads)
    route_metadata_place_kernel(const RouteMetadataParams p, const int* tile_prefix,
                                const int* bucket_totals) {
  extern __shared__ int meta_smem[];
  const int cols = p.num_experts + 1;
  int* cursor = meta_smem;                         // [kMetaWarps][E + 1]
  int* expert_start = cursor + kMetaWarps * cols;  // [E + 1]
  int* padded_start = expert_start + cols;         // [E + 1]
  int* scratch = padded_start + cols;              // [kScanScratchInts]
  const int warp = threadIdx.x / kWarpSize;

  for (int i = threadIdx.x; i < kMetaWarps * cols; i += blockDim.x) cursor[i] = 0;
  for (int e = threadIdx.x; e < cols; e += blockDim.x) expert_start[e] = bucket_totals[e];
  scan_expert_layout(p, expert_start, padded_start, scratch);  // synchronises first
  if (blockIdx.x == 0) write_expert_layout(p, expert_start, padded_start);

  const int64_t warp_begin =
      static_cast<int64_t>(blockIdx.x) * kTileSlots + warp * kSlotsPerWarpInTile;
  const int begin = static_cast<int>(std::min<int64_t>(p.n, warp_begin));
  const int end = static_cast<int>(std::min<int64_t>(p.n, warp_begin + kSlotsPerWarpInTile));
  rank_warp_slots<false>(p, begin, end, cursor + warp * cols, nullptr, nullptr);
  __syncthreads();
  const int* prefix_row = tile_prefix + static_cast<int64_t>(blockIdx.x) * cols;
  for (int e = threadIdx.x; e < cols; e += blockDim.x) {
    int running = expert_start[e] + prefix_row[e];
    for (int w = 0; w < kMetaWarps; ++w) {
      const int c = cursor[w * cols + e];
      cursor[w * cols + e] = running;
      running += c;
    }
  }
  __syncthreads();
  rank_warp_slots<true>(p, begin, end, cursor + warp * cols, expert_start, padded_start);
  if (p.block_m > 0) {
    fill_padded_blocks(p, static_cast<int64_t>(blockIdx.x) * kMetaWarps + warp,
                       static_cast<int64_t>(gridDim.x) * kMetaWarps, expert_start, padded_start);
  }
}

}  // namespace

void topk_route_cuda_kernel(const at::Tensor& logits, const at::Tensor& bias,
                            const at::Tensor& mask, const TopkRouteConfig& cfg, at::Tensor& weights,
                            at::Tensor& ids) {
  TORCH_CHECK(cfg.num_experts >= 1 && cfg.num_experts <= kMaxExperts,
              "topk_route: num_experts must be in [1, ", kMaxExperts, "], got ", cfg.num_experts);
  TORCH_CHECK(cfg.k >= 1 && cfg.k <= std::min<int64_t>(cfg.num_experts, kMaxTopk),
              "topk_route: k must be in [1, min(E, ", kMaxTopk, ")], got ", cfg.k);
  TORCH_CHECK(cfg.n_group >= 1 && cfg.num_experts % cfg.n_group == 0 && cfg.topk_group >= 1 &&
                  cfg.topk_group <= cfg.n_group,
              "topk_route: bad groups n_group = ", cfg.n_group, ", topk_group = ", cfg.topk_group);
  TORCH_CHECK(!cfg.has_bias || bias.defined(), "topk_route: has_bias without a bias tensor");
  TORCH_CHECK(!cfg.has_mask || mask.defined(), "topk_route: has_mask without a mask tensor");
  if (cfg.num_tokens == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        launch_topk_route<scalar_t, acc_t>(logits, bias, mask, cfg, weights, ids);
      });
}

void route_metadata_cuda_kernel(const at::Tensor& ids, int64_t num_experts, int64_t block_m,
                                RouteMetadata& out) {
  const int64_t n = ids.numel();
  const int64_t E = num_experts;
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "route_metadata: num_experts must be in [1, ",
              kMaxExperts, "], got ", E);
  TORCH_CHECK(block_m >= 0, "route_metadata: block_m must be >= 0, got ", block_m);
  TORCH_CHECK(ids.scalar_type() == at::kInt && ids.is_contiguous() && ids.dim() == 2,
              "route_metadata: ids must be a contiguous 2-D int32 tensor, got ", describe(ids));
  const int64_t k = ids.size(1);
  const int64_t padded_rows = block_m > 0 ? (n + E * (block_m - 1)) / block_m * block_m : 0;
  const int64_t num_padded_blocks = block_m > 0 ? padded_rows / block_m : 0;
  TORCH_CHECK(n <= kInt32Max && padded_rows <= kInt32Max,
              "route_metadata: T * k and its padded bound must fit in int32, got ids ",
              describe(ids), " with block_m = ", block_m);
  TORCH_CHECK(out.padded_slots.numel() == padded_rows &&
                  out.block_expert.numel() == num_padded_blocks &&
                  out.padded_offs.numel() == (block_m > 0 ? E : 0) && out.counts.numel() == E &&
                  out.sorted_slots.numel() == n,
              "route_metadata: output sizes do not match the inputs");

  RouteMetadataParams p;
  p.ids = ids.const_data_ptr<int32_t>();
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(std::max<int64_t>(k, 1));
  p.num_experts = static_cast<int>(E);
  p.block_m = static_cast<int>(block_m);
  p.num_padded_blocks = num_padded_blocks;
  p.counts = out.counts.mutable_data_ptr<int32_t>();
  p.offs = out.offs.mutable_data_ptr<int32_t>();
  p.sorted_slots = out.sorted_slots.mutable_data_ptr<int32_t>();
  p.inverse = out.inverse.mutable_data_ptr<int32_t>();
  p.tokens = out.tokens.mutable_data_ptr<int32_t>();
  p.padded_slots = block_m > 0 ? out.padded_slots.mutable_data_ptr<int32_t>() : nullptr;
  p.block_expert = block_m > 0 ? out.block_expert.mutable_data_ptr<int32_t>() : nullptr;
  p.padded_offs = block_m > 0 ? out.padded_offs.mutable_data_ptr<int32_t>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t cols = E + 1;
  const size_t placement_smem = placement_shared_ints(E) * sizeof(int);  // <= 41,132 bytes

  if (n <= kSmallPathMaxSlots) {
    // One launch. Extra blocks only when there are many padded blocks to fill: about
    // kPaddedBlocksPerWarp per warp, at most kSmallPathMaxBlocks blocks.
    const int64_t per_block = kMetaWarps * kPaddedBlocksPerWarp;
    const int64_t blocks = std::clamp<int64_t>((num_padded_blocks + per_block - 1) / per_block, 1,
                                               kSmallPathMaxBlocks);
    route_metadata_small_kernel<<<static_cast<unsigned>(blocks), kMetaThreads, placement_smem,
                                  stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  // Large path. Workspace (caching allocator, no sync): tile histograms, then bucket totals.
  const int64_t num_tiles = (n + kTileSlots - 1) / kTileSlots;  // <= 2^21
  at::Tensor workspace = at::empty({num_tiles * cols + cols}, ids.options().dtype(at::kInt));
  int* tile_hist = workspace.mutable_data_ptr<int>();
  int* bucket_totals = tile_hist + num_tiles * cols;

  route_metadata_tile_histogram_kernel<<<static_cast<unsigned>(num_tiles), kMetaThreads,
                                         kMetaWarps * cols * sizeof(int), stream>>>(p, tile_hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  route_metadata_column_scan_kernel<<<static_cast<unsigned>((cols + kWarpSize - 1) / kWarpSize),
                                      dim3(kWarpSize, kColumnScanRanges), 0, stream>>>(
      tile_hist, bucket_totals, num_tiles, static_cast<int>(cols));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  route_metadata_place_kernel<<<static_cast<unsigned>(num_tiles), kMetaThreads, placement_smem,
                                stream>>>(p, tile_hist, bucket_totals);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparseops
