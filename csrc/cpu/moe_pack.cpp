// The packed copies of expert weights the moe_mlp weight-stream kernel reads (layout in
// sparseops/moe_cpu.h), and their cache.
//
// Why a copy: the HF layout streams each output's weight row as its own 4 KB run, so a kernel
// that computes several outputs at once reads several short streams and reduces every dot
// product horizontally; a block of 64 output rows stored K-major is one sequential stream
// whose 64-byte lines each feed one broadcast multiply-add of 16 outputs. A 75 MB stream of
// bf16 blocks (one thread, the shared 2-core EPYC 9xx4, load 5, 2026-12-07, best / median of
// 100 interleaved passes) read 24.0 / 10.3 GB/s against 15.3 / 8.5 GB/s for four rows at a
// time in the HF layout.
//
// Why opt-in: the copy costs as much memory as the experts it holds (a Qwen3-30B-A3B layer:
// 1.2 GB of bf16), so only tensors passed to sparseops.prepack_moe_weights get one, as vLLM's
// CPU path repacks its weights once at load. An expert is packed the first time a forward
// uses it (the copy is allocated at once but its pages are touched only as experts are
// packed). Entries are keyed on the tensor's storage (held weakly: a freed tensor's entry
// is dropped at the next registration or lookup), data pointer, sizes, strides and dtype, and
// remember its version counter: an in-place update (an optimizer step, load_state_dict,
// copy_) moves the counter, and the next forward remakes the copy from the new values, on a
// fresh allocation so that a forward still reading the old copy on another thread is safe.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>

#include <cstdlib>
#endif

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "sparseops/moe_cpu.h"

namespace sparseops {
namespace moe_cpu {
namespace {

struct Entry {
  explicit Entry(c10::weak_intrusive_ptr<c10::StorageImpl> s) : storage(std::move(s)) {}
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  std::mutex mu;  // guards the fields below
  int64_t version = -1, groups = 0;
  bool vnni = false;
  PackedWeight packed;
  std::vector<char> done;  // [E] expert e is packed
  int64_t packed_experts = 0;
};

std::mutex g_mu;
std::vector<std::shared_ptr<Entry>> g_entries;

bool matches(const Entry& en, const at::Tensor& w) {
  return !en.storage.expired() &&
         en.storage._unsafe_get_target() == w.storage().unsafeGetStorageImpl() &&
         en.data == w.data_ptr() && en.dtype == w.scalar_type() && en.sizes == w.sizes().vec() &&
         en.strides == w.strides().vec();
}

// Drops the entries of freed tensors; g_mu held.
void sweep() {
  g_entries.erase(
      std::remove_if(g_entries.begin(), g_entries.end(),
                     [](const std::shared_ptr<Entry>& en) { return en->storage.expired(); }),
      g_entries.end());
}

std::shared_ptr<Entry> find(const at::Tensor& w) {
  std::lock_guard<std::mutex> lock(g_mu);
  sweep();
  for (const auto& en : g_entries)
    if (matches(*en, w)) return en;
  return nullptr;
}

// dst[c * kPackCols + i] = src[i * ld + c] for i < rows, c < cols: a transpose of elements of
// U bytes, in strips of 16 columns (one 64-byte line of each source row, 16 destination runs).
template <typename U>
void transpose_rows(const char* src, int64_t ld, int64_t rows, int64_t cols, char* dst) {
  constexpr int64_t kStrip = 16;
  for (int64_t c0 = 0; c0 < cols; c0 += kStrip) {
    const int64_t c1 = std::min(cols, c0 + kStrip);
    for (int64_t i = 0; i < rows; ++i) {
      const char* s = src + (i * ld) * sizeof(U);
      for (int64_t c = c0; c < c1; ++c) {
        U v;
        std::memcpy(&v, s + c * sizeof(U), sizeof(U));
        std::memcpy(dst + (c * kPackCols + i) * sizeof(U), &v, sizeof(U));
      }
    }
  }
}

// Block b of group g of expert e of w into dst (kPackCols * kp elements), zero padded. Rows of
// unit stride move as a transpose of whole elements (of bf16 pairs with vnni and an even K and
// row stride: 1.2 GB of Qwen3-30B-A3B bf16 took 4.2 s element by element, one thread); the
// other strides element by element.
template <typename T>
void pack_block(const at::Tensor& w, const PackedWeight& pw, int64_t e, int64_t g, int64_t b,
                T* dst) {
  const int64_t K = w.size(2), s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2);
  const int64_t row0 = g * pw.group_rows + b * kPackCols;
  const T* src = w.data_ptr<T>() + e * s0 + row0 * s1;
  std::memset(static_cast<void*>(dst), 0, kPackCols * pw.kp * sizeof(T));
  const int64_t rows = std::min<int64_t>(kPackCols, pw.group_rows - b * kPackCols);
  const char* sb = reinterpret_cast<const char*>(src);
  char* db = reinterpret_cast<char*>(dst);
  if (s2 == 1 && !pw.vnni) {
    if constexpr (sizeof(T) == 4) return transpose_rows<uint32_t>(sb, s1, rows, K, db);
    if constexpr (sizeof(T) == 2) return transpose_rows<uint16_t>(sb, s1, rows, K, db);
  }
  if (s2 == 1 && pw.vnni && sizeof(T) == 2 && K % 2 == 0 && s1 % 2 == 0)
    return transpose_rows<uint32_t>(sb, s1 / 2, rows, K / 2, db);
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = src + i * s1;
    if (pw.vnni) {
      for (int64_t k = 0; k < K; ++k) dst[(k >> 1) * 2 * kPackCols + 2 * i + (k & 1)] = row[k * s2];
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k * kPackCols + i] = row[k * s2];
    }
  }
}

// An uninitialised [E, per] tensor for the packed copy. On Linux it lies on 2 MB boundaries
// and is advised MADV_HUGEPAGE (transparent huge pages are "madvise" on many servers, this
// one included), so the stream walks 2 MB pages instead of 4 KB ones: the bf16 block
// stream above, on 150 MB, read 16.1-16.8 GB/s median (27-30 best) on huge pages against
// 9.1-9.4 (13-18) on 4 KB pages, one thread, load 6.5, 2026-12-07. The pages are faulted in
// as experts are packed: at most one 2 MB page past each packed expert holds a neighbour's
// untouched part.
at::Tensor alloc_packed(int64_t E, int64_t per, const at::Tensor& w) {
  const auto opts = w.options().requires_grad(false);
#if defined(__linux__)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(E * per) * w.element_size();
  if (bytes > 0) {
    const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, size);
    TORCH_CHECK(p != nullptr, "moe_mlp: could not allocate the ", size,
                " bytes of the packed copy of the expert weight of shape ", w.sizes());
#if defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // a hint: without it, 4 KB pages
#endif
    return at::from_blob(p, {E, per}, [](void* q) { std::free(q); }, opts);
  }
#endif
  return at::empty({E, per}, opts);
}

}  // namespace

void pack_register(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.layout() == at::kStrided && w.dim() == 3,
              "prepack_moe_weights: expected a CPU [E, N, K] expert weight, got ", w.device(),
              " tensor of shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 ||
                  w.scalar_type() == at::kHalf,
              "prepack_moe_weights: expected fp32, bf16 or fp16 weights, got ", w.scalar_type());
  TORCH_CHECK(!w.is_inference(), "prepack_moe_weights: the weight of shape ", w.sizes(),
              " is an inference tensor (made under torch.inference_mode), which has no version "
              "counter, so an in-place update could not be seen: make the weights outside "
              "inference_mode");
  std::lock_guard<std::mutex> lock(g_mu);
  sweep();
  for (const auto& en : g_entries)
    if (matches(*en, w)) return;
  auto en = std::make_shared<Entry>(w.storage().getWeakStorageImpl());
  en->data = w.data_ptr();
  en->sizes = w.sizes().vec();
  en->strides = w.strides().vec();
  en->dtype = w.scalar_type();
  g_entries.push_back(std::move(en));
}

bool pack_registered(const at::Tensor& w) { return !w.is_inference() && find(w) != nullptr; }

bool pack_unregister(const at::Tensor& w) {
  std::lock_guard<std::mutex> lock(g_mu);
  const auto it = std::find_if(g_entries.begin(), g_entries.end(),
                               [&](const std::shared_ptr<Entry>& en) { return matches(*en, w); });
  if (it == g_entries.end()) return false;
  g_entries.erase(it);
  return true;
}

void pack_clear() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_entries.clear();
}

std::pair<int64_t, int64_t> pack_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  sweep();
  int64_t bytes = 0;
  for (const auto& en : g_entries) {
    std::lock_guard<std::mutex> el(en->mu);
    if (en->packed.data.defined())
      bytes += en->packed_experts * en->packed.data.size(1) * en->packed.data.element_size();
  }
  return {static_cast<int64_t>(g_entries.size()), bytes};
}

bool packed_weight(const at::Tensor& w, int64_t groups, bool vnni,
                   const std::vector<int64_t>& experts, PackedWeight& out) {
  if (w.is_inference()) return false;
  const std::shared_ptr<Entry> en = find(w);
  if (!en) return false;
  std::lock_guard<std::mutex> lock(en->mu);
  const int64_t E = w.size(0), N = w.size(1), K = w.size(2);
  const int64_t version = w._version();
  if (!en->packed.data.defined() || en->version != version || en->groups != groups ||
      en->vnni != vnni) {
    PackedWeight pw;
    pw.groups = groups;
    pw.group_rows = N / groups;
    pw.group_pad = (pw.group_rows + kPackCols - 1) / kPackCols * kPackCols;
    pw.kp = vnni ? (K + 1) / 2 * 2 : K;
    pw.vnni = vnni;
    pw.data = alloc_packed(E, groups * pw.group_pad * pw.kp, w);
    en->packed = pw;
    en->version = version;
    en->groups = groups;
    en->vnni = vnni;
    en->done.assign(E, 0);
    en->packed_experts = 0;
  }
  std::vector<int64_t> todo;
  for (const int64_t e : experts)
    if (!en->done[e]) todo.push_back(e);
  if (!todo.empty()) {
    const PackedWeight& pw = en->packed;
    const int64_t nb = pw.group_pad / kPackCols, per = groups * nb;
    at::parallel_for(0, static_cast<int64_t>(todo.size()) * per, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t e = todo[i / per], g = i % per / nb, b = i % nb;
        void* dst = const_cast<void*>(pw.block(e, g, b));
        switch (w.scalar_type()) {
          case at::kFloat:
            pack_block<float>(w, pw, e, g, b, static_cast<float*>(dst));
            break;
          case at::kBFloat16:
            pack_block<c10::BFloat16>(w, pw, e, g, b, static_cast<c10::BFloat16*>(dst));
            break;
          default:
            pack_block<c10::Half>(w, pw, e, g, b, static_cast<c10::Half*>(dst));
            break;
        }
      }
    });
    for (const int64_t e : todo) en->done[e] = 1;
    en->packed_experts += static_cast<int64_t>(todo.size());
  }
  out = en->packed;
  return true;
}

}  // namespace moe_cpu
}  // namespace sparseops
