// What a validated plan depends on, tensor by tensor, and the test that it still holds: the
// same TensorImpl, dispatch keys, data pointer, dtype, device, sizes and strides, and (for a
// tensor the plan writes) a storage of its own. The persistent plans (ema/handle.h,
// optim/step_plan.h) run a step on their stored table only when every tensor passes; each test
// is a few loads, no Python and no refcount.
#pragma once
#include <c10/core/DispatchKey.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/impl/COW.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <cstdint>
#include <vector>

namespace eman_fused {

inline int64_t dtype_device_of(const c10::TensorImpl* impl) {
  const c10::Device d = impl->device();
  return static_cast<int64_t>(impl->dtype().toScalarType()) |
         (static_cast<int64_t>(d.type()) << 8) | (static_cast<int64_t>(d.index() + 1) << 16);
}

// Whether a tensor's storage is copy-on-write (torch._lazy_clone), shared with another tensor
// until one of them is written: a plan must not write its address then. Tested without
// materializing (the checks write nothing and may run on several threads); a re-plan
// materializes it and gets the tensor its own address.
inline bool copy_on_write(const c10::TensorImpl* impl) {
  return c10::impl::cow::is_cow_data_ptr(impl->unsafe_storage().data_ptr());
}

// Whether a call made now would reach the backend kernel directly: no Python dispatch mode,
// no functorch transform, autocast or inference mode (each changes the thread's key sets).
inline bool dispatcher_would_go_straight_to_kernel() {
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  return local.included_ == c10::default_included_set &&
         local.excluded_ == c10::default_excluded_set &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// Keys of tensors whose calls must go through the dispatcher: a subclass (Python key) or a
// functional/fake wrapper.
inline bool needs_dispatcher(c10::DispatchKeySet keys) {
  constexpr auto kNeedDispatcher = c10::DispatchKeySet({c10::DispatchKey::Python,
                                                        c10::DispatchKey::PythonTLSSnapshot,
                                                        c10::DispatchKey::Functionalize});
  return keys.has_any(kNeedDispatcher);
}

class TensorSnapshots {
 public:
  void clear() {
    seen_.clear();
    geometry_.clear();
  }
  void reserve(size_t n) { seen_.reserve(n), geometry_.reserve(3 * n); }
  // Remembers `impl` as it is now (a plain strided tensor: the caller checked).
  void add(const c10::TensorImpl* impl, bool written) {
    seen_.push_back({impl, impl->key_set().raw_repr(), impl->data(), dtype_device_of(impl),
                     static_cast<int64_t>(geometry_.size()), written});
    geometry_.push_back(impl->dim());
    geometry_.insert(geometry_.end(), impl->sizes().begin(), impl->sizes().end());
    geometry_.insert(geometry_.end(), impl->strides().begin(), impl->strides().end());
  }
  size_t size() const { return seen_.size(); }
  const c10::TensorImpl* impl(size_t k) const { return seen_[k].impl; }

  // Whether impls[k], for k in [first, last), are the remembered tensors, unchanged.
  bool unchanged_range(const c10::TensorImpl* const* impls, size_t first, size_t last) const {
    for (size_t k = first; k < last; ++k) {
      if (!unchanged(k, impls[k])) return false;
    }
    return true;
  }

  // Whether `impl` is remembered tensor k, unchanged.
  bool unchanged(size_t k, const c10::TensorImpl* impl) const {
    const Seen& seen = seen_[k];
    // The TensorImpl first: a new one (swap_tensors, a replaced object) may be of any kind,
    // and only a known plain one may be asked for its data and geometry.
    if (impl != seen.impl || impl->key_set().raw_repr() != seen.keys) return false;
    if (impl->data() != seen.data || dtype_device_of(impl) != seen.dtype_device) return false;
    if (seen.written && copy_on_write(impl)) return false;  // now shared with another tensor
    return same_geometry(geometry_.data() + seen.geometry, impl);
  }

  // Whether `impl` has the geometry of remembered tensor k (another tensor laid out alike).
  bool same_geometry_as(size_t k, const c10::TensorImpl* impl) const {
    return same_geometry(geometry_.data() + seen_[k].geometry, impl);
  }

 private:
  struct Seen {
    const c10::TensorImpl* impl;
    uint64_t keys;  // the dispatch key set: a plain tensor's, checked before asking for data
    const void* data;
    int64_t dtype_device;
    int64_t geometry;  // where its dim, sizes and strides start in geometry_
    bool written;
  };
  static bool same_geometry(const int64_t* g, const c10::TensorImpl* impl) {
    const int64_t dim = impl->dim();
    if (g[0] != dim) return false;
    const c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
    for (int64_t d = 0; d < dim; ++d) {
      if (g[1 + d] != sizes[d] || g[1 + dim + d] != strides[d]) return false;
    }
    return true;
  }
  std::vector<Seen> seen_;
  std::vector<int64_t> geometry_;
};

}  // namespace eman_fused
