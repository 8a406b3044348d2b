// The 2:4 sparse-tensor-core layout of nm_linear's CUDA kernel (csrc/cuda/nm_sparse.cu), as
// plain host/device functions: the CUDA kernel computes every address with them, and its CPU
// emulator (csrc/cpu/nm_sp24.cpp) runs the same functions over the same arrays, so the
// emulator tests on a machine without a GPU check the addresses the kernel really uses.
//
// The instruction: mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{bf16,f16} (PTX
// ISA 9.7.14.6; sm_80+). y^T = W x^T: A = 16 weight rows x 32 dense columns of W held as its
// 16 x 16 kept values, B = 32 columns x 8 rows of x, D = 16 x 8 fp32 outputs. For each group
// of 4 dense columns of an A row, a 4-bit metadata nibble idx0 | idx1 << 2 (idx0 < idx1; the
// ISA calls 0b0000, 0b0101, 0b1010, 0b1111 undefined) says which 2 columns the 2 kept values
// of the group sit at. With sparsity selector 0, lane l (g = l >> 2, t = l & 3) with t < 2
// holds the metadata register for A rows g (bits 0-15) and g + 8 (bits 16-31), dense columns
// 16 t .. 16 t + 15 (4 nibbles, group j of the 16 at bits 4 j). Lanes with t >= 2 are
// ignored; the kernel gives them the same word as t - 2.
//
// Hardware metadata ("hw meta", built once per weight by nm_sp24_meta and cached by the op
// layer, csrc/ops/nm_sparse.cpp): int32 [mtiles, ksteps, 16] with mtiles = ceil(out / 128) * 8
// m16 tiles and ksteps = ceil(in / 256) * 8 k32 steps, so that no CTA tile reads past it;
// word w = 2 g + h of (mtile, kstep) is lane (g, t = h)'s register for that mma: rows 16 mtile
// + g and + g + 8, dense columns 32 kstep + 16 h ... + 15. Nibbles of rows >= out or columns
// >= in are 0b0100 (columns 0 and 1: valid metadata; the values there are zero-filled).
//
// Patterns: 2:4 maps one to one (the NM_FORMAT nibble of a 2:4 group is the hardware nibble).
// Every n:m with n <= 2 puts at most 2 kept values into each aligned group of 4 columns (1:2,
// 1:4, 2:8, 1:8, 2:16, 1:16), so it maps exactly onto 2:4 groups with explicit zeros:
// sp24_group() says, for one group of 4, which kept values land in it and where. Patterns
// with n > 2 (3:4, 4:8, 8:16 ...) can put 3 or 4 values into a group of 4: not 2:4.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPARSEOPS_SP24_HD __host__ __device__ __forceinline__
#else
#define SPARSEOPS_SP24_HD inline
#endif

namespace sparseops {
namespace sp24 {

constexpr int kMaxTileRows = 128;      // hw meta rows are padded to a multiple of this (largest BM)
constexpr int kMaxStageCols = 256;     // hw meta columns are padded to a multiple of this
constexpr uint32_t kPadNibble = 0x4u;  // idx0 = 0, idx1 = 1

SPARSEOPS_SP24_HD int64_t hw_mtiles(int64_t out) {
  return (out + kMaxTileRows - 1) / kMaxTileRows * (kMaxTileRows / 16);
}
SPARSEOPS_SP24_HD int64_t hw_ksteps(int64_t in) {
  return (in + kMaxStageCols - 1) / kMaxStageCols * (kMaxStageCols / 32);
}

// Position b-bit field j of a packed NM_FORMAT meta row (value j at bit j * b).
SPARSEOPS_SP24_HD int meta_position(const uint8_t* meta_row, int64_t j, int bits) {
  const int64_t bit = j * bits;
  return (meta_row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// One aligned group of 4 dense columns (columns 4 q ... 4 q + 3 of a weight row) on the 2:4
// hardware: its nibble and, for slots 0 and 1 of the group's two kept-value places, the index
// of the NM_FORMAT value that goes there (into the row's values; -1 = an explicit zero).
// Kept values present in the group sit at their columns; a group with fewer than 2 is padded
// with its lowest free columns (as NM_FORMAT pads short groups). Needs n <= 2 (or 1:2), a
// group inside the row (4 q < in) and strictly increasing positions per N:M group
// (sp24_group_valid).
struct Group {
  uint32_t nibble;
  int64_t src[2];
};

SPARSEOPS_SP24_HD Group sp24_group(const uint8_t* meta_row, int n, int m, int bits, int64_t kept,
                                   int64_t q) {
  int cnt = 0;
  int col[2] = {0, 0};
  int64_t idx[2] = {-1, -1};
  if (m == 2) {  // two N:M groups of 2 (n = 1) per group of 4
    for (int h = 0; h < 2; ++h) {
      const int64_t j = 2 * q + h;
      if (j < kept) {
        col[cnt] = 2 * h + meta_position(meta_row, j, bits);
        idx[cnt] = j;
        ++cnt;
      }
    }
  } else {  // m >= 4: the group of 4 lies inside N:M group 4 q / m, at offset 4 q % m
    const int64_t mg = 4 * q / m;
    const int off = static_cast<int>(4 * q % m);
    for (int s = 0; s < n && cnt < 2; ++s) {
      const int64_t j = mg * n + s;
      const int p = meta_position(meta_row, j, bits);
      if (p >= off && p < off + 4) {
        col[cnt] = p - off;
        idx[cnt] = j;
        ++cnt;
      }
    }
  }
  Group gr;
  if (cnt == 2) {
    gr.nibble = static_cast<uint32_t>(col[0] | (col[1] << 2));
    gr.src[0] = idx[0];
    gr.src[1] = idx[1];
  } else if (cnt == 1) {  // pad with the lowest free column: 1 if the value is at 0, else 0
    if (col[0] == 0) {
      gr.nibble = 0x4u;  // (0, 1): the value in slot 0
      gr.src[0] = idx[0];
      gr.src[1] = -1;
    } else {
      gr.nibble = static_cast<uint32_t>(col[0] << 2);  // (0, col): the value in slot 1
      gr.src[0] = -1;
      gr.src[1] = idx[0];
    }
  } else {
    gr.nibble = kPadNibble;
    gr.src[0] = -1;
    gr.src[1] = -1;
  }
  return gr;
}

// True when N:M group g of a meta row has strictly increasing positions (what NM_FORMAT
// guarantees and the hardware's ordered metadata needs).
SPARSEOPS_SP24_HD bool sp24_group_valid(const uint8_t* meta_row, int n, int bits, int64_t g) {
  int prev = -1;
  for (int s = 0; s < n; ++s) {
    const int p = meta_position(meta_row, g * n + s, bits);
    if (p <= prev) return false;
    prev = p;
  }
  return true;
}

// The 16-bit metadata of one A row for 16 dense columns 16 c ... 16 c + 15 (c counts from
// column 0 of the row; 4 nibbles); rows >= out / columns >= in get kPadNibble.
SPARSEOPS_SP24_HD uint32_t sp24_half_word(const uint8_t* meta, int64_t meta_bytes, int n, int m,
                                          int bits, int64_t out, int64_t in, int64_t row,
                                          int64_t c) {
  uint32_t word = 0;
  for (int j = 0; j < 4; ++j) {
    const int64_t q = 4 * c + j;
    uint32_t nib = kPadNibble;
    if (row < out && 4 * q < in) {
      nib = sp24_group(meta + row * meta_bytes, n, m, bits, in / m * n, q).nibble;
    }
    word |= nib << (4 * j);
  }
  return word;
}

// hw meta word (mtile, kstep, w) (see the top of this file).
SPARSEOPS_SP24_HD uint32_t sp24_meta_word(const uint8_t* meta, int64_t meta_bytes, int n, int m,
                                          int bits, int64_t out, int64_t in, int64_t mtile,
                                          int64_t kstep, int w) {
  const int g = w >> 1, h = w & 1;
  const int64_t row = 16 * mtile + g;
  const int64_t c = 2 * kstep + h;
  return sp24_half_word(meta, meta_bytes, n, m, bits, out, in, row, c) |
         (sp24_half_word(meta, meta_bytes, n, m, bits, out, in, row + 8, c) << 16);
}

// ---------------------------------------------------------------------------------------------
// Tile configurations of the kernel. A CTA computes BM weight rows x BN rows of x; its warps
// form a WM x WN x WK grid: WM x WN split the output tile, WK splits each stage's columns
// (intra-CTA split-K for the small-batch configuration, reduced through shared memory at
// the end). A stage holds 64 * WK dense columns: per warp two k32 steps.
template <int BM_, int BN_, int WM_, int WN_, int WK_, int STAGES_>
struct Config {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, WK = WK_, STAGES = STAGES_;
  static constexpr int kWarps = WM * WN * WK;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBK = 64 * WK;                           // dense columns per stage
  static constexpr int kBKc = kBK / 2;                          // kept (2:4) columns per stage
  static constexpr int kMT = BM / WM / 16;                      // m16 tiles per warp
  static constexpr int kNT = BN / WN / 8;                       // n8 tiles per warp
  static constexpr int kAChunks = kBKc / 8;                     // 16-byte chunks per A row (values)
  static constexpr int kXChunks = kBK / 8;                      // 16-byte chunks per x row
  static constexpr int kMetaChunks = (BM / 16) * (2 * WK) * 4;  // 64 B per (m16 tile, k32 step)
  static constexpr int kABytes = BM * kAChunks * 16;
  static constexpr int kXBytes = BN * kXChunks * 16;
  static constexpr int kMetaBytes = kMetaChunks * 16;
  static constexpr int kStageBytes = kABytes + kXBytes + kMetaBytes;
  static constexpr int kRedStride = BM + 4;  // floats per epilogue row (bank spread)
  static constexpr int kRedBytes = WK * BN * kRedStride * 4;
  static constexpr int kSmemBytes =
      STAGES * kStageBytes > kRedBytes ? STAGES* kStageBytes : kRedBytes;
  static_assert(BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "warp tiles of whole mma tiles");
  static_assert(BM <= kMaxTileRows && kBK <= kMaxStageCols, "hw meta padding covers a tile");
  static_assert(kMaxStageCols % kBK == 0 && kMaxTileRows % BM == 0, "tiles never straddle pads");
  static_assert(kAChunks == 4 || kAChunks % 8 == 0, "swizzle needs 4 or a multiple of 8 chunks");
  static_assert(kXChunks % 8 == 0, "swizzle needs a multiple of 8 chunks");
};

// 16-byte chunk swizzle of a shared-memory row of `chunks` chunks: the 8 rows one ldmatrix
// phase reads at the same logical chunk land in 8 different 16-byte bank groups.
SPARSEOPS_SP24_HD int swizzle(int row, int chunk, int chunks) {
  return chunks >= 8 ? chunk ^ (row & 7) : chunk ^ ((row >> 1) & 3);
}

// Byte offsets inside one pipeline stage.
template <class C>
SPARSEOPS_SP24_HD int a_smem(int row, int chunk) {
  return (row * C::kAChunks + swizzle(row, chunk, C::kAChunks)) * 16;
}
template <class C>
SPARSEOPS_SP24_HD int x_smem(int row, int chunk) {
  return C::kABytes + (row * C::kXChunks + swizzle(row, chunk, C::kXChunks)) * 16;
}
template <class C>
SPARSEOPS_SP24_HD int meta_smem(int mtile, int kstep, int w) {
  return C::kABytes + C::kXBytes + ((mtile * 2 * C::WK + kstep) * 16 + w) * 4;
}

// One 16-byte cp.async of stage tile kt (fast path: 2:4, in % 16 == 0, aligned pointers).
// Chunk c in [0, kCopies): values rows, then x rows, then hw meta. `row`/`col` are global
// element coordinates (values: kept column; x: dense column; meta: byte offset in hw meta),
// `valid` false means zero-fill (rows past the end, columns past the row).
enum class Src : int { kValues = 0, kX = 1, kMeta = 2 };
struct Copy {
  Src src;
  int smem;
  int64_t row;
  int64_t col;
  bool valid;
};

template <class C>
SPARSEOPS_SP24_HD int copies() {
  return C::BM * C::kAChunks + C::BN * C::kXChunks + C::kMetaChunks;
}

template <class C>
SPARSEOPS_SP24_HD Copy stage_copy(int c, int64_t m0, int64_t n0, int64_t kt, int64_t out,
                                  int64_t rows, int64_t in, int64_t ksteps) {
  Copy cp;
  if (c < C::BM * C::kAChunks) {
    const int r = c / C::kAChunks, ch = c % C::kAChunks;
    cp.src = Src::kValues;
    cp.smem = a_smem<C>(r, ch);
    cp.row = m0 + r;
    cp.col = kt * C::kBKc + ch * 8;
    cp.valid = cp.row < out && cp.col < in / 2;
    return cp;
  }
  c -= C::BM * C::kAChunks;
  if (c < C::BN * C::kXChunks) {
    const int r = c / C::kXChunks, ch = c % C::kXChunks;
    cp.src = Src::kX;
    cp.smem = x_smem<C>(r, ch);
    cp.row = n0 + r;
    cp.col = kt * C::kBK + ch * 8;
    cp.valid = cp.row < rows && cp.col < in;
    return cp;
  }
  c -= C::BN * C::kXChunks;
  const int per_mtile = 2 * C::WK * 4;  // chunks of one m16 tile's k32 steps in this stage
  const int mt = c / per_mtile, piece = c % per_mtile;
  cp.src = Src::kMeta;
  cp.smem = C::kABytes + C::kXBytes + (mt * per_mtile + piece) * 16;
  cp.row = 0;
  cp.col = ((m0 / 16 + mt) * ksteps + kt * 2 * C::WK) * 64 + piece * 16;
  cp.valid = true;  // hw meta is padded to whole tiles
  return cp;
}

// Generic path (any n <= 2 pattern, any in, any alignment): element-wise loads.
// A item i in [0, BM * 16 WK): (row, group of 4 in the stage), written as 2 values (4 bytes).
template <class C>
SPARSEOPS_SP24_HD int a_items() {
  return C::BM * 16 * C::WK;
}
template <class C>
SPARSEOPS_SP24_HD int a_item_smem(int i, int& row, int& qq) {
  row = i / (16 * C::WK);
  qq = i % (16 * C::WK);
  return a_smem<C>(row, qq / 4) + (qq % 4) * 4;
}
// x item i in [0, BN * kBK / 2): (row, column pair), written as 2 values (4 bytes).
template <class C>
SPARSEOPS_SP24_HD int x_items() {
  return C::BN * C::kBK / 2;
}
template <class C>
SPARSEOPS_SP24_HD int x_item_smem(int i, int& row, int& pp) {
  row = i / (C::kBK / 2);
  pp = i % (C::kBK / 2);
  return x_smem<C>(row, pp / 4) + (pp % 4) * 4;
}

// Warp coordinates of warp `warp` (0 .. kWarps-1): wm fastest, then wn, then wk.
template <class C>
SPARSEOPS_SP24_HD void warp_coords(int warp, int& wm, int& wn, int& wk) {
  wm = warp % C::WM;
  wn = (warp / C::WM) % C::WN;
  wk = warp / (C::WM * C::WN);
}

// ldmatrix.x4 row address (byte offset in the stage) given by `lane` for the A fragment of
// m16 tile mt, k32 step s of warp (wm, wk): matrix j = lane >> 3 is rows + 8 (j & 1),
// kept columns + 8 (j >> 1): registers a0..a3 of the m16n8k32 A fragment.
template <class C>
SPARSEOPS_SP24_HD int a_ldmatrix(int lane, int wm, int wk, int mt, int s) {
  const int row = wm * (C::BM / C::WM) + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int chunk = wk * 4 + s * 2 + (lane >> 4);
  return a_smem<C>(row, chunk);
}
// ... for the B fragment (x) of n8 tile nt: matrix j is dense columns 8 j ... 8 j + 7 of the
// k32 step: registers b0..b3.
template <class C>
SPARSEOPS_SP24_HD int x_ldmatrix(int lane, int wn, int wk, int nt, int s) {
  const int row = wn * (C::BN / C::WN) + nt * 8 + (lane & 7);
  const int chunk = wk * 8 + s * 4 + (lane >> 3);
  return x_smem<C>(row, chunk);
}
// ... and the metadata word lane reads (32-bit shared load) for m16 tile mt, k32 step s.
template <class C>
SPARSEOPS_SP24_HD int meta_lds(int lane, int wm, int wk, int mt, int s) {
  return meta_smem<C>(wm * C::kMT + mt, 2 * wk + s, 2 * (lane >> 2) + (lane & 1));
}

// Epilogue: accumulator i (0..3) of tile (mt, nt) of lane -> fp32 slot in the reduction
// buffer [WK][BN][kRedStride] (rows of x major, so the final stores run along out).
template <class C>
SPARSEOPS_SP24_HD int red_slot(int lane, int wm, int wn, int wk, int mt, int nt, int i) {
  const int r = wm * (C::BM / C::WM) + mt * 16 + (lane >> 2) + 8 * (i >> 1);
  const int n = wn * (C::BN / C::WN) + nt * 8 + 2 * (lane & 3) + (i & 1);
  return (wk * C::BN + n) * C::kRedStride + r;
}

// The three configurations and when the launcher uses each (rows of x, weight rows, SMs).
using ConfigS = Config<32, 16, 2, 1, 4, 4>;    // decode: 8 warps split each stage's columns
using ConfigM = Config<64, 64, 2, 2, 1, 4>;    // medium batch; also the generic path
using ConfigL = Config<128, 128, 2, 4, 1, 3>;  // large batch
enum class ConfigId : int { kS = 0, kM = 1, kL = 2, kGeneric = 3 };

// The cp.async path needs 2:4, whole 16-byte chunks of values rows (in % 16 == 0) and
// 16-byte aligned x and values; anything else takes the generic (element-wise) path.
SPARSEOPS_SP24_HD bool fast_path(int64_t n, int64_t m, int64_t in, uint64_t x_addr,
                                 uint64_t values_addr) {
  return n == 2 && m == 4 && in % 16 == 0 && x_addr % 16 == 0 && values_addr % 16 == 0;
}

// Rows <= 16: S (per CTA 32 weight rows, so out / 32 CTAs stream the weight with 8 warps
// each); rows <= 64, or too few 128 x 128 tiles to fill the GPU once: M; else L.
inline ConfigId choose_config(int64_t rows, int64_t out, bool fast, int sms) {
  if (!fast) return ConfigId::kGeneric;
  if (rows <= 16) return ConfigId::kS;
  const int64_t tiles_l = ((rows + 127) / 128) * ((out + 127) / 128);
  if (rows <= 64 || tiles_l < sms) return ConfigId::kM;
  return ConfigId::kL;
}

}  // namespace sp24
}  // namespace sparseops
