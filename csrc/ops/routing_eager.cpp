// The routing ops' eager entry: what sparseops.topk_route / route / route_metadata call from
// Python before anything else. When nothing but the native CPU kernel would run (CPU tensors,
// no autograd to record, no mode, transform, tracer or profiler: eager_cpu_call), it calls
// the very C++ function the dispatcher would reach, with the same arguments, and returns its
// outputs; otherwise, and on any error, it returns NotImplemented and the caller takes the
// op (torch.ops.sparseops.*), which then raises its own error or runs what it runs. So the
// answers and the errors are the op's; only the dispatcher's per-call cost is skipped.
//
// Why raw METH_FASTCALL functions instead of pybind11 or torch.ops: at T = 1 the op call was
// ~4.3 us, of which the kernel is < 0.2 us; torch.ops' schema-driven argument conversion,
// two dispatcher passes (autograd, then CPU) and at::empty's dispatch were most of the rest
// (tools: benchmarks/percall_breakdown.py; 2-core EPYC, 2026-12-07).
#include "routing_eager.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

namespace sparseops {
namespace {

using at::Tensor;

// Argument conversion. Each accepts only the exact Python type the fast path handles and
// returns false otherwise: the op's argument parser then converts or rejects the value.
bool as_int(PyObject* o, int64_t& v) {
  if (!PyLong_CheckExact(o)) return false;  // bool is not exactly int
  int overflow = 0;
  v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

bool as_bool(PyObject* o, bool& v) {
  if (o != Py_True && o != Py_False) return false;
  v = o == Py_True;
  return true;
}

bool as_double(PyObject* o, double& v) {
  if (!PyFloat_CheckExact(o)) return false;
  v = PyFloat_AS_DOUBLE(o);
  return true;
}

bool as_str(PyObject* o, c10::string_view& v) {
  if (!PyUnicode_CheckExact(o)) return false;
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);  // cached in the object: no copy
  if (s == nullptr) {
    PyErr_Clear();
    return false;
  }
  v = c10::string_view(s, static_cast<size_t>(n));
  return true;
}

// torch.Tensor (or nn.Parameter, the same to C++) exactly: a subclass may override
// __torch_function__, which the op's Python binding would honour.
bool as_tensor(PyObject* o, const Tensor*& t) {
  if (!THPVariable_CheckExact(o)) return false;
  t = &THPVariable_Unpack(o);
  return true;
}

bool as_optional_tensor(PyObject* o, std::optional<Tensor>& t) {
  if (o == Py_None) return true;
  if (!THPVariable_CheckExact(o)) return false;
  t = THPVariable_Unpack(o);
  return true;
}

// The backend the caller resolved from backend= and the default (None = auto): only those
// that run the native CPU kernel take the fast path.
bool as_native_cpu_backend(PyObject* o, c10::string_view& v) {
  if (o == Py_None) {
    v = "auto";
    return true;
  }
  return as_str(o, v) && (v == "auto" || v == "cpu");
}

// A NamedTuple class (RouteMeta) instance holding `items` (new references, stolen).
PyObject* named_tuple(PyObject* cls, std::initializer_list<PyObject*> items) {
  auto* type = reinterpret_cast<PyTypeObject*>(cls);
  PyObject* t = type->tp_alloc(type, static_cast<Py_ssize_t>(items.size()));
  Py_ssize_t i = 0;
  for (PyObject* item : items) {
    if (t == nullptr || item == nullptr) {
      Py_XDECREF(item);
      continue;
    }
    PyTuple_SET_ITEM(t, i++, item);
  }
  if (t != nullptr && i != static_cast<Py_ssize_t>(items.size())) {
    Py_DECREF(t);
    return nullptr;
  }
  return t;
}

bool is_tuple_class(PyObject* cls) {
  return PyType_Check(cls) &&
         PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(cls), &PyTuple_Type) != 0;
}

PyObject* wrap(Tensor t) { return THPVariable_Wrap(std::move(t)); }

// A torch function mode (a TorchFunctionMode, `with torch.device(...)`) sees every
// torch.ops call from Python; it is no dispatch key, so eager_cpu_call cannot see it.
bool torch_function_mode_active() { return at::impl::torch_function_mode_enabled(); }

// Calls fn with the GIL released when the call is large (as torch.ops does for every call;
// below ~16K logits releasing and re-taking it costs more than the kernel).
template <typename Fn>
auto run(int64_t work, Fn&& fn) {
  if (work < 16384) return fn();
  pybind11::gil_scoped_release no_gil;
  return fn();
}

struct TopkArgs {
  const Tensor* logits = nullptr;
  int64_t k = 0, n_group = 1, topk_group = 1;
  c10::string_view scoring, order, group_scoring;
  bool renormalize = true;
  std::optional<Tensor> bias, mask;
  double scale = 1.0;
};

// args[0..10]: logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale,
// expert_mask, group_scoring (the schema's order).
bool parse_topk_args(PyObject* const* args, TopkArgs& a) {
  return as_tensor(args[0], a.logits) && as_int(args[1], a.k) && as_str(args[2], a.scoring) &&
         as_str(args[3], a.order) && as_bool(args[4], a.renormalize) &&
         as_optional_tensor(args[5], a.bias) && as_int(args[6], a.n_group) &&
         as_int(args[7], a.topk_group) && as_double(args[8], a.scale) &&
         as_optional_tensor(args[9], a.mask) && as_str(args[10], a.group_scoring);
}

// _topk_route_eager(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale,
//                   expert_mask, group_scoring, backend) -> (weights, ids) | NotImplemented
PyObject* topk_route_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TopkArgs a;
  c10::string_view backend;
  if (nargs != 12 || !parse_topk_args(args, a) || !as_native_cpu_backend(args[11], backend)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  try {
    if (torch_function_mode_active() ||
        !eager_cpu_call(*a.logits, a.bias, a.mask, /*differentiable=*/true)) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    auto [w, ids] = run(a.logits->numel(), [&] {
      return topk_route_op(*a.logits, a.k, a.scoring, a.order, a.renormalize, a.bias, a.n_group,
                           a.topk_group, a.scale, a.mask, a.group_scoring, backend);
    });
    PyObject* pw = wrap(std::move(w));
    PyObject* pi = wrap(std::move(ids));
    if (pw == nullptr || pi == nullptr) {
      Py_XDECREF(pw);
      Py_XDECREF(pi);
      return nullptr;
    }
    PyObject* out = PyTuple_Pack(2, pw, pi);
    Py_DECREF(pw);
    Py_DECREF(pi);
    return out;
  } catch (...) {
    Py_RETURN_NOTIMPLEMENTED;  // the op raises the same error, with its own message
  }
}

// _route_eager(logits, k, scoring, order, renormalize, bias, n_group, topk_group, scale,
//              expert_mask, group_scoring, block_m, backend, RouteMeta)
//   -> (weights, ids, RouteMeta(...)) | NotImplemented
PyObject* route_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  TopkArgs a;
  int64_t block_m = 0;
  c10::string_view backend;
  if (nargs != 14 || !parse_topk_args(args, a) || !as_int(args[11], block_m) ||
      !as_native_cpu_backend(args[12], backend) || !is_tuple_class(args[13])) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  try {
    if (torch_function_mode_active() ||
        !eager_cpu_call(*a.logits, a.bias, a.mask, /*differentiable=*/true)) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    RouteResult r = run(a.logits->numel(), [&] {
      return route_fused_cpu(*a.logits, a.k, a.scoring, a.order, a.renormalize, a.bias, a.n_group,
                             a.topk_group, a.scale, a.mask, a.group_scoring, block_m);
    });
    RouteMetadata& m = r.meta;
    PyObject* meta =
        block_m > 0 ? named_tuple(args[13], {wrap(m.counts), wrap(m.offs), wrap(m.sorted_slots),
                                             wrap(m.inverse), wrap(m.tokens), wrap(m.padded_slots),
                                             wrap(m.block_expert), wrap(m.padded_offs)})
                    : named_tuple(args[13], {wrap(m.counts), wrap(m.offs), wrap(m.sorted_slots),
                                             wrap(m.inverse), wrap(m.tokens)});
    if (meta == nullptr) return nullptr;
    PyObject* pw = wrap(std::move(r.weights));
    PyObject* pi = wrap(std::move(r.ids));
    if (pw == nullptr || pi == nullptr) {
      Py_XDECREF(pw);
      Py_XDECREF(pi);
      Py_DECREF(meta);
      return nullptr;
    }
    PyObject* out = PyTuple_Pack(3, pw, pi, meta);
    Py_DECREF(pw);
    Py_DECREF(pi);
    Py_DECREF(meta);
    return out;
  } catch (...) {
    Py_RETURN_NOTIMPLEMENTED;
  }
}

// _route_metadata_eager(ids, num_experts, block_m, backend, RouteMeta)
//   -> RouteMeta(...) | NotImplemented
PyObject* route_metadata_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const Tensor* ids = nullptr;
  int64_t num_experts = 0, block_m = 0;
  c10::string_view backend;
  if (nargs != 5 || !as_tensor(args[0], ids) || !as_int(args[1], num_experts) ||
      !as_int(args[2], block_m) || !as_native_cpu_backend(args[3], backend) ||
      !is_tuple_class(args[4])) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  try {
    if (torch_function_mode_active() ||
        !eager_cpu_call(*ids, std::nullopt, std::nullopt, /*differentiable=*/false)) {
      Py_RETURN_NOTIMPLEMENTED;
    }
    auto out = run(ids->numel() * 4,
                   [&] { return route_metadata_op(*ids, num_experts, block_m, backend); });
    auto& [counts, offs, sorted_slots, inverse, tokens, padded_slots, block_expert, padded_offs] =
        out;
    if (block_m > 0) {
      return named_tuple(args[4],
                         {wrap(counts), wrap(offs), wrap(sorted_slots), wrap(inverse), wrap(tokens),
                          wrap(padded_slots), wrap(block_expert), wrap(padded_offs)});
    }
    return named_tuple(args[4],
                       {wrap(counts), wrap(offs), wrap(sorted_slots), wrap(inverse), wrap(tokens)});
  } catch (...) {
    Py_RETURN_NOTIMPLEMENTED;
  }
}

PyMethodDef kMethods[] = {
    {"_topk_route_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(&topk_route_eager)),
     METH_FASTCALL,
     "topk_route's CPU kernel without the dispatcher, or NotImplemented (then call the op)."},
    {"_route_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(&route_eager)),
     METH_FASTCALL, "route's fused CPU kernel without the dispatcher, or NotImplemented."},
    {"_route_metadata_eager",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(&route_metadata_eager)), METH_FASTCALL,
     "route_metadata's CPU kernel without the dispatcher, or NotImplemented."},
};

}  // namespace

void bind_routing_eager(pybind11::module_& m) {
  for (PyMethodDef& def : kMethods) {
    PyObject* fn = PyCFunction_NewEx(&def, nullptr, m.attr("__name__").ptr());
    if (fn == nullptr) throw pybind11::error_already_set();
    m.attr(def.ml_name) = pybind11::reinterpret_steal<pybind11::object>(fn);
  }
}

}  // namespace sparseops
