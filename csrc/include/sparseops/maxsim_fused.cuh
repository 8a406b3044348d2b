// The fused MaxSim forward of the "cuda" backend, written once and compiled twice: by nvcc
// for the GPU (csrc/cuda/maxsim.cu, where `Arch` wraps the PTX instructions) and by the host
// compiler for the CPU emulator (csrc/testing/maxsim_cuda_emulator.cpp, where `Arch` runs
// every thread of a block as a fiber and carries out ldmatrix, mma.sync, shuffles and
// cp.async from the PTX ISA's definitions). So the indexing below (fragment layouts, tile
// pipeline, document partition, split-document combine, epilogue) is tested on machines
// without a GPU, bit for bit where the inputs make every dot product exact.
//
// What one block does (semantics: python/sparseops/reference/maxsim.py).
//   * Query rows (the flattened [Nq * Lq] or packed [total_q] query tokens) are taken in
//     chunks of QR = 32 * MTP rows; a chunk sits in shared memory for the whole pass, and
//     several short queries share one chunk, so each document byte is read once per chunk
//     (once in all when Nq * Lq <= 128).
//   * Documents: the block owns a contiguous range of documents (equal counts when padded,
//     equal token counts for packed cu_seqlens documents), and its W warps split the range's
//     tokens evenly, cutting documents where they must. Each warp streams its tokens as
//     32-token tiles through a private cp.async ring of kStages tiles (16-byte copies; rows
//     past a document's end are zero-filled, never read), so W * (kStages - 1) tiles per
//     block are in flight while one is multiplied.
//   * Per tile: S = Q_chunk x D_tile^T in registers (bf16/fp16: mma.sync m16n8k16 with
//     ldmatrix fragments and fp32 accumulators; fp32: FFMA, exact, no tf32), masked
//     columns out, the per-row max and its lowest column reduced across lanes and folded
//     into a running (max, argmax) that each lane keeps for one row of every 32 (ties: the
//     lower token, sparseops::ranks_before).
//   * At a document's end the warp writes the argmax rows (int16 / int32) and the per-query sums
//     (reduce "sum" or "mean") straight to the outputs: no atomics, no Lq x Ld anywhere. A
//     document cut between warps is finished after a block barrier by the warp that holds
//     its first token, which merges the other warps' partial maxima in warp order.
// Deterministic: the work split depends only on the shapes, and every sum runs in a fixed
// order. No host synchronisation, fixed-size outputs: CUDA-graph capturable.
#pragma once

#include <climits>
#include <cstdint>

#include "sparseops/ranking.h"

// SO_HD: the kernel body. Device code under nvcc (the GPU build never runs it on the host),
// plain inline functions under the host compiler (the emulator). SPARSEOPS_HOST_DEVICE
// (ranking.h) marks the few helpers the launchers also call on the host.
#if defined(__CUDACC__)
#define SO_HD __device__ __forceinline__
#else
#define SO_HD inline
#endif

namespace sparseops {
namespace maxsim_fused {

constexpr int kWarpSize = 32;
constexpr int kTileTokens = 32;     // document tokens per pipeline tile
constexpr int kMaxWarps = 8;        // warps per block (launch bound 256 threads)
constexpr int kMaxRows = 128;       // query rows per chunk (MTP <= 4)
constexpr int kMaxDim = 256;        // the launcher refuses larger embeddings
constexpr int32_t kNone = INT_MAX;  // "no token taken yet": above every token index

// Element tags: bf16 and fp16 travel as raw 16-bit words; only mma / the converters look
// inside them.
struct BF16 {};
struct FP16 {};
struct F32 {};

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kLengthsMask = 2 };

// Everything a block needs, by value (kernel parameter). Pointers are device pointers on the
// GPU and host pointers in the emulator.
struct Params {
  const void* q = nullptr;  // [rows_q, dim] query token rows (padded [Nq, Lq, dim] flattened)
  const void* d = nullptr;  // [rows_d, dim] document token rows
  int64_t dim = 0;
  // Queries: padded (lq > 0, cu_q null: query n = rows [n * lq, (n + 1) * lq)) or packed
  // (cu_q int32 [nq + 1]).
  int64_t nq = 0, lq = 0, rows_q = 0;
  const int32_t* cu_q = nullptr;
  int q_mask = kNoMask;  // padded only: bool [nq, lq] as bytes, or int32 lengths [nq]
  const uint8_t* q_bool = nullptr;
  const int32_t* q_len = nullptr;
  // Documents: padded (ld > 0, cu_d null: document m = rows [m * ld, (m + 1) * ld)) or
  // packed (cu_d int32 [nd + 1]).
  int64_t nd = 0, ld = 0;
  const int32_t* cu_d = nullptr;
  int d_mask = kNoMask;
  const uint8_t* d_bool = nullptr;
  const int32_t* d_len = nullptr;
  bool pylate = false;        // PyLate's multiplicative masking (d_mask is none or bool then)
  bool mean = false;          // reduce="mean"
  float* scores = nullptr;    // [nq, nd]
  void* argmax = nullptr;     // padded: [nq, nd, lq]; packed: [nd, rows_q]
  bool argmax16 = false;      // int16 entries (argmax_dtype), else int32
  // Launch plan (plan_launch): rows per chunk, warps per block, blocks, shared-memory row
  // stride in elements, columns multiplied (dim rounded up to the instruction's K step).
  int chunk_rows = 32;
  int warps = 4;
  int ctas = 1;
  int row_stride = 0;
  int dim_pad = 0;
};

// ---------------------------------------------------------------------------------------
// Geometry of queries and documents (padded and packed alike).

SO_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

SO_HD int64_t q_start(const Params& p, int64_t n) { return p.cu_q ? int64_t(p.cu_q[n]) : n * p.lq; }

SO_HD int64_t d_start(const Params& p, int64_t m) { return p.cu_d ? int64_t(p.cu_d[m]) : m * p.ld; }

// Tokens of document m that are stored (lengths masks shorten padded documents).
SO_HD int64_t d_real_len(const Params& p, int64_t m) {
  if (p.cu_d) return int64_t(p.cu_d[m + 1]) - int64_t(p.cu_d[m]);
  if (p.d_mask == kLengthsMask) return clamp64(p.d_len[m], 0, p.ld);
  return p.ld;
}

// Token j < d_real_len(m) of document m is real (bool masks).
SO_HD bool d_token_real(const Params& p, int64_t m, int64_t j) {
  return p.d_mask != kBoolMask || p.d_bool[m * p.ld + j] != 0;
}

// Query row r (flattened) is real.
SO_HD bool q_row_real(const Params& p, int64_t r) {
  if (p.cu_q || p.q_mask == kNoMask) return true;
  const int64_t n = r / p.lq, i = r - n * p.lq;
  if (p.q_mask == kBoolMask) return p.q_bool[r] != 0;
  return i < clamp64(p.q_len[n], 0, p.lq);
}

// Real tokens of query n (what reduce="mean" divides by).
SO_HD float q_count(const Params& p, int64_t n) {
  if (p.cu_q) return float(p.cu_q[n + 1] - p.cu_q[n]);
  if (p.q_mask == kLengthsMask) return float(clamp64(p.q_len[n], 0, p.lq));
  if (p.q_mask == kBoolMask) {
    int64_t c = 0;
    for (int64_t i = 0; i < p.lq; ++i) c += p.q_bool[n * p.lq + i] != 0;
    return float(c);
  }
  return float(p.lq);
}

// First index m in [lo, hi) with cu[m] >= t (hi if none).
SO_HD int64_t first_start_at_least(const int32_t* cu, int64_t lo, int64_t hi, int64_t t) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (int64_t(cu[mid]) >= t)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// First index m in [lo, hi) with cu[m + 1] > t or cu[m] >= t: the first sequence that has a
// token at or after position t, or is empty and starts at t (hi if none). Monotone in m.
SO_HD int64_t first_reaching(const int32_t* cu, int64_t lo, int64_t hi, int64_t t) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (int64_t(cu[mid + 1]) > t || int64_t(cu[mid]) >= t)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

// Documents [first_doc_reaching(t), ...) are those a warp whose range starts at token t sees.
SO_HD int64_t first_doc_reaching(const Params& p, int64_t t, int64_t lo, int64_t hi) {
  if (p.cu_d) return first_reaching(p.cu_d, lo, hi, t);
  return clamp64(t / p.ld, lo, hi);  // (m + 1) * ld > t  <=>  m >= floor(t / ld)
}

SO_HD int64_t first_doc_from(const Params& p, int64_t t, int64_t lo, int64_t hi) {
  if (p.cu_d) return first_start_at_least(p.cu_d, lo, hi, t);
  return clamp64((t + p.ld - 1) / p.ld, lo, hi);
}

// Documents of block b: [cta_first_doc(b), cta_first_doc(b + 1)). Padded: equal counts.
// Packed: equal token counts (a block starts at the first document starting at or after its
// share of the tokens), so ragged corpora balance without any host work.
SO_HD int64_t cta_first_doc(const Params& p, int64_t b) {
  if (b <= 0) return 0;
  if (b >= p.ctas) return p.nd;
  if (!p.cu_d) return b * p.nd / p.ctas;
  const int64_t total = p.cu_d[p.nd];
  return first_start_at_least(p.cu_d, 0, p.nd, (b * total + p.ctas - 1) / p.ctas);
}

// Queries that chunk [r0, r1) writes scores for: [first, stop). Packed empty queries belong
// to the chunk their position falls in (the last chunk takes those at the very end).
SO_HD int64_t chunk_first_query(const Params& p, int64_t r0) {
  if (p.cu_q) return first_reaching(p.cu_q, 0, p.nq, r0);
  return r0 / p.lq;
}

SO_HD int64_t chunk_stop_query(const Params& p, int64_t r1, bool last) {
  if (last) return p.nq;
  if (p.cu_q) return first_start_at_least(p.cu_q, 0, p.nq, r1);
  return (r1 + p.lq - 1) / p.lq;
}

SO_HD int64_t argmax_index(const Params& p, int64_t r, int64_t m) {
  if (p.cu_q) return m * p.rows_q + r;
  const int64_t n = r / p.lq;
  return (n * p.nd + m) * p.lq + (r - n * p.lq);
}

// ---------------------------------------------------------------------------------------
// Shared-memory layout of a block (byte offsets, all 16-byte aligned).

template <int kStages>
struct Layout {
  int64_t q_chunk = 0, row_real = 0, warps = 0, per_warp = 0, total = 0;
  int64_t ring = 0, scratch = 0, head = 0, tail = 0, ids = 0;  // offsets inside a warp's part
  SPARSEOPS_HOST_DEVICE Layout(int chunk_rows, int row_stride, int esize, int nwarps) {
    const int64_t row_bytes = int64_t(row_stride) * esize;
    const int64_t slot = int64_t(chunk_rows) * 8;  // best (fp32) + argmax (int32) per row
    q_chunk = 0;
    row_real = q_chunk + chunk_rows * row_bytes;
    warps = row_real + ((chunk_rows + 15) / 16) * 16;
    ring = 0;
    scratch = ring + int64_t(kStages) * kTileTokens * row_bytes;
    head = scratch + slot;
    tail = head + slot;
    ids = tail + slot;
    per_warp = ids + 16;
    total = warps + nwarps * per_warp;
  }
};

// One row's running result: the best similarity and the lowest token reaching it.
struct Best {
  float v;
  int32_t i;
};

SO_HD void take_better(float& v, int32_t& i, float ov, int32_t oi) {
  if (ranks_before(ov, oi, v, i)) {
    v = ov;
    i = oi;
  }
}

// Reduce-scatter of N = 2^k row candidates per lane over the 2^k lanes that differ in lane
// bits [shift, shift + k): afterwards each lane holds the merged result of row
// ((lane >> shift) & (N - 1)). Step by step, lanes differing in one bit exchange the half of
// the rows they do not keep: N - 1 shuffle pairs instead of N * k.
template <int N, class Arch>
SO_HD Best reduce_scatter(Arch& a, const float (&v)[N], const int32_t (&i)[N], int lane,
                          int shift) {
  float cv[N];
  int32_t ci[N];
#pragma unroll
  for (int r = 0; r < N; ++r) {
    cv[r] = v[r];
    ci[r] = i[r];
  }
#pragma unroll
  for (int bit = N / 2; bit >= 1; bit /= 2) {
    // The rows left are indexed by their low bits; `bit` is the highest of them.
    const bool upper = ((lane >> shift) & bit) != 0;
#pragma unroll
    for (int r = 0; r < bit; ++r) {
      const float keep_v = upper ? cv[r + bit] : cv[r];
      const int32_t keep_i = upper ? ci[r + bit] : ci[r];
      const float send_v = upper ? cv[r] : cv[r + bit];
      const int32_t send_i = upper ? ci[r] : ci[r + bit];
      const float got_v = a.shfl_xor(send_v, bit << shift);
      const int32_t got_i = a.shfl_xor(send_i, bit << shift);
      cv[r] = keep_v;
      ci[r] = keep_i;
      take_better(cv[r], ci[r], got_v, got_i);
    }
  }
  return Best{cv[0], ci[0]};
}

SO_HD float neg_inf() { return -__builtin_huge_valf(); }

// ---------------------------------------------------------------------------------------
// Tensor-core tile (bf16 / fp16, dim % 8 == 0, 16-byte aligned rows).
//
// Per 32-row group of the chunk, a [32 x 32] similarity tile: 2 m-tiles of 16 rows x 4
// n-tiles of 8 tokens, K in steps of 16. ldmatrix.x4 fetches an A fragment (16 rows x 16) or
// the B fragments of two n-tiles (document rows are B's columns, so no transpose). Lane
// (g = lane / 4, t = lane % 4) holds accumulator rows g and g + 8 at columns 2t, 2t + 1 of
// each n-tile; after the tile, its 4 row candidates (m-tile, half) are reduce-scattered over
// the quad so that lane t keeps row (t / 2) * 16 + (t % 2) * 8 + g of the group.

template <class Tag, int kMTP>
struct TcTile {
  static constexpr int kStages = 3;
  static constexpr int kMtp = kMTP;
  static constexpr int kElem = 2;
  static constexpr bool kAsyncCopy = true;
  static constexpr int kNTiles = kTileTokens / 8;
  using Storage = uint16_t;
  struct State {
    float v[kMTP];
    int32_t i[kMTP];
  };
  SPARSEOPS_HOST_DEVICE static int row_of_lane(int lane) {
    const int t = lane & 3;
    return (t >> 1) * 16 + (t & 1) * 8 + (lane >> 2);
  }
  // Shared-memory row stride (elements): K rounded up to 16, plus 8 so that the 8 rows an
  // ldmatrix phase reads fall in 8 different 16-byte bank groups (stride = 4 mod 32 words).
  SPARSEOPS_HOST_DEVICE static int row_stride(int64_t dim) {
    return int(((dim + 15) / 16) * 16 + 8);
  }
  SPARSEOPS_HOST_DEVICE static int dim_pad(int64_t dim) { return int(((dim + 15) / 16) * 16); }

  template <class Arch>
  SO_HD static void tile(Arch& a, const Params& p, const char* qs, const char* ts, State& st,
                         int64_t m, int64_t j0, int cnt, int lane) {
    const int t = lane & 3;
    const int stride = p.row_stride;
    // Which of this lane's 8 columns (n-tile nt, element e: column nt * 8 + 2t + e) can win,
    // and (PyLate) which hold real tokens.
    uint32_t cand = 0, real = 0;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nt * 8 + 2 * t + e;
        const bool in = col < cnt;
        const bool ok = in && d_token_real(p, m, j0 + col);
        const uint32_t bit = 1u << (nt * 2 + e);
        if (p.pylate) {
          cand |= in ? bit : 0u;
          real |= ok ? bit : 0u;
        } else {
          cand |= ok ? bit : 0u;
        }
      }
    }
    const int ksteps = p.dim_pad / 16;
    // ldmatrix row addresses of this lane: A (query rows), B (document tokens).
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = ((lane >> 4) & 1) * 8;
    const int b_row = (lane & 7) + ((lane >> 4) & 1) * 8, b_col = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int pp = 0; pp < kMTP; ++pp) {
      float acc[2][kNTiles][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[mi][nt][c] = 0.f;
      for (int ks = 0; ks < ksteps; ++ks) {
        uint32_t af[2][4], bf[kNTiles / 2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          a.ldmatrix_x4(af[mi],
                        qs + (int64_t(pp * 32 + mi * 16 + a_row) * stride + ks * 16 + a_col) * 2);
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          a.ldmatrix_x4(bf[np], ts + (int64_t(np * 16 + b_row) * stride + ks * 16 + b_col) * 2);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
          for (int np = 0; np < kNTiles / 2; ++np) {
            a.mma(Tag{}, acc[mi][2 * np], af[mi], bf[np][0], bf[np][1]);
            a.mma(Tag{}, acc[mi][2 * np + 1], af[mi], bf[np][2], bf[np][3]);
          }
        }
      }
      // Lane-local best of each of the 4 rows (m-tile mi, half h: accumulator c = 2h + e).
      float bv[4];
      int32_t bi[4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v = neg_inf();
          int32_t idx = kNone;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const uint32_t bit = 1u << (nt * 2 + e);
              float s = acc[mi][nt][2 * h + e];
              if (p.pylate && !(real & bit)) s = 0.f;
              // Columns rise within a lane: strictly larger wins, the first candidate always.
              if ((cand & bit) && (idx == kNone || s > v)) {
                v = s;
                idx = int32_t(j0) + nt * 8 + 2 * t + e;
              }
            }
          }
          bv[mi * 2 + h] = v;
          bi[mi * 2 + h] = idx;
        }
      }
      // Row index bits (mi, h) <-> lane bits 1, 0 of t.
      const Best b = reduce_scatter<4>(a, bv, bi, lane, 0);
      take_better(st.v[pp], st.i[pp], b.v, b.i);
    }
  }
};

// ---------------------------------------------------------------------------------------
// FFMA tile (fp32 exactly; bf16 / fp16 whose rows are not 16-byte aligned, widened to fp32).
//
// Per 32-row group a [32 x 32] tile: lane (rg = lane / 8, cg = lane % 8) owns rows
// rg + 4r (r < 8) and columns cg + 8c (c < 4), reading 16-byte vectors of both from shared
// memory (the row stride is padded by 16 bytes, so the 8 columns of a phase hit 8 different
// bank groups; the 4 rows are broadcasts). After the tile the 8 row candidates are
// reduce-scattered over the 8 lanes of a row group: lane cg keeps row rg + 4 * cg.

template <class Storage_, class Tag, int kMTP, bool kAsync>
struct SimtTile {
  static constexpr int kStages = 2;
  static constexpr int kMtp = kMTP;
  static constexpr int kElem = int(sizeof(Storage_));
  static constexpr int kVec = 16 / kElem;  // elements per 16-byte vector
  static constexpr bool kAsyncCopy = kAsync;
  using Storage = Storage_;
  struct State {
    float v[kMTP];
    int32_t i[kMTP];
  };
  SPARSEOPS_HOST_DEVICE static int row_of_lane(int lane) { return (lane >> 3) + 4 * (lane & 7); }
  SPARSEOPS_HOST_DEVICE static int dim_pad(int64_t dim) {
    return int(((dim + kVec - 1) / kVec) * kVec);
  }
  SPARSEOPS_HOST_DEVICE static int row_stride(int64_t dim) { return dim_pad(dim) + kVec; }

  template <class Arch>
  SO_HD static void widen(Arch& a, const uint32_t (&w)[4], float (&out)[kVec]) {
    if constexpr (kElem == 4) {
#pragma unroll
      for (int e = 0; e < 4; ++e) out[e] = a.bits_to_float(w[e]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const uint16_t h = uint16_t(w[e / 2] >> (16 * (e % 2)));
        out[e] = a.half_to_float(Tag{}, h);
      }
    }
  }

  template <class Arch>
  SO_HD static void tile(Arch& a, const Params& p, const char* qs, const char* ts, State& st,
                         int64_t m, int64_t j0, int cnt, int lane) {
    const int rg = lane >> 3, cg = lane & 7;
    const int64_t stride_b = int64_t(p.row_stride) * kElem;
    uint32_t cand = 0, real = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = cg + 8 * c;
      const bool in = col < cnt;
      const bool ok = in && d_token_real(p, m, j0 + col);
      if (p.pylate) {
        cand |= in ? (1u << c) : 0u;
        real |= ok ? (1u << c) : 0u;
      } else {
        cand |= ok ? (1u << c) : 0u;
      }
    }
#pragma unroll
    for (int pp = 0; pp < kMTP; ++pp) {
      float acc[8][4];
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
      for (int k = 0; k < p.dim_pad; k += kVec) {
        float dv[4][kVec];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          uint32_t w[4];
          a.lds16(w, ts + (cg + 8 * c) * stride_b + int64_t(k) * kElem);
          widen(a, w, dv[c]);
        }
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          uint32_t w[4];
          float qv[kVec];
          a.lds16(w, qs + (pp * 32 + rg + 4 * r) * stride_b + int64_t(k) * kElem);
          widen(a, w, qv);
#pragma unroll
          for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[r][c] = a.fma(qv[e], dv[c][e], acc[r][c]);
        }
      }
      float bv[8];
      int32_t bi[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) {
        float v = neg_inf();
        int32_t idx = kNone;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float s = acc[r][c];
          if (p.pylate && !(real & (1u << c))) s = 0.f;
          if ((cand & (1u << c)) && (idx == kNone || s > v)) {
            v = s;
            idx = int32_t(j0) + cg + 8 * c;
          }
        }
        bv[r] = v;
        bi[r] = idx;
      }
      const Best b = reduce_scatter<8>(a, bv, bi, lane, 0);
      take_better(st.v[pp], st.i[pp], b.v, b.i);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Copies of document tiles and query chunks into shared memory.

// Row `r` (count `rows`) of a tile: dim elements from `src_row` (nullptr: zero-fill).
// 16-byte cp.async when the rows are 16-byte aligned, element copies otherwise.
template <class K, class Arch>
SO_HD void copy_rows(Arch& a, char* dst, const char* base, const Params& p, int64_t first_row,
                     int valid_rows, int rows, int thread, int nthreads) {
  const int64_t row_bytes = p.dim * K::kElem;
  const int64_t stride_b = int64_t(p.row_stride) * K::kElem;
  if constexpr (K::kAsyncCopy) {
    const int per_row = int(row_bytes / 16);
    for (int c = thread; c < rows * per_row; c += nthreads) {
      const int r = c / per_row, k = c - r * per_row;
      const bool ok = r < valid_rows;
      const char* src = ok ? base + (first_row + r) * row_bytes + int64_t(k) * 16 : base;
      a.cp_async16(dst + r * stride_b + int64_t(k) * 16, src, ok ? 16 : 0);
    }
  } else {
    using S = typename K::Storage;
    for (int64_t c = thread; c < int64_t(rows) * p.dim; c += nthreads) {
      const int r = int(c / p.dim);
      const int64_t k = c - int64_t(r) * p.dim;
      const S v =
          r < valid_rows ? reinterpret_cast<const S*>(base)[(first_row + r) * p.dim + k] : S(0);
      reinterpret_cast<S*>(dst + r * stride_b)[k] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------
// The per-warp document stream and the epilogues.

struct WarpRange {
  int64_t t0, t1;       // token positions [t0, t1) of this warp
  int64_t first, stop;  // documents [first, stop) it touches
};

// Tokens of document m inside the warp's range, document-local: [lo, hi) (lo >= hi: none).
SO_HD void doc_span(const Params& p, const WarpRange& w, int64_t m, int64_t& lo, int64_t& hi) {
  const int64_t s = d_start(p, m);
  lo = (w.t0 > s ? w.t0 : s) - s;
  const int64_t real_end = s + d_real_len(p, m);
  hi = (real_end < w.t1 ? real_end : w.t1) - s;
  if (hi < lo) hi = lo;
}

// Walks the tiles of a warp's documents in order (the producer side of the pipeline).
struct TileCursor {
  int64_t m, stop, pos, end;
  SO_HD TileCursor(const Params& p, const WarpRange& w) : m(w.first), stop(w.stop), pos(0), end(0) {
    if (m < stop) doc_span(p, w, m, pos, end);
  }
  SO_HD bool next(const Params& p, const WarpRange& w, int64_t& tm, int64_t& tj, int& tcnt) {
    while (m < stop && pos >= end) {
      ++m;
      if (m < stop) doc_span(p, w, m, pos, end);
    }
    if (m >= stop) return false;
    tm = m;
    tj = pos;
    tcnt = int(end - pos < kTileTokens ? end - pos : kTileTokens);
    pos += kTileTokens;
    return true;
  }
};

// Per-row (best, argmax) arrays of one chunk in shared memory.
struct Slot {
  float* v;
  int32_t* i;
};

// Writes a warp's running state (one row per lane per 32-row group) to a slot.
template <class K>
SO_HD void store_state(const typename K::State& st, Slot s, int lane) {
#pragma unroll
  for (int pp = 0; pp < K::kMtp; ++pp) {
    const int r = pp * 32 + K::row_of_lane(lane);
    s.v[r] = st.v[pp];
    s.i[r] = st.i[pp];
  }
}

template <class K>
SO_HD void reset_state(typename K::State& st) {
#pragma unroll
  for (int pp = 0; pp < K::kMtp; ++pp) {
    st.v[pp] = neg_inf();
    st.i[pp] = kNone;
  }
}

// Document m is complete in slot s (rows of chunk [r0, r1)): write its argmax rows and the
// scores of the chunk's queries [n0, n1). One warp; s.v is overwritten.
template <class Arch>
SO_HD void finish_doc(Arch& a, const Params& p, const uint8_t* row_real, Slot s, int64_t m,
                      int64_t r0, int64_t r1, int64_t n0, int64_t n1, bool last_chunk, int lane) {
  const int rows = int(r1 - r0);
  for (int r = lane; r < rows; r += kWarpSize) {
    const int32_t i = s.i[r];
    const bool live = row_real[r] && i != kNone;
    int32_t out = live ? i : -1;
    // PyLate: a masked token that won (similarity 0) is reported as -1 and takes no gradient.
    if (live && p.pylate && !d_token_real(p, m, i)) out = -1;
    const int64_t at = argmax_index(p, r0 + r, m);
    if (p.argmax16) {
      static_cast<int16_t*>(p.argmax)[at] = int16_t(out);
    } else {
      static_cast<int32_t*>(p.argmax)[at] = out;
    }
    s.v[r] = live ? s.v[r] : 0.f;
  }
  a.syncwarp();
  if (n1 - n0 == 1) {
    // One query in the chunk (a single ColBERT query): the whole warp sums its rows (lane
    // partial sums, then a butterfly: every lane ends with the same bits).
    const int64_t n = n0, qs = q_start(p, n), qe = q_start(p, n + 1);
    const int64_t lo = (qs > r0 ? qs : r0) - r0, hi = (qe < r1 ? qe : r1) - r0;
    float sum = 0.f;
    for (int64_t r = lo + lane; r < hi; r += kWarpSize) sum += s.v[r];
#pragma unroll
    for (int off = kWarpSize / 2; off >= 1; off /= 2) sum += a.shfl_xor(sum, off);
    if (lane == 0) {
      float* out = p.scores + n * p.nd + m;
      if (qs < r0) sum = *out + sum;
      if ((qe <= r1 || last_chunk) && p.mean) {
        const float c = q_count(p, n);
        sum = c > 0.f ? sum / c : 0.f;
      }
      *out = sum;
    }
    a.syncwarp();
    return;
  }
  for (int64_t n = n0 + lane; n < n1; n += kWarpSize) {
    const int64_t qs = q_start(p, n), qe = q_start(p, n + 1);
    const int64_t lo = (qs > r0 ? qs : r0) - r0, hi = (qe < r1 ? qe : r1) - r0;
    float sum = 0.f;
    for (int64_t r = lo; r < hi; ++r) sum += s.v[r];
    float* out = p.scores + n * p.nd + m;
    if (qs < r0) sum = *out + sum;  // the query began in an earlier chunk
    if (qe <= r1 || last_chunk) {
      if (p.mean) {
        const float c = q_count(p, n);
        sum = c > 0.f ? sum / c : 0.f;
      }
    }
    *out = sum;
  }
  a.syncwarp();
}

// ---------------------------------------------------------------------------------------
// The block.

template <class K, class Arch>
SO_HD void maxsim_block(Arch& a, const Params& p) {
  constexpr int S = K::kStages;
  const int tid = a.tid(), warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int nw = p.warps;
  const int64_t b = a.block();
  const int64_t D0 = cta_first_doc(p, b), D1 = cta_first_doc(p, b + 1);
  if (D0 >= D1) return;  // the whole block: no barrier is skipped by only some threads
  char* smem = a.smem();
  const Layout<S> L(p.chunk_rows, p.row_stride, K::kElem, nw);
  const int64_t T0 = d_start(p, D0), T1 = d_start(p, D1);
  WarpRange w;
  w.t0 = T0 + (T1 - T0) * warp / nw;
  w.t1 = T0 + (T1 - T0) * (warp + 1) / nw;
  w.first = first_doc_reaching(p, w.t0, D0, D1);
  w.stop = warp == nw - 1 ? D1 : first_doc_from(p, w.t1, D0, D1);
  char* my = smem + L.warps + warp * L.per_warp;
  char* ring = my + L.ring;
  const int64_t tile_bytes = int64_t(kTileTokens) * p.row_stride * K::kElem;
  Slot scratch{reinterpret_cast<float*>(my + L.scratch),
               reinterpret_cast<int32_t*>(my + L.scratch + p.chunk_rows * 4)};
  Slot head{reinterpret_cast<float*>(my + L.head),
            reinterpret_cast<int32_t*>(my + L.head + p.chunk_rows * 4)};
  Slot tail{reinterpret_cast<float*>(my + L.tail),
            reinterpret_cast<int32_t*>(my + L.tail + p.chunk_rows * 4)};
  int64_t* ids = reinterpret_cast<int64_t*>(my + L.ids);  // [head doc, tail doc]
  uint8_t* row_real = reinterpret_cast<uint8_t*>(smem + L.row_real);
  const char* qs = smem + L.q_chunk;
  const int64_t row_b = int64_t(p.row_stride) * K::kElem;

  // Columns [dim, dim_pad) are multiplied but never copied: zero them once.
  if (p.dim_pad > p.dim) {
    using St = typename K::Storage;
    const int pad = p.dim_pad - int(p.dim);
    const int64_t rows_total = p.chunk_rows + int64_t(nw) * S * kTileTokens;
    for (int64_t c = tid; c < rows_total * pad; c += int64_t(nw) * kWarpSize) {
      const int64_t r = c / pad, k = p.dim + (c - r * pad);
      char* row = r < p.chunk_rows
                      ? smem + L.q_chunk + r * row_b
                      : smem + L.warps + ((r - p.chunk_rows) / (S * kTileTokens)) * L.per_warp +
                            ((r - p.chunk_rows) % (S * kTileTokens)) * row_b;
      reinterpret_cast<St*>(row)[k] = St(0);
    }
  }

  const int64_t rows = p.rows_q;
  const int64_t nchunks = (rows + p.chunk_rows - 1) / p.chunk_rows;
  const char* qbase = static_cast<const char*>(p.q);
  const char* dbase = static_cast<const char*>(p.d);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t r0 = c * p.chunk_rows;
    const int64_t r1 = r0 + p.chunk_rows < rows ? r0 + p.chunk_rows : rows;
    const bool last = c == nchunks - 1;
    const int64_t n0 = chunk_first_query(p, r0), n1 = chunk_stop_query(p, r1, last);
    a.syncthreads();  // everyone is done with the previous chunk's query rows and slots
    copy_rows<K>(a, smem + L.q_chunk, qbase, p, r0, int(r1 - r0), p.chunk_rows, tid,
                 nw * kWarpSize);
    for (int r = tid; r < p.chunk_rows; r += nw * kWarpSize) {
      row_real[r] = (r0 + r < r1 && q_row_real(p, r0 + r)) ? 1 : 0;
    }
    if (lane == 0) ids[0] = ids[1] = -1;
    a.cp_async_commit();
    a.template cp_async_wait<0>();
    a.syncthreads();

    // ---- this warp's documents, one pipelined tile stream
    typename K::State st;
    reset_state<K>(st);
    TileCursor prod(p, w);
    for (int s = 0; s < S - 1; ++s) {
      int64_t tm, tj;
      int tc;
      if (prod.next(p, w, tm, tj, tc)) {
        copy_rows<K>(a, ring + s * tile_bytes, dbase, p, d_start(p, tm) + tj, tc, kTileTokens, lane,
                     kWarpSize);
      }
      a.cp_async_commit();
    }
    int64_t cm = w.first, cpos = 0, cend = 0;
    if (cm < w.stop) doc_span(p, w, cm, cpos, cend);
    int stage = 0;
    while (cm < w.stop) {
      if (cpos < cend) {
        a.template cp_async_wait<S - 2>();
        a.syncwarp();  // the tile has landed for every lane; the stage refilled next is free
        int64_t tm, tj;
        int tc;
        if (prod.next(p, w, tm, tj, tc)) {
          copy_rows<K>(a, ring + ((stage + S - 1) % S) * tile_bytes, dbase, p, d_start(p, tm) + tj,
                       tc, kTileTokens, lane, kWarpSize);
        }
        a.cp_async_commit();
        const int cnt = int(cend - cpos < kTileTokens ? cend - cpos : kTileTokens);
        K::tile(a, p, qs, ring + stage * tile_bytes, st, cm, cpos, cnt, lane);
        stage = (stage + 1) % S;
        cpos += kTileTokens;
      }
      if (cpos >= cend) {
        // Document cm is done in this warp: finish it, or leave it to the warp that owns its
        // first token (head), or keep it for the merge after the barrier (tail).
        const int64_t s0 = d_start(p, cm), s1 = d_start(p, cm + 1);
        const bool is_head = s0 < w.t0;
        const bool is_tail = !is_head && s1 > w.t1;
        Slot dst = is_head ? head : (is_tail ? tail : scratch);
        store_state<K>(st, dst, lane);
        a.syncwarp();
        if (is_head || is_tail) {
          if (lane == 0) ids[is_head ? 0 : 1] = cm;
        } else {
          finish_doc(a, p, row_real, scratch, cm, r0, r1, n0, n1, last, lane);
        }
        reset_state<K>(st);
        ++cm;
        if (cm < w.stop) doc_span(p, w, cm, cpos, cend);
      }
    }
    a.template cp_async_wait<0>();
    a.syncwarp();
    a.syncthreads();

    // ---- documents cut between warps: the warp holding the first token merges and finishes.
    const int64_t mt = ids[1];
    if (mt >= 0) {
      for (int o = warp + 1; o < nw; ++o) {
        char* other = smem + L.warps + o * L.per_warp;
        if (reinterpret_cast<const int64_t*>(other + L.ids)[0] != mt) break;
        const float* ov = reinterpret_cast<const float*>(other + L.head);
        const int32_t* oi = reinterpret_cast<const int32_t*>(other + L.head + p.chunk_rows * 4);
        for (int r = lane; r < p.chunk_rows; r += kWarpSize)
          take_better(tail.v[r], tail.i[r], ov[r], oi[r]);
      }
      a.syncwarp();
      finish_doc(a, p, row_real, tail, mt, r0, r1, n0, n1, last, lane);
    }
  }
}

// Launch plan of block body K (host): chunk rows, row stride and the most warps
// (<= max_warps) whose shared memory fits in max_smem bytes; false when not even one warp
// fits (the embedding is too wide).
template <class K>
inline bool plan_block(Params& p, int64_t max_smem, int max_warps, int64_t& smem) {
  p.chunk_rows = 32 * K::kMtp;
  p.row_stride = K::row_stride(p.dim);
  p.dim_pad = K::dim_pad(p.dim);
  for (int w = max_warps; w >= 1; --w) {
    const Layout<K::kStages> L(p.chunk_rows, p.row_stride, K::kElem, w);
    if (L.total <= max_smem) {
      p.warps = w;
      smem = L.total;
      return true;
    }
  }
  return false;
}

}  // namespace maxsim_fused
}  // namespace sparseops
