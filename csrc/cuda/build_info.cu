// Build facts only nvcc knows: __CUDA_ARCH_LIST__ is the list of arches this translation
// unit was compiled for (e.g. "800,900"), so build_info() reports what was really built.
#include <string>

#include "sparseops/build_info.h"

#define SPARSEOPS_STRINGIFY_IMPL(...) #__VA_ARGS__
#define SPARSEOPS_STRINGIFY(...) SPARSEOPS_STRINGIFY_IMPL(__VA_ARGS__)

namespace sparseops {

std::string compiled_cuda_arches() {
#ifdef __CUDA_ARCH_LIST__
  return SPARSEOPS_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace sparseops
