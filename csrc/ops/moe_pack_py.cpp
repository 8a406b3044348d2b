// Python hooks of the moe_mlp CPU packed-weight cache (csrc/cpu/moe_pack.cpp), bound on
// sparseops._C and wrapped by sparseops.prepack_moe_weights and friends
// (python/sparseops/ops/moe.py).
#include <torch/extension.h>

#include "sparseops/moe_cpu.h"

namespace sparseops {

void bind_moe_pack(pybind11::module_& m) {
  m.def("moe_pack_register", &moe_cpu::pack_register,
        "Give this [E, N, K] CPU expert weight a packed copy for the moe_mlp stream kernel.");
  m.def("moe_pack_unregister", &moe_cpu::pack_unregister,
        "Drop the packed copy of this weight; False if it had none.");
  m.def("moe_pack_clear", &moe_cpu::pack_clear, "Drop every packed copy.");
  m.def(
      "moe_pack_stats",
      [] {
        const auto s = moe_cpu::pack_stats();
        pybind11::dict d;
        d["tensors"] = s.first;
        d["packed_bytes"] = s.second;
        return d;
      },
      "Registered weights (alive) and the bytes of their packed experts.");
}

}  // namespace sparseops
