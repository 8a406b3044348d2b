// The one ordering rule every routing kernel (CPU and CUDA) uses to rank candidates: larger
// value first, lower index on ties. Kept in one place so the backends cannot drift apart
// (ids must be bitwise identical on every backend and the reference).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPARSEOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SPARSEOPS_HOST_DEVICE inline
#endif

namespace sparseops {

// True when candidate (va, a) ranks before (vb, b). Callers map NaN to -inf beforehand, so
// this is a strict weak order.
template <typename T, typename I>
SPARSEOPS_HOST_DEVICE bool ranks_before(T va, I a, T vb, I b) {
  return va > vb || (va == vb && a < b);
}

}  // namespace sparseops
