// The sparse-tensor-core side of N:M on the CPU: the hardware-metadata builder (nm_sp24_meta's
// CPU kernel) and the emulators that prove the CUDA kernels (csrc/cuda/nm_sparse.cu) on a
// machine without a GPU (tests/test_nm_cuda.py).
//
// nm_linear's emulator replays the kernel's data flow CTA by CTA with the very functions the
// kernel computes its addresses with (sparseops/nm_sp24.h): the stage loads (cp.async chunks or
// the generic element-wise loads) into a byte image of shared memory, in the kernel's pipeline
// order (tile kt + STAGES - 1 loaded into its slot before tile kt is computed), the ldmatrix.x4
// fragments and metadata words every lane reads, mma.sp as the PTX ISA defines it (below,
// written from the ISA and independent of nm_sp24.h), and the epilogue. It also checks what
// the GPU would not report: every stage byte written exactly once, no bank conflict in any
// ldmatrix phase, every metadata nibble valid (idx0 < idx1). Shared memory starts poisoned
// (0xFF: NaN values, invalid nibbles), so a read of a byte no load wrote shows up.
//
// nm_compress's emulator runs the kernel's per-thread blocks (sparseops/nm_compress.h) over
// the whole weight, with the kernel's keys (|w| via float, or the scores) and block split.
#include "sparseops/nm_sp24.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sparseops/nm_compress.h"
#include "sparseops/nm_sparse.h"

namespace sparseops {
namespace {

using at::Tensor;
using namespace sp24;

// ---- The hardware model (PTX ISA 9.7.14.6 and 9.7.14.5.15) ------------------------------------

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

uint32_t load32(const std::vector<uint8_t>& smem, int64_t off) {
  TORCH_CHECK(off >= 0 && off + 4 <= static_cast<int64_t>(smem.size()) && off % 4 == 0,
              "emulator: shared-memory read out of bounds or misaligned at ", off);
  uint32_t v;
  std::memcpy(&v, smem.data() + off, 4);
  return v;
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: the 8 row addresses of matrix j come from lanes
// 8 j ... 8 j + 7 (16-byte aligned rows of 8 b16 elements); lane l receives in register j the
// elements (row l / 4, columns 2 (l % 4), 2 (l % 4) + 1) of matrix j. One phase per matrix:
// its 8 rows must fall in 8 distinct 16-byte bank groups to be conflict free.
void ldmatrix_x4(const std::vector<uint8_t>& smem, const int64_t (&addr)[32],
                 uint32_t (&reg)[32][4]) {
  for (int j = 0; j < 4; ++j) {
    uint32_t groups = 0;
    for (int r = 0; r < 8; ++r) {
      const int64_t a = addr[8 * j + r];
      TORCH_CHECK(a % 16 == 0, "emulator: ldmatrix row address ", a, " is not 16-byte aligned");
      groups |= 1u << ((a % 128) / 16);
    }
    TORCH_CHECK(groups == 0xFFu, "emulator: ldmatrix phase ", j, " has a bank conflict");
  }
  for (int l = 0; l < 32; ++l) {
    for (int j = 0; j < 4; ++j) reg[l][j] = load32(smem, addr[8 * j + l / 4] + 4 * (l % 4));
  }
}

// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{bf16,f16}.f32, selector 0.
// Lane l (g = l / 4, t = l % 4):
//  A (16 x 16 kept values of a 16 x 32 2:4 matrix): register j holds the two elements at row
//    g + 8 (j & 1), kept columns 2 t + 8 (j >> 1) + {0, 1} (the dense m16n8k16 A layout);
//  B (32 x 8): register j holds rows 8 j + 2 t + {0, 1} of column g;
//  metadata: group c (dense columns 4 c ... 4 c + 3) of row i is the nibble at bits
//    16 (i >= 8) + 4 (c % 4) of lane 4 (i % 8) + c / 4 (t = 0 holds columns 0-15, t = 1
//    16-31; lanes t >= 2 are not read); nibble = idx0 | idx1 << 2 with idx0 < idx1, and kept
//    columns 2 c, 2 c + 1 sit at dense columns 4 c + idx0, 4 c + idx1;
//  D (16 x 8 fp32): c_i is row g + 8 (i >> 1), column 2 t + (i & 1).
void mma_sp(float (&acc)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][4],
            const uint32_t (&e)[32], bool bf16) {
  float A[16][16], B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < 2; ++h) {
        const uint16_t av = static_cast<uint16_t>(a[l][j] >> (16 * h));
        const uint16_t bv = static_cast<uint16_t>(b[l][j] >> (16 * h));
        A[g + 8 * (j & 1)][2 * t + 8 * (j >> 1) + h] = half_bits_to_float(av, bf16);
        B[8 * j + 2 * t + h][g] = half_bits_to_float(bv, bf16);
      }
    }
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i) {
    int idx[8][2];
    for (int c = 0; c < 8; ++c) {
      const uint32_t word = e[4 * (i % 8) + c / 4];
      const uint32_t nib = (word >> (16 * (i / 8) + 4 * (c % 4))) & 0xFu;
      idx[c][0] = static_cast<int>(nib & 3u);
      idx[c][1] = static_cast<int>(nib >> 2);
      TORCH_CHECK(idx[c][0] < idx[c][1], "emulator: invalid metadata nibble ", nib, " (row ", i,
                  ", group ", c, ")");
    }
    for (int n = 0; n < 8; ++n) {
      float s = 0.f;
      for (int c = 0; c < 8; ++c) {
        s += A[i][2 * c] * B[4 * c + idx[c][0]][n];
        s += A[i][2 * c + 1] * B[4 * c + idx[c][1]][n];
      }
      D[i][n] = s;
    }
  }
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) acc[l][i] += D[l / 4 + 8 * (i >> 1)][2 * (l % 4) + (i & 1)];
  }
}

// ---- nm_linear_cuda_kernel, replayed ----------------------------------------------------------

struct Arrays {
  const uint8_t* x;  // [rows, in] 16-bit elements
  const uint8_t* values;
  const uint8_t* meta;
  const uint8_t* hw;
  int64_t rows, out, in, kept, meta_bytes, ksteps;
  int n, m, bits;
};

template <class C, typename T>
void load_stage(std::vector<uint8_t>& smem, std::vector<int>& writes, int slot, int64_t kt,
                int64_t m0, int64_t n0, const Arrays& p, bool fast) {
  const int64_t st = int64_t(slot) * C::kStageBytes;
  std::fill(writes.begin() + st, writes.begin() + st + C::kStageBytes, 0);
  auto put = [&](int off, const uint8_t* src, int bytes) {
    TORCH_CHECK(off >= 0 && off + bytes <= C::kStageBytes, "emulator: stage write out of range");
    for (int i = 0; i < bytes; ++i) {
      smem[st + off + i] = src ? src[i] : 0;
      ++writes[st + off + i];
    }
  };
  auto put_meta = [&](int c) {
    const Copy cp = stage_copy<C>(c, m0, n0, kt, p.out, p.rows, p.in, p.ksteps);
    TORCH_CHECK(cp.src == Src::kMeta, "emulator: chunk ", c, " is not a metadata chunk");
    put(cp.smem, p.hw + cp.col, 16);
  };
  for (int tid = 0; tid < C::kThreads; ++tid) {
    if (fast) {
      for (int c = tid; c < copies<C>(); c += C::kThreads) {
        const Copy cp = stage_copy<C>(c, m0, n0, kt, p.out, p.rows, p.in, p.ksteps);
        const uint8_t* src = nullptr;
        if (cp.src == Src::kMeta) {
          src = p.hw + cp.col;
        } else if (cp.valid) {
          src = cp.src == Src::kValues ? p.values + 2 * (cp.row * p.kept + cp.col)
                                       : p.x + 2 * (cp.row * p.in + cp.col);
        }
        put(cp.smem, src, 16);
      }
    } else {
      for (int i = tid; i < a_items<C>(); i += C::kThreads) {
        int r, qq;
        const int off = a_item_smem<C>(i, r, qq);
        const int64_t row = m0 + r, q = kt * 16 * C::WK + qq;
        uint8_t pair[4] = {0, 0, 0, 0};
        if (row < p.out && 4 * q < p.in) {
          const Group gr = sp24_group(p.meta + row * p.meta_bytes, p.n, p.m, p.bits, p.kept, q);
          for (int s = 0; s < 2; ++s) {
            if (gr.src[s] >= 0)
              std::memcpy(pair + 2 * s, p.values + 2 * (row * p.kept + gr.src[s]), 2);
          }
        }
        put(off, pair, 4);
      }
      for (int i = tid; i < x_items<C>(); i += C::kThreads) {
        int r, pp;
        const int off = x_item_smem<C>(i, r, pp);
        const int64_t row = n0 + r, col = kt * C::kBK + 2 * pp;
        uint8_t pair[4] = {0, 0, 0, 0};
        for (int s = 0; s < 2; ++s) {
          if (row < p.rows && col + s < p.in)
            std::memcpy(pair + 2 * s, p.x + 2 * (row * p.in + col + s), 2);
        }
        put(off, pair, 4);
      }
      const int first_meta = C::BM * C::kAChunks + C::BN * C::kXChunks;
      for (int c = tid; c < C::kMetaChunks; c += C::kThreads) put_meta(first_meta + c);
    }
  }
  for (int64_t i = st; i < st + C::kStageBytes; ++i) {
    TORCH_CHECK(writes[i] == 1, "emulator: stage byte ", i - st, " written ", writes[i],
                " times (each must be written exactly once)");
  }
}

template <class C, typename T>
void emulate_linear(const Arrays& p, const T* bias, T* y, bool fast) {
  const bool bf16 = std::is_same_v<T, c10::BFloat16>;
  const int64_t grid_x = (p.rows + C::BN - 1) / C::BN, grid_y = (p.out + C::BM - 1) / C::BM;
  const int64_t num_kt = (p.in + C::kBK - 1) / C::kBK;
  at::parallel_for(0, grid_x * grid_y, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> smem(C::kSmemBytes);
    std::vector<int> writes(C::kSmemBytes);
    // acc[warp][mt][nt][lane][i]
    std::vector<float> acc(static_cast<size_t>(C::kWarps) * C::kMT * C::kNT * 32 * 4);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = (blk % grid_x) * C::BN, m0 = (blk / grid_x) * C::BM;
      std::fill(smem.begin(), smem.end(), uint8_t{0xFF});
      std::fill(acc.begin(), acc.end(), 0.f);
      auto A = [&](int warp, int mt, int nt) {
        return reinterpret_cast<float(*)[4]>(acc.data() +
                                             (((warp * C::kMT + mt) * C::kNT + nt) * 32) * 4);
      };
      for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < num_kt) load_stage<C, T>(smem, writes, s, s, m0, n0, p, fast);
      }
      for (int64_t kt = 0; kt < num_kt; ++kt) {
        const int64_t next = kt + C::STAGES - 1;
        if (next < num_kt)
          load_stage<C, T>(smem, writes, static_cast<int>(next % C::STAGES), next, m0, n0, p, fast);
        const int64_t st = (kt % C::STAGES) * C::kStageBytes;
        for (int warp = 0; warp < C::kWarps; ++warp) {
          int wm, wn, wk;
          warp_coords<C>(warp, wm, wn, wk);
          for (int s = 0; s < 2; ++s) {
            uint32_t a[C::kMT][32][4], e[C::kMT][32], b[C::kNT][32][4];
            int64_t addr[32];
            for (int mt = 0; mt < C::kMT; ++mt) {
              for (int l = 0; l < 32; ++l) addr[l] = st + a_ldmatrix<C>(l, wm, wk, mt, s);
              ldmatrix_x4(smem, addr, a[mt]);
              for (int l = 0; l < 32; ++l)
                e[mt][l] = load32(smem, st + meta_lds<C>(l, wm, wk, mt, s));
            }
            for (int nt = 0; nt < C::kNT; ++nt) {
              for (int l = 0; l < 32; ++l) addr[l] = st + x_ldmatrix<C>(l, wn, wk, nt, s);
              ldmatrix_x4(smem, addr, b[nt]);
            }
            for (int mt = 0; mt < C::kMT; ++mt) {
              for (int nt = 0; nt < C::kNT; ++nt) {
                float(&c)[32][4] = *reinterpret_cast<float(*)[32][4]>(A(warp, mt, nt));
                mma_sp(c, a[mt], b[nt], e[mt], bf16);
              }
            }
          }
        }
      }
      // Epilogue: fp32 slots in shared memory (poisoned first), then the stores.
      std::vector<float> red(C::kRedBytes / 4, std::nanf(""));
      std::vector<int> red_writes(C::kRedBytes / 4, 0);
      for (int warp = 0; warp < C::kWarps; ++warp) {
        int wm, wn, wk;
        warp_coords<C>(warp, wm, wn, wk);
        for (int mt = 0; mt < C::kMT; ++mt) {
          for (int nt = 0; nt < C::kNT; ++nt) {
            float(*c)[4] = A(warp, mt, nt);
            for (int l = 0; l < 32; ++l) {
              for (int i = 0; i < 4; ++i) {
                const int slot = red_slot<C>(l, wm, wn, wk, mt, nt, i);
                TORCH_CHECK(slot >= 0 && slot < C::kRedBytes / 4,
                            "emulator: epilogue slot out of range");
                red[slot] = c[l][i];
                ++red_writes[slot];
              }
            }
          }
        }
      }
      for (int idx = 0; idx < C::BN * C::BM; ++idx) {
        const int nn = idx / C::BM, r = idx % C::BM;
        for (int k = 0; k < C::WK; ++k) {
          TORCH_CHECK(red_writes[(k * C::BN + nn) * C::kRedStride + r] == 1,
                      "emulator: epilogue slot written ",
                      red_writes[(k * C::BN + nn) * C::kRedStride + r], " times");
        }
        const int64_t row = n0 + nn, col = m0 + r;
        if (row < p.rows && col < p.out) {
          float v = 0.f;
          for (int k = 0; k < C::WK; ++k) v += red[(k * C::BN + nn) * C::kRedStride + r];
          if (bias != nullptr) v += static_cast<float>(bias[col]);
          y[row * p.out + col] = static_cast<T>(v);
        }
      }
    }
  });
}

// ---- nm_compress_cuda_kernel, replayed --------------------------------------------------------

template <typename T>
double abs_key(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return std::fabs(v);
  } else {
    return std::fabs(static_cast<double>(static_cast<float>(v)));
  }
}

template <typename T, int M>
void emulate_compress(const Tensor& w, const Tensor& scores, const Tensor& keep, const NMConfig& c,
                      Tensor& values, Tensor& meta, Tensor& mask) {
  constexpr int kMaxGroups = M == 2 ? 8 : M == 4 ? 4 : 2;  // as the kernel
  const int n = static_cast<int>(c.n), bits = c.bits;
  const int bg = nmc::block_groups(n, bits);
  TORCH_CHECK(bg <= kMaxGroups, "emulator: block of ", bg, " groups exceeds the kernel's bound");
  const int64_t blocks_per_row = (c.groups + bg - 1) / bg;
  const T* wp = w.data_ptr<T>();
  T* vp = nm_compress_out<T>(values);
  uint8_t* mp = nm_compress_out<uint8_t>(meta);
  bool* kp = nm_compress_out<bool>(mask);
  const Tensor s = scores.defined() ? scores.to(at::kDouble).contiguous() : Tensor();
  const double* sp = s.defined() ? s.data_ptr<double>() : nullptr;
  const bool* keepp = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  at::parallel_for(0, c.out * blocks_per_row, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t tid = t0; tid < t1; ++tid) {
      const int64_t row = tid / blocks_per_row, blk = tid % blocks_per_row;
      const int64_t g0 = blk * bg;
      const int groups = static_cast<int>(std::min<int64_t>(bg, c.groups - g0));
      const int64_t base = row * c.in + g0 * M;
      auto key = [&](int i) -> double {
        if (keepp != nullptr) return keepp[base + i] ? 1.0 : 0.0;
        if (sp != nullptr) return sp[base + i];
        return abs_key(wp[base + i]);
      };
      bool* mrow = kp != nullptr ? kp + base : nullptr;  // as the kernel: null = not wanted
      nmc::compress_block<M, kMaxGroups>(
          wp + base, key, n, bits, groups, vp != nullptr ? vp + row * c.kept + g0 * n : nullptr,
          [&](int i, bool k) {
            if (mrow != nullptr) mrow[i] = k;
          },
          mp != nullptr ? mp + row * c.meta_bytes + g0 * n * bits / 8 : nullptr);
    }
  });
}

}  // namespace

Tensor nm_sp24_meta_cpu_kernel(const Tensor& meta, const NMConfig& cfg, bool check) {
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  const int n = static_cast<int>(cfg.n), m = static_cast<int>(cfg.m), bits = cfg.bits;
  if (check) {
    for (int64_t r = 0; r < cfg.out; ++r) {
      for (int64_t g = 0; g < cfg.groups; ++g) {
        TORCH_CHECK(sp24_group_valid(mp + r * cfg.meta_bytes, n, bits, g), "meta is not a valid ",
                    n, ":", m, " NM_FORMAT meta: the kept positions of group ", g, " of row ", r,
                    " are not strictly increasing");
      }
    }
  }
  const int64_t mtiles = hw_mtiles(cfg.out), ksteps = hw_ksteps(cfg.in);
  Tensor hw = at::empty({mtiles, ksteps, 16}, meta.options().dtype(at::kInt));
  uint32_t* hp = reinterpret_cast<uint32_t*>(hw.data_ptr());
  at::parallel_for(0, mtiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t mt = t0; mt < t1; ++mt) {
      for (int64_t ks = 0; ks < ksteps; ++ks) {
        for (int w = 0; w < 16; ++w) {
          hp[(mt * ksteps + ks) * 16 + w] =
              sp24_meta_word(mp, cfg.meta_bytes, n, m, bits, cfg.out, cfg.in, mt, ks, w);
        }
      }
    }
  });
  return hw;
}

Tensor nm_sp24_emulate_cpu_kernel(const Tensor& x2d, const Tensor& values, const Tensor& meta,
                                  const Tensor& hw, const Tensor& bias, const NMConfig& cfg,
                                  int64_t config) {
  Arrays p;
  p.x = static_cast<const uint8_t*>(x2d.data_ptr());
  p.values = static_cast<const uint8_t*>(values.data_ptr());
  p.meta = meta.data_ptr<uint8_t>();
  p.hw = static_cast<const uint8_t*>(hw.data_ptr());
  p.rows = x2d.size(0);
  p.out = cfg.out;
  p.in = cfg.in;
  p.kept = cfg.kept;
  p.meta_bytes = cfg.meta_bytes;
  p.ksteps = hw.size(1);
  p.n = static_cast<int>(cfg.n);
  p.m = static_cast<int>(cfg.m);
  p.bits = cfg.bits;
  Tensor y = at::empty({p.rows, p.out}, x2d.options());
  const auto id = static_cast<ConfigId>(config);
  // The kernel's own choice of path (the pointers are what it would see).
  const bool fast = fast_path(cfg.n, cfg.m, cfg.in, reinterpret_cast<uint64_t>(p.x),
                              reinterpret_cast<uint64_t>(p.values));
  TORCH_CHECK(id == ConfigId::kGeneric || fast, "config ", config,
              " is a fast-path configuration, and these inputs take the generic path");
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* b = bias.defined() ? bias.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    switch (id) {
      case ConfigId::kS:
        emulate_linear<ConfigS, T>(p, b, yp, true);
        break;
      case ConfigId::kM:
        emulate_linear<ConfigM, T>(p, b, yp, true);
        break;
      case ConfigId::kL:
        emulate_linear<ConfigL, T>(p, b, yp, true);
        break;
      default:
        emulate_linear<ConfigM, T>(p, b, yp, false);
        break;
    }
  };
  if (x2d.scalar_type() == at::kBFloat16) {
    run(c10::BFloat16());
  } else {
    run(c10::Half());
  }
  return y;
}

void nm_compress_emulate_cpu_kernel(const Tensor& w, const Tensor& scores, const Tensor& keep,
                                    const NMConfig& cfg, Tensor& values, Tensor& meta,
                                    Tensor& mask) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, w.scalar_type(), "nm_compress_emulate", [&] {
        switch (cfg.m) {
          case 2:
            emulate_compress<scalar_t, 2>(w, scores, keep, cfg, values, meta, mask);
            break;
          case 4:
            emulate_compress<scalar_t, 4>(w, scores, keep, cfg, values, meta, mask);
            break;
          case 8:
            emulate_compress<scalar_t, 8>(w, scores, keep, cfg, values, meta, mask);
            break;
          default:
            emulate_compress<scalar_t, 16>(w, scores, keep, cfg, values, meta, mask);
            break;
        }
      });
}

}  // namespace sparseops
