// Core of the CPU emulator of the fused MaxSim CUDA forward (see maxsim_cuda_emulator.cpp for
// what it emulates and how): fibers for the threads of a block, the warp collectives from
// their PTX definitions, cp.async with poisoned destinations until the group retires. No
// torch dependency, so the block body can also be driven from a plain C++ program.
#pragma once

#if defined(__linux__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "sparseops/maxsim_fused.cuh"

namespace sparseops {
namespace maxsim_fused {
namespace emu {

#if defined(__linux__)

enum class Op { kNone, kSyncThreads, kSyncWarp, kShfl, kLdmatrix, kMma };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncThreads:
      return "bar.sync";
    case Op::kSyncWarp:
      return "bar.warp.sync";
    case Op::kShfl:
      return "shfl.xor";
    case Op::kLdmatrix:
      return "ldmatrix";
    case Op::kMma:
      return "mma";
    default:
      return "none";
  }
}

struct PendingCopy {
  char* dst;
  const char* src;
  int bytes;
};

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  Op waiting = Op::kNone;
  // Collective payload in / result out.
  uint32_t shfl_value = 0;
  int shfl_mask = 0;
  const char* ld_addr = nullptr;
  uint32_t regs[4] = {0, 0, 0, 0};
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0};
  bool fp16 = false;
  // cp.async groups: committed groups in order, then the open one.
  std::vector<std::vector<PendingCopy>> groups;
  std::vector<PendingCopy> open;
};

struct Range {
  const char* lo;
  const char* hi;
};

struct Block {
  int64_t id = 0;
  int nthreads = 0;
  std::vector<char> smem;
  std::vector<Thread> threads;
  ucontext_t scheduler;
  std::string error;
  std::vector<Range> global;  // readable global ranges for cp.async sources
  const Params* params = nullptr;
  void (*body)(Block&, int) = nullptr;
};

inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// IEEE binary16 -> binary32 (exact).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void fail(const std::string& what) { throw std::runtime_error(what); }

// The Arch of one emulated thread.
struct EmuArch {
  Block* blk;
  int me;
  Thread& self() { return blk->threads[me]; }
  int tid() const { return me; }
  int64_t block() const { return blk->id; }
  char* smem() const { return blk->smem.data(); }

  void yield(Op op) {
    self().waiting = op;
    swapcontext(&self().ctx, &blk->scheduler);
  }
  void syncthreads() { yield(Op::kSyncThreads); }
  void syncwarp() { yield(Op::kSyncWarp); }

  void check_smem(const char* p, int bytes, const char* what) {
    const char* lo = blk->smem.data();
    if (p < lo || p + bytes > lo + blk->smem.size()) {
      fail(std::string(what) + ": shared-memory access out of bounds (offset " +
           std::to_string(p - lo) + ", size " + std::to_string(blk->smem.size()) + ")");
    }
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 && bytes == 16)
      fail(std::string(what) + ": unaligned 16-byte access");
  }

  void cp_async16(char* dst, const char* src, int src_bytes) {
    check_smem(dst, 16, "cp.async dst");
    if (src_bytes != 0 && src_bytes != 16) fail("cp.async: src-size must be 0 or 16");
    if (src_bytes) {
      if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: unaligned global source");
      bool inside = false;
      for (const Range& r : blk->global) inside |= src >= r.lo && src + 16 <= r.hi;
      if (!inside) fail("cp.async: global read out of bounds");
    }
    std::memset(dst, 0xff, 16);  // poisoned until the group retires
    self().open.push_back({dst, src, src_bytes});
  }
  void cp_async_commit() {
    self().groups.push_back(std::move(self().open));
    self().open.clear();
  }
  template <int N>
  void cp_async_wait() {
    auto& g = self().groups;
    while (int(g.size()) > N) {
      for (const PendingCopy& c : g.front()) {
        if (c.bytes)
          std::memcpy(c.dst, c.src, 16);
        else
          std::memset(c.dst, 0, 16);
      }
      g.erase(g.begin());
    }
  }
  void ldmatrix_x4(uint32_t (&r)[4], const char* p) {
    check_smem(p, 16, "ldmatrix");
    self().ld_addr = p;
    yield(Op::kLdmatrix);
    for (int i = 0; i < 4; ++i) r[i] = self().regs[i];
  }
  template <class Tag>
  void mma_impl(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool fp16) {
    Thread& t = self();
    for (int i = 0; i < 4; ++i) {
      t.a[i] = a[i];
      t.c[i] = d[i];
    }
    t.b[0] = b0;
    t.b[1] = b1;
    t.fp16 = fp16;
    yield(Op::kMma);
    for (int i = 0; i < 4; ++i) d[i] = t.c[i];
  }
  void mma(BF16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_impl<BF16>(d, a, b0, b1, false);
  }
  void mma(FP16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_impl<FP16>(d, a, b0, b1, true);
  }
  uint32_t shfl_bits(uint32_t v, int mask) {
    self().shfl_value = v;
    self().shfl_mask = mask;
    yield(Op::kShfl);
    return self().shfl_value;
  }
  float shfl_xor(float v, int mask) { return bits_float(shfl_bits(float_bits(v), mask)); }
  int32_t shfl_xor(int32_t v, int mask) { return int32_t(shfl_bits(uint32_t(v), mask)); }
  void lds16(uint32_t (&w)[4], const char* p) {
    check_smem(p, 16, "ld.shared.v4");
    std::memcpy(w, p, 16);
  }
  float bits_to_float(uint32_t b) { return bits_float(b); }
  float half_to_float(BF16, uint16_t h) { return bits_float(uint32_t(h) << 16); }
  float half_to_float(FP16, uint16_t h) { return half_bits_to_float(h); }
  float fma(float x, float y, float z) { return std::fma(x, y, z); }
};

inline float elem(uint32_t reg, int half, bool fp16) {
  const uint16_t h = uint16_t(reg >> (16 * half));
  return fp16 ? half_bits_to_float(h) : bits_float(uint32_t(h) << 16);
}

// The collective of warp w, once all its 32 lanes wait on it.
inline void run_warp_collective(Block& blk, int w) {
  Thread* lanes = &blk.threads[w * kWarpSize];
  const Op op = lanes[0].waiting;
  for (int l = 1; l < kWarpSize; ++l) {
    if (lanes[l].waiting != op) {
      fail("warp " + std::to_string(w) + " diverged: lane 0 at " + op_name(op) + ", lane " +
           std::to_string(l) + " at " + op_name(lanes[l].waiting));
    }
  }
  if (op == Op::kShfl) {
    uint32_t v[kWarpSize];
    for (int l = 0; l < kWarpSize; ++l) {
      if (lanes[l].shfl_mask != lanes[0].shfl_mask) fail("shfl.xor: lanes disagree on the mask");
      v[l] = lanes[l].shfl_value;
    }
    for (int l = 0; l < kWarpSize; ++l) lanes[l].shfl_value = v[l ^ lanes[0].shfl_mask];
  } else if (op == Op::kLdmatrix) {
    for (int l = 0; l < kWarpSize; ++l) {
      for (int i = 0; i < 4; ++i) {
        const char* row = lanes[8 * i + l / 4].ld_addr;
        std::memcpy(&lanes[l].regs[i], row + 4 * (l % 4), 4);
      }
    }
  } else if (op == Op::kMma) {
    const bool fp16 = lanes[0].fp16;
    float A[16][16], B[16][8];
    for (int l = 0; l < kWarpSize; ++l) {
      const int g = l / 4, t = l % 4;
      const Thread& x = lanes[l];
      for (int e = 0; e < 2; ++e) {
        A[g][2 * t + e] = elem(x.a[0], e, fp16);
        A[g + 8][2 * t + e] = elem(x.a[1], e, fp16);
        A[g][2 * t + 8 + e] = elem(x.a[2], e, fp16);
        A[g + 8][2 * t + 8 + e] = elem(x.a[3], e, fp16);
        B[2 * t + e][g] = elem(x.b[0], e, fp16);
        B[2 * t + 8 + e][g] = elem(x.b[1], e, fp16);
      }
    }
    float D[kWarpSize][4];
    for (int l = 0; l < kWarpSize; ++l) {
      const int g = l / 4, t = l % 4;
      for (int c = 0; c < 4; ++c) {
        const int row = g + (c >= 2 ? 8 : 0), col = 2 * t + (c & 1);
        double s = 0.0;
        for (int k = 0; k < 16; ++k) s += double(A[row][k]) * double(B[k][col]);
        D[l][c] = float(double(lanes[l].c[c]) + s);
      }
    }
    for (int l = 0; l < kWarpSize; ++l)
      for (int c = 0; c < 4; ++c) lanes[l].c[c] = D[l][c];
  }
  for (int l = 0; l < kWarpSize; ++l) lanes[l].waiting = Op::kNone;
}

inline void fiber_entry(unsigned hi, unsigned lo, int me) {
  Block* blk = reinterpret_cast<Block*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  try {
    blk->body(*blk, me);
  } catch (const std::exception& e) {
    if (blk->error.empty()) blk->error = "thread " + std::to_string(me) + ": " + e.what();
  }
  blk->threads[me].done = true;
  blk->threads[me].waiting = Op::kNone;
  // Returning resumes uc_link (the scheduler).
}

// Runs block `blk` to completion; throws on divergence, deadlock or a failed check. Fiber
// stacks are kept across blocks.
inline void run_block(Block& blk) {
  constexpr size_t kStack = 128 * 1024;
  if (int(blk.threads.size()) != blk.nthreads) blk.threads = std::vector<Thread>(blk.nthreads);
  for (int i = 0; i < blk.nthreads; ++i) {
    Thread& t = blk.threads[i];
    if (t.stack.size() != kStack) t.stack.resize(kStack);
    t.done = false;
    t.waiting = Op::kNone;
    t.groups.clear();
    t.open.clear();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &blk.scheduler;
    const uintptr_t ptr = reinterpret_cast<uintptr_t>(&blk);
    makecontext(&t.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 3, unsigned(ptr >> 32),
                unsigned(ptr & 0xffffffffu), i);
  }
  const int nwarps = blk.nthreads / kWarpSize;
  while (true) {
    bool ran = false;
    for (int i = 0; i < blk.nthreads; ++i) {
      Thread& t = blk.threads[i];
      if (t.done || t.waiting != Op::kNone) continue;
      ran = true;
      swapcontext(&blk.scheduler, &t.ctx);
      if (!blk.error.empty()) throw std::runtime_error(blk.error);
    }
    bool released = false;
    for (int w = 0; w < nwarps; ++w) {
      Thread* lanes = &blk.threads[w * kWarpSize];
      bool all = true, any_done = false, any_cta = false;
      for (int l = 0; l < kWarpSize; ++l) {
        any_done |= lanes[l].done;
        all &= lanes[l].waiting != Op::kNone;
        any_cta |= lanes[l].waiting == Op::kSyncThreads;
      }
      if (all && !any_cta) {
        run_warp_collective(blk, w);
        released = true;
      } else if (any_done && !all) {
        for (int l = 0; l < kWarpSize; ++l) {
          if (!lanes[l].done && lanes[l].waiting != Op::kNone &&
              lanes[l].waiting != Op::kSyncThreads) {
            fail("warp " + std::to_string(w) + ": some lanes exited while others wait at " +
                 op_name(lanes[l].waiting));
          }
        }
      }
    }
    int at_bar = 0, done = 0;
    for (const Thread& t : blk.threads) {
      at_bar += t.waiting == Op::kSyncThreads;
      done += t.done;
    }
    if (done == blk.nthreads) break;
    if (at_bar + done == blk.nthreads && at_bar > 0) {
      if (done > 0) fail("bar.sync reached by only some threads of the block (others exited)");
      for (Thread& t : blk.threads) t.waiting = Op::kNone;
      released = true;
    }
    if (!ran && !released) {
      // Every live thread waits, and no collective can complete: mixed warp / block waits.
      fail("deadlock: threads wait at different barriers or collectives");
    }
  }
  for (const Thread& t : blk.threads) {
    if (!t.groups.empty() || !t.open.empty()) {
      bool pending = !t.open.empty();
      for (const auto& g : t.groups) pending |= !g.empty();
      if (pending) fail("a thread exited with cp.async copies still in flight");
    }
  }
}

template <class K>
void block_body(Block& blk, int me) {
  EmuArch a{&blk, me};
  maxsim_block<K>(a, *blk.params);
}

template <class K>
void emulate_grid(Params& p, int64_t max_smem, int max_warps, int64_t ctas,
                  std::vector<Range> global) {
  int64_t smem = 0;
  if (!plan_block<K>(p, max_smem, max_warps, smem)) {
    throw std::runtime_error("maxsim emulator: dim " + std::to_string(p.dim) + " does not fit " +
                             std::to_string(max_smem) + " bytes of shared memory");
  }
  // Default: up to 3 blocks, so that documents are shared out and cut between warps.
  p.ctas = int(ctas > 0 ? ctas : std::min<int64_t>(3, std::max<int64_t>(1, p.nd)));
  Block blk;
  blk.nthreads = p.warps * kWarpSize;
  blk.global = std::move(global);
  blk.params = &p;
  blk.body = &block_body<K>;
  for (int64_t b = 0; b < p.ctas; ++b) {
    blk.id = b;
    // Garbage, not zeros: the body must not rely on shared memory starting at 0.
    blk.smem.assign(size_t(smem), char(0x5a));
    run_block(blk);
  }
}

#endif  // __linux__

}  // namespace emu
}  // namespace maxsim_fused
}  // namespace sparseops
