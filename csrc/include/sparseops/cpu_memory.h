// Memory advice shared by the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparseops {

// Fresh large outputs come from mmap and fault in 4 KB at a time on their first write; with
// transparent huge pages in "madvise" mode (this KVM guest, many servers) nothing asks for
// 2 MB pages unless told. Measured on the 2-core EPYC (2026-12-07): 64 MB of route_metadata
// output took 46 ms to fill on 4 KB pages and 9 ms after this advice; the 96 MB of a bf16
// 11008x4096 2:4 prune 50-75 ms against ~25 ms. Only above kFreshMapBytes, glibc's largest
// mmap threshold: smaller blocks come from the heap, whose pages are recycled from call to
// call without faulting, and advising them made each call fault whole 2 MB pages back in
// (a 25 MB grouped_mm weight gradient spent 68 % of its time in clear_page under
// do_huge_pmd_anonymous_page). A hint on the 2 MB-aligned interior of a tensor the caller is
// about to write in full; without THP, or on pages already touched, nothing changes, and
// errors are ignored (and an undefined tensor, an output nobody asked for, is skipped).
constexpr size_t kFreshMapBytes = size_t(32) << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!t.defined()) return;
  const size_t bytes = t.nbytes();
  if (bytes <= kFreshMapBytes) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace sparseops
