// MoE routing CPU kernels. Semantics: python/sparseops/reference/routing.py.
//
// topk_route: the transcendental work (fp64 selection scores, log-sum-exp of the softmax)
// runs as vectorised, multithreaded ATen passes over [T, E]; what ATen cannot express
// cheaply -- grouped selection and an insertion top-k that visits each expert once -- runs
// in one at::parallel_for over rows. Using ATen's own fp64 sigmoid/softmax also makes the
// CPU scores bit-identical to the reference's.
//
// route_metadata: a parallel stable counting sort (per-chunk histograms, a scan, then
// per-chunk placement in slot order), so the output never depends on thread timing.
#include "sparseops/routing.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "sparseops/checks.h"

namespace sparseops {
namespace {

using at::Tensor;

// Rows per parallel task: large enough to amortise task start-up (~1 us), small enough to
// balance two to 64 threads at T = 1024.
constexpr int64_t kRowGrain = 64;

// True when candidate (va, a) ranks before (vb, b): larger value first, lower index on ties.
template <typename acc_t>
inline bool ranks_before(acc_t va, int64_t a, acc_t vb, int64_t b) {
  return va > vb || (va == vb && a < b);
}

// Inserts expert e with rank v into the sorted top list (size n <= cap). Experts arrive in
// increasing index order, so an equal rank goes after the ones already there.
template <typename acc_t>
inline void insert_topk(acc_t v, int32_t e, acc_t* top_v, int32_t* top_e, int64_t& n, int64_t cap) {
  if (n == cap && !(v > top_v[n - 1])) return;
  int64_t j = n < cap ? n++ : cap - 1;
  while (j > 0 && v > top_v[j - 1]) {
    top_v[j] = top_v[j - 1];
    top_e[j] = top_e[j - 1];
    --j;
  }
  top_v[j] = v;
  top_e[j] = e;
}

// fp64 router scores rounded to the accumulate type, exactly as selection_scores_ref does.
Tensor selection_scores(const Tensor& logits, const Tensor& mask, const TopkRouteConfig& cfg,
                        at::ScalarType acc) {
  const Tensor x64 = logits.to(at::kDouble);
  if (cfg.scoring == Scoring::kSigmoid) return at::sigmoid(x64).to(acc);
  if (cfg.order == Order::kTopkThenSoftmax) return logits.to(acc);
  const Tensor xm = mask.defined() ? x64.masked_fill(mask.logical_not(), -INFINITY) : x64;
  return at::softmax(xm, -1).nan_to_num(0.0).to(acc);
}

// Blocks of at most this many logits take the scalar score path (see topk_route_rows).
constexpr int64_t kScalarElements = 512;

// selection_scores for one row in scalar code: the same fp64 formulas as the ATen path
// (sigmoid as 1 / (1 + exp(-x)); softmax as exp(x - max) / sum over enabled experts, a NaN
// anywhere making the row 0 as nan_to_num does), rounded to acc_t.
template <typename scalar_t, typename acc_t>
void scalar_selection_scores(const scalar_t* x, const bool* enabled, const TopkRouteConfig& cfg,
                             acc_t* out) {
  const int64_t E = cfg.num_experts;
  auto on = [&](int64_t e) { return enabled == nullptr || enabled[e]; };
  if (cfg.scoring == Scoring::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) {
      out[e] = static_cast<acc_t>(1.0 / (1.0 + std::exp(-static_cast<double>(x[e]))));
    }
  } else if (cfg.order == Order::kTopkThenSoftmax) {
    for (int64_t e = 0; e < E; ++e) out[e] = static_cast<acc_t>(x[e]);
  } else {
    double max_x = -INFINITY, sum = 0;
    bool nan = false;
    for (int64_t e = 0; e < E; ++e) {
      if (!on(e)) continue;
      const double v = static_cast<double>(x[e]);
      nan |= std::isnan(v);
      max_x = std::max(max_x, v);
    }
    for (int64_t e = 0; e < E; ++e) {
      if (on(e)) sum += std::exp(static_cast<double>(x[e]) - max_x);
    }
    for (int64_t e = 0; e < E; ++e) {
      const double p = on(e) ? std::exp(static_cast<double>(x[e]) - max_x) / sum : 0.0;
      out[e] = nan || std::isnan(p) ? acc_t(0) : static_cast<acc_t>(p);
    }
  }
}

// Max and sum of exp(x - max) over enabled experts, in acc_t: the softmax the weights use.
template <typename scalar_t, typename acc_t>
void softmax_stats(const scalar_t* x, const bool* enabled, int64_t E, acc_t& max_x, acc_t& sum) {
  max_x = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    if (enabled != nullptr && !enabled[e]) continue;
    const acc_t v = static_cast<acc_t>(x[e]);
    nan |= std::isnan(v);
    max_x = std::max(max_x, v);
  }
  sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (enabled == nullptr || enabled[e]) sum += std::exp(static_cast<acc_t>(x[e]) - max_x);
  }
  if (nan) sum = std::numeric_limits<acc_t>::quiet_NaN();  // as softmax: NaN row -> weights 0
}

template <typename scalar_t, typename acc_t>
void topk_route_rows(const Tensor& logits, const Tensor& bias, const Tensor& mask,
                     const TopkRouteConfig& cfg, Tensor& weights, Tensor& ids) {
  const int64_t T = cfg.num_tokens, E = cfg.num_experts, k = cfg.k;
  const int64_t G = cfg.n_group, gs = cfg.group_size();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t* b = cfg.has_bias ? bias.const_data_ptr<acc_t>() : nullptr;
  const bool* enabled = cfg.has_mask ? mask.const_data_ptr<bool>() : nullptr;
  acc_t* w_out = weights.mutable_data_ptr<acc_t>();
  int32_t* id_out = ids.mutable_data_ptr<int32_t>();

  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kLowest = std::numeric_limits<acc_t>::lowest();
  constexpr acc_t kMax = std::numeric_limits<acc_t>::max();

  // ATen computes the transcendental parts per block of rows: temporaries of ~256 KB stay in
  // cache and are recycled by the allocator, where whole-[T, E] fp64 temporaries cost more in
  // page faults than in arithmetic (measured: 14 of 77 ms at T = 16384, E = 256, one core).
  const int64_t rows_per_block = std::max<int64_t>(1, 32768 / E);
  const bool softmax_then_topk =
      cfg.scoring == Scoring::kSoftmax && cfg.order == Order::kSoftmaxThenTopk;
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> group_score(G);
    std::vector<char> group_chosen(G);
    std::vector<acc_t> rank_buffer(E);
    std::vector<char> candidate_buffer(E);
    std::vector<acc_t> score_buffer(E);
    acc_t* score_row = score_buffer.data();
    acc_t* rank = rank_buffer.data();
    char* candidate = candidate_buffer.data();
    acc_t top_v[kMaxTopk];
    int32_t top_e[kMaxTopk];
    for (int64_t block = begin; block < end; block += rows_per_block) {
      const int64_t block_end = std::min(end, block + rows_per_block);
      // Small blocks (decode) compute the scores in scalar code below: the ATen calls would
      // cost more than the arithmetic they save (about half of a 6 us call at T = 1).
      const bool scalar = (block_end - block) * E <= kScalarElements;
      Tensor score_t, probs_t;
      if (!scalar) {
        const Tensor xb = logits.narrow(0, block, block_end - block);
        // fp64 selection scores, exactly as selection_scores_ref computes them.
        if (cfg.needs_score()) score_t = selection_scores(xb, mask, cfg, acc);
        // softmax_then_topk weights are the probabilities over enabled experts: a vectorised
        // ATen softmax (E scalar exps per row would cost more than the whole selection).
        if (softmax_then_topk) {
          Tensor xa = xb.to(acc);
          if (cfg.has_mask) xa = xa.masked_fill(mask.logical_not(), -INFINITY);
          probs_t = at::softmax(xa, -1).contiguous();
        }
      }
      const acc_t* score = score_t.defined() ? score_t.const_data_ptr<acc_t>() : nullptr;
      const acc_t* probs = probs_t.defined() ? probs_t.const_data_ptr<acc_t>() : nullptr;
      for (int64_t t = block; t < block_end; ++t) {
        const scalar_t* xr = x + t * E;
        const acc_t* sr = score ? score + (t - block) * E : nullptr;
        acc_t row_max = 0, row_sum = 1;  // scalar softmax_then_topk: weight = exp(x - max) / sum
        if (scalar) {
          if (cfg.needs_score()) {
            scalar_selection_scores(xr, enabled, cfg, score_row);
            sr = score_row;
          }
          if (softmax_then_topk) softmax_stats(xr, enabled, E, row_max, row_sum);
        }
        auto is_enabled = [&](int64_t e) { return enabled == nullptr || enabled[e]; };

        if (G > 1) {
          for (int64_t g = 0; g < G; ++g) {
            acc_t best = kNegInf, second = kNegInf;
            for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
              // As the reference's nan_to_num(nan=-inf): NaN counts as -inf, an infinite score as
              // the largest finite value, a disabled expert as -inf.
              const acc_t raw = sr[e] + (b ? b[e] : acc_t(0));
              const acc_t v =
                  !is_enabled(e) || std::isnan(raw) ? kNegInf : std::clamp(raw, kLowest, kMax);
              if (v > best) {
                second = best;
                best = v;
              } else if (v > second) {
                second = v;
              }
            }
            group_score[g] = gs >= 2 ? best + second : best;
            group_chosen[g] = 0;
          }
          for (int64_t r = 0; r < cfg.topk_group; ++r) {
            int64_t pick = -1;
            for (int64_t g = 0; g < G; ++g) {
              if (!group_chosen[g] &&
                  (pick < 0 || ranks_before(group_score[g], g, group_score[pick], pick))) {
                pick = g;
              }
            }
            group_chosen[pick] = 1;
          }
        }

        // Rank row first (a branch-free loop the compiler vectorises), then the top-k: fill
        // the list with the first k candidates, then only ranks above the current k-th best
        // (rare after the first few dozen experts) pay for an insertion.
        const bool all_candidates = enabled == nullptr && G == 1;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t v = b ? sr[e] + b[e] : static_cast<acc_t>(xr[e]);
          rank[e] = std::isnan(v) ? kNegInf : v;
        }
        if (!all_candidates) {
          for (int64_t e = 0; e < E; ++e) {
            candidate[e] = is_enabled(e) && (G == 1 || group_chosen[e / gs]);
          }
        }
        int64_t n = 0;
        int64_t e = 0;
        for (; e < E && n < k; ++e) {
          if (all_candidates || candidate[e])
            insert_topk(rank[e], static_cast<int32_t>(e), top_v, top_e, n, k);
        }
        if (n == k) {
          acc_t kth = top_v[k - 1];
          for (; e < E; ++e) {
            if (rank[e] > kth && (all_candidates || candidate[e])) {
              insert_topk(rank[e], static_cast<int32_t>(e), top_v, top_e, n, k);
              kth = top_v[k - 1];
            }
          }
        }

        acc_t* wr = w_out + t * k;
        int32_t* ir = id_out + t * k;
        acc_t total = 0;
        acc_t max_logit = kNegInf;
        for (int64_t j = 0; j < n; ++j) max_logit = std::max(max_logit, acc_t(xr[top_e[j]]));
        for (int64_t j = 0; j < k; ++j) {
          if (j >= n) {
            ir[j] = -1;
            wr[j] = 0;
            continue;
          }
          const acc_t xe = static_cast<acc_t>(xr[top_e[j]]);
          acc_t w;
          if (cfg.scoring == Scoring::kSigmoid) {
            w = acc_t(1) / (acc_t(1) + std::exp(-xe));
          } else if (cfg.order == Order::kSoftmaxThenTopk) {
            w = scalar ? std::exp(xe - row_max) / row_sum : probs[(t - block) * E + top_e[j]];
          } else {
            w = std::exp(xe - max_logit);
          }
          if (std::isnan(w)) w = 0;
          ir[j] = top_e[j];
          wr[j] = w;
          total += w;
        }
        const bool normalise =
            cfg.order == Order::kTopkThenSoftmax && cfg.scoring == Scoring::kSoftmax
                ? true
                : cfg.renormalize;
        const acc_t factor =
            normalise ? (total > 0 ? acc_t(cfg.scale) / total : acc_t(0)) : acc_t(cfg.scale);
        for (int64_t j = 0; j < k; ++j) wr[j] *= factor;
      }
    }
  });
}

}  // namespace

void topk_route_cpu_kernel(const Tensor& logits, const Tensor& bias, const Tensor& mask,
                           const TopkRouteConfig& cfg, Tensor& weights, Tensor& ids) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "topk_route_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        topk_route_rows<scalar_t, acc_t>(logits, bias, mask, cfg, weights, ids);
      });
}

void route_metadata_cpu_kernel(const Tensor& ids, int64_t num_experts, int64_t block_m,
                               RouteMetadata& out) {
  const int64_t E = num_experts;
  const int64_t n = ids.numel();
  const int64_t k = ids.size(1);
  const int32_t* id = ids.const_data_ptr<int32_t>();
  // Bucket E collects dropped slots (id -1) so they land after every expert.
  auto bucket = [&](int32_t v) -> int64_t { return v < 0 ? E : v; };

  // Chunks of at least 32K slots: below that one thread sorts faster than two can split it.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 32768));
  const int64_t chunk_len = (n + chunks - 1) / chunks;
  std::vector<int64_t> hist(chunks * (E + 1), 0);
  std::atomic<bool> bad{false};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * (E + 1);
      for (int64_t i = c * chunk_len; i < std::min(n, (c + 1) * chunk_len); ++i) {
        const int32_t v = id[i];
        if (v < -1 || v >= E) {
          bad = true;
          continue;
        }
        ++h[bucket(v)];
      }
    }
  });
  TORCH_CHECK(!bad, "ids must hold expert indices in [0, num_experts = ", E,
              ") or -1 for a dropped slot, got a value outside that range in ids ", describe(ids));

  // Exclusive scan in (bucket, chunk) order gives each chunk's first position per bucket.
  int32_t* counts = out.counts.mutable_data_ptr<int32_t>();
  int32_t* offs = out.offs.mutable_data_ptr<int32_t>();
  int64_t running = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t start = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t h = hist[c * (E + 1) + e];
      hist[c * (E + 1) + e] = running;
      running += h;
    }
    if (e < E) {
      counts[e] = static_cast<int32_t>(running - start);
      offs[e] = static_cast<int32_t>(running);
    }
  }

  int32_t* sorted_slots = out.sorted_slots.mutable_data_ptr<int32_t>();
  int32_t* inverse = out.inverse.mutable_data_ptr<int32_t>();
  int32_t* tokens = out.tokens.mutable_data_ptr<int32_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = hist.data() + c * (E + 1);
      for (int64_t i = c * chunk_len; i < std::min(n, (c + 1) * chunk_len); ++i) {
        const int64_t pos = next[bucket(id[i])]++;
        sorted_slots[pos] = static_cast<int32_t>(i);
        inverse[i] = static_cast<int32_t>(pos);
        tokens[pos] = static_cast<int32_t>(i / k);
      }
    }
  });

  if (block_m <= 0) return;
  int32_t* padded_slots = out.padded_slots.mutable_data_ptr<int32_t>();
  int32_t* block_expert = out.block_expert.mutable_data_ptr<int32_t>();
  int32_t* padded_offs = out.padded_offs.mutable_data_ptr<int32_t>();
  const int64_t padded_rows = out.padded_slots.numel();
  std::fill(padded_slots, padded_slots + padded_rows, static_cast<int32_t>(n));
  std::fill(block_expert, block_expert + out.block_expert.numel(), -1);
  int64_t padded_end = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t start = offs[e] - counts[e];
    std::copy(sorted_slots + start, sorted_slots + offs[e], padded_slots + padded_end);
    const int64_t padded_count = (counts[e] + block_m - 1) / block_m * block_m;
    std::fill(block_expert + padded_end / block_m,
              block_expert + (padded_end + padded_count) / block_m, static_cast<int32_t>(e));
    padded_end += padded_count;
    padded_offs[e] = static_cast<int32_t>(padded_end);
  }
}

}  // namespace sparseops
