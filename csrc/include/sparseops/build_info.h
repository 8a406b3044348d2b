// Build facts reported by sparseops.build_info().
#pragma once

#include <string>

namespace sparseops {

// Comma-separated SM arches of the CUDA kernels in this build, e.g. "800,900".
std::string compiled_cuda_arches();

}  // namespace sparseops
