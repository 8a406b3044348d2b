// N:M sparse CPU kernels. Semantics: python/sparseops/reference/nm_sparse.py (NM_FORMAT).
//
// nm_linear, batch 1 (R = 1), fp32 and bf16 (avx512_bf16) with AVX-512 VBMI, m / n in {2, 4, 8}:
// x gathered by the kept columns (see "batch 1, AVX-512 VBMI" below): the kept values are used as
// stored and the meta becomes permute indices into x; other cases take the path below.
//
// nm_linear, small batch (the weight-streaming regime, R < kNMDenseCrossoverRows): output rows
// are split over threads in blocks of kRowBlock (at::parallel_for). For each block, every
// weight row is decoded ONCE into a dense fp32 row in thread-local scratch and then reused by
// all R rows of x (x is widened to fp32 once, up front, into rows padded to 16 floats):
//  - decoding: meta is turned into the row's dense column bitmask, a byte at a time through a
//    256-entry table where groups align with meta bytes (1:2, 1:4, 2:4, 1:8, 2:8, 4:8, 1:16,
//    2:16, 4:16, 8:16, ... : every pattern with 8 % (n*b) == 0 or (n*b) % 8 == 0), position
//    by position otherwise (3:4, 3:8, 15:16, ...);
//  - AVX-512: each 16-column chunk of the dense row is one vexpandps of the next popcount(mask)
//    kept values (kept in increasing column order, so the expand is exactly the scatter), then
//    the R dot products stream the fp32 row with four independent accumulators; bf16 / fp16
//    values are widened 16 at a time in registers;
//  - portable (no AVX-512, or SPARSEOPS_CPU_NO_AVX512=1): the same structure with a scalar
//    scatter and an 8-lane scalar dot.
// Each output is one dot product computed by one thread in a fixed order: the bits never depend
// on the thread count.
// Large batch (R >= kNMDenseCrossoverRows, out >= 2): the weight is decompressed tile by tile
// (kTileOut rows, at least two tiles) into fp32 and each tile's GEMM [R, in] x [in, tile] goes
// to ATen's BLAS (at::mm) inside at::parallel_for, where the BLAS runs single-threaded: also
// bitwise independent of the thread count.
// Between them (see nm_sparse.h for the crossovers): register blocks of 3 weight rows x 8 x rows
// (fp32 and bf16, from 2 rows) and, for bf16 2:4 / 1:4 / 2:8 and fp32 n:m with m in {4, 8} at any
// batch from kNMLaneRows, weight rows in lanes against x values picked by vpshufb / vpermilps /
// vpermps (sparse arithmetic);
// fp16 keeps fp32 column tables. Each has its own section below.
//
// nm_compress: one pass per group: the n best scores (|w| or scores; NaN above every number,
// ties to the lower index) by n rounds of argmax over m <= 16 candidates, or the given keep
// mask padded with the lowest unkept positions; values, packed meta and the mask are written
// in the same pass. Threads over weight rows. Vectorised (AVX-512) paths: 16-bit weights by |w|
// 32 columns per step, other float weights and scores by 32-bit keys 16 columns per step.
#include "sparseops/nm_sparse.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparseops/cpu_memory.h"
#include "sparseops/cpu_vec.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPARSEOPS_NM_X86 1
#define SPARSEOPS_NM_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,popcnt")))
#else
#define SPARSEOPS_NM_X86 0
#endif

namespace sparseops {
namespace {

using at::Tensor;

constexpr int64_t kRowBlock = 8;   // weight rows decoded together (x rows reused across them)
constexpr int64_t kTileOut = 64;   // weight rows per tile of the large-batch (BLAS) path
constexpr int64_t kTileOut16 = 512;  // the same for the 16-bit tiles (oneDNN is slow on narrow ones)

bool use_avx512() {
#if SPARSEOPS_NM_X86
  return cpu_avx512_enabled();
#else
  return false;
#endif
}

inline int64_t round_up16(int64_t v) { return (v + 15) / 16 * 16; }

// Software prefetch of the batch-1 weight streams: every cache line of the values is prefetched
// this far ahead into L2 (and the meta stream an eighth of it, into L1). Into L1 (T0) the
// prefetches hold L1's few miss buffers; into L2 (T1) more lines are in flight. 2:4 4096x4096,
// weights rotated over copies beyond the L3, the 2-core EPYC (2026-12-07, load ~1.5, three
// interleaved rounds): fp32 10-13 GB/s on one thread and 19-20 on two with 4096 bytes into L1
// (the previous setting), 14-18 and 23-29 with 8-16 KB into L2; bf16 10-14 / 15-23 against
// 14-18.5 / 24-28; 1:4 and 2:8 at two threads 11-23 against 18-26; torch's sum over the same
// bytes 17-19 / 23-26.
constexpr int64_t kPrefetchBytes = 8192;

#if SPARSEOPS_NM_X86
inline void prefetch_ahead(const void* values, int64_t bytes, const uint8_t* meta) {
  const char* p = static_cast<const char*>(values) + kPrefetchBytes;
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(meta) + kPrefetchBytes / 8, _MM_HINT_T0);
}
#endif

// The dense column bitmask of a row of meta, 16 columns (one uint16) per chunk: chunk ch has bit
// t set when column 16*ch + t is stored. Where groups align with meta bytes the mask of a chunk
// comes straight from a 256-entry table of meta bytes (chunk()); otherwise (3:4, 3:8, 15:16,
// ...) decode_generic() sets the bits position by position. Columns >= in are cleared.
struct RowDecoder {
  enum Mode { kGeneric, kBytesToCols, kBytesOfGroup } mode = kGeneric;
  int64_t n = 0, m = 0, in = 0, groups = 0, meta_bytes = 0, chunks = 0;
  int bits = 0;
  int col_bytes = 0;    // kBytesToCols: mask bytes per meta byte (1, 2 or 4)
  int group_bytes = 0;  // kBytesOfGroup: meta bytes per group
  uint16_t tail = 0xffff;  // valid columns of the last chunk
  std::array<uint32_t, 256> lut{};

  explicit RowDecoder(const NMConfig& c)
      : n(c.n), m(c.m), in(c.in), groups(c.groups), meta_bytes(c.meta_bytes), bits(c.bits) {
    chunks = (in + 15) / 16;
    if (in % 16 != 0) tail = static_cast<uint16_t>((1u << (in % 16)) - 1u);
    const int64_t nb = n * bits;
    const int per_byte = 8 / bits;  // positions per meta byte
    if (8 % nb == 0) {
      mode = kBytesToCols;
      col_bytes = static_cast<int>((8 / nb) * m / 8);
      for (int v = 0; v < 256; ++v) {
        uint32_t mask = 0;
        for (int t = 0; t < per_byte; ++t) {
          const int p = (v >> (t * bits)) & ((1 << bits) - 1);
          mask |= uint32_t(1) << ((t / n) * m + p);
        }
        lut[v] = mask;
      }
    } else if (nb % 8 == 0) {
      mode = kBytesOfGroup;
      group_bytes = static_cast<int>(nb / 8);
      for (int v = 0; v < 256; ++v) {
        uint32_t mask = 0;
        for (int t = 0; t < per_byte; ++t) mask |= uint32_t(1) << ((v >> (t * bits)) & ((1 << bits) - 1));
        lut[v] = mask;
      }
    }
  }

  inline uint32_t byte_mask(const uint8_t* meta, int64_t i) const {
    // Meta bytes past the row decode to nothing (only a partial last chunk reads them).
    return i < meta_bytes ? lut[meta[i]] : 0u;
  }

  inline uint32_t group_mask(const uint8_t* meta, int64_t g) const {
    if (g >= groups) return 0u;
    uint32_t mask = 0;
    const uint8_t* gm = meta + g * group_bytes;
    for (int t = 0; t < group_bytes; ++t) mask |= lut[gm[t]];
    return mask;
  }

  // Table modes only, a full chunk (ch < in / 16): its meta bytes lie inside the row and all its
  // columns are valid, so no bound checks.
  inline uint16_t chunk_inside(const uint8_t* meta, int64_t ch) const {
    if (mode == kBytesToCols) {
      if (col_bytes == 1)
        return static_cast<uint16_t>(lut[meta[2 * ch]] | (lut[meta[2 * ch + 1]] << 8));
      if (col_bytes == 2) return static_cast<uint16_t>(lut[meta[ch]]);
      return static_cast<uint16_t>(lut[meta[ch >> 1]] >> (16 * (ch & 1)));
    }
    return chunk(meta, ch);
  }

  // Table modes only.
  inline uint16_t chunk(const uint8_t* meta, int64_t ch) const {
    uint32_t k;
    if (mode == kBytesToCols) {
      if (col_bytes == 1) {
        k = byte_mask(meta, 2 * ch) | (byte_mask(meta, 2 * ch + 1) << 8);
      } else if (col_bytes == 2) {
        k = byte_mask(meta, ch);
      } else {
        k = byte_mask(meta, ch >> 1) >> (16 * (ch & 1));
      }
    } else if (m == 8) {
      k = group_mask(meta, 2 * ch) | (group_mask(meta, 2 * ch + 1) << 8);
    } else {
      k = group_mask(meta, ch);
    }
    // A row's last meta byte may hold unused (zero) positions: they decode to columns >= in.
    if (ch == chunks - 1) k &= tail;
    return static_cast<uint16_t>(k);
  }

  void decode_generic(const uint8_t* meta, uint16_t* words) const {
    std::memset(words, 0, static_cast<size_t>(chunks) * sizeof(uint16_t));
    const int pm = (1 << bits) - 1;
    int64_t j = 0;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t t = 0; t < n; ++t, ++j) {
        const int64_t bit = j * bits;
        const int64_t col = g * m + ((meta[bit >> 3] >> (bit & 7)) & pm);
        words[col >> 4] = static_cast<uint16_t>(words[col >> 4] | (1u << (col & 15)));
      }
    }
  }
};

// Dense columns of every kept value of one row, in order (the portable scatter's indices).
inline void decode_columns(const uint8_t* meta, const NMConfig& c, int32_t* cols) {
  const int b = c.bits;
  const int mask = (1 << b) - 1;
  int64_t j = 0;
  for (int64_t g = 0; g < c.groups; ++g) {
    for (int64_t t = 0; t < c.n; ++t, ++j) {
      const int64_t bit = j * b;
      cols[j] = static_cast<int32_t>(g * c.m + ((meta[bit >> 3] >> (bit & 7)) & mask));
    }
  }
}

template <typename scalar_t>
inline float to_float(scalar_t v) {
  return static_cast<float>(v);
}

// ---- portable small-batch path ---------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void linear_rows_portable(const acc_t* x, int64_t ldx, const scalar_t* values, const uint8_t* meta,
                          const scalar_t* bias, const NMConfig& c, int64_t R, int64_t o0,
                          int64_t o1, scalar_t* out, std::vector<int32_t>& cols,
                          std::vector<acc_t>& wrow) {
  const int64_t nb = o1 - o0;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t o = o0 + i;
    acc_t* d = wrow.data() + i * c.in;
    for (int64_t k = 0; k < c.in; ++k) d[k] = acc_t(0);
    decode_columns(meta + o * c.meta_bytes, c, cols.data());
    const scalar_t* v = values + o * c.kept;
    for (int64_t j = 0; j < c.kept; ++j) d[cols[j]] = static_cast<acc_t>(v[j]);
  }
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* xr = x + r * ldx;
    for (int64_t i = 0; i < nb; ++i) {
      const acc_t* d = wrow.data() + i * c.in;
      acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= c.in; k += 8) {
        for (int l = 0; l < 8; ++l) part[l] += d[k + l] * xr[k + l];
      }
      for (; k < c.in; ++k) part[k & 7] += d[k] * xr[k];
      acc_t s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      const int64_t o = o0 + i;
      if (bias != nullptr) s += static_cast<acc_t>(bias[o]);
      out[r * c.out + o] = static_cast<scalar_t>(s);
    }
  }
}

// ---- AVX-512 small-batch path ----------------------------------------------------------------

// Thread-local scratch of the AVX-512 path: one row's bitmask, its widened values, the block's
// dense rows (allocated once per parallel_for chunk).
struct Scratch {
  std::vector<uint16_t> bits;
  std::vector<float> vrow;
  std::vector<float> wrow;
  Scratch(int64_t in_pad, int64_t kept, int64_t rows)
      : bits(static_cast<size_t>(in_pad / 16 + 1)),
        vrow(static_cast<size_t>(kept + 16)),
        wrow(static_cast<size_t>(rows * in_pad)) {}
};

#if SPARSEOPS_NM_X86
template <typename scalar_t>
SPARSEOPS_NM_AVX512 inline void widen16(const scalar_t* src, float* dst, int64_t count) {
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
    return;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; j + 16 <= count; j += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
      const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(w));
    }
  } else {
    for (; j + 16 <= count; j += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
      _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(h));
    }
  }
  for (; j < count; ++j) dst[j] = static_cast<float>(src[j]);
}

// Builds the dense fp32 row (in_pad floats) of one weight row from its kept values (fp32) and
// its meta: per 16-column chunk, the next popcount(mask) values are expanded into place.
SPARSEOPS_NM_AVX512 inline void expand_row(const float* v, const uint8_t* meta,
                                           const RowDecoder& dec, uint16_t* words, float* d) {
  const bool generic = dec.mode == RowDecoder::kGeneric;
  if (generic) dec.decode_generic(meta, words);
  // m divides 16, so a full chunk holds 16 / m whole groups: exactly 16 * n / m kept values, at a
  // fixed offset (no dependency from one chunk to the next); a partial last chunk holds
  // (in % 16) / m groups. Register-form expand of a masked load (the memory form of vexpandps
  // is microcoded on Zen 4); the masked load never touches values past the row.
  const int64_t per = 16 * dec.n / dec.m;
  const int64_t full = dec.in / 16;
  const __mmask16 lm = static_cast<__mmask16>((1u << per) - 1u);
  for (int64_t ch = 0; ch < full; ++ch) {
    const uint16_t k = generic ? words[ch] : dec.chunk(meta, ch);
    _mm_prefetch(reinterpret_cast<const char*>(v + ch * per) + 1024, _MM_HINT_T0);
    const __m512 packed = _mm512_maskz_loadu_ps(lm, v + ch * per);
    _mm512_storeu_ps(d + 16 * ch, _mm512_maskz_expand_ps(static_cast<__mmask16>(k), packed));
  }
  if (full < dec.chunks) {
    const uint16_t k = generic ? words[full] : dec.chunk(meta, full);
    const int64_t cnt = (dec.in % 16) / dec.m * dec.n;
    const __m512 packed = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1u), v + full * per);
    _mm512_storeu_ps(d + 16 * full, _mm512_maskz_expand_ps(static_cast<__mmask16>(k), packed));
  }
}

// `count` (< 16) kept values widened to fp32 in a register; the masked load never reads past them.
template <typename scalar_t>
SPARSEOPS_NM_AVX512 inline __m512 load_kept(const scalar_t* v, __mmask16 lm) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(lm, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i h = _mm256_maskz_loadu_epi16(lm, v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, v));
  }
}

// The 16-column mask of a full chunk by decode kind CB, a compile-time constant so that the
// batch-1 loops carry no mode branches: -1 generic (pre-decoded words), 0 the other table modes,
// 1 / 2 / 4 bytes-to-columns with that many mask bytes per meta byte (2:4, 1:4 / 1:2 / 1:16 ...).
// Measured on the bare loop (bf16 2:4, one thread, load ~15): 14 GB/s without the branches
// against 11 GB/s with them.
template <int CB>
inline uint16_t mask_inside(const RowDecoder& dec, const uint8_t* meta, const uint16_t* words,
                            int64_t ch) {
  if constexpr (CB < 0) {
    return words[ch];
  } else if constexpr (CB == 0) {
    return dec.chunk_inside(meta, ch);
  } else if constexpr (CB == 1) {
    return static_cast<uint16_t>(dec.lut[meta[2 * ch]] | (dec.lut[meta[2 * ch + 1]] << 8));
  } else if constexpr (CB == 2) {
    return static_cast<uint16_t>(dec.lut[meta[ch]]);
  } else {
    return static_cast<uint16_t>(dec.lut[meta[ch >> 1]] >> (16 * (ch & 1)));
  }
}

inline int decode_kind(const RowDecoder& dec) {
  if (dec.mode == RowDecoder::kGeneric) return -1;
  return dec.mode == RowDecoder::kBytesToCols ? dec.col_bytes : 0;
}

// One 16-column chunk of one weight row (kept values expanded into place by the chunk's column
// mask k) times the same chunk of RB rows of x, into accumulator a of each row.
template <typename scalar_t, int RB>
SPARSEOPS_NM_AVX512 inline void fma_chunk(const scalar_t* v, __mmask16 lm, uint16_t k, const float* x,
                                          int64_t in_pad, __m512 (&acc)[RB][4], int a) {
  const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(k), load_kept<scalar_t>(v, lm));
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) acc[r][a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + r * in_pad), acc[r][a]);
}

// sums[r] = (weight row) . (x row r) for RB rows of x, straight from the compressed row: no dense
// row is written. Chunk ch goes to accumulator ch % 4 for every RB, and the four are added in
// one order: a row's result has the same bits at every batch size below the crossover.
template <typename scalar_t, int RB, int CB>
SPARSEOPS_NM_AVX512 void dot_compressed(const scalar_t* v, const uint8_t* meta,
                                        const RowDecoder& dec, const uint16_t* words,
                                        const float* x, int64_t in_pad, float* sums) {
  const bool generic = dec.mode == RowDecoder::kGeneric;
  // m divides 16, so a full chunk holds 16 / m whole groups: exactly 16 * n / m kept values at a
  // fixed offset; a partial last chunk holds (in % 16) / m groups. Register-form expand of a
  // masked load (the memory form of vexpandps is microcoded on Zen 4).
  const int64_t per = 16 * dec.n / dec.m;
  const int64_t full = dec.in / 16;
  const auto lm = static_cast<__mmask16>((1u << per) - 1u);
  __m512 acc[RB][4];
  for (int r = 0; r < RB; ++r) {
    for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_ps();
  }
  int64_t ch = 0;
  const int64_t iter_bytes = 4 * per * static_cast<int64_t>(sizeof(scalar_t));
  for (; ch + 4 <= full; ch += 4) {
    prefetch_ahead(v + ch * per, iter_bytes, meta + (ch * 16 * dec.n * dec.bits / dec.m) / 8);
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const uint16_t k = mask_inside<CB>(dec, meta, words, ch + a);
      fma_chunk<scalar_t, RB>(v + (ch + a) * per, lm, k, x + 16 * (ch + a), in_pad, acc, a);
    }
  }
  for (; ch < full; ++ch) {
    const uint16_t k = mask_inside<CB>(dec, meta, words, ch);
    fma_chunk<scalar_t, RB>(v + ch * per, lm, k, x + 16 * ch, in_pad, acc, static_cast<int>(ch & 3));
  }
  if (full < dec.chunks) {
    const uint16_t k = generic ? words[full] : dec.chunk(meta, full);
    const int64_t cnt = (dec.in % 16) / dec.m * dec.n;
    fma_chunk<scalar_t, RB>(v + full * per, static_cast<__mmask16>((1u << cnt) - 1u), k, x + 16 * full,
                            in_pad, acc, static_cast<int>(full & 3));
  }
  for (int r = 0; r < RB; ++r) {
    sums[r] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
  }
}

#define SPARSEOPS_NM_VBMI2 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
bool use_vbmi2() {
  static const bool v = [] {
    __builtin_cpu_init();
    return use_avx512() && __builtin_cpu_supports("avx512vbmi2");
  }();
  return v;
}

#define SPARSEOPS_NM_BF16DOT \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx512bf16,popcnt")))
bool use_bf16dot() {
  static const bool v = [] {
    __builtin_cpu_init();
    return use_vbmi2() && __builtin_cpu_supports("avx512bf16");
  }();
  return v;
}

// bf16 x bf16 without widening (avx512_bf16 + VBMI2): per 32-column chunk one masked load of
// the 32 * n / m kept values, one vpexpandw into place and one vdpbf16ps per x row (pairs of
// bf16 products summed into fp32 lanes; like oneDNN's bf16 GEMM it treats bf16 subnormals as
// zero). A third of the instructions of the widening path per column.
template <int RB>
SPARSEOPS_NM_BF16DOT inline void dp_chunk(const uint16_t* v, __mmask32 lm, uint32_t k, const uint16_t* x,
                                          int64_t ldx, __m512 (&acc)[RB][4], int a) {
  const __m512i w = _mm512_maskz_expand_epi16(k, _mm512_maskz_loadu_epi16(lm, v));
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) {
    const __m512i xr = _mm512_loadu_si512(x + r * ldx);
    acc[r][a] = _mm512_dpbf16_ps(acc[r][a], (__m512bh)w, (__m512bh)xr);
  }
}

// The dot products of dot_compressed for bf16 rows of x padded to ldx (a multiple of 32) with
// zeros; chunk j of 32 columns into accumulator j % 4, the same order at every RB.
template <int RB, int CB>
SPARSEOPS_NM_BF16DOT void dot_compressed_bf16(const uint16_t* v, const uint8_t* meta,
                                              const RowDecoder& dec, const uint16_t* words,
                                              const uint16_t* x, int64_t ldx, float* sums) {
  const bool generic = dec.mode == RowDecoder::kGeneric;
  const int64_t per = 32 * dec.n / dec.m;  // kept values per full 32-column chunk (< 32)
  const int64_t full = dec.in / 32;
  const auto lm = static_cast<__mmask32>((1u << per) - 1u);
  // Full chunks lie inside the row, so their 16-column halves need no bound checks.
  auto mask = [&](int64_t h) -> uint32_t {
    if (h >= dec.chunks) return 0u;
    return generic ? words[h] : dec.chunk(meta, h);
  };
  __m512 acc[RB][4];
  for (int r = 0; r < RB; ++r) {
    for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_ps();
  }
  int64_t ch = 0;
  for (; ch + 4 <= full; ch += 4) {
    prefetch_ahead(v + ch * per, 8 * per, meta + (ch * 32 * dec.n * dec.bits / dec.m) / 8);
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const int64_t j = ch + a;
      // full 32-column chunks: both 16-column halves lie inside the row
      const uint32_t k = mask_inside<CB>(dec, meta, words, 2 * j) |
                         (uint32_t(mask_inside<CB>(dec, meta, words, 2 * j + 1)) << 16);
      dp_chunk<RB>(v + j * per, lm, k, x + 32 * j, ldx, acc, a);
    }
  }
  for (; ch < full; ++ch) {
    const uint32_t k = mask(2 * ch) | (mask(2 * ch + 1) << 16);
    dp_chunk<RB>(v + ch * per, lm, k, x + 32 * ch, ldx, acc, static_cast<int>(ch & 3));
  }
  if (32 * full < dec.in) {
    const uint32_t k = mask(2 * full) | (mask(2 * full + 1) << 16);
    const int64_t cnt = (dec.in - 32 * full) / dec.m * dec.n;
    dp_chunk<RB>(v + full * per, static_cast<__mmask32>((1u << cnt) - 1u), k, x + 32 * full, ldx, acc,
                 static_cast<int>(full & 3));
  }
  for (int r = 0; r < RB; ++r) {
    sums[r] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
  }
}

// RB dot products of one weight row: widened fp32 x (dot_compressed) or bf16 x (the bf16 pair
// instructions).
template <typename scalar_t, typename x_t, int RB>
SPARSEOPS_NM_AVX512 inline void dot_rows(const scalar_t* v, const uint8_t* meta, const RowDecoder& dec,
                                         const uint16_t* words, const x_t* x, int64_t ldx, float* sums) {
  if constexpr (std::is_same_v<x_t, float>) {
    switch (decode_kind(dec)) {
      case -1:
        return dot_compressed<scalar_t, RB, -1>(v, meta, dec, words, x, ldx, sums);
      case 1:
        return dot_compressed<scalar_t, RB, 1>(v, meta, dec, words, x, ldx, sums);
      case 2:
        return dot_compressed<scalar_t, RB, 2>(v, meta, dec, words, x, ldx, sums);
      case 4:
        return dot_compressed<scalar_t, RB, 4>(v, meta, dec, words, x, ldx, sums);
      default:
        return dot_compressed<scalar_t, RB, 0>(v, meta, dec, words, x, ldx, sums);
    }
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<x_t, c10::BFloat16>);
    const auto* v16 = reinterpret_cast<const uint16_t*>(v);
    const auto* x16 = reinterpret_cast<const uint16_t*>(x);
    switch (decode_kind(dec)) {
      case -1:
        return dot_compressed_bf16<RB, -1>(v16, meta, dec, words, x16, ldx, sums);
      case 1:
        return dot_compressed_bf16<RB, 1>(v16, meta, dec, words, x16, ldx, sums);
      case 2:
        return dot_compressed_bf16<RB, 2>(v16, meta, dec, words, x16, ldx, sums);
      case 4:
        return dot_compressed_bf16<RB, 4>(v16, meta, dec, words, x16, ldx, sums);
      default:
        return dot_compressed_bf16<RB, 0>(v16, meta, dec, words, x16, ldx, sums);
    }
  }
}

// Output rows [o0, o1) for all R rows of x (fp32 or bf16, rows padded with zeros to ldx), x
// rows four at a time while the weight row stays in L1.
template <typename scalar_t, typename x_t>
SPARSEOPS_NM_AVX512 void linear_rows_avx512(const x_t* x, int64_t ldx, const scalar_t* values,
                                            const uint8_t* meta, const scalar_t* bias,
                                            const NMConfig& c, const RowDecoder& dec, int64_t R,
                                            int64_t o0, int64_t o1, scalar_t* out,
                                            std::vector<uint16_t>& words) {
  for (int64_t o = o0; o < o1; ++o) {
    const scalar_t* v = values + o * c.kept;
    const uint8_t* mrow = meta + o * c.meta_bytes;
    if (dec.mode == RowDecoder::kGeneric) dec.decode_generic(mrow, words.data());
    const bool has_bias = bias != nullptr;
    const float b = has_bias ? static_cast<float>(bias[o]) : 0.f;
    auto put = [&](int64_t row, float s) { out[row * c.out + o] = static_cast<scalar_t>(has_bias ? s + b : s); };
    float sums[4];
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
      dot_rows<scalar_t, x_t, 4>(v, mrow, dec, words.data(), x + r * ldx, ldx, sums);
      for (int i = 0; i < 4; ++i) put(r + i, sums[i]);
    }
    for (; r + 2 <= R; r += 2) {
      dot_rows<scalar_t, x_t, 2>(v, mrow, dec, words.data(), x + r * ldx, ldx, sums);
      for (int i = 0; i < 2; ++i) put(r + i, sums[i]);
    }
    if (r < R) {
      dot_rows<scalar_t, x_t, 1>(v, mrow, dec, words.data(), x + r * ldx, ldx, sums);
      put(r, sums[0]);
    }
  }
}

// ---- batch 1, AVX-512 VBMI: x gathered by the kept columns (no expand of the weight) ---------
//
// At batch 1 every kept value is used once, so the cost per kept value is the instruction count.
// The expand path (dot_compressed*) spends per 16 fp32 / 32 bf16 *columns* a table decode of the
// meta (2 dependent loads, shift, or, kmov), a masked load, a vexpandps / vpexpandw and one fma /
// vdpbf16ps: ~9 instructions per 8 kept fp32 values of 2:4 and per 8 kept bf16 values of 1:4 or
// 2:8, and the expand itself is a 2-uop instruction on Zen 4. Here the weight's kept values are
// used as stored, a full vector (16 fp32 / 32 bf16 kept values) per step, and x (stationary at
// batch 1, in L1) is gathered to match by permutes: the kept lane l of a block sits at column
// (l / n) * m + p_l of the block's 32 * m / n (bf16) or 16 * m / n (fp32) columns, so the index
// vector is a per-lane constant base plus the lane's meta field p_l: the block's meta bytes are
// spread so that each 64-bit lane holds the fields of its 16/32-bit lanes (vpermb), each field
// is shifted into its lane's low byte (vpmultishiftqb) and masked and added to the base
// (vpternlog); then one vpermt2w / vpermt2ps per two x registers (m / n = 2: one, 4: two, 8:
// four, merged by lane masks). Per block: ~4 + m / (2n) permutes/logic, one multiply-add, 2 to 8
// x loads from L1: 1:4 bf16 ~12 instructions per 32 kept values against ~40 for the expand path.
// Patterns: m / n in {2, 4, 8} (1:2, 2:4, 4:8, 8:16, 1:4, 2:8, 4:16, 1:8, 2:16). x is padded
// with zeros to whole blocks, so the lanes past a row's last kept value (zero values, masked
// loads) meet zeros; unkept columns of x are never read (an inf there gives no NaN, unlike a
// dense product with the masked weight). Each row is one thread's fixed-order sum: the bits do
// not depend on the thread count (they differ from the R >= 2 paths', as those differ from each
// other).
#define SPARSEOPS_NM_GATHER __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,popcnt")))
#define SPARSEOPS_NM_GATHER_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512bf16,popcnt")))

bool use_vbmi() {
  static const bool v = [] {
    __builtin_cpu_init();
    return use_avx512() && __builtin_cpu_supports("avx512vbmi");
  }();
  return v;
}

// m / n when the gather path takes the pattern, else 0.
inline int gather_span(const NMConfig& c) {
  if (c.n <= 0 || c.m % c.n != 0) return 0;
  const int64_t s = c.m / c.n;
  return s == 2 || s == 4 || s == 8 ? static_cast<int>(s) : 0;
}

// The per-call constants of the index computation for lanes of wbytes (2: bf16, 4: fp32).
struct GatherPlan {
  int lanes = 0;       // kept values per block (32 bf16 / 16 fp32)
  int span = 0;        // m / n: x registers per block
  int meta_block = 0;  // meta bytes per block (lanes * bits / 8, whole)
  alignas(64) uint8_t permb[64] = {};  // vpermb: qword q <- the meta bytes holding its lanes' fields
  alignas(64) uint8_t shift[64] = {};  // vpmultishiftqb: each lane's field to its low byte
  alignas(64) uint8_t base[64] = {};   // per lane: (l / n) * m mod (2 * lanes) (the permute table)
  alignas(64) uint8_t field[64] = {};  // per lane: m - 1
};

GatherPlan make_gather_plan(const NMConfig& c, int wbytes) {
  GatherPlan g;
  g.lanes = 64 / wbytes;
  g.span = gather_span(c);
  g.meta_block = g.lanes * c.bits / 8;
  const int lq = 8 / wbytes;  // lanes per qword
  for (int q = 0; q < 8; ++q) {
    const int s = c.bits * q * lq / 8;  // first meta byte of the qword's lanes
    for (int t = 0; t < 8; ++t) g.permb[q * 8 + t] = static_cast<uint8_t>(s + t);
    for (int j = 0; j < lq; ++j) g.shift[q * 8 + j * wbytes] = static_cast<uint8_t>(c.bits * (q * lq + j) - 8 * s);
  }
  for (int l = 0; l < g.lanes; ++l) {
    const int64_t b = (l / c.n) * c.m % (2 * g.lanes);
    g.base[l * wbytes] = static_cast<uint8_t>(b);
    g.field[l * wbytes] = static_cast<uint8_t>(c.m - 1);
  }
  return g;
}

// The permute indices of one block from its meta bytes (lm: the bytes to load).
SPARSEOPS_NM_GATHER inline __m512i gather_index(const uint8_t* mb, __mmask16 lm, __m512i permb, __m512i shift,
                                                __m512i field, __m512i base) {
  const __m512i raw = _mm512_zextsi128_si512(_mm_maskz_loadu_epi8(lm, mb));
  const __m512i f = _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(permb, raw));
  return _mm512_ternarylogic_epi32(f, field, base, 0xEA);  // (f & field) | base
}

// Tail block b of a row (its kept values [b L, b L + L) clipped to the row's kept): how many it
// holds (<= 0: past the row) and, when any, the permute indices from its meta bytes (blocks of
// mbk bytes, clipped to the row's meta).
SPARSEOPS_NM_GATHER inline int64_t tail_block(const uint8_t* meta, const NMConfig& c, int64_t L, int64_t mbk, int64_t b,
                                              __m512i permb, __m512i shift, __m512i field, __m512i base, __m512i& idx) {
  const int64_t cnt = std::min<int64_t>(c.kept - b * L, L);
  if (cnt <= 0) return cnt;
  const int64_t mcnt = std::min<int64_t>(c.meta_bytes - b * mbk, mbk);
  idx = gather_index(meta + b * mbk, static_cast<__mmask16>((uint32_t(1) << mcnt) - 1u), permb, shift, field, base);
  return cnt;
}

// x (bf16) of a block's 32 kept lanes: permute p serves lanes [p * 32 / P, (p + 1) * 32 / P)
// from x registers 2p and 2p + 1.
template <int P>
SPARSEOPS_NM_GATHER inline __m512i gather_x16(const uint16_t* xb, __m512i idx) {
  __m512i gx = _mm512_permutex2var_epi16(_mm512_loadu_si512(xb), idx, _mm512_loadu_si512(xb + 32));
#pragma GCC unroll 4
  for (int p = 1; p < P; ++p) {
    const auto k = static_cast<__mmask32>(((uint64_t(1) << (32 / P)) - 1) << (p * 32 / P));
    gx = _mm512_mask_mov_epi16(
        gx, k, _mm512_permutex2var_epi16(_mm512_loadu_si512(xb + 64 * p), idx, _mm512_loadu_si512(xb + 64 * p + 32)));
  }
  return gx;
}

template <int P>
SPARSEOPS_NM_GATHER inline __m512 gather_x32(const float* xb, __m512i idx) {
  __m512 gx = _mm512_permutex2var_ps(_mm512_loadu_ps(xb), idx, _mm512_loadu_ps(xb + 16));
#pragma GCC unroll 4
  for (int p = 1; p < P; ++p) {
    const auto k = static_cast<__mmask16>(((1u << (16 / P)) - 1u) << (p * 16 / P));
    gx = _mm512_mask_mov_ps(gx, k, _mm512_permutex2var_ps(_mm512_loadu_ps(xb + 32 * p), idx, _mm512_loadu_ps(xb + 32 * p + 16)));
  }
  return gx;
}

// One weight row (kept values v, meta) times x (padded with zeros to whole blocks): block j
// into accumulator j % 4.
template <int P>
SPARSEOPS_NM_GATHER_BF16 float dot_gather_bf16(const uint16_t* v, const uint8_t* meta, const NMConfig& c,
                                               const GatherPlan& g, const uint16_t* x) {
  const __m512i permb = _mm512_load_si512(g.permb), shift = _mm512_load_si512(g.shift);
  const __m512i field = _mm512_load_si512(g.field), base = _mm512_load_si512(g.base);
  constexpr int64_t L = 32, cols = 64 * P;
  const int64_t mbk = g.meta_block;
  const auto mlm = static_cast<__mmask16>((uint32_t(1) << mbk) - 1u);
  const int64_t full = c.kept / L;
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 4 <= full; j += 4) {
    prefetch_ahead(v + j * L, 4 * L * 2, meta + j * mbk);
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const __m512i idx = gather_index(meta + (j + a) * mbk, mlm, permb, shift, field, base);
      const __m512i gx = gather_x16<P>(x + (j + a) * cols, idx);
      acc[a] = _mm512_dpbf16_ps(acc[a], (__m512bh)_mm512_loadu_si512(v + (j + a) * L), (__m512bh)gx);
    }
  }
  // the last 0..3 full blocks and the partial one, still block b into accumulator b % 4 (j is a
  // multiple of 4; constant indices keep acc in registers)
#pragma GCC unroll 4
  for (int a = 0; a < 4; ++a) {
    const int64_t b = j + a;
    __m512i idx;
    const int64_t cnt = tail_block(meta, c, L, mbk, b, permb, shift, field, base, idx);
    if (cnt <= 0) break;
    const __m512i gx = gather_x16<P>(x + b * cols, idx);
    const __m512i w = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t(1) << cnt) - 1u), v + b * L);
    acc[a] = _mm512_dpbf16_ps(acc[a], (__m512bh)w, (__m512bh)gx);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// R (1 or 2) consecutive weight rows (kept values v + r * kept, meta + r * meta_bytes) times
// x: the rows share each block's x loads (their permutes differ), which halves the x traffic
// where x outgrows L1 (in = 11008 fp32: 44 KB). Each row's sums run exactly as with R = 1
// (block j into its accumulator j % 4, one reduction), so its bits do not depend on R.
template <int P, int R>
SPARSEOPS_NM_GATHER void dot_gather_fp32(const float* v, const uint8_t* meta, const NMConfig& c,
                                         const GatherPlan& g, const float* x, float* out) {
  const __m512i permb = _mm512_load_si512(g.permb), shift = _mm512_load_si512(g.shift);
  const __m512i field = _mm512_load_si512(g.field), base = _mm512_load_si512(g.base);
  constexpr int64_t L = 16, cols = 32 * P;
  const int64_t mbk = g.meta_block;
  const auto mlm = static_cast<__mmask16>((uint32_t(1) << mbk) - 1u);
  const int64_t full = c.kept / L;
  __m512 acc[R][4];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 4 <= full; j += 4) {
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) prefetch_ahead(v + r * c.kept + j * L, 4 * L * 4, meta + r * c.meta_bytes + j * mbk);
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const float* xb = x + (j + a) * cols;
      __m512 xr[2 * P];
#pragma GCC unroll 8
      for (int q = 0; q < 2 * P; ++q) xr[q] = _mm512_loadu_ps(xb + 16 * q);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        const __m512i idx =
            gather_index(meta + r * c.meta_bytes + (j + a) * mbk, mlm, permb, shift, field, base);
        __m512 gx = _mm512_permutex2var_ps(xr[0], idx, xr[1]);
#pragma GCC unroll 4
        for (int p = 1; p < P; ++p) {
          const auto k = static_cast<__mmask16>(((1u << (16 / P)) - 1u) << (p * 16 / P));
          gx = _mm512_mask_mov_ps(gx, k, _mm512_permutex2var_ps(xr[2 * p], idx, xr[2 * p + 1]));
        }
        acc[r][a] = _mm512_fmadd_ps(_mm512_loadu_ps(v + r * c.kept + (j + a) * L), gx, acc[r][a]);
      }
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r) {
    const float* vr = v + r * c.kept;
    const uint8_t* mr = meta + r * c.meta_bytes;
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {  // as in dot_gather_bf16
      const int64_t b = j + a;
      __m512i idx;
      const int64_t cnt = tail_block(mr, c, L, mbk, b, permb, shift, field, base, idx);
      if (cnt <= 0) break;
      const __m512 w = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1u), vr + b * L);
      acc[r][a] = _mm512_fmadd_ps(w, gather_x32<P>(x + b * cols, idx), acc[r][a]);
    }
    out[r] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3])));
  }
}

// Batch 1 through the gather kernels: x (fp32 or bf16, as the weight) padded with zeros to whole
// blocks; output rows over threads in blocks of kRowBlock.
template <typename scalar_t>
void linear_gather1(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                    const NMConfig& c, Tensor& out) {
  constexpr bool bf = std::is_same_v<scalar_t, c10::BFloat16>;
  const GatherPlan g = make_gather_plan(c, bf ? 2 : 4);
  const int64_t blocks = (c.kept + g.lanes - 1) / g.lanes;
  Tensor xb = at::zeros({std::max<int64_t>(blocks * g.lanes * g.span, 1)}, x2d.options());
  xb.narrow(0, 0, c.in).copy_(x2d[0]);
  const scalar_t* xp = xb.data_ptr<scalar_t>();
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  // fp32 rows go in pairs where x outgrows half of L1 or each block permutes from 4+ x
  // registers (1:4, 2:8, ...): 2 threads, weights beyond the L3, 2026-12-07, three interleaved
  // rounds, GB/s single / paired: 4096x11008 1:4 14.5-17.4 / 18.6-22.0, 2:4 20.0-23.6 /
  // 25.0-26.8; 4096x4096 1:4 21.4-29.3 / 24.6-33.5; but 4096x4096 2:4 (x 16 KB, two x
  // registers) 26.5-27.3 / 21.1-24.6.
  const bool pairs = !bf && (g.span >= 4 || c.in * 4 > 16 * 1024);
  // Rows [o, o + r) (r = 1, or 2 with pairs) into s[0, r).
  auto rows = [&](int64_t o, int r, float* s) {
    const uint8_t* mr = mp + o * c.meta_bytes;
    if constexpr (bf) {
      const auto* v16 = reinterpret_cast<const uint16_t*>(vp + o * c.kept);
      const auto* x16 = reinterpret_cast<const uint16_t*>(xp);
      switch (g.span) {
        case 2: s[0] = dot_gather_bf16<1>(v16, mr, c, g, x16); break;
        case 4: s[0] = dot_gather_bf16<2>(v16, mr, c, g, x16); break;
        default: s[0] = dot_gather_bf16<4>(v16, mr, c, g, x16); break;
      }
    } else {
      const float* vr = vp + o * c.kept;
      switch (g.span * 2 + (r == 2)) {
        case 4: return dot_gather_fp32<1, 1>(vr, mr, c, g, xp, s);
        case 5: return dot_gather_fp32<1, 2>(vr, mr, c, g, xp, s);
        case 8: return dot_gather_fp32<2, 1>(vr, mr, c, g, xp, s);
        case 9: return dot_gather_fp32<2, 2>(vr, mr, c, g, xp, s);
        case 16: return dot_gather_fp32<4, 1>(vr, mr, c, g, xp, s);
        default: return dot_gather_fp32<4, 2>(vr, mr, c, g, xp, s);
      }
    }
  };
  at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t o = b0; o < b1;) {
      const int r = pairs && o + 1 < b1 ? 2 : 1;
      float s[2];
      rows(o, r, s);
      for (int i = 0; i < r; ++i, ++o) {
        op[o] = static_cast<scalar_t>(bp != nullptr ? s[i] + static_cast<float>(bp[o]) : s[i]);
      }
    }
  });
}

// ---- AVX-512 register-blocked path: weight chunks decoded once per OB x RB block ---------------
//
// From 2 rows of x on (bf16 with avx512_bf16: until the oneDNN tiles; fp32: until the BLAS
// tiles), the weight is still read once per call, so the cost is the arithmetic and the x loads.
// Here a block of kRegOB weight rows x kRegRB rows of x keeps its 24 partial-sum vectors in
// registers: per chunk (16 fp32 / 32 bf16 columns) each weight row is loaded and expanded once
// (vexpandps / vpexpandw) and each x row is loaded once, then kRegOB * kRegRB multiply-adds (fma
// / vdpbf16ps). The other rows of x reuse the block's weight rows from L1. Where x outgrows half
// of L2 the columns are split into blocks (kRegXBytes of x each), and the partial-sum vectors of
// a tile of kRegOTile weight rows wait in a thread-local buffer between them. Each (weight row,
// x row) pair has one accumulator vector fed chunk by chunk in column order, reduced once: the
// bits depend on neither the thread count, nor R, nor the blocking.

constexpr int kRegOB = 3;                   // weight rows per register block
constexpr int kRegRB = 8;                   // x rows per register block
constexpr int64_t kRegOTile = 24;           // weight rows per tile (a multiple of kRegOB)
constexpr int64_t kRegXBytes = 256 * 1024;  // bytes of x per column block

SPARSEOPS_NM_AVX512 inline float reduce16(const float* p) { return _mm512_reduce_add_ps(_mm512_loadu_ps(p)); }

// The kRegOB x RB partial-sum vectors of a block as named variables (a<ob><r>): GCC keeps an
// array of vectors indexed in unrolled loops in memory (measured: 24 stores per chunk, 8.7 ms
// against 4.9 ms for torch at R = 16), so the block is spelled out; rows r >= RB and weight rows
// ob >= OB are compiled away.
#define SPARSEOPS_NM_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define SPARSEOPS_NM_DECL(r) __m512 a0##r, a1##r, a2##r;
#define SPARSEOPS_NM_INIT(r)                                                        \
  if constexpr (RB > r) {                                                           \
    a0##r = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + r * 16);            \
    if constexpr (OB > 1) {                                                         \
      a1##r = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + acc_ld + r * 16); \
      a2##r = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + 2 * acc_ld + r * 16); \
    }                                                                               \
  }
#define SPARSEOPS_NM_STORE(r)                                      \
  if constexpr (RB > r) {                                          \
    _mm512_storeu_ps(acc + r * 16, a0##r);                         \
    if constexpr (OB > 1) {                                        \
      _mm512_storeu_ps(acc + acc_ld + r * 16, a1##r);              \
      _mm512_storeu_ps(acc + 2 * acc_ld + r * 16, a2##r);          \
    }                                                              \
  }

// 16-column chunks [j0, j1) (plus the partial last chunk when `tail`) of OB (1 or kRegOB)
// weight rows (values v, row stride ldv; meta, row stride ldm) times RB fp32 rows of x, into
// the partial sums acc[ob * acc_ld + r * 16] (zero first when `first`).
template <typename scalar_t, int OB, int RB, int CB>
SPARSEOPS_NM_AVX512 void reg_block_fp32(const scalar_t* v, int64_t ldv, const uint8_t* meta,
                                        int64_t ldm, const RowDecoder& dec, const float* x,
                                        int64_t ldx, int64_t j0, int64_t j1, bool tail, float* acc,
                                        int64_t acc_ld, bool first) {
  static_assert(OB == 1 || OB == kRegOB);
  const int64_t per = 16 * dec.n / dec.m;
  // the partial last chunk's masks, before the accumulators are live (dec.chunk is a call)
  uint16_t kt0 = 0, kt1 = 0, kt2 = 0;
  if (tail) {
    kt0 = dec.chunk(meta, j1);
    if constexpr (OB > 1) kt1 = dec.chunk(meta + ldm, j1), kt2 = dec.chunk(meta + 2 * ldm, j1);
  }
  SPARSEOPS_NM_ROWS(SPARSEOPS_NM_DECL)
  SPARSEOPS_NM_ROWS(SPARSEOPS_NM_INIT)
  // One chunk j of weight rows (k0, k1, k2: their column masks; cm: the kept values' mask). A
  // macro, not a lambda: a lambda is compiled without the function's target, and any call inside
  // the loop would move the accumulators to the stack.
#define SPARSEOPS_NM_FP32_CHUNK(j, k0, k1, k2, cm)                                                     \
  {                                                                                                  \
    const scalar_t* vj = v + (j) * per;                                                              \
    __m512 w0, w1 = _mm512_setzero_ps(), w2 = w1;                                                    \
    _mm_prefetch(reinterpret_cast<const char*>(vj) + 2048, _MM_HINT_T0);                             \
    w0 = _mm512_maskz_expand_ps(static_cast<__mmask16>(k0), load_kept<scalar_t>(vj, cm));            \
    if constexpr (OB > 1) {                                                                          \
      _mm_prefetch(reinterpret_cast<const char*>(vj + ldv) + 2048, _MM_HINT_T0);                     \
      w1 = _mm512_maskz_expand_ps(static_cast<__mmask16>(k1), load_kept<scalar_t>(vj + ldv, cm));    \
      _mm_prefetch(reinterpret_cast<const char*>(vj + 2 * ldv) + 2048, _MM_HINT_T0);                 \
      w2 = _mm512_maskz_expand_ps(static_cast<__mmask16>(k2), load_kept<scalar_t>(vj + 2 * ldv, cm)); \
    }                                                                                                \
    SPARSEOPS_NM_ROWS(SPARSEOPS_NM_FMA_ROW)                                                          \
  }
#define SPARSEOPS_NM_FMA_ROW(r)                                   \
  if constexpr (RB > r) {                                         \
    const __m512 xr = in_register(_mm512_loadu_ps(x + r * ldx + 16 * j)); \
    a0##r = _mm512_fmadd_ps(w0, xr, a0##r);                       \
    if constexpr (OB > 1) {                                       \
      a1##r = _mm512_fmadd_ps(w1, xr, a1##r);                     \
      a2##r = _mm512_fmadd_ps(w2, xr, a2##r);                     \
    }                                                             \
  }
  const auto lm = static_cast<__mmask16>((1u << per) - 1u);
  for (int64_t j = j0; j < j1; ++j) {
    SPARSEOPS_NM_FP32_CHUNK(j, mask_inside<CB>(dec, meta, nullptr, j),
                            OB > 1 ? mask_inside<CB>(dec, meta + ldm, nullptr, j) : 0,
                            OB > 1 ? mask_inside<CB>(dec, meta + 2 * ldm, nullptr, j) : 0, lm)
  }
  if (tail) {
    const int64_t j = j1;
    const auto cm = static_cast<__mmask16>((1u << ((dec.in % 16) / dec.m * dec.n)) - 1u);
    SPARSEOPS_NM_FP32_CHUNK(j, kt0, kt1, kt2, cm)
  }
#undef SPARSEOPS_NM_FMA_ROW
#undef SPARSEOPS_NM_FP32_CHUNK
  SPARSEOPS_NM_ROWS(SPARSEOPS_NM_STORE)
}

// The same for bf16 weights and bf16 rows of x (32-column chunks, vpexpandw + vdpbf16ps; x rows
// padded with zeros to a multiple of 32).
template <int OB, int RB, int CB>
SPARSEOPS_NM_BF16DOT void reg_block_bf16(const uint16_t* v, int64_t ldv, const uint8_t* meta,
                                         int64_t ldm, const RowDecoder& dec, const uint16_t* x,
                                         int64_t ldx, int64_t j0, int64_t j1, bool tail, float* acc,
                                         int64_t acc_ld, bool first) {
  static_assert(OB == 1 || OB == kRegOB);
  const int64_t per = 32 * dec.n / dec.m;
  // the partial last chunk's masks (its second half may lie past the row), before the
  // accumulators are live (dec.chunk is a call)
  auto tail_mask = [&](const uint8_t* mr) -> uint32_t {
    const uint32_t hi = 2 * j1 + 1 < dec.chunks ? dec.chunk(mr, 2 * j1 + 1) : 0u;
    return dec.chunk(mr, 2 * j1) | (hi << 16);
  };
  uint32_t kt0 = 0, kt1 = 0, kt2 = 0;
  if (tail) {
    kt0 = tail_mask(meta);
    if constexpr (OB > 1) kt1 = tail_mask(meta + ldm), kt2 = tail_mask(meta + 2 * ldm);
  }
  SPARSEOPS_NM_ROWS(SPARSEOPS_NM_DECL)
  SPARSEOPS_NM_ROWS(SPARSEOPS_NM_INIT)
#define SPARSEOPS_NM_BF16_CHUNK(j, k0, k1, k2, cm)                                                    \
  {                                                                                                  \
    const uint16_t* vj = v + (j) * per;                                                              \
    __m512i w0, w1 = _mm512_setzero_si512(), w2 = w1;                                                \
    _mm_prefetch(reinterpret_cast<const char*>(vj) + 2048, _MM_HINT_T0);                             \
    w0 = _mm512_maskz_expand_epi16(k0, _mm512_maskz_loadu_epi16(cm, vj));                            \
    if constexpr (OB > 1) {                                                                          \
      _mm_prefetch(reinterpret_cast<const char*>(vj + ldv) + 2048, _MM_HINT_T0);                     \
      w1 = _mm512_maskz_expand_epi16(k1, _mm512_maskz_loadu_epi16(cm, vj + ldv));                    \
      _mm_prefetch(reinterpret_cast<const char*>(vj + 2 * ldv) + 2048, _MM_HINT_T0);                 \
      w2 = _mm512_maskz_expand_epi16(k2, _mm512_maskz_loadu_epi16(cm, vj + 2 * ldv));                \
    }                                                                                                \
    SPARSEOPS_NM_ROWS(SPARSEOPS_NM_DP_ROW)                                                           \
  }
#define SPARSEOPS_NM_DP_ROW(r)                                              \
  if constexpr (RB > r) {                                                   \
    const __m512i xr = _mm512_loadu_si512(x + r * ldx + 32 * j);            \
    a0##r = _mm512_dpbf16_ps(a0##r, (__m512bh)w0, (__m512bh)xr);            \
    if constexpr (OB > 1) {                                                 \
      a1##r = _mm512_dpbf16_ps(a1##r, (__m512bh)w1, (__m512bh)xr);          \
      a2##r = _mm512_dpbf16_ps(a2##r, (__m512bh)w2, (__m512bh)xr);          \
    }                                                                       \
  }
  // full chunks: both 16-column halves lie inside the row
#define SPARSEOPS_NM_MASK32(mr, j) \
  (mask_inside<CB>(dec, mr, nullptr, 2 * (j)) | (uint32_t(mask_inside<CB>(dec, mr, nullptr, 2 * (j) + 1)) << 16))
  const auto lm = static_cast<__mmask32>((1u << per) - 1u);
  for (int64_t j = j0; j < j1; ++j) {
    SPARSEOPS_NM_BF16_CHUNK(j, SPARSEOPS_NM_MASK32(meta, j), OB > 1 ? SPARSEOPS_NM_MASK32(meta + ldm, j) : 0u,
                            OB > 1 ? SPARSEOPS_NM_MASK32(meta + 2 * ldm, j) : 0u, lm)
  }
  if (tail) {
    const int64_t j = j1;
    const auto cm = static_cast<__mmask32>((1u << ((dec.in % 32) / dec.m * dec.n)) - 1u);
    SPARSEOPS_NM_BF16_CHUNK(j, kt0, kt1, kt2, cm)
  }
#undef SPARSEOPS_NM_MASK32
#undef SPARSEOPS_NM_DP_ROW
#undef SPARSEOPS_NM_BF16_CHUNK
  SPARSEOPS_NM_ROWS(SPARSEOPS_NM_STORE)
}
#undef SPARSEOPS_NM_ROWS
#undef SPARSEOPS_NM_DECL
#undef SPARSEOPS_NM_INIT
#undef SPARSEOPS_NM_STORE

// ---- bf16 2:4 / 1:4 / 2:8, fp32 m in {4, 8}, from kNMLaneRows rows: weight rows in lanes -----------
//
// vdpbf16ps sums products of bf16 pairs; call a "step" two consecutive kept values of a weight row
// (32 bits as stored) and the x columns they can come from: one group of 2:4 (4 columns) or 2:8
// (8), two groups of 1:4 (8). For a block of 16 weight rows and a step s, W[s] holds the 16 rows'
// pairs, one per 32-bit lane, and C[s] per lane the vpshufb control bytes that pick the row's two
// x values out of the step's columns (from the step's meta field: 4 bits for 2:4 and 1:4, 8 for
// 2:8). For a row r of x: one broadcast of the step's columns (8 bytes to every 64-bit lane, or 16
// bytes to every 128-bit lane), one vpshufb by C[s] (each 32-bit lane now holds the pair of x its
// weight row keeps), one vdpbf16ps with W[s] into the 16 outputs (r, o0 .. o0 + 15): 32 products
// per vdpbf16ps and none of them zero, from registers. Measured on the 2-core Zen 4 (one thread,
// in-cache loop): 1.3-1.5 cycles per vdpbf16ps, against 3-4 for x-stationary pair tables (a table
// load, a broadcast of the weight pair and an offset lookup per product) and 1 per 16 useful
// products (2:4; 8 for 1:4) for dense arithmetic on the expanded weight. The layout of kLaneSteps
// steps (16 x 16 transposes of 32-bit words) is made once per pass over the weight and used by up
// to kLaneRowChunk rows of x, 16 at a time (16 accumulator vectors; 4 or 8 for R <= 4 or 8). fp32
// (m in {4, 8}) works the same way with one kept value per step and vpermilps / vpermps (below).
// Each output is one lane fed step by step in column order: the bits depend on neither the thread
// count, nor R, nor the blocking.

constexpr int64_t kLaneRows = 16;       // weight rows per block (the lanes)
constexpr int64_t kLaneSteps = 64;      // steps per column block (8 KB of layout)
constexpr int kLaneRB = 16;             // rows of x per register block
constexpr int64_t kLaneRowChunk = 128;  // rows of x per pass over the weight (a multiple of kLaneRB)

// A pattern's steps: S x columns, B meta bits; control = table[field & 15] | high[(field >> 4) & 15].
struct LanePattern {
  int S, B;
  std::array<uint32_t, 16> table, high;
};

// the two vpshufb control bytes of the bf16 x value at column offset a of the step's columns
constexpr uint32_t lane_pick(uint32_t a) { return (2 * a) | ((2 * a + 1) << 8); }

constexpr LanePattern lane_pattern(int n, int m) {
  LanePattern p{n == 2 ? m : 2 * m, n == 2 && m == 8 ? 8 : 4, {}, {}};
  for (uint32_t f = 0; f < 16; ++f) {
    if (m == 4) {  // 2:4: positions f & 3 < f >> 2 of one group; 1:4: one position in each of two
      p.table[f] = lane_pick(f & 3) | (lane_pick((f >> 2) + (n == 1 ? 4 : 0)) << 16);
    } else {  // 2:8: the 8-bit field's bits 0-3 (table) and 4-7 (high) hold the two positions
      p.table[f] = f < 8 ? lane_pick(f) : 0;
      p.high[f] = f < 8 ? lane_pick(f) << 16 : 0;
    }
  }
  return p;
}
constexpr LanePattern kLane24 = lane_pattern(2, 4), kLane14 = lane_pattern(1, 4), kLane28 = lane_pattern(2, 8);

// The patterns the lanes take (steps of two kept values over at most 8 columns, whole steps).
inline const LanePattern* lane_pattern_of(const NMConfig& c) {
  if (c.kept % 2 != 0) return nullptr;
  if (c.n == 2 && c.m == 4) return &kLane24;
  if (c.n == 1 && c.m == 4) return &kLane14;
  if (c.n == 2 && c.m == 8) return &kLane28;
  return nullptr;
}

// In place: r[i] lane j <- r[j] lane i (16 x 16 32-bit words).
SPARSEOPS_NM_AVX512 inline void transpose16x16(__m512i* r) {
  __m512i b[16];
  for (int k = 0; k < 8; ++k) {
    b[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    b[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  // c[4k + q], 128-bit lane l: rows 4k .. 4k + 3 at column 4l + q
  __m512i c[16];
  for (int k = 0; k < 4; ++k) {
    c[4 * k] = _mm512_unpacklo_epi64(b[4 * k], b[4 * k + 2]);
    c[4 * k + 1] = _mm512_unpackhi_epi64(b[4 * k], b[4 * k + 2]);
    c[4 * k + 2] = _mm512_unpacklo_epi64(b[4 * k + 1], b[4 * k + 3]);
    c[4 * k + 3] = _mm512_unpackhi_epi64(b[4 * k + 1], b[4 * k + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // a 4 x 4 transpose of 128-bit lanes per q
    const __m512i d0 = _mm512_shuffle_i32x4(c[q], c[4 + q], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i d1 = _mm512_shuffle_i32x4(c[q], c[4 + q], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i d2 = _mm512_shuffle_i32x4(c[8 + q], c[12 + q], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i d3 = _mm512_shuffle_i32x4(c[8 + q], c[12 + q], _MM_SHUFFLE(3, 2, 3, 2));
    r[q] = _mm512_shuffle_i32x4(d0, d2, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + q] = _mm512_shuffle_i32x4(d0, d2, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + q] = _mm512_shuffle_i32x4(d1, d3, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + q] = _mm512_shuffle_i32x4(d1, d3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// The layout of weight rows [o0, o0 + rows) (rows <= 16; lanes past them zero), steps [s0, s1):
// lay[2 (s - s0)] = W[s], lay[2 (s - s0) + 1] = C[s] (steps rounded up to 16, the extra ones zero).
// w: the rows' 32-bit step words (bf16 pairs or fp32 values), ldw per row. W: 16 x 16 transposes
// of them. C: the 16 rows' meta of 16 steps (2 B bytes each) as 32-bit words per row, then per
// step a shift (its B-bit field into the low bits); bf16 (TABLE): one vpermd of the control table,
// which reads only the 4 low bits of each index (2:8: and a second one for bits 4-7); fp32: the
// field itself (vpermilps / vpermps read only its low 2 / 4 bits).
template <int B, bool TABLE>
SPARSEOPS_NM_AVX512 void lane_layout(const uint32_t* w, int64_t ldw, const uint8_t* meta, int64_t meta_bytes,
                                     const LanePattern* pat, int64_t o0, int64_t rows, int64_t s0, int64_t s1,
                                     __m512i* lay) {
  constexpr int kWords = B == 2 ? 1 : 16 * B / 32;  // meta words per row per 16 steps
  __m512i table = _mm512_setzero_si512(), high = table;
  if constexpr (TABLE) table = _mm512_loadu_si512(pat->table.data()), high = _mm512_loadu_si512(pat->high.data());
  // the next column block of these rows, into L2 (16 rows 4 KB+ apart: no stream the hardware
  // follows)
  if (s1 < ldw) {
    for (int64_t i = 0; i < rows; ++i) {
      const char* pw = reinterpret_cast<const char*>(w + (o0 + i) * ldw + s1);
      for (int64_t l = 0; l < 4 * (s1 - s0); l += 64) _mm_prefetch(pw + l, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(meta + (o0 + i) * meta_bytes + s1 * B / 8), _MM_HINT_T1);
    }
  }
  const __mmask16 live = lanes_below(rows);
  const __m512i row_bytes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(meta_bytes)));
  for (int64_t sb = s0; sb < s1; sb += 16) {
    const int64_t ns = std::min<int64_t>(16, s1 - sb);
    const __mmask16 words = lanes_below(ns);
    __m512i wt[16];
    for (int64_t i = 0; i < 16; ++i) {
      wt[i] = i < rows ? _mm512_maskz_loadu_epi32(words, w + (o0 + i) * ldw + sb) : _mm512_setzero_si512();
    }
    transpose16x16(wt);
    // mw[k] lane i: meta word k of row i's 16 steps (steps 32 k / B .., B bits each from bit 0)
    __m512i mw[kWords];
    const uint8_t* mb = meta + o0 * meta_bytes + sb * B / 8;
    if (ns == 16) {  // 2 B bytes inside every row
      for (int k = 0; k < kWords; ++k) {
        mw[k] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, row_bytes, mb + 4 * k, 1);
      }
    } else {  // the row's last steps: only the bytes that exist
      alignas(64) uint32_t t[kWords][16] = {};
      const int64_t nbytes = (ns * B + 7) / 8;
      for (int64_t i = 0; i < rows; ++i) {
        uint32_t row[kWords] = {};
        std::memcpy(row, mb + i * meta_bytes, nbytes);
        for (int k = 0; k < kWords; ++k) t[k][i] = row[k];
      }
      for (int k = 0; k < kWords; ++k) mw[k] = _mm512_load_si512(t[k]);
    }
    __m512i* out = lay + 2 * (sb - s0);
    for (int j = 0; j < 16; ++j) {
      const __m512i f = _mm512_srli_epi32(mw[j * B / 32], (j * B) % 32);
      __m512i ctl = f;
      if constexpr (TABLE) {
        ctl = _mm512_permutexvar_epi32(f, table);
        if constexpr (B == 8) ctl = _mm512_or_si512(ctl, _mm512_permutexvar_epi32(_mm512_srli_epi32(f, 4), high));
      }
      _mm512_store_si512(out + 2 * j, wt[j]);
      _mm512_store_si512(out + 2 * j + 1, _mm512_maskz_mov_epi32(live, ctl));
    }
  }
}

// Steps [0, ns) of one layout against RB rows of x (row i at x + i * ldx, from the layout's first
// step's columns; S columns per step): acc[i * 16 .. + 16] (zero first when `first`) += the 16
// weight rows' products.
template <int RB, int S>
SPARSEOPS_NM_BF16DOT void lane_block(const __m512i* lay, int64_t ns, const uint16_t* x, int64_t ldx, float* acc,
                                     bool first) {
  __m512 a[RB];
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i) a[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + 16 * i);
  for (int64_t s = 0; s < ns; ++s) {
    const __m512i w = _mm512_load_si512(lay + 2 * s), ctl = _mm512_load_si512(lay + 2 * s + 1);
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const uint16_t* xs = x + i * ldx + S * s;
      __m512i cols;
      if constexpr (S == 4) {
        long long q;
        std::memcpy(&q, xs, 8);
        cols = _mm512_set1_epi64(q);
      } else {
        cols = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xs)));
      }
      a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)w, (__m512bh)_mm512_shuffle_epi8(cols, ctl));
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

// fp32 (N kept values per group of M columns, M in {4, 8}): a step is one kept value. Steps [0, ns)
// (ns a multiple of N) of one layout against RB rows of x: per group one broadcast of its M x
// values to every 128-bit (M = 4) or 256-bit (M = 8) lane, then per step one vpermilps / vpermps
// by C[s] and one FMA with W[s]: 16 products per FMA and none of them zero (the register blocks'
// expanded rows: 16 N / M).
template <int RB, int N, int M>
SPARSEOPS_NM_AVX512 void lane_block_fp32(const __m512i* lay, int64_t ns, const float* x, int64_t ldx, float* acc,
                                         bool first) {
  __m512 a[RB];
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i) a[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + 16 * i);
  for (int64_t g = 0; g < ns / N; ++g) {
    __m512 w[N];
    __m512i ctl[N];
#pragma GCC unroll 4
    for (int k = 0; k < N; ++k) {
      w[k] = _mm512_castsi512_ps(_mm512_load_si512(lay + 2 * (N * g + k)));
      ctl[k] = _mm512_load_si512(lay + 2 * (N * g + k) + 1);
    }
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const float* xg = x + i * ldx + M * g;
      const __m512 win = M == 4 ? _mm512_broadcast_f32x4(_mm_loadu_ps(xg)) : _mm512_broadcast_f32x8(_mm256_loadu_ps(xg));
#pragma GCC unroll 4
      for (int k = 0; k < N; ++k) {
        const __m512 pick = M == 4 ? _mm512_permutevar_ps(win, ctl[k]) : _mm512_permutexvar_ps(ctl[k], win);
        a[i] = _mm512_fmadd_ps(w[k], pick, a[i]);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

// The per-dtype parts of the lanes: the block kernel by its rows of x (4, 8 or 16).
template <int S>
struct LanesBf16 {
  using T = uint16_t;
  template <int RB>
  static void block(const __m512i* lay, int64_t ns, const T* x, int64_t ldx, float* acc, bool first) {
    lane_block<RB, S>(lay, ns, x, ldx, acc, first);
  }
};
template <int N, int M>
struct LanesFp32 {
  using T = float;
  template <int RB>
  static void block(const __m512i* lay, int64_t ns, const T* x, int64_t ldx, float* acc, bool first) {
    lane_block_fp32<RB, N, M>(lay, ns, x, ldx, acc, first);
  }
};

// out[r * ldo + i] = acc[r * 16 + i] + bias[i] (rounded to out_t) for the block's first `rows` lanes.
template <typename out_t>
SPARSEOPS_NM_AVX512 void lane_outputs(const float* acc, int64_t R, const out_t* bias, int64_t rows, out_t* out,
                                      int64_t ldo) {
  const __mmask16 lanes = lanes_below(rows);
  const __m512 b = bias != nullptr ? load16(bias, lanes) : _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    const __m512 s = _mm512_loadu_ps(acc + r * 16);
    store16(out + r * ldo, bias != nullptr ? _mm512_add_ps(s, b) : s, lanes);
  }
}

// Weight rows in lanes (see above): `steps` 32-bit step words per weight row, `bcols` columns of x
// per column block of kLaneSteps steps, B meta bits per step (TABLE: bf16 controls from pat);
// x2d [R, in] contiguous, of the output's dtype scalar_t.
template <typename Lanes, int B, bool TABLE, typename scalar_t>
void linear_lanes(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                  const NMConfig& c, const LanePattern* pat, int64_t steps, int64_t bcols, Tensor& out) {
  using T = typename Lanes::T;
  static_assert(sizeof(T) == sizeof(scalar_t));
  const int64_t R = x2d.size(0);
  const int rb = R <= 4 ? 4 : R <= 8 ? 8 : kLaneRB;  // rows of x per register block (4, 8 or 16)
  const int64_t rp = (R + rb - 1) / rb * rb;
  const int64_t nb = (steps + kLaneSteps - 1) / kLaneSteps;
  // x by column block: xb[block][row][bcols columns], rows and columns past x zero. Read in place,
  // the 16 rows of a register block lie a multiple of 4 KB apart for the usual widths, in one L1
  // set (measured: 3.5-4 cycles per vdpbf16ps instead of 1.5).
  Tensor xb = at::zeros({nb, rp, bcols}, x2d.options());
  const auto* xs = reinterpret_cast<const T*>(x2d.data_ptr<scalar_t>());
  auto* xd = reinterpret_cast<T*>(xb.data_ptr<scalar_t>());
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t cols = std::min(bcols, c.in - b * bcols);
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(xd + (b * rp + r) * bcols, xs + r * c.in + b * bcols, sizeof(T) * cols);
    }
  }
  const auto* vp = reinterpret_cast<const uint32_t*>(values.data_ptr<scalar_t>());
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t blocks = (c.out + kLaneRows - 1) / kLaneRows;
  // Rows of x in chunks of kLaneRowChunk, each a pass over the weight: a chunk's x (1 MB of bf16 at
  // in = 4096) stays in L2 while every weight block runs against it.
  for (int64_t r0 = 0; r0 < rp; r0 += kLaneRowChunk) {
    const int64_t r1 = std::min(rp, r0 + kLaneRowChunk);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      alignas(64) __m512i lay[2 * kLaneSteps];  // (a std::vector of them is not 64-byte aligned here)
      std::vector<float> acc(static_cast<size_t>((r1 - r0) * 16));
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t o0 = blk * kLaneRows, rows = std::min(kLaneRows, c.out - o0);
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t s0 = b * kLaneSteps, s1 = std::min(steps, s0 + kLaneSteps);
          lane_layout<B, TABLE>(vp, steps, mp, c.meta_bytes, pat, o0, rows, s0, s1, lay);
          for (int64_t r = r0; r < r1; r += rb) {
            const T* xr = xd + (b * rp + r) * bcols;
            float* ar = acc.data() + (r - r0) * 16;
            if (rb == 4) {
              Lanes::template block<4>(lay, s1 - s0, xr, bcols, ar, b == 0);
            } else if (rb == 8) {
              Lanes::template block<8>(lay, s1 - s0, xr, bcols, ar, b == 0);
            } else {
              Lanes::template block<kLaneRB>(lay, s1 - s0, xr, bcols, ar, b == 0);
            }
          }
        }
        lane_outputs(acc.data(), std::min(R, r1) - r0, bp != nullptr ? bp + o0 : nullptr, rows,
                     op + r0 * c.out + o0, c.out);
      }
    });
  }
}

// The patterns the lanes take, or false: bf16 2:4 / 1:4 / 2:8 (lane_pattern_of), fp32 n:m with
// m in {4, 8} and n in {1, 2, 4} (n < m).
bool linear_lanes(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                  const NMConfig& c, Tensor& out) {
  if (x2d.scalar_type() == at::kBFloat16) {
    const LanePattern* pat = lane_pattern_of(c);
    if (pat == nullptr || !use_bf16dot()) return false;
    const int64_t steps = c.kept / 2, bcols = pat->S * kLaneSteps;
    if (pat->S == 4) {
      linear_lanes<LanesBf16<4>, 4, true, c10::BFloat16>(x2d, values, meta, bias, c, pat, steps, bcols, out);
    } else if (pat->B == 4) {
      linear_lanes<LanesBf16<8>, 4, true, c10::BFloat16>(x2d, values, meta, bias, c, pat, steps, bcols, out);
    } else {
      linear_lanes<LanesBf16<8>, 8, true, c10::BFloat16>(x2d, values, meta, bias, c, pat, steps, bcols, out);
    }
    return true;
  }
  if (x2d.scalar_type() != at::kFloat || !use_avx512() || (c.m != 4 && c.m != 8) || c.n >= c.m ||
      (c.n != 1 && c.n != 2 && c.n != 4)) {
    return false;
  }
  const int64_t bcols = kLaneSteps / c.n * c.m;
  auto go = [&](auto lanes, auto bits) {
    linear_lanes<decltype(lanes), decltype(bits)::value, false, float>(x2d, values, meta, bias, c, nullptr, c.kept,
                                                                       bcols, out);
  };
  using B2 = std::integral_constant<int, 2>;
  using B4 = std::integral_constant<int, 4>;
  if (c.m == 4 && c.n == 1) go(LanesFp32<1, 4>{}, B2{});
  if (c.m == 4 && c.n == 2) go(LanesFp32<2, 4>{}, B2{});
  if (c.m == 8 && c.n == 1) go(LanesFp32<1, 8>{}, B4{});
  if (c.m == 8 && c.n == 2) go(LanesFp32<2, 8>{}, B4{});
  if (c.m == 8 && c.n == 4) go(LanesFp32<4, 8>{}, B4{});
  return true;
}

// One register block by its run-time shape (ob in {1, kRegOB}, rb in {1, 2, 4, kRegRB}).
template <bool BF, typename scalar_t, typename x_t, int OB, int CB>
inline void reg_block_rb(int rb, const scalar_t* v, int64_t ldv, const uint8_t* meta, int64_t ldm,
                         const RowDecoder& dec, const x_t* x, int64_t ldx, int64_t j0, int64_t j1,
                         bool tail, float* acc, int64_t acc_ld, bool first) {
  auto go = [&](auto rbc) {
    constexpr int RB = decltype(rbc)::value;
    if constexpr (BF) {
      reg_block_bf16<OB, RB, CB>(reinterpret_cast<const uint16_t*>(v), ldv, meta, ldm, dec,
                                 reinterpret_cast<const uint16_t*>(x), ldx, j0, j1, tail, acc, acc_ld, first);
    } else {
      reg_block_fp32<scalar_t, OB, RB, CB>(v, ldv, meta, ldm, dec, x, ldx, j0, j1, tail, acc, acc_ld, first);
    }
  };
  switch (rb) {
    case kRegRB:
      return go(std::integral_constant<int, kRegRB>{});
    case 4:
      return go(std::integral_constant<int, 4>{});
    case 2:
      return go(std::integral_constant<int, 2>{});
    default:
      return go(std::integral_constant<int, 1>{});
  }
}

// Output rows [o0, o1) for all R rows of x (fp32 rows padded to 16, or bf16 rows padded to 32,
// with zeros) through the register blocks (see the section comment). acc: thread-local scratch.
template <bool BF, typename scalar_t, typename x_t, int CB>
void linear_rows_reg(const x_t* x, int64_t ldx, const scalar_t* values, const uint8_t* meta,
                     const scalar_t* bias, const NMConfig& c, const RowDecoder& dec, int64_t R,
                     int64_t o0, int64_t o1, scalar_t* out, std::vector<float>& acc) {
  const int64_t cols = BF ? 32 : 16;
  const int64_t full = c.in / cols;
  const bool has_tail = full * cols < c.in;
  const int64_t kc = std::max<int64_t>(8, kRegXBytes / (R * cols * static_cast<int64_t>(sizeof(x_t))));
  acc.resize(static_cast<size_t>(kRegOTile * R * 16));
  for (int64_t ot = o0; ot < o1; ot += kRegOTile) {
    const int64_t oe = std::min(o1, ot + kRegOTile);
    for (int64_t j0 = 0;; j0 += kc) {
      const int64_t j1 = std::min(full, j0 + kc);
      const bool tail = has_tail && j1 == full;
      for (int64_t o = ot; o < oe;) {
        const int ob = oe - o >= kRegOB ? kRegOB : 1;
        const scalar_t* v = values + o * c.kept;
        const uint8_t* mr = meta + o * c.meta_bytes;
        for (int64_t r = 0; r < R;) {
          const int64_t left = R - r;
          const int rb = left >= kRegRB ? kRegRB : left >= 4 ? 4 : left >= 2 ? 2 : 1;
          float* a = acc.data() + ((o - ot) * R + r) * 16;
          if (ob == kRegOB) {
            reg_block_rb<BF, scalar_t, x_t, kRegOB, CB>(rb, v, c.kept, mr, c.meta_bytes, dec, x + r * ldx, ldx,
                                                        j0, j1, tail, a, R * 16, j0 == 0);
          } else {
            reg_block_rb<BF, scalar_t, x_t, 1, CB>(rb, v, c.kept, mr, c.meta_bytes, dec, x + r * ldx, ldx, j0,
                                                   j1, tail, a, R * 16, j0 == 0);
          }
          r += rb;
        }
        o += ob;
      }
      if (j1 >= full) break;
    }
    for (int64_t o = ot; o < oe; ++o) {
      const float b = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;
      for (int64_t r = 0; r < R; ++r) {
        const float s = reduce16(acc.data() + ((o - ot) * R + r) * 16);
        out[r * c.out + o] = static_cast<scalar_t>(bias != nullptr ? s + b : s);
      }
    }
  }
}

// ---- AVX-512 medium-batch path: x-stationary tables, sparse arithmetic -------------------------
//
// From a dozen rows of x on, the expand-based rows above do dense arithmetic (zeros included) and
// stream every x row from L2 once per weight row. Here x is laid out once per call: xt[block][col]
// holds the 16 x rows of a row block at one column (64 bytes, fp32, zero rows past R); per kept
// value one FMA of its broadcast value with xt[col] (a weight row's column offsets come from its
// 16-column masks by vpcompressd), so the arithmetic is the sparse one. Used for fp32 and fp16
// weights (and bf16 where the CPU lacks VBMI2); 16-bit inputs with VBMI2 go to the bf16 / fp16
// tiles from 8 rows instead (see nm_linear_cpu_kernel).
// Work is split over weight rows (threads stream disjoint row ranges) and, inside a thread, over
// column chunks of kChunkCols so that a chunk's tables stay in L2; a weight row's result is the
// chunks' partial sums added in chunk order, each chunk in a fixed order: the bits depend on
// neither the thread count nor R.

constexpr int64_t kChunkCols = 2048;  // columns per chunk (a multiple of 64; see the tables' sizes)
constexpr int64_t kRowsPerBlock = 16;  // x rows per table (one zmm of fp32 lanes)
constexpr int64_t kOutBlock = 32;      // weight rows whose chunk partial sums are kept together

// Columns [k0, k1) of the fp32 table of one row block (`rows` rows of x from x):
// xt[k][r] = x[r][k], zero for r >= rows.
template <typename x_t>
void build_fp32_table(const x_t* x, int64_t ldx, int64_t rows, int64_t k0, int64_t k1, float* xt) {
  for (int64_t k = k0; k < k1; ++k) {
    float* d = xt + k * kRowsPerBlock;
    for (int64_t r = rows; r < kRowsPerBlock; ++r) d[r] = 0.f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const x_t* s = x + r * ldx;
    for (int64_t k = k0; k < k1; ++k) xt[k * kRowsPerBlock + r] = static_cast<float>(s[k]);
  }
}

// Byte offsets (col * 64) of the kept values of columns [k0, k1) of one row (k0 a multiple of
// 16), in order, from the 16-column masks; returns their count.
SPARSEOPS_NM_AVX512 int64_t column_offsets(const uint8_t* meta, const RowDecoder& dec, int64_t k0,
                                           int64_t k1, int32_t* offs) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t cnt = 0;
  for (int64_t ch = k0 / 16; ch * 16 < k1; ++ch) {
    const uint16_t k = dec.chunk(meta, ch);  // table modes only (see nm_linear_cpu_kernel)
    const __m512i cols = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(16 * ch)));
    const __m512i sel = _mm512_maskz_compress_epi32(static_cast<__mmask16>(k), cols);
    _mm512_storeu_si512(offs + cnt, _mm512_slli_epi32(sel, 6));
    cnt += __builtin_popcount(k);
  }
  return cnt;
}

// 16 dot products (one per lane: the 16 rows of a table) of `count` fp32 kept values with the
// table entries at byte offsets offs; four accumulators by index % 4, added in one order.
SPARSEOPS_NM_AVX512 inline __m512 fma_entry(const float* v, const int32_t* offs, const char* xt,
                                            int64_t i, __m512 acc) {
  return _mm512_fmadd_ps(_mm512_set1_ps(v[i]),
                         _mm512_loadu_ps(reinterpret_cast<const float*>(xt + offs[i])), acc);
}

SPARSEOPS_NM_AVX512 inline __m512 dot_table_fp32(const float* v, const int32_t* offs, int64_t count,
                                                 const char* xt) {
#define SPARSEOPS_NM_FMA(i, acc) fma_entry(v, offs, xt, i, acc)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    a0 = SPARSEOPS_NM_FMA(j, a0);
    a1 = SPARSEOPS_NM_FMA(j + 1, a1);
    a2 = SPARSEOPS_NM_FMA(j + 2, a2);
    a3 = SPARSEOPS_NM_FMA(j + 3, a3);
  }
  if (j < count) a0 = SPARSEOPS_NM_FMA(j, a0);
  if (j + 1 < count) a1 = SPARSEOPS_NM_FMA(j + 1, a1);
  if (j + 2 < count) a2 = SPARSEOPS_NM_FMA(j + 2, a2);
#undef SPARSEOPS_NM_FMA
  return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

// Output rows [o0, o1) for all R rows of x through the tables (see the section comment).
template <typename scalar_t>
SPARSEOPS_NM_AVX512 void linear_rows_tables(const scalar_t* values, const uint8_t* meta,
                                            const scalar_t* bias, const NMConfig& c,
                                            const RowDecoder& dec, const float* tables, int64_t R,
                                            int64_t o0, int64_t o1, scalar_t* out) {
  const int64_t nb = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t stride = c.in * kRowsPerBlock;  // floats per row block's table
  std::vector<int32_t> offs(static_cast<size_t>(kChunkCols + 16));
  std::vector<float> vbuf(static_cast<size_t>(kChunkCols + 16));
  // partial sums [weight row in the block][row block][16 rows]
  std::vector<float> acc(static_cast<size_t>(kOutBlock * nb * kRowsPerBlock));
  for (int64_t ob = o0; ob < o1; ob += kOutBlock) {
    const int64_t oe = std::min(o1, ob + kOutBlock);
    // chunk by chunk: the block's weight rows and every row block's tables of one chunk stay in L2
    for (int64_t k0 = 0; k0 < c.in; k0 += kChunkCols) {
      const int64_t k1 = std::min(c.in, k0 + kChunkCols);
      const int64_t j0 = k0 / c.m * c.n;  // first kept value of the chunk
      for (int64_t o = ob; o < oe; ++o) {
        const scalar_t* v = values + o * c.kept;
        // the chunk's column offsets and fp32 values, decoded once for every row block
        const int64_t cnt = column_offsets(meta + o * c.meta_bytes, dec, k0, k1, offs.data());
        const float* vf;
        if constexpr (std::is_same_v<scalar_t, float>) {
          vf = v + j0;
        } else {
          widen16<scalar_t>(v + j0, vbuf.data(), cnt);
          vf = vbuf.data();
        }
        for (int64_t b = 0; b < nb; ++b) {
          const __m512 part = dot_table_fp32(vf, offs.data(), cnt,
                                             reinterpret_cast<const char*>(tables + b * stride));
          float* a = acc.data() + ((o - ob) * nb + b) * kRowsPerBlock;
          _mm512_storeu_ps(a, k0 == 0 ? part : _mm512_add_ps(_mm512_loadu_ps(a), part));
        }
      }
    }
    for (int64_t o = ob; o < oe; ++o) {
      const float bo = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;
      for (int64_t r = 0; r < R; ++r) {
        const float a =
            acc[((o - ob) * nb + r / kRowsPerBlock) * kRowsPerBlock + r % kRowsPerBlock];
        out[r * c.out + o] = static_cast<scalar_t>(a + bo);
      }
    }
  }
}

// The medium-batch driver: the tables of every row block (threads over column pieces), then
// threads over weight rows.
template <typename scalar_t>
void linear_medium(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                   const NMConfig& c, Tensor& out) {
  const int64_t R = x2d.size(0);
  const int64_t nb = (R + kRowsPerBlock - 1) / kRowsPerBlock;
  const RowDecoder dec(c);
  const scalar_t* xp = x2d.data_ptr<scalar_t>();
  const int64_t stride = c.in * kRowsPerBlock;
  Tensor tables = at::empty({nb * stride}, x2d.options().dtype(at::kFloat));
  float* tp = tables.data_ptr<float>();
  const int64_t pieces = (c.in + 255) / 256;
  at::parallel_for(0, nb * pieces, 4, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / pieces, k0 = (i % pieces) * 256;
      build_fp32_table(xp + b * kRowsPerBlock * c.in, c.in,
                       std::min(kRowsPerBlock, R - b * kRowsPerBlock), k0, std::min(c.in, k0 + 256),
                       tp + b * stride);
    }
  });
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, c.out, kOutBlock, [&](int64_t o0, int64_t o1) {
    linear_rows_tables<scalar_t>(vp, mp, bp, c, dec, tp, R, o0, o1, op);
  });
}

// The dense fp32 tile [o1 - o0, ld] (columns >= in zero) of the large-batch path.
template <typename scalar_t>
SPARSEOPS_NM_AVX512 void decompress_rows_avx512(const scalar_t* values, const uint8_t* meta,
                                                const NMConfig& c, const RowDecoder& dec,
                                                int64_t o0, int64_t o1, float* tile, int64_t ld) {
  Scratch sc(ld, c.kept, 0);
  auto& bits = sc.bits;
  auto& vrow = sc.vrow;
  for (int64_t o = o0; o < o1; ++o) {
    const float* v;
    if constexpr (std::is_same_v<scalar_t, float>) {
      v = values + o * c.kept;
    } else {
      widen16<scalar_t>(values + o * c.kept, vrow.data(), c.kept);
      v = vrow.data();
    }
    expand_row(v, meta + o * c.meta_bytes, dec, bits.data(), tile + (o - o0) * ld);
  }
}

// The dense 16-bit tile [o1 - o0, in] (bf16 / fp16 values, no widening) of the large-batch
// path: per 16-column chunk one masked load of the kept values and one vpexpandw.
SPARSEOPS_NM_VBMI2 void decompress_rows_16bit(const uint16_t* values, const uint8_t* meta, const NMConfig& c,
                                              const RowDecoder& dec, int64_t o0, int64_t o1,
                                              uint16_t* tile) {
  const bool generic = dec.mode == RowDecoder::kGeneric;
  std::vector<uint16_t> words(static_cast<size_t>(dec.chunks + 1));
  const int64_t per = 16 * dec.n / dec.m;
  const int64_t full = dec.in / 16;
  const auto lm = static_cast<__mmask16>((1u << per) - 1u);
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* v = values + o * c.kept;
    const uint8_t* mrow = meta + o * c.meta_bytes;
    uint16_t* d = tile + (o - o0) * c.in;
    if (generic) dec.decode_generic(mrow, words.data());
    for (int64_t ch = 0; ch < full; ++ch) {
      const uint16_t k = generic ? words[ch] : dec.chunk(mrow, ch);
      const __m256i packed = _mm256_maskz_loadu_epi16(lm, v + ch * per);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16 * ch), _mm256_maskz_expand_epi16(k, packed));
    }
    if (full < dec.chunks) {
      const uint16_t k = generic ? words[full] : dec.chunk(mrow, full);
      const int64_t cnt = (dec.in % 16) / dec.m * dec.n;
      const __m256i packed = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << cnt) - 1u), v + full * per);
      _mm256_mask_storeu_epi16(d + 16 * full, static_cast<__mmask16>(dec.tail), _mm256_maskz_expand_epi16(k, packed));
    }
  }
}
#endif

template <typename scalar_t, typename acc_t>
void decompress_rows_portable(const scalar_t* values, const uint8_t* meta, const NMConfig& c,
                              int64_t o0, int64_t o1, acc_t* tile, int64_t ld) {
  std::vector<int32_t> cols(static_cast<size_t>(c.kept));
  for (int64_t o = o0; o < o1; ++o) {
    acc_t* d = tile + (o - o0) * ld;
    for (int64_t k = 0; k < ld; ++k) d[k] = acc_t(0);
    decode_columns(meta + o * c.meta_bytes, c, cols.data());
    const scalar_t* v = values + o * c.kept;
    for (int64_t j = 0; j < c.kept; ++j) d[cols[j]] = static_cast<acc_t>(v[j]);
  }
}

#if SPARSEOPS_NM_X86
// The register-blocked driver: x laid out once (bf16 rows padded to 32 with avx512_bf16, else
// fp32 rows padded to 16), then threads over weight rows (see linear_rows_reg). The x rows are
// one cache line longer than that: at a stride of a multiple of 4 KB (in = 4096, 8192, ...) the 8
// rows of a block fall in one 8-way L1 set, beside the block's weight rows.
template <typename scalar_t>
void linear_reg(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                const NMConfig& c, Tensor& out) {
  const int64_t R = x2d.size(0);
  const RowDecoder dec(c);
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  auto run = [&](auto bf, const auto* xp, int64_t ldx) {
    constexpr bool BF = decltype(bf)::value;
    using x_t = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    at::parallel_for(0, c.out, kRegOTile, [&](int64_t o0, int64_t o1) {
      std::vector<float> acc;
      switch (decode_kind(dec)) {
        case 1:
          return linear_rows_reg<BF, scalar_t, x_t, 1>(xp, ldx, vp, mp, bp, c, dec, R, o0, o1, op, acc);
        case 2:
          return linear_rows_reg<BF, scalar_t, x_t, 2>(xp, ldx, vp, mp, bp, c, dec, R, o0, o1, op, acc);
        case 4:
          return linear_rows_reg<BF, scalar_t, x_t, 4>(xp, ldx, vp, mp, bp, c, dec, R, o0, o1, op, acc);
        default:  // the other table modes (callers exclude the generic decode)
          return linear_rows_reg<BF, scalar_t, x_t, 0>(xp, ldx, vp, mp, bp, c, dec, R, o0, o1, op, acc);
      }
    });
  };
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_bf16dot()) {
      const int64_t ldx = (c.in + 31) / 32 * 32 + 32;  // + one cache line: see above
      Tensor xb = at::zeros({R, ldx}, x2d.options());
      xb.narrow(1, 0, c.in).copy_(x2d);
      run(std::true_type{}, xb.data_ptr<scalar_t>(), ldx);
      return;
    }
  }
  const int64_t ldx = round_up16(c.in) + 16;
  Tensor xa = at::zeros({R, ldx}, x2d.options().dtype(at::kFloat));
  xa.narrow(1, 0, c.in).copy_(x2d);
  run(std::false_type{}, static_cast<const float*>(xa.data_ptr<float>()), ldx);
}
#endif

template <typename scalar_t>
void linear_small(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                  const NMConfig& c, Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t R = x2d.size(0);
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const auto acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
#if SPARSEOPS_NM_X86
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (R == 1 && gather_span(c) != 0 && use_vbmi() &&
        (std::is_same_v<scalar_t, float> || use_bf16dot())) {
      linear_gather1<scalar_t>(x2d, values, meta, bias, c, out);
      return;
    }
  }
  if constexpr (!std::is_same_v<acc_t, double>) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (use_bf16dot()) {
        // x kept in bf16, rows padded with zeros to 32 columns.
        const int64_t ldx = (c.in + 31) / 32 * 32;
        Tensor xb = at::zeros({R, ldx}, x2d.options());
        xb.narrow(1, 0, c.in).copy_(x2d);
        const scalar_t* xp = xb.data_ptr<scalar_t>();
        const RowDecoder dec(c);
        at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
          std::vector<uint16_t> words(static_cast<size_t>(dec.chunks + 1));
          linear_rows_avx512<scalar_t, scalar_t>(xp, ldx, vp, mp, bp, c, dec, R, b0, b1, op, words);
        });
        return;
      }
    }
    if (use_avx512()) {
      // x widened once into rows padded to 16 floats (the padding is zero).
      const int64_t in_pad = round_up16(c.in);
      Tensor xa = at::zeros({R, in_pad}, x2d.options().dtype(at::kFloat));
      xa.narrow(1, 0, c.in).copy_(x2d);
      const float* xp = xa.data_ptr<float>();
      const RowDecoder dec(c);
      at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
        std::vector<uint16_t> words(static_cast<size_t>(dec.chunks + 1));
        linear_rows_avx512<scalar_t, float>(xp, in_pad, vp, mp, bp, c, dec, R, b0, b1, op, words);
      });
      return;
    }
  }
#endif
  const Tensor xa = x2d.to(acc_type).contiguous();
  const acc_t* xp = xa.data_ptr<acc_t>();
  at::parallel_for(0, c.out, kRowBlock, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> cols(static_cast<size_t>(c.kept));
    std::vector<acc_t> wrow(static_cast<size_t>(kRowBlock * c.in));
    for (int64_t o = b0; o < b1; o += kRowBlock) {
      linear_rows_portable<scalar_t, acc_t>(xp, c.in, vp, mp, bp, c, R, o, std::min(b1, o + kRowBlock),
                                            op, cols, wrow);
    }
  });
}

#if SPARSEOPS_NM_X86
// bf16 / fp16 with VBMI2: tiles decompressed in the 16-bit dtype and multiplied by ATen's 16-bit
// GEMM (oneDNN: AMX / avx512_bf16 / avx512_fp16 where the CPU has them, fp32 accumulation),
// bias through addmm as F.linear does: half the tile bytes of the fp32 path and the CPU's
// fastest matrix unit. Tiles are multiplied inside the parallel region (single-threaded BLAS):
// the bits do not depend on the thread count.
template <typename scalar_t>
void linear_large_16bit(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                        const NMConfig& c, Tensor& out) {
  const auto* vp = reinterpret_cast<const uint16_t*>(values.data_ptr<scalar_t>());
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const int64_t tile = std::min<int64_t>(kTileOut16, (c.out + 1) / 2);
  const int64_t ntiles = (c.out + tile - 1) / tile;
  const RowDecoder dec(c);
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode inference_mode;  // thread-local, see linear_large
    Tensor buf = at::empty({tile, c.in}, x2d.options());  // one tile buffer per thread
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * tile, o1 = std::min(c.out, o0 + tile);
      Tensor w = buf.narrow(0, 0, o1 - o0);
      decompress_rows_16bit(vp, mp, c, dec, o0, o1, reinterpret_cast<uint16_t*>(w.data_ptr<scalar_t>()));
      Tensor y = bias.defined() ? at::addmm(bias.narrow(0, o0, o1 - o0), x2d, w.t()) : at::mm(x2d, w.t());
      out.narrow(1, o0, o1 - o0).copy_(y);
    }
  });
}
#endif

template <typename scalar_t>
void linear_large(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias,
                  const NMConfig& c, Tensor& out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const scalar_t* vp = values.data_ptr<scalar_t>();
  const uint8_t* mp = meta.data_ptr<uint8_t>();
#if SPARSEOPS_NM_X86
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (use_vbmi2()) return linear_large_16bit<scalar_t>(x2d, values, meta, bias, c, out);
  }
#endif
  const bool wide = std::is_same_v<acc_t, float> && use_avx512();
  const int64_t ld = wide ? round_up16(c.in) : c.in;
  Tensor xa = at::zeros({x2d.size(0), ld}, x2d.options().dtype(acc_type));
  xa.narrow(1, 0, c.in).copy_(x2d);
  const Tensor ba = bias.defined() ? bias.to(acc_type) : Tensor();
  // At least two tiles, so that every tile's GEMM runs inside the parallel region (the BLAS
  // single-threaded there): the bits do not depend on the thread count.
  const int64_t tile = std::min<int64_t>(kTileOut, (c.out + 1) / 2);
  const int64_t ntiles = (c.out + tile - 1) / tile;
  const RowDecoder dec(c);
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    // Inference mode is thread-local: without it a worker may not write an output made under
    // the caller's inference mode (and it records no graph for the temporaries).
    c10::InferenceMode inference_mode;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * tile, o1 = std::min(c.out, o0 + tile);
      Tensor w = at::empty({o1 - o0, ld}, xa.options());
#if SPARSEOPS_NM_X86
      if constexpr (std::is_same_v<acc_t, float>) {
        if (wide) {
          decompress_rows_avx512<scalar_t>(vp, mp, c, dec, o0, o1, w.data_ptr<float>(), ld);
        } else {
          decompress_rows_portable<scalar_t, acc_t>(vp, mp, c, o0, o1, w.data_ptr<acc_t>(), ld);
        }
      } else {
        decompress_rows_portable<scalar_t, acc_t>(vp, mp, c, o0, o1, w.data_ptr<acc_t>(), ld);
      }
#else
      decompress_rows_portable<scalar_t, acc_t>(vp, mp, c, o0, o1, w.data_ptr<acc_t>(), ld);
#endif
      Tensor y = at::mm(xa, w.t());
      if (ba.defined()) y.add_(ba.narrow(0, o0, o1 - o0));
      out.narrow(1, o0, o1 - o0).copy_(y);
    }
  });
}

// ---- nm_compress -------------------------------------------------------------------------------

// a ranks above b: NaN above every number, then larger (ties are resolved by the caller).
inline bool better(double a, double b) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na || nb) return na && !nb;
  return a > b;
}

template <typename scalar_t>
void compress(const Tensor& w, const double* scores, const bool* keep, const NMConfig& c,
              Tensor& values, Tensor& meta, Tensor& mask) {
  const scalar_t* wp = w.data_ptr<scalar_t>();
  scalar_t* vp = nm_compress_out<scalar_t>(values);
  uint8_t* mp = nm_compress_out<uint8_t>(meta);
  bool* kp = nm_compress_out<bool>(mask);
  const int64_t n = c.n, m = c.m;
  at::parallel_for(0, c.out, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t o = b0; o < b1; ++o) {
      uint8_t* mrow = mp != nullptr ? mp + o * c.meta_bytes : nullptr;
      if (mrow != nullptr) std::memset(mrow, 0, static_cast<size_t>(c.meta_bytes));
      for (int64_t g = 0; g < c.groups; ++g) {
        const int64_t base = o * c.in + g * m;
        bool sel[16];
        if (keep != nullptr) {
          int64_t cnt = 0;
          for (int64_t p = 0; p < m; ++p) cnt += (sel[p] = keep[base + p]);
          for (int64_t p = 0; p < m && cnt < n; ++p) {
            if (!sel[p]) {
              sel[p] = true;
              ++cnt;
            }
          }
        } else {
          double s[16];
          for (int64_t p = 0; p < m; ++p) {
            sel[p] = false;
            s[p] = scores != nullptr ? scores[base + p] : std::abs(static_cast<double>(wp[base + p]));
          }
          // n rounds of argmax over the unselected; the strict comparison keeps the lower index
          // on ties.
          for (int64_t t = 0; t < n; ++t) {
            int64_t best = -1;
            for (int64_t p = 0; p < m; ++p) {
              if (sel[p]) continue;
              if (best < 0 || better(s[p], s[best])) best = p;
            }
            sel[best] = true;
          }
        }
        int64_t j = g * n;
        for (int64_t p = 0; p < m; ++p) {
          if (kp != nullptr) kp[base + p] = sel[p];
          if (!sel[p] || vp == nullptr) continue;
          vp[o * c.kept + j] = wp[base + p];
          const int64_t bit = j * c.bits;
          mrow[bit >> 3] |= static_cast<uint8_t>(p << (bit & 7));
          ++j;
        }
      }
    }
  });
}

#if SPARSEOPS_NM_X86
// ---- nm_compress, AVX-512: 16 columns (16 / m groups) per step --------------------------------
//
// Keys are int32 with the ranking's order: |w| as its fp32 bit pattern with every NaN set to the
// smallest NaN pattern (above +inf: NaN first, NaNs tied), or a score's fp32 bits made monotone
// (negative values flipped, -0 = +0, NaN the largest key). An element's rank in its group is the
// number of group members with a larger key or an equal key at a lower position, counted over the
// m - 1 rotations of the group (one vpermd each); kept = rank < n. Then one compress of the kept
// values, the bool mask from the kept bits and each group's positions appended to the meta row.

SPARSEOPS_NM_AVX512 inline __m512i abs_key(__m512 v) {
  const __m512i bits = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
  return _mm512_min_epi32(bits, _mm512_set1_epi32(0x7f800001));
}

SPARSEOPS_NM_AVX512 inline __m512i score_key(__m512 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512 z = _mm512_add_ps(v, _mm512_setzero_ps());  // -0 -> +0
  __m512i bits = _mm512_castps_si512(z);
  const __mmask16 neg = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
  bits = _mm512_mask_xor_epi32(bits, neg, bits, _mm512_set1_epi32(0x7fffffff));
  return _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(0x7fffffff));
}

// Bit writer for a meta row (codes of `width` <= 60 bits, low bits first).
struct MetaWriter {
  uint8_t* out;
  uint64_t acc = 0;
  int nbits = 0;
  inline void put(uint64_t code, int width) {
    if (width > 32) {  // at most 7 pending bits: keep the shifted code inside 64 bits
      put(code & 0xffffffffu, 32);
      code >>= 32;
      width -= 32;
    }
    acc |= code << nbits;
    nbits += width;
    while (nbits >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      nbits -= 8;
    }
  }
  inline void flush() {
    if (nbits > 0) *out++ = static_cast<uint8_t>(acc);
  }
};

// M is a template argument: the group arithmetic becomes shifts, the m - 1 rotations unroll, and
// for m <= 8 the meta of each 8 columns is one table lookup (was: an idiv per step and a code
// per group, 1.3 ns per value on one Zen 4 core, compute-bound even on an L3-resident weight).
template <typename scalar_t, int M>
SPARSEOPS_NM_AVX512 void compress_keyed_rows(const scalar_t* wp, const float* sp, const NMConfig& c,
                                             int64_t o0, int64_t o1, scalar_t* vp, uint8_t* mp,
                                             bool* kp) {
  constexpr int bits = M == 2 ? 1 : M == 4 ? 2 : 4;  // nm_meta_bits
  const int n = static_cast<int>(c.n);
  const int width = n * bits;  // meta bits per group (<= 60)
  // Rotation d of every group: lane i takes lane g*M + (i%M + d) % M; `wrapped` lanes compare
  // with a lower position (ties go to it).
  __m512i rot[M - 1];
  __mmask16 wrapped[M - 1];
  for (int d = 1; d < M; ++d) {
    alignas(64) int32_t ix[16];
    uint32_t wm = 0;
    for (int i = 0; i < 16; ++i) {
      ix[i] = i - i % M + (i % M + d) % M;
      if (i % M + d >= M) wm |= 1u << i;
    }
    rot[d - 1] = _mm512_load_si512(ix);
    wrapped[d - 1] = static_cast<__mmask16>(wm);
  }
  // M <= 8: the positions code of 8 columns (8 / M groups, wb bits) from their kept bits.
  constexpr int kGroups8 = M <= 8 ? 8 / M : 1;
  const int wb = kGroups8 * width;
  std::array<uint32_t, 256> code8{};
  if constexpr (M <= 8) {
    for (int b = 0; b < 256; ++b) {
      uint32_t cd = 0;
      int t = 0;
      for (int p = 0; p < 8; ++p) {
        if (b >> p & 1) cd |= static_cast<uint32_t>(p % M) << (bits * t++);
      }
      code8[b] = cd;
    }
  }
  const int64_t per = 16 / M * c.n;
  const __m512i one = _mm512_set1_epi32(1), nv = _mm512_set1_epi32(n);
  // vp / mp (both or neither) and kp null: outputs nobody asked for (nm_compress_out).
  for (int64_t o = o0; o < o1; ++o) {
    const scalar_t* wr = wp + o * c.in;
    const float* sr = sp != nullptr ? sp + o * c.in : nullptr;
    scalar_t* vr = vp != nullptr ? vp + o * c.kept : nullptr;
    bool* kr = kp != nullptr ? kp + o * c.in : nullptr;
    MetaWriter mw{mp != nullptr ? mp + o * c.meta_bytes : nullptr};
    for (int64_t k0 = 0; k0 < c.in; k0 += 16) {
      const int64_t cols = std::min<int64_t>(16, c.in - k0);
      const auto lm = static_cast<__mmask16>(cols == 16 ? 0xffff : (1u << cols) - 1u);
      const __m512 wv = load16(wr + k0, lm);
      const __m512i key =
          sr != nullptr ? score_key(_mm512_maskz_loadu_ps(lm, sr + k0)) : abs_key(wv);
      __m512i rank = _mm512_setzero_si512();
      for (int d = 0; d < M - 1; ++d) {
        const __m512i other = _mm512_permutexvar_epi32(rot[d], key);
        const __mmask16 beats = _mm512_cmpgt_epi32_mask(other, key) |
                                (_mm512_cmpeq_epi32_mask(other, key) & wrapped[d]);
        rank = _mm512_mask_add_epi32(rank, beats, rank, one);
      }
      const __mmask16 kept = _mm512_cmplt_epi32_mask(rank, nv) & lm;
      if (kr != nullptr) _mm_mask_storeu_epi8(kr + k0, lm, _mm_maskz_set1_epi8(kept, 1));
      if (vr == nullptr) continue;
      const int64_t cnt = cols == 16 ? per : cols / M * n;
      const auto sm = static_cast<__mmask16>((1u << cnt) - 1u);
      scalar_t* vdst = vr + k0 / M * n;
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_mask_storeu_ps(vdst, sm, _mm512_maskz_compress_ps(kept, wv));
      } else {
        // 16-bit values: compress the raw halves (exact, NaN payloads kept)
        const __m512i raw = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lm, wr + k0));
        _mm256_mask_storeu_epi16(vdst, sm,
                                 _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(kept, raw)));
      }
      const uint32_t kb = kept;
      if constexpr (M <= 8) {
        if (cols == 16) {
          mw.put(uint64_t(code8[kb & 0xff]) | (uint64_t(code8[kb >> 8]) << wb), 2 * wb);
        } else {  // the row's last step: its groups only
          const int lo = static_cast<int>(std::min<int64_t>(cols, 8));
          mw.put(code8[kb & 0xff], lo / M * width);
          if (cols > 8) mw.put(code8[kb >> 8], static_cast<int>(cols - 8) / M * width);
        }
      } else {  // one group of 16: its n positions, lowest first
        uint64_t code = 0;
        uint32_t rest = kb;
        for (int t = 0; t < n; ++t) {
          code |= static_cast<uint64_t>(__builtin_ctz(rest)) << (bits * t);
          rest &= rest - 1;
        }
        mw.put(code, width);
      }
    }
    if (vr != nullptr) mw.flush();
  }
}

template <typename scalar_t>
void compress_keyed(const Tensor& w, const float* scores, const NMConfig& c, Tensor& values,
                    Tensor& meta, Tensor& mask) {
  const scalar_t* wp = w.data_ptr<scalar_t>();
  scalar_t* vp = nm_compress_out<scalar_t>(values);
  uint8_t* mp = nm_compress_out<uint8_t>(meta);
  bool* kp = nm_compress_out<bool>(mask);
  at::parallel_for(0, c.out, 16, [&](int64_t b0, int64_t b1) {
    switch (c.m) {
      case 2:
        return compress_keyed_rows<scalar_t, 2>(wp, scores, c, b0, b1, vp, mp, kp);
      case 4:
        return compress_keyed_rows<scalar_t, 4>(wp, scores, c, b0, b1, vp, mp, kp);
      case 8:
        return compress_keyed_rows<scalar_t, 8>(wp, scores, c, b0, b1, vp, mp, kp);
      default:
        TORCH_INTERNAL_ASSERT(c.m == 16);
        return compress_keyed_rows<scalar_t, 16>(wp, scores, c, b0, b1, vp, mp, kp);
    }
  });
}

// ---- nm_compress, AVX-512 (BW + VBMI2), 16-bit weights by |w|: 32 columns per step -----------
//
// bf16 / fp16 weights ranked by |w| need no widening: the key is the 16-bit pattern of |w| (NaN
// clamped to the smallest NaN pattern, above inf), compared as int16, 32 lanes per zmm. A group's
// rotations are one vprord / vprorq (m = 2, 4) or vpalignr (m = 8); the kept values are one
// vpcompressw, the bool mask one masked byte move, and the meta of each 8 columns one table
// lookup: a step of 32 columns ends on a byte of meta (32 n bits / m is a multiple of 8 for
// every pattern), so a step's codes are stored as one word. The rank rule is the 32-bit path's.

// Group rotation d (lane i takes lane g*m + (i%m + d) % m) of 16-bit keys for m in {2, 4, 8}.
template <int M, int D>
SPARSEOPS_NM_AVX512 inline __m512i rotate_groups16(__m512i k) {
  if constexpr (M == 2) {
    return _mm512_ror_epi32(k, 16 * D);
  } else if constexpr (M == 4) {
    return _mm512_ror_epi64(k, 16 * D);
  } else {
    return _mm512_alignr_epi8(k, k, 2 * D);
  }
}

// Rank of each lane in its group: the group members with a larger key or an equal key at a lower
// position (the rotations that wrap), summed over the m - 1 rotations.
template <int M, int D = 1>
SPARSEOPS_NM_AVX512 inline __m512i rank16(__m512i key, __m512i rank) {
  if constexpr (D >= M) {
    return rank;
  } else {
    // lanes whose rotation-D partner wrapped to a lower position: i % M + D >= M
    constexpr uint64_t wrapped = [] {
      uint64_t w = 0;
      for (int i = 0; i < 32; ++i) {
        if (i % M + D >= M) w |= uint64_t(1) << i;
      }
      return w;
    }();
    const __m512i other = rotate_groups16<M, D>(key);
    const __mmask32 beats = _mm512_cmpgt_epi16_mask(other, key) |
                            (_mm512_cmpeq_epi16_mask(other, key) & static_cast<__mmask32>(wrapped));
    rank = _mm512_mask_add_epi16(rank, beats, rank, _mm512_set1_epi16(1));
    return rank16<M, D + 1>(key, rank);
  }
}

template <int M>
SPARSEOPS_NM_BF16DOT void compress_abs16_rows(const uint16_t* wp, uint16_t nan_key, const NMConfig& c,
                                              int64_t o0, int64_t o1, uint16_t* vp, uint8_t* mp,
                                              bool* kp) {
  const int n = static_cast<int>(c.n), bits = c.bits;
  const int wb = (8 / M) * n * bits;  // meta bits of 8 columns (<= 16: see the caller)
  // meta code of 8 columns (8 / M groups) from their kept bits
  std::array<uint16_t, 256> code{};
  for (int b = 0; b < 256; ++b) {
    uint32_t cd = 0;
    int t = 0;
    for (int p = 0; p < 8; ++p) {
      if (b >> p & 1) cd |= static_cast<uint32_t>(p % M) << (bits * t++);
    }
    code[b] = static_cast<uint16_t>(cd);
  }
  const int64_t per = 32 * c.n / M;       // kept values of a full step
  const int64_t step_bytes = wb * 4 / 8;  // meta bytes of a full step
  const __m512i absm = _mm512_set1_epi16(0x7fff), nank = _mm512_set1_epi16(static_cast<short>(nan_key));
  const __m512i nv = _mm512_set1_epi16(static_cast<short>(n));
  const __m256i one8 = _mm256_set1_epi8(1);
  // vp / mp (both or neither) and kp null: outputs nobody asked for (nm_compress_out).
  for (int64_t o = o0; o < o1; ++o) {
    const uint16_t* wr = wp + o * c.in;
    uint16_t* vr = vp != nullptr ? vp + o * c.kept : nullptr;
    uint8_t* mr = mp != nullptr ? mp + o * c.meta_bytes : nullptr;
    bool* kr = kp != nullptr ? kp + o * c.in : nullptr;
    for (int64_t k0 = 0; k0 < c.in; k0 += 32) {
      const int64_t cols = std::min<int64_t>(32, c.in - k0);
      const auto lm = static_cast<__mmask32>(cols == 32 ? 0xffffffffu : (1u << cols) - 1u);
      const __m512i raw = _mm512_maskz_loadu_epi16(lm, wr + k0);
      const __m512i key = _mm512_min_epu16(_mm512_and_si512(raw, absm), nank);
      const __m512i rank = rank16<M>(key, _mm512_setzero_si512());
      const __mmask32 kept = _mm512_cmplt_epi16_mask(rank, nv) & lm;
      if (kr != nullptr) _mm256_mask_storeu_epi8(kr + k0, lm, _mm256_maskz_mov_epi8(kept, one8));
      if (vr == nullptr) continue;
      const int64_t cnt = cols == 32 ? per : cols / M * n;
      _mm512_mask_storeu_epi16(vr + k0 / M * n, static_cast<__mmask32>((1ull << cnt) - 1u),
                               _mm512_maskz_compress_epi16(kept, raw));
      const uint32_t kb = kept;
      const uint64_t cd = uint64_t(code[kb & 0xff]) | (uint64_t(code[(kb >> 8) & 0xff]) << wb) |
                          (uint64_t(code[(kb >> 16) & 0xff]) << (2 * wb)) |
                          (uint64_t(code[kb >> 24]) << (3 * wb));
      uint8_t* md = mr + (k0 / 32) * step_bytes;
      if (cols == 32) {
        std::memcpy(md, &cd, static_cast<size_t>(step_bytes));
      } else {  // the row's last, partial step: its meta bytes up to the row's end
        std::memcpy(md, &cd, static_cast<size_t>(c.meta_bytes - (k0 / 32) * step_bytes));
      }
    }
  }
}

template <int M>
void compress_abs16(const Tensor& w, uint16_t nan_key, const NMConfig& c, Tensor& values, Tensor& meta,
                    Tensor& mask) {
  const auto* wp = static_cast<const uint16_t*>(w.data_ptr());
  auto* vp = nm_compress_out<uint16_t>(values);
  uint8_t* mp = nm_compress_out<uint8_t>(meta);
  bool* kp = nm_compress_out<bool>(mask);
  at::parallel_for(0, c.out, 16, [&](int64_t b0, int64_t b1) {
    compress_abs16_rows<M>(wp, nan_key, c, b0, b1, vp, mp, kp);
  });
}
#endif

}  // namespace

void nm_linear_cpu_kernel(const Tensor& x2d, const Tensor& values, const Tensor& meta,
                          const Tensor& bias, const NMConfig& cfg, Tensor& out) {
  const int64_t R = x2d.size(0);
  const bool is16 = x2d.scalar_type() == at::kBFloat16 || x2d.scalar_type() == at::kHalf;
  const bool tab = 8 % (cfg.n * cfg.bits) == 0 || (cfg.n * cfg.bits) % 8 == 0;  // table decodes
  const int64_t large16 =
      x2d.scalar_type() == at::kBFloat16 && tab && use_bf16dot() ? kNMReg16Rows : kNMDense16Rows;
  const bool large = R >= (is16 && use_vbmi2() ? large16 : kNMDenseCrossoverRows) && cfg.out >= 2;
  bool medium = false;
#if SPARSEOPS_NM_X86
  // The tables need the byte-table decode (every pattern but 3:4, 3:8, 15:16, ...) and 32-bit
  // byte offsets of columns.
  const int64_t nb = cfg.n * cfg.bits;
  medium = !large && R >= kNMTableRows && x2d.scalar_type() != at::kDouble && use_avx512() &&
           (8 % nb == 0 || nb % 8 == 0) && cfg.in < (int64_t(1) << 24);
#endif
  // Register blocks (table decodes only): bf16 with avx512_bf16 for 2 <= R < kNMReg16Rows (the
  // 16-bit tiles from there), fp32 for 2 <= R < kNMDenseCrossoverRows (instead of the tables).
  bool reg = false;
#if SPARSEOPS_NM_X86
  if (tab && R >= 2) {
    const auto st = x2d.scalar_type();
    reg = (st == at::kBFloat16 && R < kNMReg16Rows && use_bf16dot()) ||
          (st == at::kFloat && R < kNMDenseCrossoverRows && use_avx512());
  }
#endif
  // bf16 2:4 / 1:4 / 2:8 with avx512_bf16 and fp32 n:m (m in {4, 8}) from kNMLaneRows rows on:
  // weight rows in lanes.
#if SPARSEOPS_NM_X86
  const bool fp32_half = x2d.scalar_type() == at::kFloat && 2 * cfg.n == cfg.m;  // 2:4, 4:8
  if (R >= (fp32_half ? kNMLaneRowsFp32Half : kNMLaneRows) && linear_lanes(x2d, values, meta, bias, cfg, out)) return;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2d.scalar_type(), "nm_linear_cpu", [&] {
    if (reg) {
#if SPARSEOPS_NM_X86
      if constexpr (!std::is_same_v<scalar_t, double>) linear_reg<scalar_t>(x2d, values, meta, bias, cfg, out);
#endif
    } else if (large) {
      linear_large<scalar_t>(x2d, values, meta, bias, cfg, out);
    } else if (medium) {
#if SPARSEOPS_NM_X86
      if constexpr (!std::is_same_v<scalar_t, double>)
        linear_medium<scalar_t>(x2d, values, meta, bias, cfg, out);
#endif
    } else {
      linear_small<scalar_t>(x2d, values, meta, bias, cfg, out);
    }
  });
}

void nm_compress_cpu_kernel(const Tensor& w, const Tensor& scores, const Tensor& keep,
                            const NMConfig& cfg, Tensor& values, Tensor& meta, Tensor& mask) {
  const bool* kp = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  advise_huge_pages(values);
  advise_huge_pages(mask);
#if SPARSEOPS_NM_X86
  // Ranking without a keep mask by 32-bit keys: |w| (any float w but fp64) or fp32 / bf16 / fp16
  // scores; fp64 scores rank in fp64 (a conversion to fp32 could merge distinct scores).
  const bool w16 = w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf;
  if (kp == nullptr && !scores.defined() && w16 && cfg.m <= 8 && (8 / cfg.m) * cfg.n * cfg.bits <= 16 &&
      use_vbmi2()) {
    const uint16_t nan_key = w.scalar_type() == at::kBFloat16 ? 0x7f81 : 0x7c01;
    if (cfg.m == 2) compress_abs16<2>(w, nan_key, cfg, values, meta, mask);
    if (cfg.m == 4) compress_abs16<4>(w, nan_key, cfg, values, meta, mask);
    if (cfg.m == 8) compress_abs16<8>(w, nan_key, cfg, values, meta, mask);
    return;
  }
  const bool keyed_scores = !scores.defined() || scores.scalar_type() != at::kDouble;
  if (kp == nullptr && keyed_scores && w.scalar_type() != at::kDouble && use_avx512()) {
    const Tensor sc =
        scores.defined() && scores.scalar_type() != at::kFloat ? scores.to(at::kFloat) : scores;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, w.scalar_type(), "nm_compress_cpu", [&] {
          if constexpr (!std::is_same_v<scalar_t, double>) {
            compress_keyed<scalar_t>(w, sc.defined() ? sc.data_ptr<float>() : nullptr, cfg, values,
                                     meta, mask);
          }
        });
    return;
  }
#endif
  const Tensor s = scores.defined() ? scores.to(at::kDouble).contiguous() : scores;
  const double* sp = s.defined() ? s.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "nm_compress_cpu", [&] {
    compress<scalar_t>(w, sp, kp, cfg, values, meta, mask);
  });
}

}  // namespace sparseops
